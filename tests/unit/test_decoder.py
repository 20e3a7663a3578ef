"""The engine's lean decoder (qwen_vl_backend/modeling/decoder.py) against HF's text forward, the
reference, on the tiny checkpoint: logits within a stated tolerance and the same greedy tokens
for text, an image, a video, chunked prefill, rows joining mid-way and a decode batch; bfloat16
on the CPU; the compile switch."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading

import pytest
import torch
from sample_images import encoded_image
from sample_videos import clip

from qwen_vl_backend.engine.batching import BatchingEngine
from qwen_vl_backend.engine.kv_cache import PrefillChunk, SlotKVCache, StepLayout
from qwen_vl_backend.modeling import cpu_linear, step_compile
from qwen_vl_backend.modeling.checkpoint import load_checkpoint
from qwen_vl_backend.modeling.decoder import FusedSlice, LeanDecoder, MRopeTable
from qwen_vl_backend.request.prepare import RawRequest, prepare
from qwen_vl_backend.settings import ModelSettings

SETTINGS = ModelSettings()
# Largest |lean - HF| allowed on a logit (the tiny checkpoint's logits stay within ±8).
# float32: the two differ only in summation order (fused vs separate GEMMs, oneDNN's packed
# layout, SDPA's blocking); at most 1.3e-5 measured. bfloat16: two rounding steps of a logit in
# [4, 8) (2 x 2^-5), room for another kernel's accumulation order; 0 measured on the
# development CPU, where both run the same dense bf16 GEMMs.
FP32_TOLERANCE = 1e-4
BF16_TOLERANCE = 0.0625

PROMPTS = {
    "text": ("Describe a cat in a few words.", [], []),
    "image": (
        [{"type": "image"}, {"type": "text", "text": "What is it?"}],
        [encoded_image(size=(112, 84))],
        [],
    ),
    # 1 fps: two seconds a temporal patch, so its temporal positions step by 4 (time, not count)
    "video": (
        [{"type": "video", "fps": 1.0}, {"type": "text", "text": "What happens?"}],
        [],
        [clip(seconds=4)],
    ),
}


def raw_request(content, images=(), videos=(), max_tokens=12, **extra) -> RawRequest:
    return RawRequest(
        request_id="d",
        messages=json.dumps([{"role": "user", "content": content}]),
        images=list(images),
        videos=list(videos),
        exclude_input_in_output=True,
        sampling_parameters=json.dumps({"max_tokens": max_tokens, "temperature": 0, **extra}),
    )


@pytest.fixture(scope="module")
def reference(tiny_checkpoint_path):
    """HF's model, untouched: the reference forward (and the embeddings both forwards take)."""
    return load_checkpoint(tiny_checkpoint_path, "cpu", "float32")


@pytest.fixture(scope="module", params=["packed", "dense"])
def lean(request, tiny_checkpoint_path):
    model = load_checkpoint(tiny_checkpoint_path, "cpu", "float32").model
    pack = request.param == "packed"
    assert cpu_linear.available(model) or not pack
    return model, LeanDecoder(model, pack)


@dataclasses.dataclass
class Sequence:
    """One sequence's inputs: every embedding row fed or to feed, and its mrope positions."""

    embeds: torch.Tensor
    positions: torch.Tensor
    rope_delta: int
    slot: int
    cached: int = 0

    def append(self, token: int, checkpoint) -> None:
        """A generated token, at text position `len` + rope_delta as the engine places it."""
        row = checkpoint.model.get_input_embeddings()(torch.tensor([token]))
        position = torch.full((3, 1), self.embeds.shape[0] + self.rope_delta)
        self.embeds = torch.cat([self.embeds, row])
        self.positions = torch.cat([self.positions, position], dim=1)


def prompt(checkpoint, name: str, slot: int) -> Sequence:
    """The prompt's input embeddings as the engine builds them: token embeddings, the image and
    video rows from the vision tower."""
    content, images, videos = PROMPTS[name]
    prepared = prepare(raw_request(content, images, videos), checkpoint, SETTINGS)
    inputs, model = prepared.inputs, checkpoint.model.model
    ids = inputs["input_ids"][0]
    with torch.inference_mode():
        embeds = model.get_input_embeddings()(ids).clone()
        for kind, pixels, grid, token in [
            ("image", "pixel_values", "image_grid_thw", checkpoint.image_token_id),
            ("video", "pixel_values_videos", "video_grid_thw", checkpoint.video_token_id),
        ]:
            if inputs.get(grid) is not None:
                features = getattr(model, f"get_{kind}_features")(inputs[pixels], inputs[grid])
                embeds[ids == token] = torch.cat(features.pooler_output)
    return Sequence(embeds, prepared.positions, prepared.rope_delta, slot)


def hf_logits(checkpoint, sequence: Sequence, upto: int) -> torch.Tensor:
    """HF's text forward over the sequence's first `upto` rows, all at once: [upto, vocab]."""
    model = checkpoint.model
    hidden = model.model.language_model(
        inputs_embeds=sequence.embeds[None, :upto],
        position_ids=sequence.positions[:, None, :upto],
        use_cache=False,
    ).last_hidden_state
    return model.lm_head(hidden[0]).float()


class LeanSteps:
    """Packed steps through the lean decoder over its own slot cache, as the engine builds them."""

    def __init__(self, model, decoder, slots: int = 4, slot_len: int = 256):
        self.decoder = decoder
        self.cache = SlotKVCache.for_model(model, slots, slot_len)

    def step(self, decode: list[Sequence], chunks: list[tuple[Sequence, int]]) -> list:
        """`decode`: sequences whose last row is new; `chunks`: (sequence, length) of prompt rows
        from its cached count. Logits of every row, split per entry."""
        embeds = [s.embeds[-1:] for s in decode]
        positions = [s.positions[:, -1:] for s in decode]
        layout_chunks, offset = [], len(decode)
        for sequence, length in chunks:
            start = sequence.cached
            embeds.append(sequence.embeds[start : start + length])
            positions.append(sequence.positions[:, start : start + length])
            layout_chunks.append(PrefillChunk(sequence.slot, start, length, offset))
            offset += length
        layout = StepLayout(
            [s.slot for s in decode], [s.cached + 1 for s in decode], layout_chunks, "cpu"
        )
        logits = self.decoder(
            torch.cat(embeds), torch.cat(positions, dim=1), layout, self.cache, list(range(offset))
        )
        for sequence in decode:
            sequence.cached += 1
        for sequence, length in chunks:
            sequence.cached += length
        sizes = [1] * len(decode) + [length for _, length in chunks]
        return list(logits.split(sizes))


def assert_matches_hf(reference, sequence: Sequence, logits: torch.Tensor, tolerance: float):
    """`logits` are the lean rows ending at `sequence.cached`; same greedy token wherever HF's
    top two are further apart than the tolerance allows to flip."""
    want = hf_logits(reference, sequence, sequence.cached)[-len(logits) :]
    assert (logits - want).abs().max().item() <= tolerance
    top2 = want.topk(2).values
    decisive = (top2[:, 0] - top2[:, 1]) > 2 * tolerance
    assert torch.equal(logits.argmax(-1)[decisive], want.argmax(-1)[decisive])
    return int(want[-1].argmax())


@pytest.mark.parametrize("name", ["text", "image", "video"])
def test_prompt_and_greedy_decode_match_hf(reference, lean, name):
    model, decoder = lean
    # slot 0: decode rows in slot order (no scatter); slot 2: a view over idle slots 0 and 1
    slot = 0 if name == "text" else 2
    steps, sequence = LeanSteps(model, decoder), prompt(reference, name, slot)
    with torch.inference_mode():
        (logits,) = steps.step([], [(sequence, sequence.embeds.shape[0])])
        token = assert_matches_hf(reference, sequence, logits, FP32_TOLERANCE)
        assert token == int(logits[-1].argmax())
        for _ in range(6):
            sequence.append(token, reference)
            (logits,) = steps.step([sequence], [])
            token = assert_matches_hf(reference, sequence, logits, FP32_TOLERANCE)


def test_chunked_prefill_rows_joining_and_a_decode_batch_match_hf(reference, lean):
    """The text prompt is prefilled in chunks of 7 alone; the image prompt's chunks then share
    steps with the text's decode tokens, the video's with both; then all three decode together.
    Every row of every step is checked against HF's forward over that sequence alone."""
    model, decoder = lean
    steps = LeanSteps(model, decoder)
    # slots out of row order, with an idle one inside the decode view
    joining = [prompt(reference, name, slot) for slot, name in zip([2, 0, 3], PROMPTS)]
    decoding: list[Sequence] = []
    with torch.inference_mode():
        while joining:
            chunk = joining[0]
            length = min(7, chunk.embeds.shape[0] - chunk.cached)
            finishing = chunk.cached + length == chunk.embeds.shape[0]
            logits = steps.step(decoding, [(chunk, length)])
            for sequence, rows in zip([*decoding, chunk], logits):
                token = assert_matches_hf(reference, sequence, rows, FP32_TOLERANCE)
                if sequence is not chunk or finishing:
                    sequence.append(token, reference)
            if finishing:
                decoding.append(joining.pop(0))
        for _ in range(4):  # a decode batch of three rows
            for sequence, rows in zip(decoding, steps.step(decoding, [])):
                token = assert_matches_hf(reference, sequence, rows, FP32_TOLERANCE)
                sequence.append(token, reference)


def test_bfloat16_matches_hf_bfloat16_within_its_tolerance(tiny_checkpoint_path):
    reference = load_checkpoint(tiny_checkpoint_path, "cpu", "bfloat16")
    model = load_checkpoint(tiny_checkpoint_path, "cpu", "bfloat16").model
    decoder = LeanDecoder(model, pack=False)
    steps = LeanSteps(model, decoder)
    with torch.inference_mode():
        for slot, name in enumerate(["text", "image"]):
            sequence = prompt(reference, name, slot)
            (logits,) = steps.step([], [(sequence, sequence.embeds.shape[0])])
            assert logits.dtype == torch.float32
            token = assert_matches_hf(reference, sequence, logits, BF16_TOLERANCE)
            for _ in range(4):
                sequence.append(token, reference)
                (logits,) = steps.step([sequence], [])
                token = assert_matches_hf(reference, sequence, logits, BF16_TOLERANCE)


def test_hf_modules_share_the_fused_weights_and_still_generate(reference, lean):
    model, decoder = lean
    attn = model.model.language_model.layers[0].self_attn
    fused = decoder.weights.layers[0].qkv
    if decoder.weights.packed:
        assert isinstance(attn.q_proj, FusedSlice) and attn.q_proj.packed_weight is fused
    else:  # views into the fused matrix, not copies
        assert attn.k_proj.weight.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
        assert attn.k_proj.weight.data_ptr() == fused[attn.q_proj.out_features].data_ptr()
    request = prepare(raw_request(*PROMPTS["image"][:2], max_tokens=8), reference, SETTINGS)
    with torch.inference_mode():
        ours = model.generate(**request.inputs, max_new_tokens=8, do_sample=False)
        theirs = reference.model.generate(**request.inputs, max_new_tokens=8, do_sample=False)
    assert torch.equal(ours, theirs)


def test_rope_table_matches_hf_rotary_far_past_its_first_size(reference):
    rotary = reference.model.model.language_model.rotary_emb
    table = MRopeTable(rotary, torch.float32, torch.device("cpu"))
    positions = torch.tensor([[0, 7, 4095, 4096, 70000], [0, 3, 9, 5000, 12], [0, 5, 1, 2, 69999]])
    cos, sin = table(positions)
    want_cos, want_sin = rotary(torch.zeros(1, dtype=torch.float32), positions[:, None])
    torch.testing.assert_close(cos[:, 0], want_cos[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(sin[:, 0], want_sin[0], atol=1e-6, rtol=0)


# ---- through the engine: bfloat16 on the CPU, the compile switch ----------------------------


class Sink:
    def __init__(self):
        self.final, self.error, self.done = None, None, threading.Event()

    def is_cancelled(self):
        return False

    def send(self, chunk):
        if chunk.final:
            self.final = chunk
            self.done.set()

    def fail(self, error):
        self.error = error
        self.done.set()

    def cancelled(self):
        self.done.set()


def generate(engine, prompts, max_tokens=16) -> list:
    """Submit every prompt at once; the final chunks."""
    sinks = [Sink() for _ in prompts]
    for (content, images, videos), sink in zip(prompts, sinks):
        engine.submit(raw_request(content, images, videos, max_tokens), sink)
    for sink in sinks:
        assert sink.done.wait(120) and sink.error is None, sink.error
    return [sink.final for sink in sinks]


def engine_texts(checkpoint, prompts, **settings) -> tuple[list[str], BatchingEngine]:
    engine = BatchingEngine(checkpoint, dataclasses.replace(SETTINGS, **settings))
    try:
        finals = generate(engine, prompts)
    finally:
        assert engine.shutdown(30)
    return [f.text for f in finals], engine


BATCH = [PROMPTS["text"], PROMPTS["image"], ("Tell me a story about rain.", [], [])]


def test_a_bfloat16_engine_on_the_cpu_generates_batch_invariant_tokens(tiny_checkpoint_path):
    checkpoint = load_checkpoint(tiny_checkpoint_path, "cpu", "bfloat16")
    alone = [engine_texts(checkpoint, [p], max_batch_size=1)[0][0] for p in BATCH]
    batched, engine = engine_texts(checkpoint, BATCH)
    assert engine.stats.largest_batch >= 2 and engine.stats.failed == 0
    assert batched == alone and all(alone)


# A compiled forward takes dense weights; the eager engines it is compared with must too (the
# first engine on a model object fuses its weights, and later ones share them).
DENSE = {"cpu_packed_linear": False}


@pytest.fixture(scope="module")
def dense_checkpoint(tiny_checkpoint_path):
    """A model object of its own, fused densely by its first engine."""
    return load_checkpoint(tiny_checkpoint_path, "cpu", "float32")


# aot_eager: dynamo's whole-graph capture with the engine's buckets, padding and guards, in
# ~2 s. inductor (what serving uses) adds its code generation: ~15 s with a warm on-disk cache,
# ~90 s cold on 2 loaded cores, beyond the suite's budget, so it runs on request.
INDUCTOR = pytest.param(
    "inductor",
    marks=pytest.mark.skipif(
        not os.environ.get("QWEN_VL_TEST_INDUCTOR"), reason="set QWEN_VL_TEST_INDUCTOR=1"
    ),
)


@pytest.mark.parametrize("backend", ["aot_eager", INDUCTOR])
def test_compile_on_gives_the_eager_tokens(dense_checkpoint, backend, monkeypatch):
    monkeypatch.setattr(step_compile, "BACKEND", backend)
    eager, _ = engine_texts(dense_checkpoint, BATCH[:2], compile="off", **DENSE, max_step_tokens=8)
    compiled, engine = engine_texts(
        dense_checkpoint, BATCH[:2], compile="on", compile_buckets="8", max_step_tokens=8
    )
    assert engine._text_forward.buckets == [8], "the decoder did not compile"
    assert compiled == eager


def test_a_failing_compile_falls_back_to_eager_at_load_and_in_a_step(
    dense_checkpoint, monkeypatch, caplog
):
    eager, _ = engine_texts(dense_checkpoint, BATCH[:1], compile="off", **DENSE)

    def refusing(function, **kwargs):
        def compiled(*args):
            raise RuntimeError("inductor says no")

        return compiled

    monkeypatch.setattr(torch, "compile", refusing)
    with caplog.at_level(logging.WARNING, logger=step_compile.__name__):
        texts, engine = engine_texts(dense_checkpoint, BATCH[:1], compile="on")
    assert texts == eager and engine._text_forward.buckets == []
    assert "compile failed; the decoder runs eagerly" in caplog.text

    calls = []

    def failing_after_warm_up(function, **kwargs):  # warm-up passes, the first real step fails
        def compiled(*args):
            calls.append(function)
            if len(calls) > 2 * 4:  # two parts x four buckets
                raise RuntimeError("inductor says no")
            return function(*args)

        return compiled

    monkeypatch.setattr(torch, "compile", failing_after_warm_up)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=step_compile.__name__):
        texts, engine = engine_texts(
            dense_checkpoint, BATCH[:1], compile="on", compile_buckets="1,2,4,8"
        )
    assert texts == eager and engine._text_forward.buckets == []
    assert "the decoder runs eagerly from now on" in caplog.text
