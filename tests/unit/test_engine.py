"""The batching engine in-process with the tiny checkpoint (no Triton)."""
import dataclasses
import json
import threading

import pytest

from sample_images import encoded_image
from qwen_vl_backend.checkpoint import load_checkpoint
from qwen_vl_backend.engine import BatchingEngine
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

    def send(self, chunk):
        if chunk.finish_reason:
            self.final = chunk
            self.done.set()
        else:
            self.sends.append(chunk)

    def fail(self, error):
        self.error = error
        self.done.set()

    def cancelled(self):
        self.final = "cancelled"
        self.done.set()

    def wait(self):
        assert self.done.wait(60), "no final response"
        assert self.error is None, self.error
        return self

    @property
    def streamed_text(self):
        return "".join(c.text for c in self.sends) + self.final.text


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint_path):
    return load_checkpoint(tiny_checkpoint_path, "cpu", "float32")


SETTINGS = ModelSettings()


@pytest.fixture(scope="module")
def engine(checkpoint):
    engine = BatchingEngine(checkpoint, SETTINGS)
    yield engine
    assert engine.shutdown(30)


def raw_request(content, stream=False, images=(), **sampling):
    sampling = {"max_tokens": 24, "temperature": 0, **sampling}
    return RawRequest(request_id="t", messages=json.dumps([{"role": "user", "content": content}]),
                      images=list(images), stream=stream, exclude_input_in_output=True,
                      sampling_parameters=json.dumps(sampling))


def run(engine, content, stream=False, images=(), **sampling):
    sink = RecordingSink()
    engine.submit(raw_request(content, stream, images, **sampling), sink)
    return sink.wait()


IMAGE_PROMPT = [{"type": "image"}, {"type": "text", "text": "What is it?"}]


@pytest.mark.parametrize("content", ["Describe a cat.", "这张图片里有什么？请描述。", IMAGE_PROMPT])
def test_stream_equals_non_stream_and_counts_match(engine, content):
    images = [encoded_image()] if isinstance(content, list) else []
    streamed = run(engine, content, True, images)
    whole = run(engine, content, False, images)
    assert streamed.streamed_text == whole.final.text != ""
    assert sum(c.num_tokens for c in streamed.sends) + streamed.final.num_tokens == whole.final.num_tokens == 24
    assert whole.final.finish_reason == "length"
    assert all(c.text for c in streamed.sends)


def test_output_depends_on_the_prompt(engine):
    # Guards against a degenerate checkpoint where every prompt yields the same tokens.
    assert run(engine, "alpha").final.text != run(engine, "omega beta").final.text


def test_image_tokens_are_counted(engine):
    text_only = run(engine, [{"type": "text", "text": "x"}])
    with_image = run(engine, [{"type": "image"}, {"type": "text", "text": "x"}],
                     images=[encoded_image(size=(112, 112))])
    # 112x112 → a 4x4 grid of 28-pixel patches merged 2x2 → 16 image tokens (+2 vision markers).
    assert with_image.final.image_tokens == 16 and text_only.final.image_tokens == 0
    assert with_image.final.prompt_tokens - text_only.final.prompt_tokens == 16 + 2


def test_same_seed_same_sampled_text_and_different_seed_differs(engine):
    a = run(engine, "hello", temperature=1.0, seed=7, max_tokens=40)
    b = run(engine, "hello", temperature=1.0, seed=7, max_tokens=40)
    c = run(engine, "hello", temperature=1.0, seed=8, max_tokens=40)
    assert a.final.text == b.final.text != c.final.text


def test_stop_string_ends_generation_with_stop(engine):
    full = run(engine, "Describe a cat.").final.text
    stop = full[5:8]
    stopped = run(engine, "Describe a cat.", stop=[stop])
    assert stopped.final.text == full[:full.index(stop)]
    assert stopped.final.finish_reason == "stop"


def test_logprobs_cover_every_token_and_greedy_picks_the_top_one(engine):
    result = run(engine, "hi", logprobs=True, top_logprobs=3, max_tokens=8)
    entries = result.final.logprobs
    assert len(entries) == result.final.num_tokens == 8
    for entry in entries:
        assert len(entry["top_logprobs"]) == 3
        assert entry["logprob"] == pytest.approx(entry["top_logprobs"][0]["logprob"])
        assert entry["logprob"] <= 0 and isinstance(entry["bytes"], list)


def test_penalties_change_the_output(engine):
    plain = run(engine, "repeat after me", max_tokens=40).final.text
    penalised = run(engine, "repeat after me", max_tokens=40, frequency_penalty=2.0,
                    presence_penalty=2.0, repetition_penalty=3.0).final.text
    assert plain != penalised


def test_context_overflow_uses_vllms_wording(checkpoint):
    small = dataclasses.replace(checkpoint, max_model_len=40)
    with pytest.raises(RequestError) as err:
        prepare(raw_request("hi", max_tokens=30), small, SETTINGS)
    assert err.value.code == "context_length_exceeded" and err.value.param == "max_tokens"
    assert "maximum context length is 40 tokens" in err.value.message
    with pytest.raises(RequestError, match="your messages resulted in"):
        prepare(raw_request("hi " * 50), small, SETTINGS)


def test_greedy_tokens_are_identical_alone_and_batched(checkpoint):
    """Prompts of different lengths, with and without images, decoded together in fp32."""
    prompts = [("Describe a cat.", []), ("这张图片里有什么？请详细描述一下。", []),
               (IMAGE_PROMPT, [encoded_image(size=(112, 84))]),
               ([{"type": "text", "text": "Compare"}, {"type": "image"}, {"type": "image"}],
                [encoded_image(size=(56, 56), color=(0, 90, 0)), encoded_image("PNG", size=(140, 84))])]
    alone_engine = BatchingEngine(checkpoint, dataclasses.replace(SETTINGS, max_batch_size=1))
    try:
        alone = [run(alone_engine, c, images=i, max_tokens=32).final for c, i in prompts]
        assert alone_engine.stats.largest_batch == 1
    finally:
        assert alone_engine.shutdown(30)
    batched_engine = BatchingEngine(checkpoint, SETTINGS)
    try:
        sinks = [RecordingSink() for _ in prompts]
        for (content, images), sink in zip(prompts, sinks):
            batched_engine.submit(raw_request(content, images=images, max_tokens=32), sink)
        batched = [s.wait().final for s in sinks]
        assert batched_engine.stats.largest_batch >= 3, "the requests never shared a decode step"
    finally:
        assert batched_engine.shutdown(30)
    for one, other in zip(alone, batched):
        assert one.text == other.text and one.num_tokens == other.num_tokens
    # And both equal HF `generate`, the reference implementation of the model's decoding.
    for (content, images), one in zip(prompts, alone):
        assert one.text == hf_generate_text(checkpoint, raw_request(content, images=images, max_tokens=32))


def hf_generate_text(checkpoint, raw):
    import torch

    request = prepare(raw, checkpoint, SETTINGS)
    with torch.inference_mode():
        out = checkpoint.model.generate(**request.inputs, max_new_tokens=request.max_new_tokens,
                                        do_sample=False)
    return checkpoint.decode(out[0, request.prompt_tokens:])


def test_cancel_stops_within_a_step_and_the_next_request_is_served(engine):
    # Seed 1 runs 213 tokens before EOS uncancelled, so "cancelled" is the only way to end early.
    raw = raw_request("go", stream=True, max_tokens=500, temperature=1.0, seed=1)
    cancelled = RecordingSink(cancel_after_sends=2)
    engine.submit(raw, cancelled)
    assert cancelled.done.wait(30) and cancelled.final == "cancelled"
    assert len(cancelled.sends) <= 3
    bad, good = RecordingSink(), RecordingSink()
    engine.submit(RawRequest(request_id="b", messages="[oops"), bad)
    engine.submit(raw_request("hello"), good)
    good.wait()
    assert bad.done.wait(5) and isinstance(bad.error, RequestError)


def test_engine_refuses_beyond_its_queue(checkpoint):
    engine = BatchingEngine(checkpoint, dataclasses.replace(SETTINGS, max_queued_requests=1))
    gate = threading.Event()
    try:
        blocker = RecordingSink()
        blocker.is_cancelled = lambda: not gate.wait(30)  # holds the worker until released
        engine.submit(raw_request("x"), blocker)
        for _ in range(100):  # wait until the worker has taken the blocker off the queue
            if engine._queue.empty():
                break
            threading.Event().wait(0.02)
        engine.submit(raw_request("x"), RecordingSink())
        with pytest.raises(EngineFullError):
            engine.submit(raw_request("x"), RecordingSink())
    finally:
        gate.set()
        assert engine.shutdown(30)


def test_request_larger_than_the_cache_budget_is_refused(checkpoint):
    engine = BatchingEngine(checkpoint, dataclasses.replace(SETTINGS, max_cache_tokens=50))
    try:
        sink = RecordingSink()
        engine.submit(raw_request("hello", max_tokens=100), sink)
        assert sink.done.wait(30) and isinstance(sink.error, RequestError)
    finally:
        assert engine.shutdown(30)


def test_a_failing_metrics_observer_does_not_break_generation(checkpoint):
    from qwen_vl_backend.engine import EngineObserver

    class Broken(EngineObserver):
        def prefilled(self, *args):
            raise RuntimeError("metrics backend gone")

        def decoded(self, *args):
            raise RuntimeError("metrics backend gone")

    engine = BatchingEngine(checkpoint, SETTINGS, observer=Broken())
    try:
        assert run(engine, "still works").final.num_tokens == 24
    finally:
        assert engine.shutdown(30)
