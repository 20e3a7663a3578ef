"""Token usage of one completion, filled in from the model's responses; every API surface
renders it in its own fields (chat's `usage`, Responses' `usage`)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..transport.backend import GenerationChunk


@dataclass
class TokenUsage:
    """Token counts of one completion, filled in as responses arrive."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    image_tokens: int | None = None  # None: the model did not report it
    video_tokens: int | None = None

    def as_dict(self) -> dict[str, Any]:
        usage: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }
        if self.image_tokens is not None:
            usage["prompt_tokens_details"] = self.prompt_details()
        return usage

    def prompt_details(self) -> dict[str, Any]:
        """The prompt's token breakdown: image (and, where a request had videos, video) tokens
        when the model reports them; chat's `prompt_tokens_details`, Responses'
        `input_tokens_details`."""
        details: dict[str, Any] = {"cached_tokens": 0}
        if self.image_tokens is not None:
            details["image_tokens"] = self.image_tokens
            if self.video_tokens:  # only where a request had videos: the image-only shape stays
                details["video_tokens"] = self.video_tokens
        return details


def total_usage(usages: Iterable[TokenUsage]) -> TokenUsage:
    """Several generations' usage as one (a completions request of several prompts): every
    count added up, the image and video counts where any generation reported them."""
    total = TokenUsage()
    for usage in usages:
        total.prompt_tokens += usage.prompt_tokens
        total.completion_tokens += usage.completion_tokens
        if usage.image_tokens is not None:
            total.image_tokens = (total.image_tokens or 0) + usage.image_tokens
        if usage.video_tokens is not None:
            total.video_tokens = (total.video_tokens or 0) + usage.video_tokens
    return total


def record_usage(usage: TokenUsage, chunk: GenerationChunk) -> None:
    if chunk.prompt_tokens is not None:
        usage.prompt_tokens = chunk.prompt_tokens
    if chunk.image_tokens is not None:
        usage.image_tokens = chunk.image_tokens
    if chunk.video_tokens is not None:
        usage.video_tokens = chunk.video_tokens
    usage.completion_tokens += chunk.completion_tokens
