"""Loading a Qwen2.5-VL checkpoint (model + processor) onto one device."""

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

    def decode(self, token_ids) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)


def _eos_ids(model, tokenizer) -> frozenset[int]:
    ids = model.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return frozenset(ids)


def load_checkpoint(
    name_or_path: str,
    device: str,
    dtype: str,
    attn_implementation: str = "sdpa",
    max_model_len: int = 0,
) -> Checkpoint:
    import torch
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    model = (
        Qwen2_5_VLForConditionalGeneration.from_pretrained(
            name_or_path,
            dtype=getattr(torch, dtype),
            attn_implementation=attn_implementation,
        )
        .to(device)
        .eval()
    )
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
