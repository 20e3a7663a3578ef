"""The engine's own Qwen2.5-VL text decoder for packed steps, over the loaded HF weights.

HF's `Qwen2_5_VLTextModel.forward` is general (masks, caches, output capture, deprecation
shims, checkpointing wrappers) and runs every projection, norm and rotary as separate module
calls; per decode step that stack cost as much as the GEMMs it wraps on the development CPU
(docs/engine.md "Lean forward"). This forward does only what a packed step needs, per layer:

    RMSNorm → one q/k/v GEMM (with bias) → M-RoPE (cos/sin gathered per token from a table) →
    slot-KV write + attention (`engine/kv_cache.attend`) → o_proj → residual →
    RMSNorm → one gate/up GEMM → SiLU × up → down → residual

then the final norm and the LM head on the rows that sample only. The arithmetic follows
transformers 5.24's modules op for op (RMSNorm in float32, rotary in the model's dtype, the
mrope sections' axis interleave); tests/unit/test_decoder.py compares logits and greedy tokens
with HF's forward, which stays the reference.

Weights are HF's, not a copy: q/k/v and gate/up are concatenated once into fused matrices and
HF's modules are re-pointed at slices of them (dense), or, with oneDNN prepacking on CPU
(`cpu_linear`), replaced by `FusedSlice` views of the packed product, so `model.generate` on
the same object still works and memory does not grow.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.kv_cache import SlotKVCache, StepLayout, attend, layer_devices
from . import cpu_linear
from .lora import TextLora, add_lora

log = logging.getLogger(__name__)

_LEAN_WEIGHTS = "_qwen_vl_lean_weights"  # where the fused weights live on the text model


def rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen2_5_VLRMSNorm: the statistics in float32, the scale in the model's dtype."""
    dtype = hidden.dtype
    hidden = hidden.to(torch.float32)
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    return weight * hidden.to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rotary_pos_emb on [T, heads, D] with cos/sin [T, 1, D]."""
    half = x.shape[-1] // 2
    return (x * cos) + (torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin)


class MRopeTable:
    """Qwen2.5-VL's multimodal rotary embedding as a lookup: cos/sin of every integer position
    for every frequency, computed as HF computes them (`position * inv_freq` in float32), and
    per token the frequencies of mrope section i taken from position axis i % 3 (temporal,
    height, width). The table grows (doubling) to the largest position a step asks for."""

    def __init__(self, rotary, dtype: torch.dtype, device: torch.device):
        if rotary.rope_type != "default":
            raise ValueError(f"rope_type {rotary.rope_type!r}")
        self._inv_freq = rotary.inv_freq.detach().to(device, torch.float32)
        self._scaling = rotary.attention_scaling
        sections = rotary.mrope_section
        axis = [i % 3 for i, width in enumerate(sections) for _ in range(width)]
        self._axis = torch.tensor(axis, device=device)
        self._dtype, self._device = dtype, device
        self._table = torch.empty(0, 2, len(axis), device=device)

    def __call__(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`positions` [3, T] (long, on the CPU) → cos, sin [T, 1, D] in the model's dtype."""
        self._grow(int(positions.max()) + 1)
        halves = self._table[positions.to(self._device)]  # [3, T, 2, D/2]
        index = self._axis.expand(1, positions.shape[1], 2, -1)
        halves = halves.gather(0, index)[0]  # [T, 2, D/2]
        both = torch.cat((halves, halves), dim=-1).to(self._dtype)
        return both[:, None, 0], both[:, None, 1]

    def _grow(self, needed: int) -> None:
        if needed <= len(self._table):
            return
        size = max(4096, 1 << (needed - 1).bit_length())
        freqs = torch.arange(size, device=self._device).float()[:, None] * self._inv_freq
        self._table = torch.stack((freqs.cos() * self._scaling, freqs.sin() * self._scaling), 1)


class FusedSlice(nn.Module):
    """What HF's q_proj (etc.) becomes when its weight lives packed inside a fused matrix: the
    fused product, sliced. Costs the whole fused GEMM per call: only HF's own forward (the
    reference, `model.generate`) calls it, never the engine's step."""

    def __init__(self, packed: torch.Tensor, bias: torch.Tensor | None, start: int, stop: int):
        super().__init__()
        self.register_buffer("packed_weight", packed, persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        self.start, self.stop = start, stop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_linear.packed_linear(x, self.packed_weight, self.bias)[
            ..., self.start : self.stop
        ]


@dataclass
class LayerWeights:
    """One decoder layer's tensors as the lean forward uses them (dense or oneDNN-packed)."""

    device: torch.device
    input_norm: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor
    o: torch.Tensor
    post_norm: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor


@dataclass
class TextWeights:
    layers: list[LayerWeights]
    packed: bool  # the matrices are in oneDNN's layout: multiply with cpu_linear.packed_linear


def unsupported(model) -> str | None:
    """Why the lean forward cannot run this model (the engine then uses HF's), or None."""
    text = model.model.language_model
    config = text.config
    if getattr(text, _LEAN_WEIGHTS, None) is not None:
        return None
    if any(kind != "full_attention" for kind in config.layer_types):
        return "sliding-window layers"
    if config.hidden_act != "silu":
        return f"hidden_act {config.hidden_act!r}"
    if text.rotary_emb.rope_type != "default":
        return f"rope_type {text.rotary_emb.rope_type!r}"
    if any(p.device.type == "meta" for p in text.parameters()):
        return "weights offloaded by the device_map"
    attn = text.layers[0].self_attn
    if not isinstance(attn.q_proj, nn.Linear):
        return "the text linears were already prepacked for HF's forward"
    return None


def fuse_text_weights(model, pack: bool) -> TextWeights:
    """Fuse q/k/v and gate/up of every text layer (once per model object; later calls return
    the first result). `pack`: hold every text matrix in oneDNN's layout (CPU, float32)."""
    text = model.model.language_model
    fused = getattr(text, _LEAN_WEIGHTS, None)
    if fused is None:
        with torch.no_grad():
            layers = [_fuse_layer(layer, device, pack) for layer, device in _layers(model)]
        if pack:  # o_proj, down_proj and the LM head, as the HF forward packs them
            cpu_linear.pack_text_linears(model)
            for weights, layer in zip(layers, text.layers):
                weights.o = layer.self_attn.o_proj.packed_weight
                weights.down = layer.mlp.down_proj.packed_weight
        fused = TextWeights(layers, pack)
        setattr(text, _LEAN_WEIGHTS, fused)
    return fused


def _layers(model):
    return zip(model.model.language_model.layers, layer_devices(model))


def _fuse_layer(layer, device: torch.device, pack: bool) -> LayerWeights:
    attn, mlp = layer.self_attn, layer.mlp
    projections = [attn.q_proj, attn.k_proj, attn.v_proj]
    qkv = torch.cat([p.weight for p in projections])
    qkv_bias = torch.cat([p.bias for p in projections])
    gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
    owners = [(attn, "q_proj"), (attn, "k_proj"), (attn, "v_proj")]
    if pack:
        qkv = cpu_linear.pack_weight(qkv)
        gate_up = cpu_linear.pack_weight(gate_up)
    _repoint(owners, qkv, qkv_bias, pack)
    _repoint([(mlp, "gate_proj"), (mlp, "up_proj")], gate_up, None, pack)
    return LayerWeights(
        device=device,
        input_norm=layer.input_layernorm.weight,
        qkv=qkv,
        qkv_bias=qkv_bias,
        o=attn.o_proj.weight,
        post_norm=layer.post_attention_layernorm.weight,
        gate_up=gate_up,
        down=mlp.down_proj.weight,
    )


def _repoint(owners, fused: torch.Tensor, bias: torch.Tensor | None, packed: bool) -> None:
    """HF's separate linears become slices of the fused weight (views, or FusedSlice of the
    packed product), so their old tensors are freed."""
    start = 0
    for owner, name in owners:
        linear = getattr(owner, name)
        stop = start + linear.out_features
        if packed:
            setattr(owner, name, FusedSlice(fused, bias, start, stop))
        else:
            linear.weight = nn.Parameter(fused[start:stop], requires_grad=False)
            if bias is not None:
                linear.bias = nn.Parameter(bias[start:stop], requires_grad=False)
        start = stop


class LeanDecoder:
    """The text decoder's packed-step forward (see the module docstring)."""

    def __init__(self, model, pack: bool):
        text = model.model.language_model
        config = text.config
        self._model = model
        self.weights = fuse_text_weights(model, pack)
        self.linear = cpu_linear.packed_linear if self.weights.packed else F.linear
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scale = self.head_dim**-0.5
        self.eps = config.rms_norm_eps
        self.home = model.get_input_embeddings().weight.device
        self.rope = MRopeTable(text.rotary_emb, model.dtype, self.home)
        self.norm = text.norm.weight
        self.lm_head = model.lm_head
        self.lm_head_device = _device_of(model.lm_head)
        self.buckets: list[int] = []  # row counts the dense parts are compiled for (ascending)
        self.lora: TextLora | None = None  # stacked LoRA weights, when adapters are served
        self.use_eager()

    def enable_lora(self, slots: int, rank: int) -> TextLora:
        """Stacks for `slots` resident adapters of rank ≤ `rank` (before compiling, so the
        warm-up compiles the adapter variant too)."""
        devices = [weights.device for weights in self.weights.layers]
        self.lora = TextLora(self._model, slots, rank, devices)
        return self.lora

    def use_eager(self) -> None:
        """The dense parts of a layer run eagerly, on the step's own row count."""
        self.attention_inputs, self.layer_output = self._attention_inputs, self._layer_output
        self.buckets = []

    def padded_rows(self, count: int) -> int:
        """The compiled bucket a step of `count` tokens runs in; `count` itself beyond them."""
        return next((bucket for bucket in self.buckets if bucket >= count), count)

    def forward(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        layout: StepLayout,
        cache: SlotKVCache,
        rows: list[int],
        lora_slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (float32, on the embeddings' device) of `rows` of a packed step.
        `lora_slots` [T] (long): each token row's adapter slot, -1 for the base weights; None
        when no row has an adapter (the step then costs what it did before adapters existed).

        embeds [T, hidden]; positions [3, T] (long, CPU). With compiled buckets the dense parts
        run on the bucket's row count (zero rows past T, which stay zero: no bias reaches them
        but q/k/v's, and those rows are never written or attended), so a graph sees one shape
        per bucket."""
        count = embeds.shape[0]
        cos, sin = self.rope(positions)
        padding = self.padded_rows(count) - count
        if padding:
            embeds, cos, sin = (_pad_rows(t, padding) for t in (embeds, cos, sin))
        hidden, rope = embeds, {self.home: (cos, sin)}
        lora = [None] * len(self.weights.layers)
        if lora_slots is not None and self.lora is not None:
            lora = self.lora.step(lora_slots, count + padding, full=bool(self.buckets))
        for index, weights in enumerate(self.weights.layers):
            device = weights.device
            if device not in rope:
                rope[device] = (cos.to(device), sin.to(device))
            hidden = self._layer(
                index, weights, hidden.to(device), rope[device], layout, cache, count, lora[index]
            )
        last = rms_norm(hidden[rows].to(self.norm.device), self.norm, self.eps)
        return self.lm_head(last.to(self.lm_head_device)).float().to(self.home)

    __call__ = forward

    def _layer(self, index, weights: LayerWeights, hidden, rope, layout, cache, count, lora):
        args = (hidden, weights.input_norm, weights.qkv, weights.qkv_bias, *rope)
        q, k, v = (
            self.attention_inputs(*args) if lora is None else self.attention_inputs(*args, lora[0])
        )
        cache.write(index, k[:count], v[:count], layout)
        attended = attend(layout, q[:count], cache.keys[index], cache.values[index], self.scale)
        attended = attended.reshape(count, -1)
        if hidden.shape[0] > count:
            attended = _pad_rows(attended, hidden.shape[0] - count)
        args = (hidden, attended, weights.o, weights.post_norm, weights.gate_up, weights.down)
        return self.layer_output(*args) if lora is None else self.layer_output(*args, lora[1:])

    def _attention_inputs(self, hidden, norm, qkv, qkv_bias, cos, sin, lora=None):
        """RMSNorm, the fused q/k/v product (plus each row's adapter delta, `lora` = (mask, A,
        B)), rotary (q and k in one call: the same per-token rotation): q [T, heads, D], k and
        v [T, kv_heads, D]."""
        count, dim = hidden.shape[0], self.head_dim
        qk_heads = self.heads + self.kv_heads
        x = rms_norm(hidden, norm, self.eps)
        fused = self.linear(x, qkv, qkv_bias)
        if lora is not None:
            fused = add_lora(fused, x, lora)
        qk, v = fused.split([qk_heads * dim, self.kv_heads * dim], dim=-1)
        q, k = rotate(qk.view(count, qk_heads, dim), cos, sin).split(
            [self.heads, self.kv_heads], dim=1
        )
        return q, k, v.view(count, self.kv_heads, dim)

    def _layer_output(self, hidden, attended, o, post_norm, gate_up, down, lora=None):
        """o_proj and residual, RMSNorm, the fused gate/up product, SiLU × up, down, residual;
        with `lora` ((mask, A, B) of o, gate_up and down) each product plus its row's delta."""
        if lora is None:
            hidden = hidden + self.linear(attended, o)
            gate, up = self.linear(rms_norm(hidden, post_norm, self.eps), gate_up).chunk(2, dim=-1)
            return hidden + self.linear(F.silu(gate) * up, down)
        o_lora, gate_up_lora, down_lora = lora
        hidden = hidden + add_lora(self.linear(attended, o), attended, o_lora)
        x = rms_norm(hidden, post_norm, self.eps)
        gate, up = add_lora(self.linear(x, gate_up), x, gate_up_lora).chunk(2, dim=-1)
        x = F.silu(gate) * up
        return hidden + add_lora(self.linear(x, down), x, down_lora)


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """`rows` zero rows appended along the first dimension."""
    return F.pad(tensor, (0, 0) * (tensor.dim() - 1) + (0, rows))


def _device_of(module: nn.Module) -> torch.device:
    return next(iter([*module.parameters(), *module.buffers()])).device
