"""Priority classes in the engine (docs/engine.md "Priority classes"): waiting interactive
requests are admitted before waiting batch ones, batch sequences hold at most
`max_batch_priority_slots` KV slots while interactive ones may use the rest, and a step's
prefill budget pays interactive prompts first.

The engine thread is held inside a decode step (`Gate`) while requests line up in its queues,
so each scheduling decision these tests check is taken with every request already waiting."""

import dataclasses
import json
import threading

import pytest
from test_engine import MIXED_PROMPTS, RecordingSink, alone_texts, raw_request

from qwen_vl_backend.engine.batching import BatchingEngine, EngineObserver
from qwen_vl_backend.errors import RequestError
from qwen_vl_backend.request.prepare import RawRequest
from qwen_vl_backend.settings import ModelSettings

# With the prompt "go", seeded sampling that runs 213 tokens before EOS (test_engine's cancel
# test): a request that decodes until its max_tokens whatever its neighbours do.
LONG = {"temperature": 1.0, "seed": 1}


def raw(content, priority=None, request_id="t", max_tokens=24, **sampling):
    return RawRequest(
        request_id=request_id,
        messages=json.dumps([{"role": "user", "content": content}]),
        stream=True,
        exclude_input_in_output=True,
        sampling_parameters=json.dumps({"max_tokens": max_tokens, "temperature": 0, **sampling}),
        priority=priority,
    )


class Gate(EngineObserver):
    """Holds the engine thread in the next decode step of at least `rows` rows until released;
    records the class of every admission in order."""

    def __init__(self):
        self.admissions = []
        self.holding = threading.Event()  # the engine thread is held
        self._gate = threading.Event()
        self._rows = None

    def hold(self, rows: int) -> None:
        self._gate = threading.Event()  # a new one per hold, before `_rows` says to hold
        self.holding.clear()
        self._rows = rows

    def release(self) -> None:
        self._rows = None
        self.holding.clear()
        self._gate.set()

    def decoded(self, batch_size, waiting):
        rows, gate = self._rows, self._gate
        if rows is not None and batch_size >= rows:
            self.holding.set()
            assert gate.wait(60), "the test never released the engine"

    def admitted(self, priority):
        self.admissions.append(str(priority))


@pytest.fixture
def gated(checkpoint):
    """`gated(**settings)`: (engine, gate) for a BatchingEngine with those settings replaced."""
    made = []

    def make(**settings):
        gate = Gate()
        engine = BatchingEngine(
            checkpoint, dataclasses.replace(ModelSettings(), **settings), observer=gate
        )
        made.append((engine, gate))
        return engine, gate

    yield make
    for engine, gate in made:
        gate.release()
        assert engine.shutdown(30)


def submit(engine, request):
    sink = RecordingSink()
    engine.submit(request, sink)
    return sink


def wait_ready(engine, count):
    """Until `count` submitted requests are prepared and queued for the (held) engine thread."""
    for _ in range(3000):
        if engine._ready.qsize() >= count:
            return
        threading.Event().wait(0.01)
    raise AssertionError(f"{count} requests were never prepared")


def hold_while(engine, gate, rows, *requests):
    """Holds the engine in a step of `rows` decode rows, submits `requests` in order, waits
    until all are prepared, and lets the engine go on: its next schedule sees them all."""
    assert gate.holding.wait(60), "the engine never reached the held step"
    sinks = [submit(engine, request) for request in requests]
    wait_ready(engine, len(requests))
    gate.release()
    return sinks


def test_a_later_interactive_request_is_admitted_before_earlier_batch_ones(gated):
    """Both slots busy; two batch requests, then an interactive one, wait. The interactive
    one takes the first freed slot; the batch ones follow in their own arrival order. Batch
    may use every slot here: the order, not the cap, decides."""
    engine, gate = gated(max_batch_size=2, max_batch_priority_slots=2)
    admitted = []
    admit = engine._admit
    engine._admit = lambda request: (
        admitted.append(request.prepared.raw.request_id) or admit(request)
    )
    gate.hold(rows=2)
    busy = [submit(engine, raw("go", max_tokens=40 + 10 * i, **LONG)) for i in range(2)]
    waiting = hold_while(
        engine,
        gate,
        2,
        raw("one", "batch", "b1"),
        raw("two", "batch", "b2"),
        raw("three", "interactive", "i1"),
    )
    for sink in busy + waiting:
        sink.wait()
    assert admitted[2:] == ["i1", "b1", "b2"]
    assert gate.admissions == ["interactive"] * 3 + ["batch"] * 2
    assert engine.stats.admitted_by_priority == {"interactive": 3, "batch": 2}


def test_batch_rows_stay_within_their_slots_and_interactive_ones_use_the_rest(gated):
    """4 slots, 2 for batch (the default: half). Four batch requests wait behind one running
    interactive request, then three interactive ones arrive: the interactive ones fill the
    slots the batch ones may not take."""
    engine, gate = gated(max_batch_size=4)
    gate.hold(rows=1)
    running = submit(engine, raw("go", max_tokens=120, **LONG))
    batch = hold_while(
        engine, gate, 1, *[raw("go", "batch", max_tokens=60, **LONG) for _ in range(4)]
    )
    # Held again once the two admitted batch rows decode beside the running one: the batch
    # share is full and one slot is free, which the batch requests still waiting may not take.
    gate.hold(rows=3)
    assert gate.holding.wait(60)
    assert engine.running == 3 and engine.stats.largest_batch_priority_slots == 2
    interactive = hold_while(engine, gate, 3, *[raw("go", max_tokens=8, **LONG) for _ in range(3)])
    for sink in [running, *batch, *interactive]:
        sink.wait()
    assert engine.stats.largest_batch_priority_slots == 2  # never more, all along
    assert engine.stats.largest_batch == 4  # the free slot went to an interactive request
    assert engine.stats.admitted_by_priority == {"interactive": 4, "batch": 4}


def test_batch_choices_count_against_the_batch_slots(gated):
    engine, gate = gated(max_batch_size=4)
    gate.hold(rows=1)
    running = submit(engine, raw("go", max_tokens=80, **LONG))
    batch = hold_while(engine, gate, 1, *[raw(f"job {i}", "batch", n=2, **LONG) for i in range(2)])
    for sink in [running, *batch]:
        sink.wait()
    # each request's two choices take both batch slots: they ran one after the other
    assert engine.stats.largest_batch_priority_slots == 2
    too_many = submit(engine, raw("x", "batch", n=3))
    assert too_many.done.wait(30) and isinstance(too_many.error, RequestError)
    assert too_many.error.param == "n" and "batch" in too_many.error.message


def test_interactive_prefill_takes_the_step_budget_before_batch_prefill(gated):
    """16-token steps: a batch request and a later interactive one with long prompts join
    while a stream decodes. Every step pays the interactive prompt first; the batch prompt only
    gets what that leaves, so the interactive prompt is prefilled as fast as if it were alone,
    and no step outgrows its budget."""
    engine, gate = gated(max_step_tokens=16)
    steps = []
    execute = engine._execute

    def recording(step):
        steps.append(
            [
                (s.prepared.raw.request_id, start, length, s.prepared.prompt_tokens)
                for s, start, length in step.chunks
            ]
        )
        return execute(step)

    engine._execute = recording
    gate.hold(rows=1)
    stream = submit(engine, raw("go", max_tokens=80, **LONG))
    words = " ".join(f"word{i}" for i in range(30))  # about 110 tokens
    batch, interactive = hold_while(
        engine,
        gate,
        1,
        raw(f"Batch: {words}", "batch", "batch"),
        raw(f"Now: {words}", "interactive", "interactive"),
    )
    for sink in (stream, batch, interactive):
        sink.wait()
    paying = [step for step in steps if any(c[0] == "interactive" for c in step)]
    prompt = paying[0][0][3]
    assert prompt > 4 * 15, "the interactive prompt should need several steps"
    # 15 tokens a step (16 less the decoding row), all to the interactive prompt until it is
    # done: as many steps as alone, each with its chunk first.
    assert len(paying) == -(-prompt // 15)
    for step in paying:
        request_id, start, length, _ = step[0]
        assert request_id == "interactive"
        if start + length < prompt:  # not its last chunk: it took the whole budget
            assert length == 15 and len(step) == 1
    batch_chunks = [c for step in steps for c in step if c[0] == "batch"]
    assert sum(c[2] for c in batch_chunks) == batch_chunks[0][3]  # the batch prompt got done
    assert steps.index(paying[-1]) <= min(
        i for i, step in enumerate(steps) if any(c[0] == "batch" for c in step)
    ), "the batch prompt started before the interactive one was prefilled"
    assert engine.stats.largest_step_tokens <= 16


def test_tokens_do_not_depend_on_the_class_or_the_neighbours(gated, checkpoint):
    """The mixed prompts (text, one image, two images) in both classes at once behind small
    budgets (16-token steps, vision jobs of at most 64 patches), the two images of a batch
    request shown by an interactive one too (its queued images move to the interactive class):
    each gets the tokens it gets alone."""
    alone = alone_texts(checkpoint, MIXED_PROMPTS)
    engine, gate = gated(max_batch_size=6, max_step_tokens=16, max_vision_patches=64)
    classes = ["batch", "interactive", "batch", "batch", "interactive"]
    requests = [
        dataclasses.replace(raw_request(content, images=images, max_tokens=32), priority=priority)
        for (content, images), priority in zip([*MIXED_PROMPTS, MIXED_PROMPTS[3]], classes)
    ]
    gate.hold(rows=1)
    pacer = submit(engine, raw("go", max_tokens=60, **LONG))
    sinks = hold_while(engine, gate, 1, *requests)
    texts = [sink.wait().final.text for sink in sinks]
    pacer.wait()
    assert texts == [*alone, alone[3]]
    assert engine.stats.admitted_by_priority == {"interactive": 3, "batch": 3}
    assert engine.stats.partial_chunks > 0 and engine.stats.vision_jobs >= 2


def test_the_batch_share_of_the_slots_from_settings():
    assert ModelSettings().batch_priority_slots(16) == 8
    assert ModelSettings().batch_priority_slots(1) == 1
    assert ModelSettings(max_batch_priority_slots=3).batch_priority_slots(16) == 3
    assert ModelSettings(max_batch_priority_slots=40).batch_priority_slots(16) == 16
    with pytest.raises(ValueError, match="max_batch_priority_slots"):
        ModelSettings(max_batch_priority_slots=-1)
