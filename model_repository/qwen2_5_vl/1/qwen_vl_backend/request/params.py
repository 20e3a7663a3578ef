"""Sampling parameters: the `sampling_parameters` JSON input, validated."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from ..contract import (
    MAX_STOP_STRINGS,
    REPETITION_GUARD,
    REPETITION_GUARD_FIELDS,
    SAMPLING_FIELDS,
    TOKEN_IDS,
    TOKEN_MAP,
    VLLM_EXTRAS,
    ModelLimits,
    schema_depth,
    token_id_key,
)
from ..errors import RequestError

MAX_TOOL_NAME_CHARS = 256
STRUCTURED = "sampling_parameters.structured"  # the `param` of its errors


@dataclass(frozen=True)
class StructuredOutput:
    """The `structured` sampling parameter: what grammar-constrained decoding enforces.

    `type` is `json_object`, `json_schema` (`schema`, `strict`) or `tool_calls` (`tools` as
    (name, parameters schema) pairs, `parallel`). Schemas are kept as compact JSON text, in the
    client's key order (properties come out in that order): hashable, and the cache key of the
    grammar they compile to. Their size and depth are checked against the server's settings
    when the grammar is compiled (`check_structured_limits`)."""

    type: str
    schema: str | None = None
    strict: bool = False
    tools: tuple[tuple[str, str], ...] = ()
    parallel: bool = False

    def schemas(self) -> list[tuple[str, str]]:
        """(param, schema JSON) of every schema in it, for limits and error messages."""
        if self.type == "json_schema":
            return [(f"{STRUCTURED}.schema", self.schema or "{}")]
        return [
            (f"{STRUCTURED}.tools[{i}].parameters", parameters)
            for i, (_, parameters) in enumerate(self.tools)
        ]


@dataclass(frozen=True)
class RepetitionGuard:
    """Stop once the last `ngram` tokens have come `max_repeats` + 1 times in a row
    (`contract.REPETITION_GUARD`); ngram 0 is off."""

    ngram: int
    max_repeats: int

    @property
    def active(self) -> bool:
        return self.ngram > 0


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
    structured: StructuredOutput | None = None  # grammar-constrained output
    # vLLM's extras (contract.SAMPLING_FIELDS has each one's rule; docs/engine.md "Sampling")
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias), each id once
    min_p: float = 0.0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    prompt_logprobs: int | None = None  # None: not asked; 0: the prompt tokens' own only
    repetition_guard: RepetitionGuard | None = None  # None: the server's default

    def token_ids(self) -> list[tuple[str, int]]:
        """(param, token id) of every token id the request names, to check against the
        vocabulary where it is known."""
        ids = [(f"stop_token_ids[{i}]", token) for i, token in enumerate(self.stop_token_ids)]
        return ids + [("logit_bias", token) for token, _ in self.logit_bias]

    @property
    def greedy(self) -> bool:
        return self.temperature is not None and self.temperature == 0.0


def _number(raw: dict, name: str, rules=SAMPLING_FIELDS, prefix: str = ""):
    """The field's value, checked against the contract's sampling table (the proxy builds its
    own checks from the same table): a number, a boolean, a tuple of token ids or a tuple of
    (token id, number) pairs by the row's kind; None when not set."""
    value, rule = raw.get(name), rules[name]
    problem = rule.problem(value)
    if problem:
        raise RequestError(f"'{prefix}{name}' {problem}", prefix + name)
    if value is None or isinstance(value, bool):
        return value
    if rule.kind == TOKEN_IDS:
        return tuple(dict.fromkeys(value))
    if rule.kind == TOKEN_MAP:  # "7" and "07" are one token: the later entry wins
        return tuple({token_id_key(key): float(bias) for key, bias in value.items()}.items())
    return int(value) if rule.integer else float(value)


def _repetition_guard(raw: dict) -> RepetitionGuard | None:
    guard = raw.get(REPETITION_GUARD)
    if guard is None:
        return None
    if not isinstance(guard, dict):
        raise RequestError(
            f"'{REPETITION_GUARD}' must be an object with 'ngram' and 'max_repeats'",
            REPETITION_GUARD,
        )
    prefix = f"{REPETITION_GUARD}."
    ngram = _number(guard, "ngram", REPETITION_GUARD_FIELDS, prefix)
    if ngram is None:
        raise RequestError(f"'{prefix}ngram' is required", f"{prefix}ngram")
    max_repeats = _number(guard, "max_repeats", REPETITION_GUARD_FIELDS, prefix)
    if max_repeats is None and ngram:
        raise RequestError(f"'{prefix}max_repeats' is required", f"{prefix}max_repeats")
    return RepetitionGuard(ngram, max_repeats or 1)


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
    except (ValueError, RecursionError) as exc:  # nesting beyond the parser's recursion limit
        raise RequestError("sampling_parameters is not valid JSON", "sampling_parameters") from exc
    if not isinstance(raw, dict):
        raise RequestError("sampling_parameters must be a JSON object", "sampling_parameters")
    max_tokens = raw.get("max_tokens", raw.get("max_completion_tokens"))
    return SamplingParams(
        max_tokens=_number({"max_tokens": max_tokens}, "max_tokens"),
        temperature=_number(raw, "temperature"),
        top_p=_number(raw, "top_p"),
        top_k=_number(raw, "top_k"),
        repetition_penalty=_number(raw, "repetition_penalty"),
        seed=_number(raw, "seed"),
        stop=_stop_strings(raw),
        presence_penalty=_number(raw, "presence_penalty") or 0.0,
        frequency_penalty=_number(raw, "frequency_penalty") or 0.0,
        n=_number(raw, "n") or 1,
        structured=_structured(raw.get("structured")),
        **_logprobs(raw),
        **_extras(raw),
    )


def _extras(raw: dict) -> dict:
    """vLLM's extra sampling fields, those set."""
    values = {name: _number(raw, name) for name in VLLM_EXTRAS}
    values["repetition_guard"] = _repetition_guard(raw)
    return {name: value for name, value in values.items() if value is not None}


def _logprobs(raw: dict) -> dict:
    wanted = raw.get("logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        raise RequestError("'logprobs' must be a boolean", "logprobs")
    top = _number(raw, "top_logprobs") or 0
    if top and not wanted:
        raise RequestError("'top_logprobs' requires 'logprobs': true", "top_logprobs")
    return {"logprobs": bool(wanted), "top_logprobs": top}


def _compact(value, param: str) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    except RecursionError as exc:
        raise RequestError("the schema nests too deeply", param) from exc


def _flag(raw: dict, name: str) -> bool:
    value = raw.get(name, False)
    if not isinstance(value, bool):
        raise RequestError(f"'structured.{name}' must be a boolean", f"{STRUCTURED}.{name}")
    return value


def _structured(raw) -> StructuredOutput | None:
    """`{"type": "json_object"}`, `{"type": "json_schema", "schema": {...}, "strict": bool}` or
    `{"type": "tool_calls", "tools": [{"name": str, "parameters": {...}}, ...], "parallel":
    bool}`; None (or absent) means unconstrained."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise RequestError("'structured' must be a JSON object", STRUCTURED)
    kind = raw.get("type")
    if kind == "json_object":
        return StructuredOutput("json_object")
    if kind == "json_schema":
        schema = raw.get("schema")
        if not isinstance(schema, dict):
            raise RequestError(
                "'structured.schema' must be a JSON Schema object", f"{STRUCTURED}.schema"
            )
        return StructuredOutput(
            "json_schema", _compact(schema, f"{STRUCTURED}.schema"), strict=_flag(raw, "strict")
        )
    if kind == "tool_calls":
        return StructuredOutput(
            "tool_calls",
            tools=_tools(raw.get("tools")),
            parallel=_flag(raw, "parallel"),
            strict=_flag(raw, "strict"),
        )
    raise RequestError(
        "'structured.type' must be one of 'json_object', 'json_schema', 'tool_calls'",
        f"{STRUCTURED}.type",
    )


def _tools(tools) -> tuple[tuple[str, str], ...]:
    param = f"{STRUCTURED}.tools"
    if not isinstance(tools, list) or not tools:
        raise RequestError("'structured.tools' must be a non-empty list of tools", param)
    result, seen = [], set()
    for index, tool in enumerate(tools):
        where = f"{param}[{index}]"
        if not isinstance(tool, dict):
            raise RequestError(f"'structured.tools[{index}]' must be an object", where)
        name = tool.get("name")
        if not isinstance(name, str) or not 0 < len(name) <= MAX_TOOL_NAME_CHARS:
            raise RequestError(
                f"'structured.tools[{index}].name' must be a string of 1 to "
                f"{MAX_TOOL_NAME_CHARS} characters",
                f"{where}.name",
            )
        if name in seen:
            raise RequestError(
                f"'structured.tools[{index}].name': {name[:64]!r} names two tools", f"{where}.name"
            )
        seen.add(name)
        parameters = tool.get("parameters")
        if parameters is None:
            parameters = {}
        if not isinstance(parameters, dict):
            raise RequestError(
                f"'structured.tools[{index}].parameters' must be a JSON Schema object",
                f"{where}.parameters",
            )
        result.append((name, _compact(parameters, f"{where}.parameters")))
    return tuple(result)


def check_structured_limits(structured: StructuredOutput, limits: ModelLimits) -> None:
    """The tool count, and each schema within the model's byte and nesting limits
    (`max_tools`, `max_schema_bytes`, `max_schema_depth`), before any grammar work is spent."""
    if len(structured.tools) > limits.max_tools:
        raise RequestError(
            f"'structured.tools' takes at most {limits.max_tools} tools", f"{STRUCTURED}.tools"
        )
    max_bytes, max_depth = limits.max_schema_bytes, limits.max_schema_depth
    for param, schema in structured.schemas():
        size = len(schema.encode("utf-8"))  # compact JSON: as contract.schema_bytes counts
        if size > max_bytes:
            raise RequestError(
                f"the schema is {size} bytes (compact JSON); this server accepts at most "
                f"{max_bytes}",
                param,
            )
        depth = schema_depth(json.loads(schema))
        if depth > max_depth:
            raise RequestError(
                f"the schema nests {depth} levels deep; this server accepts at most {max_depth}",
                param,
            )
