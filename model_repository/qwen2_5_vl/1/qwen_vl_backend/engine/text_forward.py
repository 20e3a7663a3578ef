"""The text model's forward for one packed step: the engine's lean decoder (the default) or HF's
module stack (`forward: hf`, the reference, kept for comparison and as a fallback).

Both take the step's input embeddings [T, hidden], its mrope positions [3, T] (CPU), the
`StepLayout`, the slot cache and the rows that sample, and return those rows' logits (float32,
on the embeddings' device).
"""

from __future__ import annotations

import logging

import torch

from ..modeling import cpu_linear, decoder, step_compile
from ..settings import ModelSettings
from .kv_cache import SlotKVCache, StepLayout, install, packed_step

log = logging.getLogger(__name__)


def text_forward(
    model, device: str, settings: ModelSettings, largest_step: int, lora_slots: int = 0
):
    """The forward `settings` ask for; HF's when the lean one cannot run this model.
    `largest_step`: the most tokens one step can hold (the largest compiled bucket).
    `lora_slots`: resident LoRA adapters the lean decoder holds stacks for (0: none)."""
    if settings.forward == "lean":
        why = decoder.unsupported(model)
        if why is None:
            return _lean(model, device, settings, largest_step, lora_slots)
        log.warning("the lean forward cannot run this model (%s); using HF's", why)
    return HFForward(model, settings.cpu_packed_linear and cpu_linear.available(model))


def _lean(model, device: str, settings: ModelSettings, largest_step: int, lora_slots: int):
    compiled = settings.resolve_compile(device)
    # Inductor cannot trace oneDNN's packed weights: a compiled forward takes them dense.
    pack = settings.cpu_packed_linear and cpu_linear.available(model) and not compiled
    lean = decoder.LeanDecoder(model, pack)
    if lora_slots:
        lean.enable_lora(lora_slots, settings.max_lora_rank)
    if compiled:
        buckets = settings.compile_bucket_sizes() or step_compile.power_of_two_buckets(largest_step)
        step_compile.compile_decoder(lean, buckets)
    log.info(
        "text forward: lean (%s weights%s)",
        "oneDNN-packed" if lean.weights.packed else "dense",
        f", compiled for {lean.buckets}" if lean.buckets else "",
    )
    return lean


class HFForward:
    """transformers' text model over the slot cache (`kv_cache.slot_attention`)."""

    def __init__(self, model, pack: bool):
        install(model)
        if pack:
            cpu_linear.pack_text_linears(model)
        self._model = model
        log.info("text forward: HF's module stack")

    def __call__(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        layout: StepLayout,
        cache: SlotKVCache,
        rows: list[int],
    ) -> torch.Tensor:
        model = self._model
        with packed_step(cache, layout):
            hidden = model.model.language_model(
                inputs_embeds=embeds[None],
                position_ids=positions.to(embeds.device)[:, None, :],
                cache=cache,
                attention_mask={"full_attention": None},
                use_cache=True,
            ).last_hidden_state
        # .to: the LM head sits on the last GPU of a device_map; sampling works on the first.
        return model.lm_head(hidden[0, rows]).float().to(embeds.device)
