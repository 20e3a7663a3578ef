"""The vision tower in stages, so its work can be spread over several engine steps.

Encoding one 448×336 image took ~60 ms on the 2-core development machine — a step of its own
that every running stream would wait through. Run block by block, each engine step carries a
share of it (as prompt chunks share the token budget), so no step is much longer than another.

`VisionJob` mirrors `Qwen2_5_VisionTransformerPretrainedModel.forward` of the pinned transformers
(5.24): prologue (patch embedding, window permutation, rotary), one block per stage, then the
merger. tests/unit/test_vision_stages.py checks that its output equals the model's own forward,
so a transformers upgrade that changes the tower fails there, not in production.
"""

from __future__ import annotations

import torch
from transformers.utils.generic import get_max_seqlen
from transformers.vision_utils import (
    get_vision_attention_seqlens,
    get_vision_position_ids,
    get_vision_window_index,
)


class VisionJob:
    """Encodes `pixel_values` (the images of `grid_thw`) one stage per `advance()` call.
    `lora`: the tower's LoRA hooks, with `slots` the adapter slot of each image (-1: base);
    each image's patches run with its own adapter (an image's patches stay contiguous through
    the window permutation, which reorders within an image only)."""

    def __init__(
        self,
        visual,
        pixel_values: torch.Tensor,
        grid_thw: torch.Tensor,
        lora=None,
        slots: list[int] | None = None,
    ):
        self._visual = visual
        self._pixels = pixel_values.type(visual.dtype)
        self._grid = grid_thw
        self._lora, self._lora_rows = None, None
        if lora is not None and slots and max(slots) >= 0:
            self._lora = lora
            patches = grid_thw.prod(-1).to(pixel_values.device)
            self._lora_rows = torch.tensor(slots, device=pixel_values.device).repeat_interleave(
                patches
            )
        self.stages = len(visual.blocks) + 2  # prologue, blocks, merger
        self.done_stages = 0
        self.embeddings: tuple[torch.Tensor, ...] | None = None  # one per image, when done

    @property
    def done(self) -> bool:
        return self.embeddings is not None

    def advance(self) -> None:
        stage = self.done_stages
        if self._lora is not None:
            self._lora.rows = self._lora_rows
        try:
            if stage == 0:
                self._prologue()
            elif stage <= len(self._visual.blocks):
                self._block(stage - 1)
            else:
                self._merge()
        finally:
            if self._lora is not None:
                self._lora.rows = None
        self.done_stages += 1

    def run(self) -> tuple[torch.Tensor, ...]:
        while not self.done:
            self.advance()
        return self.embeddings

    def _prologue(self) -> None:
        visual, grid = self._visual, self._grid
        self._positions = get_vision_position_ids(grid, visual.spatial_merge_size, kwargs={})
        self._cu_seqlens, self._max_seqlen = get_vision_attention_seqlens(
            grid, visual.config, kwargs={}
        )
        self._window_index, self._cu_window_seqlens = get_vision_window_index(
            grid,
            spatial_merge_size=visual.spatial_merge_size,
            window_size=visual.window_size,
            patch_size=visual.patch_size,
            kwargs={},
        )
        self._max_window_seqlen = get_max_seqlen(
            self._cu_window_seqlens, visual.config, kwargs={}, kwarg_name="max_window_seqlen"
        )
        hidden = visual.patch_embed(self._pixels)
        length = hidden.shape[0]
        self._hidden = visual.permute_input_for_window_attn(
            hidden, self._window_index, seq_len=length
        )
        rotary = visual.rotary_pos_emb(self._hidden, self._positions)
        self._rotary = tuple(
            visual.permute_input_for_window_attn(f, self._window_index, seq_len=length)
            for f in rotary
        )

    def _block(self, index: int) -> None:
        full = index in self._visual.fullatt_block_indexes
        self._hidden = self._visual.blocks[index](
            self._hidden,
            cu_seqlens=self._cu_seqlens if full else self._cu_window_seqlens,
            max_seqlen=self._max_seqlen if full else self._max_window_seqlen,
            position_embeddings=self._rotary,
        )

    def _merge(self) -> None:
        merged = self._visual.merger(self._hidden)[torch.argsort(self._window_index)]
        sizes = (self._grid.prod(-1) // self._visual.spatial_merge_size**2).tolist()
        self.embeddings = torch.split(merged, sizes)
        self._hidden = self._rotary = None
