"""The engine's host path: responses built and sent off the engine thread (coalescing,
`stream_interval`, stop strings, failing sinks, the one final call), cancellation polled on a
timer, batched sampling and logprobs, and the host timers. Tiny checkpoint, seeded."""

import dataclasses
import threading
from types import SimpleNamespace

import pytest
import torch
from test_engine import ChoiceSink, RecordingSink, raw_request, run

from qwen_vl_backend.engine import staging
from qwen_vl_backend.engine.batching import BatchingEngine
from qwen_vl_backend.engine.responses import Failure, RequestStream, ResponseSender
from qwen_vl_backend.engine.sampling import (
    ResolvedSampling,
    TokenSampler,
    logprob_entry,
    sample,
)
from qwen_vl_backend.errors import EngineStoppingError
from qwen_vl_backend.request.params import SamplingParams
from qwen_vl_backend.settings import ModelSettings

SETTINGS = ModelSettings()


def wait_until(condition, what):
    for _ in range(3000):
        if condition():
            return
        threading.Event().wait(0.01)
    raise AssertionError(f"never happened: {what}")


# ---- responses off the engine thread ------------------------------------------------------


class CountingSink(RecordingSink):
    def __init__(self):
        super().__init__()
        self.polls = 0

    def is_cancelled(self):
        self.polls += 1
        return False


def test_cancellation_is_polled_on_a_timer_not_per_step(make_engine):
    # Polled per sequence per step, this 18-token stream would be asked 18 times or more.
    engine = make_engine(cancel_poll_ms=600_000)
    sink = CountingSink()
    engine.submit(raw_request("count the polls", stream=True), sink)
    sink.wait()
    assert sum(c.num_tokens for c in sink.sends) + sink.final.num_tokens == 18  # EOS
    assert sink.polls == 1  # the check before preparation; the first timed poll is far away


class GatedSink(RecordingSink):
    """Its first send blocks until the test opens the gate."""

    def __init__(self):
        super().__init__()
        self.entered, self.gate = threading.Event(), threading.Event()

    def send(self, chunk):
        if not self.entered.is_set():
            self.entered.set()
            assert self.gate.wait(60)
        super().send(chunk)


def test_a_client_that_falls_behind_gets_its_backlog_in_one_response(make_engine):
    engine = make_engine()
    whole = run(engine, "a backlog", max_tokens=24).final
    sink = GatedSink()
    engine.submit(raw_request("a backlog", stream=True, max_tokens=24), sink)
    assert sink.entered.wait(60)
    wait_until(lambda: engine.running == 0, "the engine finished the request")
    sink.gate.set()  # every remaining step is queued for the sender now
    sink.wait()
    assert len(sink.sends) == 1 and sink.final.finish_reason == "length"
    assert sink.sends[0].num_tokens + sink.final.num_tokens == 24
    assert sink.streamed_text == whole.text
    assert engine.stats.coalesced_steps > 0


def test_stream_interval_sends_fewer_larger_chunks_and_the_same_text(make_engine):
    engine = make_engine(stream_interval=4)
    whole = run(engine, "Describe a cat.", max_tokens=24).final
    streamed = run(engine, "Describe a cat.", stream=True, max_tokens=24)
    assert streamed.streamed_text == whole.text
    assert all(c.num_tokens >= 4 for c in streamed.sends[1:])  # the first goes out at once
    assert 1 < len(streamed.sends) <= 1 + 23 // 4


class RaisingSink(RecordingSink):
    def send(self, chunk):
        if len(self.sends) == 2:
            raise ConnectionError("client gone")
        super().send(chunk)


def test_a_sink_that_raises_fails_its_request_alone_and_frees_its_slot(make_engine):
    engine = make_engine(max_batch_size=1)
    failing = RaisingSink()
    engine.submit(raw_request("first", stream=True, max_tokens=200), failing)
    assert failing.done.wait(60) and isinstance(failing.error, ConnectionError)
    assert failing.final is None  # the failure was its one final call
    # The only slot is free again: the next request runs to its end.
    assert run(engine, "second").final.num_tokens == 24
    assert engine.stats.failed == 1 and engine.stats.completed == 1


def test_a_stop_string_found_after_the_step_cuts_every_choice_once(make_engine):
    engine = make_engine()
    full = run(engine, "Describe a cat.").final.text
    stop = full[5:8]
    whole = run(engine, "Describe a cat.", stop=[stop]).final
    assert whole.text == full[: full.index(stop)] and whole.finish_reason == "stop"
    sink = ChoiceSink()  # asserts that no choice finishes twice and one final comes
    engine.submit(raw_request("Describe a cat.", stream=True, n=2, stop=[stop]), sink)
    sink.wait()
    assert [sink.text(i) for i in range(2)] == [whole.text] * 2
    assert {c.finish_reason for c in sink.finals.values()} == {"stop"}
    assert sum(c.num_tokens for c in [*sink.sends, *sink.finals.values()]) == 2 * whole.num_tokens
    wait_until(lambda: engine.running == 0, "the stopped choices left the batch")


def test_the_host_timers_count_every_part_of_a_step(make_engine):
    engine = make_engine()
    sink = run(engine, "time me", stream=True, logprobs=True, top_logprobs=2)
    wait_until(lambda: engine.stats.responses == len(sink.sends) + 1, "all responses counted")
    timings = engine.stats.timings()
    assert timings["steps"] >= 24
    for part in ("scheduling", "forward", "sampling", "output", "detokenize", "send"):
        assert timings[f"{part}_s"] > 0, part
    engine_parts = ("scheduling", "vision", "forward", "sampling", "output")
    assert timings["step_s"] >= sum(timings[f"{part}_s"] for part in engine_parts)


def fake_request(n=1, stream=True):
    sampling = SamplingParams(n=n)
    raw = SimpleNamespace(stream=stream, request_id="fake", exclude_input_in_output=True)
    prepared = SimpleNamespace(
        sampling=sampling, raw=raw, prompt="", prompt_tokens=3, image_tokens=0, video_tokens=0
    )
    return RequestStream(prepared, RecordingSink(), arrived=0.0)


def sender():
    stats = SimpleNamespace(
        detokenize_s=0.0,
        send_s=0.0,
        cancellation_s=0.0,
        responses=0,
        sender_wakeups=0,
        coalesced_steps=0,
    )
    finished = []
    observe = SimpleNamespace(finished=finished.append, request_ended=lambda request, outcome: None)
    return ResponseSender(lambda i: (str(i), [i]), 1, 60.0, observe, stats), finished


def test_a_request_still_open_when_the_engine_stops_gets_its_one_final_call():
    responses, finished = sender()
    open_request, failed = fake_request(), fake_request()
    responses.register(open_request)
    responses.register(failed)
    error = RuntimeError("boom")
    responses.post([Failure(failed, error), Failure(failed, RuntimeError("again"))])
    responses.close(30)
    assert isinstance(open_request.sink.error, EngineStoppingError)
    assert failed.sink.error is error  # one failure, the first
    assert finished == ["error", "error"]


# ---- batched sampling ---------------------------------------------------------------------


def reference_logprobs(row: torch.Tensor, token: int, top: int):
    """Per row and per value, as the engine computed them before batching."""
    logprobs = torch.log_softmax(row.float(), dim=-1)
    values, ids = torch.topk(logprobs, top)
    return float(logprobs[token]), [(int(i), float(v)) for v, i in zip(values, ids)]


def test_batched_logprobs_equal_the_per_row_values():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=generator) * 3
    logits[2, 10:] = float("-inf")  # a grammar mask leaving 10 tokens
    greedy = ResolvedSampling(greedy=True, logprobs=True)
    samplers = [TokenSampler(greedy, torch.tensor([1]), 50) for _ in range(4)]
    tops = [3, None, 12, 0]
    tokens, logprobs = sample(logits.clone(), samplers, tops)
    assert tokens == logits.argmax(-1).tolist()
    assert logprobs[1] is None
    for row in (0, 2, 3):
        chosen, top = reference_logprobs(logits[row], tokens[row], tops[row])
        assert logprobs[row][0] == chosen
        assert logprobs[row][1] == top
    entry = logprob_entry(tokens[2], logprobs[2], lambda i: (f"t{i}", [i]))
    assert len(entry["top_logprobs"]) == 10  # the masked ones are not listed
    assert entry["top_logprobs"][0]["logprob"] == entry["logprob"]


def test_seeded_draws_do_not_depend_on_the_other_rows():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 64, generator=generator)
    hot = ResolvedSampling(greedy=False, temperature=0.9, top_p=0.8, top_k=20, seed=5)
    penalised = ResolvedSampling(greedy=False, repetition_penalty=1.3, seed=6)

    def draw(rows):
        samplers = [TokenSampler(settings, torch.tensor([2, 3]), 64) for settings in rows]
        return [sample(logits[: len(rows)].clone(), samplers, [None] * len(rows))[0][0]]

    alone = [draw([hot]) for _ in range(2)]
    mixed = draw([hot, penalised, ResolvedSampling(greedy=True)])
    assert alone[0] == alone[1] == mixed


def test_staged_inputs_come_back_as_they_went_in():
    tensors = [
        torch.tensor([3, 1, 4], dtype=torch.long),
        torch.tensor([[0.5, 2.0], [1.5, -1.0]], dtype=torch.float32),
        torch.tensor([True, False, True]),
        torch.tensor([], dtype=torch.long),
        torch.arange(12, dtype=torch.long).reshape(3, 4)[:, 1],  # not contiguous
    ]
    buffer, offsets = staging.pack(tensors, pin=False)
    assert buffer.dtype == torch.uint8 and all(offset % 8 == 0 for offset in offsets)
    for original, view in zip(tensors, staging.unpack(buffer, offsets, tensors)):
        assert view.dtype == original.dtype and torch.equal(view, original)
    assert [t is s for t, s in zip(tensors, staging.to_device(tensors, "cpu"))] == [True] * 5


def test_the_timers_are_reported_whenever_the_engine_goes_idle(checkpoint):
    from qwen_vl_backend.engine.batching import EngineObserver

    class Reports(EngineObserver):
        def __init__(self):
            self.increases = []

        def host_timings(self, increase):
            self.increases.append(increase)

    reports = Reports()
    settings = dataclasses.replace(SETTINGS, timing_log_s=3600.0)  # no periodic report
    engine = BatchingEngine(checkpoint, settings, observer=reports)
    try:
        run(engine, "report me")
        run(engine, "and me")
        wait_until(lambda: len(reports.increases) >= 2, "a report per idle")
        assert sum(r["steps"] for r in reports.increases) == engine.stats.steps
        assert sum(r["forward_s"] for r in reports.increases) == pytest.approx(
            engine.stats.forward_s
        )
    finally:
        assert engine.shutdown(30)
