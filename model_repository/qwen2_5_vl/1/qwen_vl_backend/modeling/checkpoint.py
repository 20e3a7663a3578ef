"""Loading a Qwen2.5-VL checkpoint (model + processor) onto one device, or split over several
GPUs with a device_map."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Written by scripts/build_tiny_checkpoint.py into checkpoints whose weights are random.
RANDOM_WEIGHTS_MARKER = "RANDOM_WEIGHTS"


@dataclass
class Checkpoint:
    model: Any
    processor: Any
    device: str
    eos_token_ids: frozenset[int]
    max_model_len: int
    random_weights: bool

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    @property
    def video_token_id(self) -> int:
        return self.model.config.video_token_id

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    def decode(self, token_ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)


def _eos_ids(model, tokenizer) -> frozenset[int]:
    ids = model.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return frozenset(ids)


def input_device(model) -> str:
    """The device of the input embeddings: the first of a device_map, where inputs go."""
    return str(model.get_input_embeddings().weight.device)


def load_checkpoint(
    name_or_path: str,
    device: str,
    dtype: str,
    attn_implementation: str = "sdpa",
    max_model_len: int = 0,
    device_map: str = "",
    max_memory: dict | None = None,
) -> Checkpoint:
    """`device_map` empty: the model on `device`. Otherwise from_pretrained places it
    (`device` is then ignored) and the checkpoint's device is that of the input embeddings,
    where the engine puts its inputs."""
    import torch
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    kwargs: dict[str, Any] = {}
    if device_map:
        kwargs["device_map"] = device_map
        if max_memory:
            kwargs["max_memory"] = max_memory
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        name_or_path,
        dtype=getattr(torch, dtype),
        attn_implementation=attn_implementation,
        **kwargs,
    )
    if device_map:
        device = input_device(model)
        placed = getattr(model, "hf_device_map", None) or {}
        log.info(
            "device_map=%s placed the model on %s",
            device_map,
            sorted(set(map(str, placed.values()))),
        )
        if any(str(where) in ("cpu", "disk") for where in placed.values()):
            log.warning(
                "device_map=%s offloaded part of the model to cpu/disk: it does not fit the "
                "GPUs (or max_memory); generation will be very slow",
                device_map,
            )
    else:
        model = model.to(device)
    model = model.eval()
    processor = AutoProcessor.from_pretrained(name_or_path)
    limit = model.config.text_config.max_position_embeddings
    return Checkpoint(
        model=model,
        processor=processor,
        device=device,
        eos_token_ids=_eos_ids(model, processor.tokenizer),
        max_model_len=min(max_model_len, limit) if max_model_len > 0 else limit,
        random_weights=(Path(name_or_path) / RANDOM_WEIGHTS_MARKER).is_file(),
    )
