"""A preallocated KV cache of fixed slots, and the attention that reads it.

Layout: per layer, keys and values live in one buffer each of shape
[slots, kv_heads, slot_len, head_dim]. A sequence owns one slot for its whole life, so admitting
or retiring a sequence moves no other sequence's cache, and a step writes only its new tokens
(in place, one indexed copy per layer).

A step is one *packed* forward: a single row of T tokens holding every running sequence's decode
token followed by prompt chunks of sequences being prefilled. `StepLayout` says, for that row,
which slot and position each token belongs to. Attention (`attend`) then works per group:
- the decode tokens attend together (one SDPA call) to a view of the slot buffers from the lowest
  to the highest slot they use, each row masked to its own valid length (no mask when all are
  equal); slots are handed out lowest-first, so the view spans few idle slots.
  The query heads that share a KV head are passed as that head's query rows (a decode token has
  one query per head and no causal structure), so SDPA reads each KV head once instead of
  expanding it per query head: on the development CPU this halved the kernel's time
  (docs/engine.md "Lean forward");
- each prefill chunk attends to its own slot's prefix plus itself, causally.
Nothing is concatenated or re-padded, and the cache is read through views, not copies.

Two forwards use it: the engine's own decoder (`modeling/decoder.py`) calls `SlotKVCache.write`
and `attend` directly; for HF's text model (the reference, and `forward: hf`) the function is
registered with transformers' `AttentionInterface` as `slot_attention`, and
`SlotKVCache.update` hands HF's attention the slot buffers. Outside a packed step (e.g.
`model.generate` on the same model object) it defers to SDPA, so the checkpoint stays usable
the ordinary way.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ATTENTION_NAME = "qwen_vl_slots"

# On a GPU the decode view's length is rounded up to this many tokens (masked past each row's
# own length), so SDPA's kernels see one shape for 256 steps rather than a new one every step.
_CUDA_LENGTH_MULTIPLE = 256


def decode_length_multiple(device: str) -> int:
    """What `StepLayout.length_multiple` should be on `device` (1: the exact length, on CPU,
    where every extra masked column costs compute and no kernel is rebuilt per shape)."""
    return _CUDA_LENGTH_MULTIPLE if str(device).startswith("cuda") else 1


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
    `length_multiple` rounds the decode view's length up (at most to `slot_len`), so a GPU
    kernel sees the same shape for many steps instead of a new one per step.
    """

    decode_slots: list[int]
    decode_lengths: list[int]
    chunks: list[PrefillChunk]
    device: torch.device
    length_multiple: int = 1
    slot_len: int = 0

    def __post_init__(self):
        slots, positions = list(self.decode_slots), [n - 1 for n in self.decode_lengths]
        for chunk in self.chunks:
            slots += [chunk.slot] * chunk.length
            positions += range(chunk.start, chunk.start + chunk.length)
        self.token_slots = torch.tensor(slots, device=self.device)
        self.token_positions = torch.tensor(positions, device=self.device)
        self.num_decode = len(self.decode_slots)
        # decode token i reads row i of the decode view: no scatter or gather
        first = self.decode_slots[0] if self.decode_slots else 0
        self.decode_in_slot_order = self.decode_slots == list(range(first, first + self.num_decode))
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
                slots, longest, rows, mask = self.decode_view()
                mask = None if mask is None else mask.to(device)
                moved._decode_view = (slots, longest, rows.to(device), mask)
            self._moved[device] = moved
        return moved

    def decode_view(self):
        """(the slice of slots the decode tokens read, the keys each reads at most, each token's
        row in that slice, the key mask or None when every row reads all of them), computed once
        per step. Slots between the decode tokens' that are idle or prefilling get a row that
        sees one (ignored) key."""
        if self._decode_view is None:
            first, last = min(self.decode_slots), max(self.decode_slots)
            longest = max(self.decode_lengths)
            if self.length_multiple > 1:
                longest = -(-longest // self.length_multiple) * self.length_multiple
                longest = min(longest, self.slot_len or longest)
            rows = torch.tensor(self.decode_slots) - first
            lengths = torch.ones(last + 1 - first, dtype=torch.long)
            lengths[rows] = torch.tensor(self.decode_lengths)
            mask = None
            if not bool((lengths == longest).all()):
                mask = (torch.arange(longest)[None, :] < lengths[:, None])[:, None, None, :]
                mask = mask.to(self.device)
            self._decode_view = (slice(first, last + 1), longest, rows.to(self.device), mask)
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

    def write(self, layer: int, keys, values, layout: StepLayout) -> None:
        """This step's keys and values ([T, kv_heads, D]) into their slots, in place."""
        layout = layout.on(self.keys[layer].device)
        slots, positions = layout.token_slots, layout.token_positions
        self.keys[layer][slots, :, positions] = keys
        self.values[layer][slots, :, positions] = values

    def update(self, key_states, value_states, layer_idx: int, kwargs=None):
        """HF's cache call: write this step's keys/values ([1, kv_heads, T, D]) into their slots
        (the layout of the active `packed_step`); return the buffers."""
        self.write(
            layer_idx, key_states[0].transpose(0, 1), value_states[0].transpose(0, 1), self.layout
        )
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


def attend(layout: StepLayout, query, keys, values, scale: float):
    """Attention of a packed step's queries ([T, heads, D]) over a layer's slot buffers
    (already holding this step's keys and values); [T, heads, D]."""
    layout = layout.on(keys.device)
    heads, head_dim = query.shape[1], query.shape[2]
    out = query.new_empty(layout.num_tokens, heads, head_dim)
    if layout.num_decode:
        out[: layout.num_decode] = _decode_attention(layout, query, keys, values, scale)
    for chunk, mask in zip(layout.chunks, layout.chunk_masks):
        end = chunk.start + chunk.length
        attended = F.scaled_dot_product_attention(
            query[chunk.offset : chunk.offset + chunk.length].transpose(0, 1)[None],
            keys[chunk.slot : chunk.slot + 1, :, :end],
            values[chunk.slot : chunk.slot + 1, :, :end],
            attn_mask=mask,
            is_causal=mask is None,
            scale=scale,
            enable_gqa=True,
        )
        out[chunk.offset : chunk.offset + chunk.length] = attended[0].transpose(0, 1)
    return out


def _decode_attention(layout: StepLayout, query, keys, values, scale: float):
    """The decode tokens over their slots: each KV head's query heads as its query rows."""
    slots, longest, rows, mask = layout.decode_view()
    count, heads, head_dim = layout.num_decode, query.shape[1], query.shape[2]
    kv_heads = keys.shape[1]
    grouped = query[:count].reshape(count, kv_heads, heads // kv_heads, head_dim)
    if not layout.decode_in_slot_order:
        span = slots.stop - slots.start
        grouped = query.new_zeros(span, *grouped.shape[1:]).index_copy_(0, rows, grouped)
    attended = F.scaled_dot_product_attention(
        grouped, keys[slots, :, :longest], values[slots, :, :longest], attn_mask=mask, scale=scale
    )
    if not layout.decode_in_slot_order:
        attended = attended[rows]
    return attended.reshape(count, heads, head_dim)


def slot_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """HF's attention interface: `attend` in a packed step, SDPA otherwise. Returns [1, T, H, D]."""
    cache = active_cache()
    if cache is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    return attend(cache.layout, query[0].transpose(0, 1), key, value, scaling)[None], None


def install(model) -> None:
    """Route the text model's attention through `slot_attention` (the vision tower keeps its own)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, slot_attention)
    # The packed step passes no mask; other callers (generate) get SDPA's as before.
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    model.config.text_config._attn_implementation = ATTENTION_NAME
    model.model.language_model.config._attn_implementation = ATTENTION_NAME
