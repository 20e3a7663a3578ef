"""Device memory: the KV cache sized from what a GPU has free after the weights load, the
device made current in every engine thread, the allocator's cache released after an
out-of-memory error.

On a CPU the cache is what the settings say (`max_batch_size` slots of
`max_cache_tokens / max_batch_size` tokens). On CUDA the settings' slot length stays (the
longest sequence a request may need), and the number of slots comes from memory:
`kv_cache_memory_fraction` of the free memory of each GPU holding text layers, divided by what
one token of cache costs on that GPU (its layers × keys and values × KV heads × head dim ×
dtype size), the smallest over the GPUs, capped by `gpu_max_batch_size`. So a 24 GB card gets
the slots that fit instead of an out-of-memory error at load, and an 80 or 141 GB card uses its
memory instead of idling beyond 16 sequences.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Callable

import torch

from ..settings import ModelSettings
from .kv_cache import layer_devices

log = logging.getLogger(__name__)


def free_device_memory(device: torch.device) -> int:
    """Bytes free on a CUDA device (the driver's figure, plus what torch's allocator holds
    unused)."""
    free, _total = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def kv_bytes_per_token(model) -> dict[torch.device, int]:
    """What one token of KV cache costs on each device holding text layers."""
    text = model.config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    per_layer = 2 * text.num_key_value_heads * head_dim * model.dtype.itemsize
    layers = Counter(torch.device(d) for d in layer_devices(model))
    return {device: count * per_layer for device, count in layers.items()}


def size_kv_cache(
    settings: ModelSettings,
    model,
    max_model_len: int,
    free_bytes: Callable[[torch.device], int] = free_device_memory,
) -> ModelSettings:
    """The settings with `max_batch_size` and `max_cache_tokens` from free GPU memory when the
    text layers are on CUDA and `kv_cache_memory_fraction` is set; unchanged otherwise."""
    per_token = kv_bytes_per_token(model)
    if settings.kv_cache_memory_fraction <= 0 or not all(d.type == "cuda" for d in per_token):
        return settings
    slot_len = min(max_model_len, settings.max_cache_tokens // settings.max_batch_size)
    tokens = min(
        int(free_bytes(device) * settings.kv_cache_memory_fraction) // cost
        for device, cost in per_token.items()
    )
    slots = min(tokens // slot_len, settings.gpu_max_batch_size)
    if slots < 1:
        raise RuntimeError(
            f"GPU memory after loading the weights holds {tokens} tokens of KV cache at "
            f"kv_cache_memory_fraction={settings.kv_cache_memory_fraction}, less than one "
            f"sequence of {slot_len} tokens: lower max_cache_tokens / max_batch_size (the "
            "longest sequence), raise the fraction, or use a larger GPU"
        )
    log.info(
        "KV cache from free GPU memory: %d tokens fit in %.0f%% of it, %d slots of %d tokens",
        tokens,
        100 * settings.kv_cache_memory_fraction,
        slots,
        slot_len,
    )
    return dataclasses.replace(settings, max_batch_size=slots, max_cache_tokens=slots * slot_len)


def use_device(device) -> None:
    """Make a CUDA device current in the calling thread (a new thread starts on GPU 0, where
    allocations and kernels of a model on another GPU would otherwise land)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)


def release_cached_memory(device) -> None:
    """After an out-of-memory error: give the allocator's unused blocks back before retrying."""
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
