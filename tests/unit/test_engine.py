"""The generation path in-process with the tiny checkpoint (no Triton)."""
import dataclasses
import json
import threading

import pytest

from sample_images import encoded_image
from qwen_vl_backend.checkpoint import load_checkpoint
from qwen_vl_backend.engine import SerialEngine, generate
from qwen_vl_backend.errors import EngineFullError, RequestError
from qwen_vl_backend.prepare import RawRequest, prepare
from qwen_vl_backend.settings import ModelSettings


class RecordingSink:
    def __init__(self, cancel_after_sends=None):
        self.sends, self.final, self.error = [], None, None
        self._cancel_after = cancel_after_sends
        self.done = threading.Event()

    def is_cancelled(self):
        return self._cancel_after is not None and len(self.sends) >= self._cancel_after

    def send(self, text, num_tokens, prompt_tokens):
        self.sends.append((text, num_tokens))

    def finish(self, text, num_tokens, prompt_tokens, finish_reason):
        self.final = (text, num_tokens, prompt_tokens, finish_reason)
        self.done.set()

    def fail(self, error):
        self.error = error
        self.done.set()

    def cancelled(self):
        self.final = "cancelled"
        self.done.set()

    @property
    def streamed_text(self):
        return "".join(t for t, _ in self.sends) + self.final[0]


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint_path):
    return load_checkpoint(tiny_checkpoint_path, "cpu", "float32")


SETTINGS = ModelSettings()


def run(checkpoint, content, stream, images=(), **sampling):
    raw = RawRequest(request_id="t", messages=json.dumps([{"role": "user", "content": content}]),
                     images=list(images), stream=stream, exclude_input_in_output=True,
                     sampling_parameters=json.dumps({"max_tokens": 24, "temperature": 0, **sampling}))
    sink = RecordingSink()
    generate(prepare(raw, checkpoint, SETTINGS), checkpoint, sink)
    return sink


@pytest.mark.parametrize("content", ["Describe a cat.", "这张图片里有什么？请描述。",
                                     [{"type": "image"}, {"type": "text", "text": "What is it?"}]])
def test_stream_equals_non_stream_and_counts_match(checkpoint, content):
    images = [encoded_image()] if isinstance(content, list) else []
    streamed = run(checkpoint, content, True, images)
    whole = run(checkpoint, content, False, images)
    assert streamed.streamed_text == whole.final[0] != ""
    assert sum(n for _, n in streamed.sends) + streamed.final[1] == whole.final[1] == 24
    assert whole.final[3] == "length"
    assert all(t and "\ufffd" not in t[-1:] for t, _ in streamed.sends)


def test_output_depends_on_the_prompt(checkpoint):
    # Guards against a degenerate checkpoint where every prompt yields the same tokens.
    assert run(checkpoint, "alpha", False).final[0] != run(checkpoint, "omega beta", False).final[0]


def test_image_tokens_count_in_the_prompt(checkpoint):
    text_only = run(checkpoint, [{"type": "text", "text": "x"}], False)
    with_image = run(checkpoint, [{"type": "image"}, {"type": "text", "text": "x"}], False,
                     [encoded_image(size=(112, 112))])
    # 112x112 → a 4x4 grid of 28-pixel patches merged 2x2 → 16 image tokens (+2 vision markers).
    assert with_image.final[2] - text_only.final[2] == 16 + 2


def test_same_seed_same_sampled_text(checkpoint):
    a = run(checkpoint, "hello", False, temperature=1.0, seed=7)
    b = run(checkpoint, "hello", False, temperature=1.0, seed=7)
    assert a.final[0] == b.final[0]


def test_stop_string_ends_generation_with_stop(checkpoint):
    full = run(checkpoint, "Describe a cat.", False).final[0]
    stop = full[5:8]
    stopped = run(checkpoint, "Describe a cat.", False, stop=[stop])
    assert stopped.final[0] == full[:full.index(stop)]
    assert stopped.final[3] == "stop"


def test_context_overflow_is_a_request_error(checkpoint):
    raw = RawRequest(messages=json.dumps([{"role": "user", "content": "hi"}]))
    with pytest.raises(RequestError, match="maximum context length"):
        prepare(raw, dataclasses.replace(checkpoint, max_model_len=5), SETTINGS)


def test_engine_cancels_between_steps_and_serves_the_next_request(checkpoint):
    engine = SerialEngine(checkpoint, SETTINGS)
    try:
        raw = RawRequest(request_id="c", messages=json.dumps([{"role": "user", "content": "go"}]),
                         stream=True, sampling_parameters=json.dumps({"max_tokens": 500}))
        cancelled = RecordingSink(cancel_after_sends=2)
        engine.submit(raw, cancelled)
        assert cancelled.done.wait(30) and cancelled.final == "cancelled"
        assert len(cancelled.sends) <= 3
        bad, good = RecordingSink(), RecordingSink()
        engine.submit(RawRequest(request_id="b", messages="[oops"), bad)
        engine.submit(RawRequest(request_id="g", messages=raw.messages), good)
        assert good.done.wait(30) and good.final is not None
        assert isinstance(bad.error, RequestError)
    finally:
        assert engine.shutdown(10)


def test_engine_refuses_beyond_its_queue(checkpoint):
    engine = SerialEngine(checkpoint, ModelSettings(max_queued_requests=1))
    gate = threading.Event()
    try:
        blocker = RecordingSink()
        blocker.is_cancelled = lambda: not gate.wait(30)  # holds the worker until released
        raw = RawRequest(messages=json.dumps([{"role": "user", "content": "x"}]))
        engine.submit(raw, blocker)
        for _ in range(50):  # wait until the worker has taken the blocker off the queue
            if engine._queue.empty():
                break
            threading.Event().wait(0.02)
        engine.submit(raw, RecordingSink())
        with pytest.raises(EngineFullError):
            engine.submit(raw, RecordingSink())
    finally:
        gate.set()
        assert engine.shutdown(30)
