"""The tensors model.py's TritonSink puts in each streamed response (no tritonserver: a
stand-in for triton_python_backend_utils records them)."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest

from proxy.transport.contract import Output
from qwen_vl_backend.engine.responses import OutputChunk
from qwen_vl_backend.request.prepare import RawRequest

MODEL_PY = Path(__file__).resolve().parents[2] / "model_repository/qwen2_5_vl/1/model.py"


class _Tensor:
    def __init__(self, name, array):
        self.name, self.array = name, array


class _Response:
    def __init__(self, output_tensors=None, error=None):
        self.tensors = {t.name: t.array for t in output_tensors or []}


class _Sender:
    def __init__(self):
        self.sent = []

    def send(self, response=None, flags=0):
        self.sent.append(response)


class _Request:
    def __init__(self):
        self.sender = _Sender()

    def get_response_sender(self):
        return self.sender


@pytest.fixture(scope="module")
def model_module():
    fake = types.ModuleType("triton_python_backend_utils")
    fake.Tensor, fake.InferenceResponse = _Tensor, _Response
    fake.TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
    saved = sys.modules.get("triton_python_backend_utils")
    sys.modules["triton_python_backend_utils"] = fake
    try:
        spec = importlib.util.spec_from_file_location("qwen_vl_triton_model", MODEL_PY)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        if saved is None:
            sys.modules.pop("triton_python_backend_utils", None)
        else:
            sys.modules["triton_python_backend_utils"] = saved


def _chunk(index=0, finish_reason=None, final=False):
    return OutputChunk(
        text="x",
        num_tokens=1,
        prompt_tokens=11,
        image_tokens=4,
        video_tokens=0,
        index=index,
        finish_reason=finish_reason,
        final=final,
    )


def test_prompt_counts_go_with_each_choices_first_and_last_chunk(model_module):
    request = _Request()
    raw = RawRequest(
        request_id="r",
        return_finish_reason=True,
        return_num_input_tokens=True,
        return_num_output_tokens=True,
    )
    sink = model_module.TritonSink(request, raw)
    for chunk in (
        _chunk(0),
        _chunk(1),
        _chunk(0),
        _chunk(1),
        _chunk(0, finish_reason="length"),
        _chunk(1, finish_reason="stop", final=True),
    ):
        sink.send(chunk)
    sent = [response.tensors for response in request.sender.sent]
    counts = {Output.NUM_INPUT_TOKENS, Output.NUM_IMAGE_TOKENS, Output.NUM_VIDEO_TOKENS}
    with_counts = [i for i, tensors in enumerate(sent) if counts <= tensors.keys()]
    assert with_counts == [0, 1, 4, 5]
    assert all(not (counts & tensors.keys()) for i, tensors in enumerate(sent) if i in (2, 3))
    assert int(sent[0][Output.NUM_INPUT_TOKENS][0]) == 11
    finishes = [tensors.get(Output.FINISH_REASON) for tensors in sent]
    assert [f is not None for f in finishes] == [False] * 4 + [True, True]
    assert finishes[4][0] == b"length"
    assert all(
        Output.NUM_OUTPUT_TOKENS in tensors and Output.TEXT_OUTPUT in tensors for tensors in sent
    )


def test_the_stop_string_goes_with_the_chunk_it_ended(model_module):
    request = _Request()
    sink = model_module.TritonSink(request, RawRequest(request_id="r", return_finish_reason=True))
    sink.send(_chunk())
    last = _chunk(finish_reason="stop", final=True)
    last.stop_reason = "END"
    sink.send(last)
    first, final = (response.tensors for response in request.sender.sent)
    assert Output.STOP_REASON not in first
    assert final[Output.STOP_REASON][0] == b"END"


def test_counts_are_not_sent_unless_asked(model_module):
    request = _Request()
    sink = model_module.TritonSink(request, RawRequest(request_id="r"))
    sink.send(_chunk(finish_reason="stop", final=True))
    # media_cache_hits goes on every request's last response (the proxy counts it per replica)
    assert set(request.sender.sent[0].tensors) == {
        Output.TEXT_OUTPUT,
        Output.INDEX,
        Output.MEDIA_CACHE_HITS,
    }


def test_the_last_response_carries_the_media_cache_hits(model_module):
    request = _Request()
    sink = model_module.TritonSink(request, RawRequest(request_id="r"))
    sink.send(_chunk())
    last = _chunk(finish_reason="stop", final=True)
    last.media_cache_hits = 3
    sink.send(last)
    first, final = (response.tensors for response in request.sender.sent)
    assert Output.MEDIA_CACHE_HITS not in first
    assert list(final[Output.MEDIA_CACHE_HITS]) == [3]


def test_timings_prompt_logprobs_and_the_repetition_flag_go_when_set(model_module):
    import json

    request = _Request()
    sink = model_module.TritonSink(request, RawRequest(request_id="r", return_timings=True))
    first = _chunk()
    first.prompt_logprobs = [None, {"5": {"logprob": -1.0, "rank": 1, "decoded_token": "a"}}]
    last = _chunk(finish_reason="stop", final=True)
    last.repetition_detected, last.timings = True, {"queue": 0.25, "ttft": 1.0}
    sink.send(first)
    sink.send(last)
    sent_first, sent_last = (response.tensors for response in request.sender.sent)
    assert json.loads(sent_first[Output.PROMPT_LOGPROBS][0]) == first.prompt_logprobs
    assert Output.TIMINGS not in sent_first and Output.REPETITION_DETECTED not in sent_first
    assert json.loads(sent_last[Output.TIMINGS][0]) == {"queue": 0.25, "ttft": 1.0}
    assert bool(sent_last[Output.REPETITION_DETECTED][0]) is True
    assert Output.PROMPT_LOGPROBS not in sent_last


def test_an_unknown_adapter_goes_out_as_not_found(model_module, monkeypatch):
    from qwen_vl_backend.contract import decode_error
    from qwen_vl_backend.errors import NotFoundError, RequestError

    class TritonError:
        INVALID_ARG, NOT_FOUND, INTERNAL = "invalid", "not found", "internal"

        def __init__(self, message, code):
            self.message, self.code = message, code

    monkeypatch.setattr(model_module.pb_utils, "TritonError", TritonError, raising=False)
    raw = RawRequest(request_id="r")
    missing = model_module._triton_error(NotFoundError("The model 'x' does not exist."), raw)
    assert missing.code == TritonError.NOT_FOUND
    error = decode_error(missing.message)
    assert (error.kind, error.param, error.code) == ("not_found", "model", "model_not_found")
    invalid = model_module._triton_error(RequestError("bad", "lora_path"), raw)
    assert invalid.code == TritonError.INVALID_ARG
    assert decode_error(invalid.message).kind == "invalid_request"
