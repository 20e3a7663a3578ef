"""Per-image pixel budgets: the area bounds the model resizes each image into.

Qwen2.5-VL cuts an image into 14x14-pixel patches and merges 2x2 of them into one visual
token, so one token covers 28x28 = 784 pixels. The model resizes every image onto this
28-pixel grid with its area inside [min_pixels, max_pixels] (`qwen_vl_utils.smart_resize`),
so the bounds decide an image's cost in prompt tokens. The proxy sends them with every image
part: `{"type": "image", "min_pixels": N, "max_pixels": M}`.

Budgets, in pixels (visual tokens = pixels / 784 after resizing):

    server bounds   the model's [min_pixels, max_pixels] (3136 = 4 tokens .. 1003520 = 1280
                    tokens by default, learned from the model), narrowed by
                    --image-min-pixels / --image-max-pixels; every image gets them unless
                    the request says otherwise
    detail "low"    min: server min; max: 200704 = 448 x 448 (at most 256 tokens), never
                    above the server max
    detail "high"   min: server min; max: the server max (at most 1280 tokens by default)
    detail "auto"   min: server min; max: the server default max, which is the server max
    or no detail    (with one server maximum, "high" has no larger budget to grant than "auto")

A request may set `min_pixels` / `max_pixels` at the top level (all its images) or inside an
`image_url` object (that image; it wins over the top level and over `detail`); explicit values
must lie within the server's [min, max], and an image's min must not exceed its max.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..error_catalogue import INVALID_VALUE
from ..transport.contract import ModelLimits
from ..transport.model_limits import narrower

LOW_DETAIL_MAX_PIXELS = 448 * 448  # 200704: at most 256 visual tokens


@dataclass(frozen=True)
class PixelBudget:
    min_pixels: int
    max_pixels: int


@dataclass(frozen=True)
class PixelLimits:
    """The server-wide bounds: defaults for every image and the range clients may ask for
    (`--image-min-pixels`, `--image-max-pixels`)."""

    # 0: the model's bound; a value may only narrow the model's range.
    min_pixels: int = 0
    max_pixels: int = 0

    def within(self, model: ModelLimits) -> PixelLimits:
        """The model's range, narrowed by these bounds; the model's alone when the two do not
        overlap (the model would refuse every budget in the gap)."""
        low = max(self.min_pixels, model.min_pixels)
        high = int(narrower(self.max_pixels, model.max_pixels))
        if low > high:
            return PixelLimits(model.min_pixels, model.max_pixels)
        return PixelLimits(low, high)

    def detail_max_pixels(self, detail: str | None) -> int:
        if detail == "low":
            return max(self.min_pixels, min(LOW_DETAIL_MAX_PIXELS, self.max_pixels))
        # "high" takes the server max; "auto" (and no detail) the server default max, which
        # is the same flag.
        return self.max_pixels

    def check(self, value: int | None, param: str) -> int | None:
        """A client's explicit bound, refused unless inside the server's range."""
        if value is not None and not self.min_pixels <= value <= self.max_pixels:
            raise INVALID_VALUE(
                param,
                message=f"Invalid value for '{param}': {value} is outside this server's range "
                f"[{self.min_pixels}, {self.max_pixels}] pixels.",
            )
        return value


def image_budget(
    limits: PixelLimits,
    detail: str | None,
    min_pixels: int | None,
    max_pixels: int | None,
    param: str,
) -> PixelBudget:
    """One image's bounds; `min_pixels`/`max_pixels` are the client's (checked) or None."""
    low = min_pixels if min_pixels is not None else limits.min_pixels
    high = max_pixels if max_pixels is not None else limits.detail_max_pixels(detail)
    if low > high:
        raise INVALID_VALUE(
            param,
            message=f"Invalid value for '{param}': min_pixels ({low}) exceeds max_pixels "
            f"({high}) for this image.",
        )
    return PixelBudget(min_pixels=low, max_pixels=high)


def part_budget(
    source: Any,
    server: Any,
    defaults: tuple[int | None, int | None],
    param: str,
) -> dict[str, int]:
    """The chat-part keys of one image: its own min/max_pixels (checked), else the request's
    `defaults`, else `detail`'s, within the server's pixel limits (`server.pixels`)."""
    limits: PixelLimits = server.pixels
    own_min = limits.check(source.min_pixels, f"{param}.min_pixels")
    own_max = limits.check(source.max_pixels, f"{param}.max_pixels")
    budget = image_budget(
        limits,
        source.detail,
        own_min if own_min is not None else defaults[0],
        own_max if own_max is not None else defaults[1],
        param,
    )
    return {"min_pixels": budget.min_pixels, "max_pixels": budget.max_pixels}
