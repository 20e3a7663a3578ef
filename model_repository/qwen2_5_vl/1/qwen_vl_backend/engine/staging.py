"""Host-built step inputs to the device in one copy.

A step builds small index and settings tensors on the host (rows to sample, per-row sampling
settings, token ids, positions). Copied one by one from pageable memory, each is a synchronous
transfer on CUDA; packed into one pinned buffer, they go as a single asynchronous copy and
come out as views of one device buffer. On a CPU nothing is copied: the tensors are returned
as they are.
"""

from __future__ import annotations

import torch

_ALIGN = 8  # bytes: every dtype packed here (int64, float32, bool) starts aligned


def pack(tensors: list[torch.Tensor], pin: bool) -> tuple[torch.Tensor, list[int]]:
    """The tensors' bytes one after another in one uint8 buffer, and where each starts."""
    offsets, total = [], 0
    for tensor in tensors:
        offsets.append(total)
        size = tensor.numel() * tensor.element_size()
        total += -(-size // _ALIGN) * _ALIGN
    buffer = torch.empty(total, dtype=torch.uint8, pin_memory=pin)
    for tensor, offset in zip(tensors, offsets):
        raw = tensor.contiguous().reshape(-1).view(torch.uint8)
        buffer[offset : offset + raw.numel()].copy_(raw)
    return buffer, offsets


def unpack(
    buffer: torch.Tensor, offsets: list[int], like: list[torch.Tensor]
) -> list[torch.Tensor]:
    """Views of `buffer` shaped and typed as `like`."""
    views = []
    for tensor, offset in zip(like, offsets):
        size = tensor.numel() * tensor.element_size()
        views.append(buffer[offset : offset + size].view(tensor.dtype).view(tensor.shape))
    return views


def to_device(tensors: list[torch.Tensor], device) -> list[torch.Tensor]:
    """`tensors` (on the host) on `device`: one pinned, non-blocking copy on CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return [tensor.to(device) for tensor in tensors]
    buffer, offsets = pack(tensors, pin=True)
    return unpack(buffer.to(device, non_blocking=True), offsets, tensors)
