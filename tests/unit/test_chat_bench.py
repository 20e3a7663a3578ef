"""bench/chat_bench.py's bookkeeping: the request plan, the rotation, pooling rounds, targets.
No server runs here."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import chat_bench  # noqa: E402


def plan_for(*flags):
    args = chat_bench.parse_args(["--image-size", "64x64", *flags])
    return args, chat_bench.request_plan(args)


def test_every_request_gets_an_image_of_its_own_by_default():
    _, plan = plan_for("--levels", "1,4", "--max-tokens", "8,16", "--rounds", "2")
    images = [s.image for s in plan.warmup] + [s.image for cell in plan.cells for s in cell.specs]
    assert len(plan.cells) == 2 * 2 * 2
    assert len(images) == 1 + 2 * 2 * (8 + 8)
    assert len(set(images)) == len(images)
    assert not plan.probe


def test_the_plan_is_seeded():
    _, first = plan_for("--levels", "2", "--max-tokens", "8", "--rounds", "1")
    _, again = plan_for("--levels", "2", "--max-tokens", "8", "--rounds", "1")
    assert [s.image for s in first.cells[0].specs] == [s.image for s in again.cells[0].specs]


def test_repeat_images_cycles_eight_and_probes_new_ones():
    _, plan = plan_for("--levels", "16", "--max-tokens", "8", "--rounds", "1", "--repeat-images")
    images = [s.image for s in plan.cells[0].specs]
    assert len(set(images)) == chat_bench.REPEATED_IMAGES
    assert len(plan.probe) == chat_bench.PROBE_IMAGES
    for first, repeat in plan.probe:
        assert first.image == repeat.image and first.image not in images
        assert first.prompt != repeat.prompt


def test_rotation_moves_the_first_mode_each_cell():
    names = ["batched", "unbatched", "vllm"]
    orders = [chat_bench.rotated(names, i) for i in range(3)]
    assert [order[0] for order in orders] == names
    assert all(sorted(order) == sorted(names) for order in orders)


def result(start, first, gaps, tokens):
    times = [first + sum(gaps[:i]) for i in range(len(gaps) + 1)]
    return chat_bench.RequestResult(
        ok=True,
        start=start,
        end=times[-1],
        first_content=first,
        chunk_times=times,
        completion_tokens=tokens,
        finish_reason="length",
    )


def test_pooled_level_adds_walls_and_keeps_each_rounds_rate():
    rounds = [([result(0.0, 0.1, [0.01] * 3, 4)], 1.0), ([result(0.0, 0.3, [0.01] * 3, 4)], 3.0)]
    level = chat_bench.pooled_level(1, rounds, max_tokens=4)
    assert level["output_tok_s"] == 2.0
    assert level["round_tok_s"] == [4.0, pytest.approx(1.33)]
    assert level["ttft_p50_ms"] == 200.0
    assert level["short_completions"] == 0


def level(concurrency, tok_s, ttft, itl50=10.0, itl99=12.0):
    return {
        "concurrency": concurrency,
        "ok": 1,
        "output_tok_s": tok_s,
        "ttft_p50_ms": ttft,
        "itl_p50_ms": itl50,
        "itl_p99_ms": itl99,
    }


def test_targets_compare_batched_with_vllm_and_skip_unselected_modes():
    report = {
        "modes": {"batched": {}, "vllm": {}},
        "inprocess": None,
        "tables": {"64": {"batched": [level(8, 130.0, 900.0)], "vllm": [level(8, 100.0, 1000.0)]}},
    }
    rows = {row["target"]: row for row in chat_bench.targets(report)}
    assert rows["out tok/s: batched / vLLM ≥ 1.2×"]["verdict"] == "PASS"
    assert rows["TTFT p50: batched / vLLM ≤ 1×"]["ratio"] == 0.9
    assert rows["ITL of batched: p99 / p50 ≤ 1.5×"]["verdict"] == "PASS"
    assert not any("unbatched" in name or "in-process" in name for name in rows)


def test_a_missing_level_is_not_applicable():
    report = {
        "modes": {"batched": {}, "unbatched": {}},
        "inprocess": None,
        "tables": {
            "64": {"batched": [level(1, 30.5, 300.0)], "unbatched": [level(1, 31.0, 300.0)]}
        },
    }
    rows = {row["target"]: row for row in chat_bench.targets(report)}
    assert rows["out tok/s: batched / unbatched ≥ 3×"]["verdict"] == "n/a"
    assert rows["out tok/s: batched / unbatched (within 3 %) ≥ 0.97×"]["verdict"] == "PASS"


def test_the_repeated_image_probe_has_its_target():
    probe = {"first_ttft_p50_ms": 500.0, "repeat_ttft_p50_ms": 250.0}
    report = {"modes": {"batched": {"repeat_probe": probe}}, "inprocess": None, "tables": {}}
    (row,) = chat_bench.targets(report)
    assert row["ratio"] == 0.5 and row["verdict"] == "PASS"
