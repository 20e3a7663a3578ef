"""LoRA adapters in PEFT's format, applied per row over stacked weights (the punica idea in torch).

An adapter is PEFT's `adapter_config.json` + `adapter_model.safetensors`: for each targeted linear
a pair A [r, in], B [out, r], and the output becomes `W x + scaling · B (A x)` with scaling
`lora_alpha / r` (`lora_alpha / sqrt(r)` with use_rslora). Targets this engine applies:

- text layers: q/k/v/o_proj, gate/up/down_proj (the lean decoder's fused q/k/v and gate/up
  products each take one stacked pair, see `LoraStack`);
- the vision tower: every block's attn.qkv, attn.proj, mlp.gate/up/down_proj and the merger's
  two linears (mlp.0, mlp.2), through forward hooks on HF's modules (`VisionLora`).

Anything else an adapter carries (patch embedding, embed_tokens, lm_head, DoRA, biases,
modules_to_save, per-module rank or alpha patterns) is refused when it is read, so an adapter
either runs exactly as PEFT would run it or not at all.

Resident adapters live in slots: every target holds A and B of all slots stacked, each padded to
`max_lora_rank` with zeros (so any resident adapter fits any slot, and a compiled step's shapes
do not depend on which adapters it holds). An eager step with adapter rows computes, per target,
one product of x with the A rows of the slots in use, then adds per run of rows on one slot (the
engine orders decode rows by slot) its columns of that product times the slot's B, in place; a
compiled step computes, per target,

    delta = where(mask, x @ A_all^T, 0) @ B_all        mask[t, j] = (slot of row t == slot of j)

two GEMMs over every slot at once plus a select, static shapes: base rows (slot -1) match no
column and get an exact zero, whatever the other slots hold. A step with no adapter row skips
all of it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from ..errors import RequestError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# adapter_config.json is a few KB; anything larger is not one.
MAX_CONFIG_BYTES = 1 << 20

# PEFT module name in a text layer → (the lean decoder's fused target, its part of it)
TEXT_TARGETS: dict[str, tuple[str, int]] = {
    "q_proj": ("qkv", 0),
    "k_proj": ("qkv", 1),
    "v_proj": ("qkv", 2),
    "o_proj": ("o", 0),
    "gate_proj": ("gate_up", 0),
    "up_proj": ("gate_up", 1),
    "down_proj": ("down", 0),
}
FUSED_PARTS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",)}
FUSED_PARTS |= {"gate_up": ("gate_proj", "up_proj"), "down": ("down_proj",)}
VISION_BLOCK_TARGETS = ("attn.qkv", "attn.proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
MERGER_TARGETS = ("merger.mlp.0", "merger.mlp.2")

_TEXT_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
_VISION_KEY = re.compile(
    r"(?:^|\.)visual\.(blocks\.\d+\.(?:attn|mlp)\.\w+|merger\.mlp\.\d+)\.lora_([AB])\.weight$"
)
# adapter_config.json fields whose non-default value changes the arithmetic beyond plain LoRA
_UNSUPPORTED = {
    "use_dora": "DoRA",
    "lora_bias": "LoRA biases",
    "fan_in_fan_out": "fan_in_fan_out",
    "modules_to_save": "modules_to_save",
    "rank_pattern": "per-module ranks (rank_pattern)",
    "alpha_pattern": "per-module alphas (alpha_pattern)",
    "layer_replication": "layer_replication",
    "trainable_token_indices": "trainable_token_indices",
    "target_parameters": "target_parameters",
    "use_qalora": "QA-LoRA",
    "alora_invocation_tokens": "activated LoRA",
}


@dataclass
class AdapterWeights:
    """One adapter read and checked: its pairs (A [r, in], B [out, r], host tensors) by module,
    the scaling, and a digest of its weights file (what caches key its effects by)."""

    rank: int
    scaling: float
    text: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    vision: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    digest: str = ""

    @property
    def touches_vision(self) -> bool:
        return bool(self.vision)

    def to(self, device: torch.device | str, dtype: torch.dtype) -> AdapterWeights:
        move = lambda pair: tuple(t.to(device, dtype) for t in pair)  # noqa: E731
        return AdapterWeights(
            self.rank,
            self.scaling,
            {key: move(pair) for key, pair in self.text.items()},
            {key: move(pair) for key, pair in self.vision.items()},
            self.digest,
        )


def model_shapes(model) -> dict[str, tuple[int, int]]:
    """(in, out) of every module an adapter may target, by PEFT's name: text ones by module name
    (the same in every layer), vision ones by their path under `visual`."""
    config = model.config.text_config
    hidden, inter = config.hidden_size, config.intermediate_size
    head_dim = hidden // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    shapes = {
        "q_proj": (hidden, hidden),
        "k_proj": (hidden, kv),
        "v_proj": (hidden, kv),
        "o_proj": (hidden, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }
    for path in vision_targets(model.model.visual):
        linear = model.model.visual.get_submodule(path)
        shapes[path] = (linear.in_features, linear.out_features)
    return shapes


def vision_targets(visual) -> list[str]:
    """The vision tower's linears an adapter may target, as paths under `visual`."""
    paths = [
        f"blocks.{i}.{name}" for i in range(len(visual.blocks)) for name in VISION_BLOCK_TARGETS
    ]
    return [p for p in [*paths, *MERGER_TARGETS] if isinstance(visual.get_submodule(p), nn.Linear)]


def read_adapter(
    directory: Path, shapes: dict[str, tuple[int, int]], layers: int, max_rank: int, max_bytes: int
) -> AdapterWeights:
    """The adapter in `directory`, checked against the model (`model_shapes`, `layers` text
    layers) and the limits; RequestError with a message that names no path and quotes no
    library otherwise."""
    config = _read_config(directory / CONFIG_FILE)
    rank = config.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise RequestError("adapter_config.json: 'r' must be a positive integer", "lora_path")
    if rank > max_rank:
        raise RequestError(
            f"the adapter's rank {rank} exceeds this server's max_lora_rank {max_rank}",
            "lora_path",
        )
    alpha = config.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or alpha <= 0:
        raise RequestError(
            "adapter_config.json: 'lora_alpha' must be a positive number", "lora_path"
        )
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    weights = AdapterWeights(rank, scaling)
    tensors, weights.digest = _read_weights(directory / WEIGHTS_FILE, max_bytes)
    pairs: dict[tuple | str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        module, which, shape = _target(key, shapes, layers)
        expected = (rank, shape[0]) if which == "A" else (shape[1], rank)
        if tuple(tensor.shape) != expected:
            raise RequestError(
                f"the adapter's lora_{which} of {_name(module)} is {list(tensor.shape)}, expected "
                f"{list(expected)} for this model and r={rank}",
                "lora_path",
            )
        pairs.setdefault(module, {})[which] = tensor
    for module, pair in pairs.items():
        if len(pair) != 2:
            raise RequestError(
                f"the adapter lacks lora_A or lora_B of {_name(module)}", "lora_path"
            )
        if not all(torch.isfinite(t).all() for t in pair.values()):
            raise RequestError(
                f"the adapter's weights of {_name(module)} are not finite", "lora_path"
            )
        target = weights.text if isinstance(module, tuple) else weights.vision
        target[module] = (pair["A"], pair["B"])
    if not pairs:
        raise RequestError("the adapter holds no LoRA weights", "lora_path")
    return weights


def _target(key: str, shapes: dict[str, tuple[int, int]], layers: int):
    """(module, "A" or "B", its (in, out)) of a weights-file key: module is (layer, name) for a
    text projection, the path under `visual` for a vision one; RequestError for anything else."""
    text, vision = _TEXT_KEY.search(key), _VISION_KEY.search(key)
    if text and "visual" not in key and text.group(2) in TEXT_TARGETS:
        layer, name = int(text.group(1)), text.group(2)
        if layer >= layers:
            raise RequestError(
                f"the adapter has layer {layer}; the model has {layers}", "lora_path"
            )
        return (layer, name), text.group(3), shapes[name]
    if vision and vision.group(1) in shapes:
        return vision.group(1), vision.group(2), shapes[vision.group(1)]
    name = ".".join(key.split(".")[-4:-2])[:80]
    raise RequestError(
        f"the adapter targets a module LoRA is not served for here ({name}); supported: the text "
        "layers' q/k/v/o/gate/up/down_proj, the vision blocks' attn.qkv, attn.proj, "
        "mlp.gate/up/down_proj and the merger's linears",
        "lora_path",
    )


def _name(module) -> str:
    return f"layer {module[0]} {module[1]}" if isinstance(module, tuple) else f"visual.{module}"


def _read_config(path: Path) -> dict:
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise RequestError("adapter_config.json is too large", "lora_path")
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        raise RequestError(
            "adapter_config.json is missing or not valid JSON", "lora_path"
        ) from None
    if not isinstance(config, dict):
        raise RequestError("adapter_config.json is not a JSON object", "lora_path")
    if config.get("peft_type", "LORA") != "LORA":
        raise RequestError("the adapter is not a LoRA adapter (peft_type)", "lora_path")
    if config.get("bias", "none") != "none":
        raise RequestError("adapters that train biases are not supported", "lora_path")
    for name, what in _UNSUPPORTED.items():
        if config.get(name):
            raise RequestError(f"adapters with {what} are not supported", "lora_path")
    return config


def _read_weights(path: Path, max_bytes: int) -> tuple[dict[str, torch.Tensor], str]:
    from safetensors.torch import load as load_safetensors

    try:
        size = path.stat().st_size
    except OSError:
        raise RequestError(f"the adapter has no {WEIGHTS_FILE}", "lora_path") from None
    if size > max_bytes:
        raise RequestError(
            f"the adapter's weights are {size / 2**20:.1f} MiB; this server takes at most "
            f"{max_bytes / 2**20:.0f} MiB (max_lora_mb)",
            "lora_path",
        )
    try:
        with open(path, "rb") as file:
            data = file.read(max_bytes + 1)
        if len(data) > max_bytes:  # it grew since the stat
            raise OSError
        return load_safetensors(data), hashlib.sha256(data).hexdigest()
    except Exception:
        raise RequestError(
            f"{WEIGHTS_FILE} could not be read as safetensors", "lora_path"
        ) from None


class LoraStack:
    """One target's A and B over every slot: A [slots·k·R, in], B [slots·k·R, Σout] for a
    target fused from k modules (q/k/v: 3), each slot's block holding module j's A in its rank
    rows j·R… and B^T (scaled) in the same rows, at module j's output columns (block-diagonal,
    so the fused product stays one GEMM; the zeros cost B's bytes k times over for fused
    targets, small next to the base weight)."""

    def __init__(self, slots: int, rank: int, in_features: int, outs: list[int], dtype, device):
        self.parts, self.rank, self.outs = len(outs), rank, outs
        rows = slots * self.parts * rank
        self.a = torch.zeros(rows, in_features, dtype=dtype, device=device)
        self.b = torch.zeros(rows, sum(outs), dtype=dtype, device=device)
        # each slot's (A, B) views, made once: a step takes them per run without slicing
        self.slots = [self._slot(slot) for slot in range(slots)]

    def install(self, slot: int, pairs: list[tuple[torch.Tensor, torch.Tensor] | None], scaling):
        """Slot `slot` takes these pairs (None: that module is not adapted)."""
        width = self.parts * self.rank
        a, b = self.a[slot * width : (slot + 1) * width], self.b[slot * width : (slot + 1) * width]
        a.zero_()
        b.zero_()
        column = 0
        for part, (pair, out) in enumerate(zip(pairs, self.outs)):
            if pair is not None:
                first, r = part * self.rank, pair[0].shape[0]
                a[first : first + r].copy_(pair[0])
                b[first : first + r, column : column + out].copy_(pair[1].t() * scaling)
            column += out

    def runs(self, runs: list[tuple[int, int, int]], low: int, high: int) -> Runs:
        """`Runs` of an eager step whose rows use slots low…high-1 in these runs."""
        width = self.parts * self.rank
        a = self.a[low * width : high * width]
        return Runs(a, [(i, j, (s - low) * width, self.slots[s][1]) for i, j, s in runs])

    def used(self, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A and B of the first `slots` slots (views)."""
        rows = slots * self.parts * self.rank
        return self.a[:rows], self.b[:rows]

    def _slot(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A and B of one slot (views)."""
        width = self.parts * self.rank
        return self.a[slot * width : (slot + 1) * width], self.b[slot * width : (slot + 1) * width]


def lora_delta(x: torch.Tensor, mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
    """Σ over slots of each row's own adapter product (module docstring)."""
    return torch.where(mask, x @ a.t(), 0.0) @ b


class Runs(NamedTuple):
    """An eager step's adapter rows: `a` the A rows of the slots from the lowest to the highest
    used (one GEMM for every row), `runs` (start, stop, column, B): rows start…stop-1 use the
    slot whose A products are columns column… of that GEMM, and its B."""

    a: torch.Tensor
    runs: list[tuple[int, int, int, torch.Tensor]]


def add_lora(y: torch.Tensor, x: torch.Tensor, lora) -> torch.Tensor:
    """`y` (the base product of `x`) plus each row's adapter product. `lora` is either a tuple
    (mask, A, B) over every slot (`lora_delta`: static shapes, a compiled step) or `Runs` (an
    eager step, whose decode rows the engine orders by adapter): one A GEMM over the slots in
    use, then per run its own B on its rows and its slot's columns, added in place. The B side
    is the larger (out ≫ r·slots): per run it does only that run's arithmetic."""
    if isinstance(lora, Runs):
        products = x @ lora.a.t()
        for start, stop, column, b in lora.runs:
            y[start:stop].addmm_(products[start:stop, column : column + b.shape[0]], b)
        return y
    return y + lora_delta(x, *lora)


def _runs(slots: list[int]) -> list[tuple[int, int, int]]:
    """(start, stop, slot) of each run of equal adapter slots, base rows (-1) left out."""
    runs, start = [], 0
    for row in range(1, len(slots) + 1):
        if row == len(slots) or slots[row] != slots[start]:
            if slots[start] >= 0:
                runs.append((start, row, slots[start]))
            start = row
    return runs


def row_masks(slots_of_rows: torch.Tensor, slots: int, rank: int, parts=(1, 2, 3)):
    """{k: mask [rows, slots·k·R]} for targets fused from k modules: row t selects the columns
    of its slot (none for -1, a base row)."""
    onehot = slots_of_rows[:, None] == torch.arange(slots, device=slots_of_rows.device)
    return {k: onehot.repeat_interleave(k * rank, dim=1) for k in parts}


class TextLora:
    """The text layers' stacks (per layer: qkv, o, gate_up, down), each on its layer's device."""

    def __init__(self, model, slots: int, rank: int, devices: list[torch.device]):
        shapes = model_shapes(model)
        self.slots, self.rank = slots, rank
        self.layers = []
        for device in devices:
            stacks = {}
            for target, parts in FUSED_PARTS.items():
                in_features = shapes[parts[0]][0]
                outs = [shapes[p][1] for p in parts]
                stacks[target] = LoraStack(slots, rank, in_features, outs, model.dtype, device)
            self.layers.append(stacks)

    def install(self, slot: int, weights: AdapterWeights) -> None:
        for index, stacks in enumerate(self.layers):
            for target, parts in FUSED_PARTS.items():
                pairs = [weights.text.get((index, part)) for part in parts]
                stacks[target].install(slot, pairs, weights.scaling)

    def step(self, slots_of_rows: torch.Tensor, padded_rows: int, full: bool):
        """Per layer, what `add_lora` takes for qkv, o, gate_up and down in a step whose rows
        use these slots (-1: base), padded with base rows to `padded_rows`. `full` (a compiled
        step): (mask, A, B) over every slot, static shapes; else the segments of equal slots."""
        targets = ("qkv", "o", "gate_up", "down")
        if not full:
            runs = _runs(slots_of_rows.tolist())
            low = min(slot for _, _, slot in runs)
            high = max(slot for _, _, slot in runs) + 1
            return [
                tuple(stacks[t].runs(runs, low, high) for t in targets) for stacks in self.layers
            ]
        used = self.slots
        if padded_rows > len(slots_of_rows):
            pad = slots_of_rows.new_full((padded_rows - len(slots_of_rows),), -1)
            slots_of_rows = torch.cat((slots_of_rows, pad))
        masks: dict[torch.device, dict] = {}
        per_layer = []
        for stacks in self.layers:
            device = stacks["qkv"].a.device
            if device not in masks:
                masks[device] = row_masks(slots_of_rows.to(device), used, self.rank)
            mask = masks[device]
            per_layer.append(
                tuple((mask[len(FUSED_PARTS[t])], *stacks[t].used(used)) for t in targets)
            )
        return per_layer


class VisionLora:
    """The vision tower's stacks, applied by forward hooks on HF's linears while a vision job
    runs a stage with `rows` set (the slot of each patch, -1: base); with `rows` None (every
    image base, or HF's own forward) the hooks add nothing."""

    def __init__(self, visual, slots: int, rank: int):
        weight = next(visual.parameters())
        self.slots, self.rank = slots, rank
        self.stacks: dict[str, LoraStack] = {}
        self.rows: torch.Tensor | None = None
        self._handles = []
        for path in vision_targets(visual):
            linear = visual.get_submodule(path)
            self.stacks[path] = LoraStack(
                slots, rank, linear.in_features, [linear.out_features], weight.dtype, weight.device
            )
            self._handles.append(linear.register_forward_hook(self._hook(self.stacks[path])))

    def install(self, slot: int, weights: AdapterWeights) -> None:
        for path, stack in self.stacks.items():
            stack.install(slot, [weights.vision.get(path)], weights.scaling)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def _hook(self, stack: LoraStack):
        def hook(module, args, output):
            rows = self.rows
            if rows is None:
                return None
            x = args[0]
            if x.shape[0] != rows.shape[0]:  # the merger: one row per merged group of patches
                rows = rows[:: rows.shape[0] // x.shape[0]]
            used = int(rows.max()) + 1
            mask = row_masks(rows, used, self.rank, parts=(1,))[1]
            return output + lora_delta(x, mask, *stack.used(used))

        return hook


def resolve_under(roots: list[Path], given: str) -> Path:
    """The real directory `given` names (absolute, or relative to the first root), refused
    unless it and both adapter files resolve, after symlinks, under one of `roots`. The
    message names no path: the client learns only that it was refused."""
    refused = RequestError(
        "lora_path is not an adapter directory under the roots this server loads adapters from",
        "lora_path",
    )
    if not roots:
        raise RequestError("this server does not load adapters at run time (no lora_roots)")
    if not given or "\x00" in given:
        raise refused
    candidate = Path(given) if os.path.isabs(given) else roots[0] / given
    try:
        real = candidate.resolve(strict=True)
        files = [(real / name).resolve(strict=True) for name in (CONFIG_FILE, WEIGHTS_FILE)]
    except (OSError, RuntimeError):
        raise refused from None
    if not real.is_dir() or not all(f.is_file() for f in files):
        raise refused
    for root in roots:
        if all(p.is_relative_to(root) for p in (real, *files)):
            return real
    raise refused
