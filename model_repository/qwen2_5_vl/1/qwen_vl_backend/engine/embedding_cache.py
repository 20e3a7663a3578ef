"""Vision-tower outputs kept by the digest of their exact input, bounded in bytes (LRU): the
bytes each entry holds on its device, counted exactly (entries own their storage).

A repeated image (same pixels after resizing, so the same pixel budget) skips the vision tower.
Only the engine thread touches it, so it needs no lock.
"""

from __future__ import annotations

from collections import OrderedDict

import torch


class EmbeddingCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: bytes) -> bool:
        return key in self._entries

    def peek(self, key: bytes) -> torch.Tensor | None:
        """The entry without counting a hit or refreshing it."""
        return self._entries.get(key)

    def get(self, key: bytes) -> torch.Tensor | None:
        embeddings = self._entries.get(key)
        if embeddings is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return embeddings

    def put(self, key: bytes, embeddings: torch.Tensor) -> None:
        """Keep `embeddings`, owning exactly its bytes: a view into a larger tensor (one image
        of a vision job's output) is copied, or it would pin the whole output while the cache
        counted only the view."""
        size = embeddings.numel() * embeddings.element_size()
        if size > self.max_bytes or key in self._entries:
            return
        if embeddings.untyped_storage().nbytes() != size or not embeddings.is_contiguous():
            embeddings = embeddings.clone(memory_format=torch.contiguous_format)
        self._entries[key] = embeddings
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.bytes -= evicted.numel() * evicted.element_size()
