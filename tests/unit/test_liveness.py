"""proxy/transport/liveness.py without a server: the watchdog ends the silent streams of a
model found dead and leaves others alone; verdicts are shared, reused while fresh, and kept
when an answer brings none."""

from __future__ import annotations

import asyncio

import pytest
from helpers import wait_until_async

from proxy.transport import liveness
from proxy.transport.liveness import LivenessWatch, Verdicts


@pytest.fixture(autouse=True)
def quick_looks(monkeypatch):
    monkeypatch.setattr(liveness, "LOOK_EVERY_S", 0.01)


class Cancels:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


async def test_silent_streams_of_a_dead_model_are_ended_and_others_are_not():
    asked: list[str] = []

    async def probe(model: str) -> bool:
        asked.append(model)
        return model != "dead"

    watch = LivenessWatch(probe, silence_s=0.05, first_silence_s=0.05)
    dead_cancels, live_cancels = Cancels(), Cancels()
    try:
        with watch.watching("dead", dead_cancels) as first, watch.watching("dead", dead_cancels):
            with watch.watching("alive", live_cancels) as other:
                await wait_until_async(lambda: dead_cancels.count == 2, timeout=5)
                await wait_until_async(lambda: "alive" in asked, timeout=5)
                assert first.dead and not other.dead and live_cancels.count == 0
    finally:
        await watch.close()


async def test_a_stream_that_hears_from_the_model_is_never_asked_about():
    asked: list[str] = []

    async def probe(model: str) -> bool:
        asked.append(model)
        return False

    watch = LivenessWatch(probe, silence_s=0.5, first_silence_s=0.5)
    try:
        # The second stream never hears a word (queued), but the first shows the model lives.
        with watch.watching("m", Cancels()) as stream, watch.watching("m", Cancels()) as queued:
            for _ in range(40):  # longer than the silence in all, never silent that long
                stream.heard()
                await asyncio.sleep(0.02)  # the watchdog looks every 10 ms meanwhile
        assert asked == [] and not stream.dead and not queued.dead
    finally:
        await watch.close()


async def test_before_its_first_response_a_stream_may_be_silent_longer():
    asked: list[str] = []

    async def probe(model: str) -> bool:
        asked.append(model)
        return True

    watch = LivenessWatch(probe, silence_s=0.01, first_silence_s=3600)
    try:
        with watch.watching("waiting", Cancels()), watch.watching("answered", Cancels()) as one:
            one.heard()
            await wait_until_async(lambda: "answered" in asked, timeout=5)
        assert "waiting" not in asked
    finally:
        await watch.close()


async def test_verdicts_are_shared_reused_while_fresh_and_kept_without_an_answer(monkeypatch):
    answers: list[bool | None] = [False, None, True]
    asked = 0
    release = asyncio.Event()

    async def ask(model: str) -> bool | None:
        nonlocal asked
        asked += 1
        await release.wait()
        return answers[asked - 1]

    verdicts = Verdicts(ask)
    waiting = [asyncio.ensure_future(verdicts.lives("m")) for _ in range(3)]
    await asyncio.sleep(0)
    release.set()
    assert await asyncio.gather(*waiting) == [False, False, False]
    assert asked == 1  # one question for three callers
    assert await verdicts.lives("m") is False and asked == 1  # a fresh death is reused
    verdicts.record("m", alive=False)
    monkeypatch.setattr(liveness, "SILENCE_S", 0.0)
    assert await verdicts.lives("m", fresh_s=3600) is False  # an old death is asked again;
    assert asked == 2  # no answer: still dead
    assert await verdicts.lives("m") is True
    assert asked == 3
    assert await verdicts.lives("m", fresh_s=3600) is True and asked == 3  # reused
    answers.append(False)
    assert await verdicts.lives("m", fresh_s=0) is False and asked == 4  # too old: asked


async def test_no_answer_before_any_verdict_counts_as_alive():
    async def ask(model: str) -> bool | None:
        return None

    assert await Verdicts(ask).lives("m") is True


async def test_a_death_found_by_a_request_stands_until_an_answer_says_otherwise(monkeypatch):
    answers: list[bool | None] = [None, True]

    async def ask(model: str) -> bool | None:
        return answers.pop(0)

    verdicts = Verdicts(ask)
    verdicts.record("m", alive=False)
    assert await verdicts.lives("m") is False and answers == [None, True]  # fresh
    monkeypatch.setattr(liveness, "SILENCE_S", 0.0)
    assert await verdicts.lives("m", fresh_s=3600) is False  # asked: no answer, still dead
    assert await verdicts.lives("m", fresh_s=3600) is True and answers == []
