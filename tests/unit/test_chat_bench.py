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
    assert level["output_tok_s"] == 2.0 and level["tpot_p50_ms"] == 10.0
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


# ---- the open loop -------------------------------------------------------------------------


def test_poisson_arrivals_are_seeded_and_have_the_asked_mean_rate():
    first = chat_bench.poisson_arrivals(20000, 0.8, chat_bench.random.Random(7))
    again = chat_bench.poisson_arrivals(20000, 0.8, chat_bench.random.Random(7))
    other = chat_bench.poisson_arrivals(20000, 0.8, chat_bench.random.Random(8))
    assert first == again and first != other
    assert first[0] == 0.0 and all(a < b for a, b in zip(first, first[1:]))
    assert (len(first) - 1) / first[-1] == pytest.approx(0.8, rel=0.03)


def open_plan_for(*flags):
    args = chat_bench.parse_args(["--image-size", "64x64", *flags])
    return args, chat_bench.open_loop_plan(args)


def test_the_open_loop_plan_stretches_one_schedule_over_the_rates():
    args, plan = open_plan_for("--rates", "0.5,1", "--requests", "40")
    slow, fast = plan.cells
    assert (slow.rate, fast.rate) == (0.5, 1.0) and len(slow.specs) == len(fast.specs) == 40
    assert fast.arrivals == pytest.approx([t / 2 for t in slow.arrivals])
    assert slow.max_tokens == fast.max_tokens and min(slow.max_tokens) >= 32
    assert max(slow.max_tokens) <= 128 and len(set(slow.max_tokens)) > 10
    images = [s.image for s in plan.warmup] + [s.image for c in plan.cells for s in c.specs]
    assert len(set(images)) == len(images) == 1 + 80
    _, again = open_plan_for("--rates", "0.5,1", "--requests", "40")
    assert again.cells[0].arrivals == slow.arrivals and again.cells[0].max_tokens == slow.max_tokens
    assert args.modes == ["batched", "vllm"] and args.rounds == 1 and args.no_inprocess


def test_open_loop_and_overhead_defaults_give_way_to_the_command_line():
    args = chat_bench.parse_args(["--rates", "0.8"])
    assert args.requests == chat_bench.OPEN_LOOP_REQUESTS and args.max_tokens_range == (32, 128)
    overhead = chat_bench.parse_args(["--overhead"])
    assert (overhead.levels, overhead.max_tokens, overhead.modes) == (
        [1, 16],
        [128],
        ["batched", "vllm"],
    )
    assert overhead.text_only and overhead.no_inprocess
    assert overhead.out == chat_bench.DEFAULT_OVERHEAD_OUT
    chosen = chat_bench.parse_args(["--overhead", "--levels", "4", "--modes", "batched"])
    assert (chosen.levels, chosen.modes) == ([4], ["batched"])
    closed = chat_bench.parse_args([])
    assert closed.levels == [1, 2, 4, 8, 16] and closed.rounds == 2 and len(closed.modes) == 4
    for bad in (["--rates", "0"], ["--rates", "1", "--max-tokens-range", "64:32"]):
        with pytest.raises(SystemExit):
            chat_bench.parse_args(bad)


def test_tpot_is_a_requests_mean_gap_between_its_tokens():
    assert chat_bench.tpot(result(0.0, 0.5, [0.02, 0.04, 0.06], 4)) == pytest.approx(0.04)
    coalesced = result(0.0, 0.5, [0.1, 0.1], 5)  # 5 tokens in 3 chunks: 0.2 s over 4 gaps
    assert chat_bench.tpot(coalesced) == pytest.approx(0.05)
    assert chat_bench.tpot(result(0.0, 0.5, [], 1)) is None
    level = chat_bench.summarize_rate(1.0, [chat_bench.OpenRound([coalesced], 1.0, [0.0], [5])])
    (note,) = chat_bench._coalesced_note("batched at 1 req/s", level)
    assert "5 tokens came in 3 content chunks" in note
    assert not chat_bench._coalesced_note(
        "x", chat_bench.summarize_rate(1.0, [open_round([0.1], 0.02, 4)])
    )


def open_round(ttfts, gap, tokens, asked=None):
    results = [result(0.0, ttft, [gap] * (tokens - 1), tokens) for ttft in ttfts]
    return chat_bench.OpenRound(
        results, 10.0, [0.0] * len(results), asked or [tokens] * len(results)
    )


def test_summarize_rate_gives_ttft_itl_tpot_and_counts_short_completions():
    level = chat_bench.summarize_rate(0.8, [open_round([0.1, 0.3], 0.05, 5, asked=[5, 8])])
    assert level["ttft_p50_ms"] == 200.0 and level["ttft_p99_ms"] == pytest.approx(298.0)
    assert level["itl_p50_ms"] == level["tpot_p99_ms"] == 50.0
    assert level["short_completions"] == 1 and level["output_tok_s"] == 1.0


def rate_level(rate, ttft_p99, tpot_p99, ok=40):
    return {
        "rate": rate,
        "requests": 40,
        "ok": ok,
        "ttft_p99_ms": ttft_p99,
        "tpot_p99_ms": tpot_p99,
    }


def test_goodput_is_the_highest_rate_within_both_slos():
    levels = [rate_level(0.4, 500, 60), rate_level(0.8, 1900, 95), rate_level(1.2, 2500, 90)]
    assert chat_bench.goodput(levels, 2000, 100) == 0.8
    assert chat_bench.goodput(levels, 2000, 80) == 0.4
    assert chat_bench.goodput([rate_level(0.4, 500, 60, ok=39)], 2000, 100) is None


def fake_machine(device):
    return {
        "cpu": "test cpu",
        "logical_cpus": 2,
        "usable_cpus": 2,
        "memory_gib": 1.0,
        "python": "3",
        "torch": "t",
        "transformers": "tf",
        "torch_threads": 2,
        "OMP_NUM_THREADS": None,
        "device": device,
        "gpu": None,
        "loadavg_at_start": "0 0 0",
    }


def test_the_open_loop_report_writes_json_markdown_and_a_plot(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(chat_bench, "machine_info", fake_machine)
    args = chat_bench.parse_args(["--rates", "0.4,0.8", "--out", str(tmp_path / "open.md")])
    report = chat_bench.new_report(args, "ckpt", "cpu", "float32")
    raw = {
        ("batched", 0.4): [open_round([0.2] * 40, 0.04, 8)],
        ("batched", 0.8): [open_round([0.4] * 40, 0.06, 8)],
        ("vllm", 0.4): [open_round([0.3] * 40, 0.05, 8)],
        ("vllm", 0.8): [open_round([0.5] * 40, 0.2, 8)],
    }
    chat_bench.write_open_loop_report(report, raw, args, started=0.0)
    saved = chat_bench.json.loads((tmp_path / "open.json").read_text())
    assert saved["open_loop"]["goodput"] == {"batched": 0.8, "vllm": 0.4}
    rows = {row["target"]: row for row in saved["targets"]}
    assert rows["goodput: batched / vLLM ≥ 1.2×"]["ratio"] == 2.0
    assert rows["TPOT p50: batched / vLLM ≤ 0.9×"]["ratio"] == 0.3
    text = (tmp_path / "open.md").read_text()
    assert "| vllm | 0.8 | 40/40 |" in text and "![TTFT and TPOT" in text
    with Image.open(tmp_path / "open.png") as plot:
        assert plot.format == "PNG" and plot.size == (1000, 750)


# ---- the overhead run and the engine's step timings ------------------------------------------


def test_the_overhead_run_has_its_own_targets():
    report = {
        "settings": {"target_set": "overhead"},
        "modes": {"batched": {}, "vllm": {}},
        "inprocess": None,
        "tables": {
            "128": {
                "batched": [level(1, 100.0, 20.0, itl50=8.0), level(16, 2000.0, 100.0)],
                "vllm": [level(1, 450.0, 9.0, itl50=2.0), level(16, 3800.0, 50.0)],
            }
        },
    }
    rows = {row["target"]: row for row in chat_bench.targets(report)}
    assert set(rows) == {"out tok/s: batched / vLLM ≥ 0.5×", "ITL p50: batched / vLLM ≤ 2×"}
    assert rows["out tok/s: batched / vLLM ≥ 0.5×"]["verdict"] == "PASS"
    assert rows["ITL p50: batched / vLLM ≤ 2×"]["verdict"] == "MISS"


TRITON_METRICS = """\
# HELP qwen_vl_engine_step_seconds Time per engine step phase
# TYPE qwen_vl_engine_step_seconds histogram
qwen_vl_engine_step_seconds_bucket{model="qwen2_5_vl",phase="forward",le="0.01"} 7
qwen_vl_engine_step_seconds_sum{model="qwen2_5_vl",phase="forward"} %s
qwen_vl_engine_step_seconds_count{model="qwen2_5_vl",phase="forward"} %s
qwen_vl_engine_step_seconds_sum{model="qwen2_5_vl",phase="sampling"} %s
qwen_vl_engine_step_seconds_count{model="qwen2_5_vl",phase="sampling"} %s
qwen_vl_engine_steps_total{model="qwen2_5_vl"} %s
qwen_vl_engine_step_send_seconds_total{model="qwen2_5_vl"} %s
qwen_vl_generated_tokens_total{model="qwen2_5_vl"} 99
"""


def test_engine_step_timings_are_the_change_of_the_engine_step_metrics():
    before = chat_bench.parse_metric_samples(TRITON_METRICS % (1.0, 100, 0.5, 100, 100, 2.0))
    after = chat_bench.parse_metric_samples(TRITON_METRICS % (1.6, 300, 0.7, 300, 300, 2.1))
    assert not any("generated" in name for name, _ in after)
    rows = {row["series"]: row for row in chat_bench.step_timing_rows(before, after)}
    forward = rows['qwen_vl_engine_step_seconds{model="qwen2_5_vl",phase="forward"}']
    assert forward["observations"] == 200 and forward["mean_ms"] == 3.0 and forward["share"] == 0.75
    assert rows['qwen_vl_engine_steps_total{model="qwen2_5_vl"}']["change"] == 200
    sends = rows['qwen_vl_engine_step_send_seconds_total{model="qwen2_5_vl"}']
    assert sends["per_step_ms"] == pytest.approx(0.5)
    assert len(rows) == 4  # buckets and counts fold into their histogram's row
    assert chat_bench.step_timing_lines(list(rows.values()))[0].endswith(
        "200 observations, mean 3.00 ms, 75% of qwen_vl_engine_step_seconds"
    )


def test_the_engines_host_path_log_lines_are_read_per_step():
    text = (
        'I1203 12:00:00.1 1 model.py:40] "host path, ms per step over 812 steps: scheduling '
        '0.120, forward 2.310, sampling 0.400, step 3.100"\nunrelated line\n'
    )
    (row,) = chat_bench.host_path_log_rows(text)
    assert row["ms_per_step"] == {"scheduling": 0.12, "forward": 2.31, "sampling": 0.4, "step": 3.1}
    assert chat_bench.step_timing_lines([row]) == [
        "engine log over 812 steps, ms per step: scheduling 0.12, forward 2.31, sampling 0.4, step 3.1"
    ]
