"""oneDNN-prepacked weights for the text model's linear layers on CPU.

A decode step multiplies a handful of rows (one per running sequence) by every weight matrix.
PyTorch's default CPU GEMM is poor at that shape: on the 2-core development machine a
[8, 768] × [768, 2560] product ran at 58 GFLOPS with `F.linear` and at about twice that with the
weight reordered once, at load, into oneDNN's blocked layout (what torch.compile's CPU freezing
and vLLM's CPU backend do). Prompt-sized products (hundreds of rows) run at the same speed either
way. The reordered copy replaces the dense weight, so memory does not grow.

The engine's own decoder (`decoder.py`) packs its fused q/k/v and gate/up weights the same way
(`pack_weight`, `packed_linear`).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

# The row count oneDNN tunes the layout for: a typical decode batch.
_PACKED_FOR_ROWS = 16


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """A dense [out, in] weight reordered into oneDNN's blocked layout (for `packed_linear`)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _PACKED_FOR_ROWS)


def packed_linear(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """`F.linear(x, weight, bias)` with the weight as `pack_weight` returned it."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class PackedLinear(nn.Module):
    """`nn.Linear`'s forward over a weight held in oneDNN's layout (CPU, float32)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("packed_weight", pack_weight(linear.weight), persistent=False)
        self.register_buffer(
            "bias", None if linear.bias is None else linear.bias.detach(), persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.packed_weight, self.bias)


def available(model) -> bool:
    return (
        model.device.type == "cpu"
        and model.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


def pack_text_linears(model) -> int:
    """Swap every linear of the language model (and the LM head) for a packed one; the count."""
    swapped = 0
    for parent in [model.model.language_model, model]:
        for name, module in list(parent.named_modules()):
            if isinstance(module, nn.Linear) and not (parent is model and name != "lm_head"):
                owner = parent.get_submodule(name.rpartition(".")[0]) if "." in name else parent
                setattr(owner, name.rpartition(".")[2], PackedLinear(module))
                swapped += 1
    log.info("packed %d linear layers for oneDNN", swapped)
    return swapped
