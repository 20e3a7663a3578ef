#!/usr/bin/env python3
"""Grammar-mask cost per decode step: llguidance against xgrammar (docs/engine.md,
"Constrained decoding").

    .venv/bin/python bench/grammar_mask_bench.py --tokenizer DIR [--batch 8] [--steps 40]

For each engine: the tokenizer wrapper's build time, the schema's compile time, then `--steps`
decode steps of `--batch` sequences walking the same JSON schema (each picks a seeded random
allowed token, so the rows sit at different points of the grammar); a step is one batch fill of
the bitmask plus the per-sequence advance. xgrammar is optional (its import is tried; install it
out of the project's venv, e.g. `pip install --no-deps --target /tmp/xgt xgrammar
apache-tvm-ffi` and `PYTHONPATH=/tmp/xgt`). Last, the engine's own path
(`qwen_vl_backend.engine.grammar.TokenMasks.apply`: the batch fill, the unpacking and the in-place add
on float32 logits of the tokenizer's width), greedy over random logits.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


def allowed(row: torch.Tensor, vocab: int) -> list[int]:
    bits = (row[:, None] >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.reshape(-1)[:vocab].nonzero()[:, 0].tolist()


def report(name: str, fills: list[float], advances: list[float], extra: dict) -> None:
    ms = lambda xs, q: 1000 * statistics.quantiles(xs, n=100)[q - 1] if len(xs) > 1 else 0  # noqa: E731
    print(
        json.dumps(
            {
                "engine": name,
                **extra,
                "steps": len(fills),
                "fill_ms_p50": round(ms(fills, 50), 3),
                "fill_ms_p90": round(ms(fills, 90), 3),
                "fill_ms_mean": round(1000 * statistics.fmean(fills), 3),
                "advance_ms_mean": round(1000 * statistics.fmean(advances), 3),
            }
        )
    )


def run_llguidance(tokenizer, batch: int, steps: int, seed: int) -> None:
    import llguidance
    import llguidance.hf
    import llguidance.torch as lltorch

    started = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=len(tokenizer))
    wrap_s = time.perf_counter() - started
    grammar = llguidance.LLMatcher.grammar_from_json_schema(
        SCHEMA, defaults={"whitespace_flexible": False}
    )
    started = time.perf_counter()
    first = llguidance.LLMatcher(lltok, grammar)
    compile_s = time.perf_counter() - started
    assert not first.is_error(), first.get_error()
    matchers = [first] + [first.deep_copy() for _ in range(batch - 1)]
    executor = llguidance.LLExecutor()
    vocab = len(tokenizer)
    mask = lltorch.allocate_token_bitmask(batch, vocab)
    rng = random.Random(seed)
    fills, advances = [], []
    for _ in range(steps):
        live = [(m, i) for i, m in enumerate(matchers) if not m.is_stopped()]
        if not live:
            break
        started = time.perf_counter()
        lltorch.fill_next_token_bitmask_par(executor, live, mask)
        fills.append(time.perf_counter() - started)
        picks = [rng.choice(allowed(mask[i], vocab)) for _, i in live]
        started = time.perf_counter()
        for (matcher, _), token in zip(live, picks):
            matcher.consume_token(token)
        advances.append(time.perf_counter() - started)
    report(
        "llguidance",
        fills,
        advances,
        {
            "vocab": vocab,
            "batch": batch,
            "tokenizer_s": round(wrap_s, 3),
            "compile_ms": round(1000 * compile_s, 2),
        },
    )


def run_xgrammar(tokenizer, batch: int, steps: int, seed: int) -> None:
    try:
        import xgrammar as xgr
    except ImportError:
        print(json.dumps({"engine": "xgrammar", "skipped": "not importable"}))
        return
    vocab = len(tokenizer)
    started = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
    compiler = xgr.GrammarCompiler(info, max_threads=2)
    wrap_s = time.perf_counter() - started
    started = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
    compile_s = time.perf_counter() - started
    matchers = [xgr.GrammarMatcher(compiled) for _ in range(batch)]
    batcher = xgr.BatchGrammarMatcher()
    mask = xgr.allocate_token_bitmask(batch, vocab)
    rng = random.Random(seed)
    fills, advances = [], []
    for _ in range(steps):
        live = [i for i, m in enumerate(matchers) if not m.is_terminated()]
        if not live:
            break
        started = time.perf_counter()
        batcher.batch_fill_next_token_bitmask([matchers[i] for i in live], mask, live)
        fills.append(time.perf_counter() - started)
        picks = [rng.choice(allowed(mask[i], vocab)) for i in live]
        started = time.perf_counter()
        for i, token in zip(live, picks):
            matchers[i].accept_token(token)
        advances.append(time.perf_counter() - started)
    report(
        "xgrammar",
        fills,
        advances,
        {
            "vocab": vocab,
            "batch": batch,
            "tokenizer_s": round(wrap_s, 3),
            "compile_ms": round(1000 * compile_s, 2),
        },
    )


def run_engine_path(tokenizer, batch: int, steps: int, seed: int) -> None:
    sys.path.insert(
        0, str(Path(__file__).resolve().parent.parent / "model_repository/qwen2_5_vl/1")
    )
    from qwen_vl_backend.contract import ModelLimits
    from qwen_vl_backend.engine.grammar import GrammarCompiler, TokenMasks
    from qwen_vl_backend.request.params import parse_sampling_parameters

    vocab = len(tokenizer)
    structured = parse_sampling_parameters(
        json.dumps({"structured": {"type": "json_schema", "schema": SCHEMA}})
    ).structured
    compiler = GrammarCompiler(tokenizer, vocab, [tokenizer.eos_token_id], ModelLimits(), 2**26)
    compiler.tokenizer()
    compiled = compiler.compile(structured)
    masks = TokenMasks(vocab)
    matchers = [compiled.matcher() for _ in range(batch)]
    generator = torch.Generator().manual_seed(seed)
    applies, advances = [], []
    for _ in range(steps):
        live = [i for i, m in enumerate(matchers) if not m.is_stopped()]
        if not live:
            break
        logits = torch.randn(batch, vocab, generator=generator)
        started = time.perf_counter()
        failed = masks.apply(logits, live, [matchers[i] for i in live])
        applies.append(time.perf_counter() - started)
        assert not failed
        tokens = logits.argmax(dim=-1).tolist()
        started = time.perf_counter()
        for i in live:
            assert matchers[i].consume_token(tokens[i])
        advances.append(time.perf_counter() - started)
    report(
        "engine TokenMasks.apply (llguidance)",
        applies,
        advances,
        {"vocab": vocab, "batch": batch, "compile_ms": round(1000 * compiled.compile_seconds, 2)},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True, help="a directory with tokenizer.json")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    for run in (run_llguidance, run_xgrammar, run_engine_path):
        run(tokenizer, args.batch, args.steps, args.seed)


if __name__ == "__main__":
    main()
