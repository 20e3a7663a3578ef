"""A preallocated KV cache of fixed slots, and the attention that reads it.

Layout: per layer, keys and values live in one buffer each of shape
[slots, kv_heads, slot_len, head_dim]. A sequence owns one slot for its whole life, so admitting
or retiring a sequence moves no other sequence's cache, and a step writes only its new tokens
(in place, one indexed copy per layer).

A step is one *packed* forward: a single row of T tokens holding every running sequence's decode
token followed by prompt chunks of sequences being prefilled. `StepLayout` says, for that row,
which slot and position each token belongs to. Attention then works per group:
- the decode tokens attend together (one SDPA call) to a view of the slot buffers, each row masked
  to its own valid length; slots are handed out lowest-first, so the view spans few idle slots;
- each prefill chunk attends to its own slot's prefix plus itself, causally.
Nothing is concatenated or re-padded, and the cache is read through views, not copies.

The attention function is registered with transformers' `AttentionInterface`; the model's own
attention modules (projections, rotary, output) run unchanged and hand it the query, and get the
slot buffers back from `SlotKVCache.update`. Outside a packed step (e.g. `model.generate` on the
same model object) it defers to SDPA, so the checkpoint stays usable the ordinary way.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ATTENTION_NAME = "qwen_vl_slots"


@dataclass
class PrefillChunk:
    """Prompt tokens [start, start + length) of the sequence in `slot`, at `offset` in the row."""

    slot: int
    start: int
    length: int
    offset: int


@dataclass
class StepLayout:
    """Where each token of a packed step comes from and goes to.

    decode_slots[i] is the slot of the i-th token of the row (decode tokens come first);
    decode_lengths[i] is that slot's valid length once the token is written.
    """

    decode_slots: list[int]
    decode_lengths: list[int]
    chunks: list[PrefillChunk]
    device: torch.device

    def __post_init__(self):
        slots, positions = list(self.decode_slots), [n - 1 for n in self.decode_lengths]
        for chunk in self.chunks:
            slots += [chunk.slot] * chunk.length
            positions += range(chunk.start, chunk.start + chunk.length)
        self.token_slots = torch.tensor(slots, device=self.device)
        self.token_positions = torch.tensor(positions, device=self.device)
        self.num_decode = len(self.decode_slots)
        self.num_tokens = len(slots)
        self._decode_view = None
        self._home = torch.device(self.device)
        self._moved: dict[torch.device, StepLayout] = {}
        # Per chunk: None (it starts the prompt: plain causal), else its mask; built once per
        # step, since every layer asks.
        self.chunk_masks = [
            None
            if chunk.start == 0
            else torch.ones(
                chunk.length, chunk.start + chunk.length, dtype=torch.bool, device=self.device
            ).tril(chunk.start)  # query i sits at position start + i: it sees keys 0 … start + i
            for chunk in self.chunks
        ]

    def on(self, device: torch.device) -> StepLayout:
        """This layout with its tensors on `device`: itself on a single device; for a model split
        across GPUs (device_map), a copy per device of the layers there, made once per step."""
        if device == self._home:
            return self
        moved = self._moved.get(device)
        if moved is None:
            moved = copy.copy(self)
            moved.device, moved._home, moved._moved = device, device, {}
            moved.token_slots = self.token_slots.to(device)
            moved.token_positions = self.token_positions.to(device)
            moved.chunk_masks = [None if m is None else m.to(device) for m in self.chunk_masks]
            if self.num_decode:
                span, longest, rows, mask = self.decode_view()
                moved._decode_view = (span, longest, rows.to(device), mask.to(device))
            self._moved[device] = moved
        return moved

    def decode_view(self):
        """(slot span, longest length, query scatter index, key mask), computed once per step."""
        if self._decode_view is None:
            span = max(self.decode_slots) + 1
            longest = max(self.decode_lengths)
            lengths = torch.ones(span, dtype=torch.long)  # idle slots see one (ignored) key
            lengths[self.decode_slots] = torch.tensor(self.decode_lengths)
            mask = torch.arange(longest)[None, :] < lengths[:, None]
            self._decode_view = (
                span,
                longest,
                self.token_slots[: self.num_decode],
                mask.to(self.device)[:, None, None, :],
            )
        return self._decode_view


class SlotKVCache:
    """Per-layer key/value buffers of `slots` × `slot_len` tokens; see the module docstring."""

    def __init__(
        self,
        num_layers: int,
        slots: int,
        slot_len: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str | list,
    ):
        """`device`: one for every layer, or a list with each layer's (a model split across
        GPUs keeps each layer's cache next to its weights)."""
        shape = (slots, kv_heads, slot_len, head_dim)
        devices = list(device) if isinstance(device, list | tuple) else [device] * num_layers
        assert len(devices) == num_layers, (len(devices), num_layers)
        self.keys = [torch.zeros(shape, dtype=dtype, device=d) for d in devices]
        self.values = [torch.zeros(shape, dtype=dtype, device=d) for d in devices]
        self.slots, self.slot_len = slots, slot_len
        self.layout: StepLayout | None = None

    @classmethod
    def for_model(cls, model, slots: int, slot_len: int) -> SlotKVCache:
        text = model.config.text_config
        head_dim = text.hidden_size // text.num_attention_heads
        return cls(
            text.num_hidden_layers,
            slots,
            slot_len,
            text.num_key_value_heads,
            head_dim,
            model.dtype,
            layer_devices(model),
        )

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def update(self, key_states, value_states, layer_idx: int, kwargs=None):
        """Write this step's keys/values ([1, kv_heads, T, D]) into their slots; return the buffers."""
        layout = self.layout.on(self.keys[layer_idx].device)
        slots, positions = layout.token_slots, layout.token_positions
        self.keys[layer_idx][slots, :, positions] = key_states[0].transpose(0, 1)
        self.values[layer_idx][slots, :, positions] = value_states[0].transpose(0, 1)
        return self.keys[layer_idx], self.values[layer_idx]

    def copy_slot(self, source: int, target: int, length: int) -> None:
        """Fork: `target` starts with `source`'s first `length` cached tokens (n > 1 choices)."""
        for buffer in self.keys + self.values:
            buffer[target, :, :length] = buffer[source, :, :length]

    # get_seq_length etc. are never asked for: the engine passes positions and masks itself.


def layer_devices(model) -> list[torch.device]:
    """The device of each text decoder layer: all `model.device` unless the checkpoint was
    loaded with a device_map that splits the layers across GPUs."""
    layers = model.model.language_model.layers
    return [
        next(layer.parameters(), torch.empty(0, device=model.device)).device for layer in layers
    ]


_active = threading.local()


def active_cache() -> SlotKVCache | None:
    return getattr(_active, "cache", None)


class packed_step:
    """Context in which the model's attention reads `cache` according to `layout`."""

    def __init__(self, cache: SlotKVCache, layout: StepLayout):
        self._cache, self._layout = cache, layout

    def __enter__(self):
        self._cache.layout = self._layout
        _active.cache = self._cache

    def __exit__(self, *exc):
        _active.cache = None
        self._cache.layout = None


def slot_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention over the slot buffers for a packed step; SDPA otherwise. Returns [1, T, H, D]."""
    cache = active_cache()
    if cache is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    layout = cache.layout.on(key.device)
    heads, head_dim = query.shape[1], query.shape[3]
    out = query.new_empty(layout.num_tokens, heads, head_dim)
    if layout.num_decode:
        span, longest, rows, mask = layout.decode_view()
        q = query.new_zeros(span, heads, 1, head_dim)
        q[rows] = query[0, :, : layout.num_decode].transpose(0, 1)[:, :, None]
        attended = F.scaled_dot_product_attention(
            q,
            key[:span, :, :longest],
            value[:span, :, :longest],
            attn_mask=mask,
            scale=scaling,
            enable_gqa=True,
        )
        out[: layout.num_decode] = attended[rows, :, 0]
    for chunk, mask in zip(layout.chunks, layout.chunk_masks):
        end = chunk.start + chunk.length
        attended = F.scaled_dot_product_attention(
            query[:, :, chunk.offset : chunk.offset + chunk.length],
            key[chunk.slot : chunk.slot + 1, :, :end],
            value[chunk.slot : chunk.slot + 1, :, :end],
            attn_mask=mask,
            is_causal=mask is None,
            scale=scaling,
            enable_gqa=True,
        )
        out[chunk.offset : chunk.offset + chunk.length] = attended[0].transpose(0, 1)
    return out[None], None


def install(model) -> None:
    """Route the text model's attention through `slot_attention` (the vision tower keeps its own)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, slot_attention)
    # The packed step passes no mask; other callers (generate) get SDPA's as before.
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    model.config.text_config._attn_implementation = ATTENTION_NAME
    model.model.language_model.config._attn_implementation = ATTENTION_NAME
