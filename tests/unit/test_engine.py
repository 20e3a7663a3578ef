"""The batching engine in-process with the tiny checkpoint (no Triton)."""

import dataclasses
import json
import threading

import pytest
from sample_images import encoded_image

from qwen_vl_backend.engine.batching import BatchingEngine
from qwen_vl_backend.errors import EngineFullError, RequestError
from qwen_vl_backend.modeling.checkpoint import load_checkpoint
from qwen_vl_backend.request.prepare import RawRequest, prepare
from qwen_vl_backend.settings import ModelSettings


class RecordingSink:
    def __init__(self, cancel_after_sends=None):
        self.sends, self.final, self.error = [], None, None
        self._cancel_after = cancel_after_sends
        self.done = threading.Event()

    def is_cancelled(self):
        return self._cancel_after is not None and len(self.sends) >= self._cancel_after

    def send(self, chunk):
        if chunk.final:
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
    return RawRequest(
        request_id="t",
        messages=json.dumps([{"role": "user", "content": content}]),
        images=list(images),
        stream=stream,
        exclude_input_in_output=True,
        sampling_parameters=json.dumps(sampling),
    )


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
    assert (
        sum(c.num_tokens for c in streamed.sends) + streamed.final.num_tokens
        == whole.final.num_tokens
        == 24
    )
    assert whole.final.finish_reason == "length"
    assert all(c.text for c in streamed.sends)


def test_output_depends_on_the_prompt(engine):
    # Guards against a degenerate checkpoint where every prompt yields the same tokens.
    assert run(engine, "alpha").final.text != run(engine, "omega beta").final.text


def test_image_tokens_are_counted(engine):
    text_only = run(engine, [{"type": "text", "text": "x"}])
    with_image = run(
        engine,
        [{"type": "image"}, {"type": "text", "text": "x"}],
        images=[encoded_image(size=(112, 112))],
    )
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
    assert stopped.final.text == full[: full.index(stop)]
    assert stopped.final.finish_reason == "stop"
    assert stopped.final.stop_reason == stop  # which one ended it: Anthropic's stop_sequence
    assert run(engine, "Describe a cat.").final.stop_reason is None


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
    penalised = run(
        engine,
        "repeat after me",
        max_tokens=40,
        frequency_penalty=2.0,
        presence_penalty=2.0,
        repetition_penalty=3.0,
    ).final.text
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
    prompts = [
        ("Describe a cat.", []),
        ("这张图片里有什么？请详细描述一下。", []),
        (IMAGE_PROMPT, [encoded_image(size=(112, 84))]),
        (
            [{"type": "text", "text": "Compare"}, {"type": "image"}, {"type": "image"}],
            [encoded_image(size=(56, 56), color=(0, 90, 0)), encoded_image("PNG", size=(140, 84))],
        ),
    ]
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
        assert one.text == hf_generate_text(
            checkpoint, raw_request(content, images=images, max_tokens=32)
        )


def hf_generate_text(checkpoint, raw):
    import torch

    request = prepare(raw, checkpoint, SETTINGS)
    with torch.inference_mode():
        out = checkpoint.model.generate(
            **request.inputs, max_new_tokens=request.max_new_tokens, do_sample=False
        )
    return checkpoint.decode(out[0, request.prompt_tokens :])


def test_cancel_ends_the_stream_and_the_next_request_is_served(engine):
    # Seed 1 runs 213 tokens before EOS uncancelled, so "cancelled" is the only way to end early
    # (cancellation is polled every cancel_poll_ms, far less than 213 steps take).
    raw = raw_request("go", stream=True, max_tokens=500, temperature=1.0, seed=1)
    cancelled = RecordingSink(cancel_after_sends=2)
    engine.submit(raw, cancelled)
    assert cancelled.done.wait(30) and cancelled.final == "cancelled"
    assert sum(c.num_tokens for c in cancelled.sends) < 213
    bad, good = RecordingSink(), RecordingSink()
    engine.submit(RawRequest(request_id="b", messages="[oops"), bad)
    engine.submit(raw_request("hello"), good)
    good.wait()
    assert bad.done.wait(5) and isinstance(bad.error, RequestError)


def test_engine_refuses_beyond_its_queue(checkpoint):
    """Requests still being prepared count against the queue: nothing piles up unbounded."""
    engine = BatchingEngine(checkpoint, dataclasses.replace(SETTINGS, max_queued_requests=1))
    gate = threading.Event()
    try:
        blocker = RecordingSink()
        blocker.is_cancelled = lambda: not gate.wait(30)  # holds its preparation until released
        engine.submit(raw_request("x"), blocker)
        with pytest.raises(EngineFullError):
            engine.submit(raw_request("x"), RecordingSink())
        gate.set()
        blocker.wait()
        run(engine, "room again")
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
    from qwen_vl_backend.engine.batching import EngineObserver

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


# ---- the token-budget scheduler, the slot cache, n > 1, the image cache ----------------------

MIXED_PROMPTS = [
    ("Describe a cat.", []),
    ("这张图片里有什么？请详细描述一下。", []),
    (IMAGE_PROMPT, [encoded_image(size=(112, 84))]),
    (
        [{"type": "text", "text": "Compare"}, {"type": "image"}, {"type": "image"}],
        [encoded_image(size=(56, 56), color=(0, 90, 0)), encoded_image("PNG", size=(140, 84))],
    ),
]


def alone_texts(checkpoint, prompts, max_tokens=32):
    engine = BatchingEngine(checkpoint, dataclasses.replace(SETTINGS, max_batch_size=1))
    try:
        return [run(engine, c, images=i, max_tokens=max_tokens).final.text for c, i in prompts]
    finally:
        assert engine.shutdown(30)


def test_chunked_prefill_and_requests_joining_mid_way_are_token_identical(checkpoint):
    """A 16-token budget splits every prompt (image tokens included) across steps, and the
    later requests arrive while the first is decoding: each still gets its alone-tokens."""
    alone = alone_texts(checkpoint, MIXED_PROMPTS)
    engine = BatchingEngine(checkpoint, dataclasses.replace(SETTINGS, max_step_tokens=16))
    try:
        first = RecordingSink()
        engine.submit(raw_request(MIXED_PROMPTS[0][0], stream=True, max_tokens=32), first)
        for _ in range(500):  # the first request is decoding before the others arrive
            if first.sends:
                break
            threading.Event().wait(0.01)
        assert first.sends, "the first request never started streaming"
        sinks = [RecordingSink() for _ in MIXED_PROMPTS[1:]]
        for (content, images), sink in zip(MIXED_PROMPTS[1:], sinks):
            engine.submit(raw_request(content, images=images, max_tokens=32), sink)
        texts = [first.wait().streamed_text] + [s.wait().final.text for s in sinks]
        assert engine.stats.partial_chunks >= 6, "the prompts were never chunked"
        assert engine.stats.largest_step_tokens <= 16
        assert engine.stats.largest_batch >= 3
    finally:
        assert engine.shutdown(30)
    assert texts == alone


def test_a_prompt_longer_than_the_step_budget_equals_hf_generate(checkpoint):
    engine = BatchingEngine(checkpoint, dataclasses.replace(SETTINGS, max_step_tokens=8))
    content = [
        {"type": "text", "text": "Look closely: "},
        {"type": "image"},
        {"type": "text", "text": "and now tell me everything about it."},
    ]
    images = [encoded_image(size=(140, 112))]
    try:
        text = run(engine, content, images=images, max_tokens=16).final.text
        assert engine.stats.partial_chunks >= 5
    finally:
        assert engine.shutdown(30)
    assert text == hf_generate_text(checkpoint, raw_request(content, images=images, max_tokens=16))


def test_seeded_sampling_does_not_depend_on_the_batch(checkpoint, engine):
    alone = run(engine, "hello there", temperature=0.9, top_p=0.8, top_k=40, seed=11, max_tokens=30)
    sinks = [RecordingSink() for _ in range(4)]
    engine.submit(
        raw_request("hello there", temperature=0.9, top_p=0.8, top_k=40, seed=11, max_tokens=30),
        sinks[0],
    )
    for i, sink in enumerate(sinks[1:]):
        engine.submit(
            raw_request(
                f"noise {i}", temperature=1.0, seed=i, max_tokens=30, repetition_penalty=1.3
            ),
            sink,
        )
    assert sinks[0].wait().final.text == alone.final.text
    for sink in sinks[1:]:
        sink.wait()


class ChoiceSink(RecordingSink):
    """Records every choice's chunks; `final` is the response flagged last."""

    def __init__(self):
        super().__init__()
        self.finals = {}

    def send(self, chunk):
        if chunk.finish_reason:
            assert chunk.index not in self.finals, "a choice finished twice"
            self.finals[chunk.index] = chunk
        else:
            self.sends.append(chunk)
        if chunk.final:
            assert not self.done.is_set(), "two final responses"
            self.final = chunk
            self.done.set()

    def text(self, index):
        return "".join(c.text for c in self.sends if c.index == index) + self.finals[index].text


def run_choices(engine, content, n, stream=True, **sampling):
    sink = ChoiceSink()
    engine.submit(raw_request(content, stream, n=n, **sampling), sink)
    return sink.wait()


def test_n_greedy_choices_share_one_prefill_and_agree(engine):
    single = run(engine, "Describe a cat.").final.text
    result = run_choices(engine, "Describe a cat.", 3)
    assert sorted(result.finals) == [0, 1, 2]
    assert {result.text(i) for i in range(3)} == {single}
    assert (
        result.final.final
        and sum(c.num_tokens for c in result.finals.values())
        + sum(c.num_tokens for c in result.sends)
        == 3 * 24
    )


def test_n_sampled_choices_differ_and_choice_zero_matches_n1(engine):
    sampling = dict(temperature=1.0, seed=5, max_tokens=30)
    one = run(
        engine,
        [{"type": "image"}, {"type": "text", "text": "x"}],
        True,
        [encoded_image(size=(56, 56))],
        **sampling,
    ).streamed_text
    sink = ChoiceSink()
    engine.submit(
        raw_request(
            [{"type": "image"}, {"type": "text", "text": "x"}],
            False,
            [encoded_image(size=(56, 56))],
            n=3,
            **sampling,
        ),
        sink,
    )
    sink.wait()
    texts = [sink.finals[i].text for i in range(3)]
    assert texts[0] == one  # choice i samples with seed + i
    assert len(set(texts)) == 3


def test_n_above_the_cap_is_refused(checkpoint):
    engine = BatchingEngine(checkpoint, dataclasses.replace(SETTINGS, max_choices=2))
    try:
        sink = RecordingSink()
        engine.submit(raw_request("hi", n=3), sink)
        assert (
            sink.done.wait(30) and isinstance(sink.error, RequestError) and sink.error.param == "n"
        )
    finally:
        assert engine.shutdown(30)


def test_cancelling_an_n_request_frees_every_slot(checkpoint):
    engine = BatchingEngine(checkpoint, dataclasses.replace(SETTINGS, max_batch_size=4))
    try:
        sink = ChoiceSink()
        sink.is_cancelled = lambda: len(sink.sends) >= 4
        engine.submit(raw_request("go", True, n=4, temperature=1.0, seed=3, max_tokens=400), sink)
        assert sink.done.wait(30) and sink.final == "cancelled"
        # all four slots are free again: a request for four choices runs
        assert sorted(run_choices(engine, "again", 4).finals) == [0, 1, 2, 3]
    finally:
        assert engine.shutdown(30)


def test_choices_keep_their_slots_until_the_prompt_is_prefilled(checkpoint):
    """Two n=3 requests on 4 slots: the second waits for room for all three of its choices (a
    choice's slot is taken when its prompt is prefilled; admitting on one free slot once ran
    out of slots at that point and failed every running request)."""
    engine = BatchingEngine(checkpoint, dataclasses.replace(SETTINGS, max_batch_size=4))
    try:
        sinks = [ChoiceSink(), ChoiceSink()]
        for sink in sinks:
            engine.submit(raw_request("hello there", n=3, temperature=1.0, seed=3), sink)
        assert [sorted(sink.wait().finals) for sink in sinks] == [[0, 1, 2]] * 2
        assert engine.stats.largest_batch == 3
    finally:
        assert engine.shutdown(30)


def test_a_repeated_image_skips_the_vision_tower_and_gives_the_same_tokens(checkpoint):
    engine = BatchingEngine(checkpoint, SETTINGS)
    image = [encoded_image(size=(112, 112), color=(10, 20, 200))]
    try:
        first = run(engine, IMAGE_PROMPT, images=image).final.text
        assert (engine.stats.image_cache_hits, engine.stats.image_cache_misses) == (0, 1)
        again = run(engine, IMAGE_PROMPT, images=image).final.text
        assert (engine.stats.image_cache_hits, engine.stats.image_cache_misses) == (1, 1)
        assert first == again
        # The same bytes under another pixel budget are other pixels: a miss.
        smaller = [
            {"type": "image", "max_pixels": 56 * 56},
            {"type": "text", "text": "What is it?"},
        ]
        run(engine, smaller, images=image)
        assert (engine.stats.image_cache_hits, engine.stats.image_cache_misses) == (1, 2)
    finally:
        assert engine.shutdown(30)


def test_a_freed_slot_serves_the_same_prompt_prefix_and_the_tokens_do_not_change(checkpoint):
    engine = BatchingEngine(checkpoint, SETTINGS)
    image = [encoded_image(size=(112, 112), color=(200, 20, 10))]
    other = [encoded_image(size=(112, 112), color=(10, 200, 10))]
    ask = lambda text: [{"type": "image"}, {"type": "text", "text": text}]  # noqa: E731
    try:
        first = run(engine, ask("What is it?"), images=image).final.text
        assert engine.stats.reused_prompt_tokens == 0
        again = run(engine, ask("What is it?"), images=image).final.text
        reused = engine.stats.reused_prompt_tokens
        assert reused > 16 and again == first
        # Same image, another question: the shared part (template + image) is reused.
        follow_up = run(engine, ask("And its colour?"), images=image).final.text
        assert engine.stats.reused_prompt_tokens > reused
        # Another image behind identical placeholder tokens: only what comes before the image.
        before = engine.stats.reused_prompt_tokens
        different = run(engine, ask("What is it?"), images=other).final.text
        image_start = prepare(
            raw_request(ask("What is it?"), images=other), checkpoint, SETTINGS
        ).image_starts[0]
        assert 0 < engine.stats.reused_prompt_tokens - before <= image_start
    finally:
        assert engine.shutdown(30)
    assert alone_texts(
        checkpoint, [(ask("And its colour?"), image), (ask("What is it?"), other)], max_tokens=24
    ) == [follow_up, different]
