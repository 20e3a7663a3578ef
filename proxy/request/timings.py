"""A request's stage timings as its response body carries them (the `timings` request field,
or every response with --timings): milliseconds per stage, `<stage>_ms`, in the order of
proxy/observability/metrics.py `STAGES` (docs/observability.md "Per-request timings")."""

from __future__ import annotations

from aiohttp import web

from ..observability.observe import RECORD_KEY, stage_timings


def timings_body(request: web.Request) -> dict[str, float] | None:
    """The request's stages in milliseconds; None when the model sent none (it was not asked,
    or the generation ended before its last response)."""
    stages = stage_timings(request[RECORD_KEY])
    if stages is None:
        return None
    return {f"{stage}_ms": round(seconds * 1000, 3) for stage, seconds in stages.items()}
