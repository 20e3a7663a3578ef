"""KV-cache slots, and the prompt prefixes freed slots still hold.

A finished sequence's keys and values stay in its slot until the slot is handed out again. So
the pool remembers what a freed slot holds (prompt token ids, and which image each image span
showed); a new request whose prompt starts the same way takes that slot and skips prefilling
the shared part. Image placeholder tokens are all the same id, so a prefix only counts as
shared up to the first image that differs (compared by the digest of its pixels).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Shorter shared prefixes are not worth giving up the lowest free slot for.
MIN_REUSED_TOKENS = 16


@dataclass(frozen=True)
class SlotContent:
    """What a slot's cache holds: these prompt tokens, with images at these spans."""

    tokens: torch.Tensor  # 1-D token ids
    images: tuple[tuple[int, bytes], ...]  # (first token position, image key), in order
    adapter: str | None = None  # the LoRA adapter (its digest) the keys and values came from


class SlotPool:
    def __init__(self, count: int):
        self._free = list(range(count))  # ascending: the lowest slots keep the decode view small
        self._held: dict[int, SlotContent] = {}  # freed slots whose content is still valid

    def __len__(self) -> int:
        return len(self._free)

    def take(self, wanted: SlotContent | None = None) -> tuple[int, int]:
        """A free slot and how many leading tokens of `wanted` it already holds (0 or at least
        MIN_REUSED_TOKENS, never all of them: the last prompt token must run to give logits)."""
        best, best_length = None, 0
        if wanted is not None:
            for slot in self._free:
                held = self._held.get(slot)
                length = shared_prefix(held, wanted) if held is not None else 0
                if length > best_length:
                    best, best_length = slot, length
        if best_length < MIN_REUSED_TOKENS:
            # Prefer a slot that holds nothing worth keeping.
            empty = [slot for slot in self._free if slot not in self._held]
            best, best_length = (empty or self._free)[0], 0
        self._free.remove(best)
        self._held.pop(best, None)
        return best, best_length

    def release(self, slot: int, content: SlotContent | None) -> None:
        self._free.append(slot)
        self._free.sort()
        if content is not None and len(content.tokens):
            self._held[slot] = content


def shared_prefix(held: SlotContent, wanted: SlotContent) -> int:
    n = min(len(held.tokens), len(wanted.tokens) - 1)
    if n <= 0 or held.adapter != wanted.adapter:
        return 0
    differs = (held.tokens[:n] != wanted.tokens[:n]).nonzero()
    length = int(differs[0]) if len(differs) else n
    for (held_start, held_key), (start, key) in zip(held.images, wanted.images):
        if start >= length:
            break
        if held_start != start or held_key != key:
            return start
    return length
