"""Sampling parameters: the `sampling_parameters` JSON input, validated."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from .errors import RequestError

MAX_STOP_STRINGS = 16
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool = False
    top_logprobs: int = 0
    n: int = 1  # choices; the server's cap is checked where the settings are known

    @property
    def greedy(self) -> bool:
        return self.temperature is not None and self.temperature == 0.0


def _number(raw: dict, name: str, low: float, high: float, integer: bool = False):
    value = raw.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"'{name}' must be a number", name)
    if integer and not float(value).is_integer():
        raise RequestError(f"'{name}' must be an integer", name)
    if not math.isfinite(value) or not low <= value <= high:
        raise RequestError(f"'{name}' must be between {low} and {high}", name)
    return int(value) if integer else float(value)


def _stop_strings(raw: dict) -> tuple[str, ...]:
    stop = raw.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise RequestError("'stop' must be a string or a list of strings", "stop")
    if len(stop) > MAX_STOP_STRINGS:
        raise RequestError(f"'stop' takes at most {MAX_STOP_STRINGS} strings", "stop")
    return tuple(s for s in stop if s)


def parse_sampling_parameters(text: str | None) -> SamplingParams:
    """Parse the JSON object; unknown keys are ignored as vllm_backend does."""
    if not text:
        return SamplingParams()
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise RequestError("sampling_parameters is not valid JSON", "sampling_parameters") from exc
    if not isinstance(raw, dict):
        raise RequestError("sampling_parameters must be a JSON object", "sampling_parameters")
    max_tokens = raw.get("max_tokens", raw.get("max_completion_tokens"))
    return SamplingParams(
        max_tokens=_number({"max_tokens": max_tokens}, "max_tokens", 1, 2**31 - 1, integer=True),
        temperature=_number(raw, "temperature", 0.0, 2.0),
        top_p=_number(raw, "top_p", 1e-9, 1.0),
        top_k=_number(raw, "top_k", -1, 2**31 - 1, integer=True),
        repetition_penalty=_number(raw, "repetition_penalty", 1e-9, 10.0),
        seed=_number(raw, "seed", -(2**63), 2**63 - 1, integer=True),
        stop=_stop_strings(raw),
        presence_penalty=_number(raw, "presence_penalty", -2.0, 2.0) or 0.0,
        frequency_penalty=_number(raw, "frequency_penalty", -2.0, 2.0) or 0.0,
        n=_number(raw, "n", 1, 2**31 - 1, integer=True) or 1,
        **_logprobs(raw),
    )


def _logprobs(raw: dict) -> dict:
    wanted = raw.get("logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        raise RequestError("'logprobs' must be a boolean", "logprobs")
    top = _number(raw, "top_logprobs", 0, MAX_TOP_LOGPROBS, integer=True) or 0
    if top and not wanted:
        raise RequestError("'top_logprobs' requires 'logprobs': true", "top_logprobs")
    return {"logprobs": bool(wanted), "top_logprobs": top}
