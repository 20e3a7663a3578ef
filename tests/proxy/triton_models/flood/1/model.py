"""Flood model for bench/stream_path_bench.py (not the real model): no engine, only the path
after it.

Every streamed request gets `max_tokens` (from its sampling parameters) responses of one token
each, as fast as Triton takes them: one sender thread serves all requests in turn, one token
per request per pass, as the real engine sends one token per sequence per step. Each response
carries the tensors the real model's carry (text, index, finish reason, token counts), the
last one has finish reason `length` and the FINAL flag. Cancellation is honoured: a cancelled
request gets an empty FINAL response and no more tokens. A non-streamed request gets all its
tokens in one response; a `describe` request gets `{}` (the contract's default limits).
"""

import json
import queue
import threading

import numpy as np
import triton_python_backend_utils as pb_utils

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
TOKEN_TEXT = " tok"  # 4 bytes: about one English BPE token
# `is_cancelled` is a round trip with tritonserver like a `send`: checked with every token it
# would halve the rate this model is here to measure; every 16 tokens it costs ~6 %.
CANCEL_CHECK_TOKENS = 16
DEFAULT_TOKENS = 16  # a request without max_tokens


class TritonPythonModel:
    def initialize(self, args):
        self._incoming = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_all, name="flood-sender", daemon=True)
        self._sender.start()

    def execute(self, requests):
        for request in requests:
            if _scalar(request, "describe", False):
                text = pb_utils.Tensor("text_output", np.array([b"{}"], dtype=np.object_))
                response = pb_utils.InferenceResponse(output_tensors=[text])
                request.get_response_sender().send(response, flags=FINAL)
            elif _scalar(request, "stream", False):
                self._incoming.put(_Stream(request))
            else:
                _answer_at_once(request)
        return None

    def finalize(self):
        self._incoming.put(None)
        self._sender.join(timeout=10)

    def _send_all(self):
        active = []
        while True:
            try:
                while True:  # every waiting request joins before the next pass
                    stream = self._incoming.get(block=not active)
                    if stream is None:
                        return
                    active.append(stream)
            except queue.Empty:
                pass
            active = [stream for stream in active if not stream.step()]


class _Stream:
    def __init__(self, request):
        self._sender = request.get_response_sender()
        self._total = max(1, _max_tokens(request))
        self._prompt_tokens = len(_scalar(request, "messages", b"").split())
        self._sent = 0

    def step(self) -> bool:
        """Send the next token (or the end of a cancelled request); True once finished."""
        try:
            if self._sent and self._sent % CANCEL_CHECK_TOKENS == 0:
                if self._sender.is_cancelled():
                    self._sender.send(flags=FINAL)
                    return True
            self._sent += 1
            last = self._sent == self._total
            response = _response(TOKEN_TEXT, "length" if last else "", self._prompt_tokens, 1)
            self._sender.send(response, flags=FINAL if last else 0)
            return last
        except Exception:  # a failed send (the request is gone) ends this stream alone
            return True


def _answer_at_once(request):
    tokens = max(1, _max_tokens(request))
    prompt_tokens = len(_scalar(request, "messages", b"").split())
    response = _response(TOKEN_TEXT * tokens, "length", prompt_tokens, tokens)
    request.get_response_sender().send(response, flags=FINAL)


def _max_tokens(request) -> int:
    raw = _scalar(request, "sampling_parameters", b"{}")
    return int(json.loads(raw.decode("utf-8")).get("max_tokens", DEFAULT_TOKENS))


def _scalar(request, name, default):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return tensor.as_numpy().reshape(-1)[0] if tensor is not None else default


def _response(text, finish_reason, prompt_tokens, output_tokens):
    def text_tensor(name, value):
        return pb_utils.Tensor(name, np.array([value.encode("utf-8")], dtype=np.object_))

    def count_tensor(name, value):
        return pb_utils.Tensor(name, np.array([value], dtype=np.uint32))

    return pb_utils.InferenceResponse(
        output_tensors=[
            text_tensor("text_output", text),
            count_tensor("index", 0),
            text_tensor("finish_reason", finish_reason),
            count_tensor("num_input_tokens", prompt_tokens),
            count_tensor("num_image_tokens", 0),
            count_tensor("num_video_tokens", 0),
            count_tensor("num_output_tokens", output_tokens),
        ]
    )
