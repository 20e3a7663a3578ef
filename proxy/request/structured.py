"""Tools, `tool_choice` and `response_format` → what the model takes: the `tools` input (the
prompt's tool section) and the `structured` sampling parameter, which the model enforces by
grammar-constrained decoding (qwen_vl_backend: a token mask per sequence).

    tool_choice "none"            no tools in the prompt: plain text
    tool_choice "auto" (default)  tools in the prompt; the model may call them or answer
    tool_choice "required"        tools in the prompt, the output forced to one or more calls
    tool_choice {function: f}     the output forced to exactly one call of f
    response_format json_object   the output forced to a JSON object
    response_format json_schema   the output forced to JSON valid for the schema

Every schema a client sends (tool `parameters`, `json_schema.schema`) is checked here against
the JSON Schema meta-schema (regex `pattern`s included) and bounded in bytes and depth, so the
model's grammar compiler only sees sane schemas.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from ..error_catalogue import INVALID_VALUE, UNSUPPORTED_PARAMETER
from ..transport.contract import schema_bytes, schema_depth
from .limits import RequestLimits
from .paths import ClientPaths
from .schema import ChatCompletionRequest, NamedToolChoice


@dataclass(frozen=True)
class Structured:
    """What a request's tools and formats become for the model."""

    tools_json: str | None  # the `tools` input; None: no tools in the prompt
    constraint: dict[str, Any] | None  # the `structured` sampling parameter
    parse_tool_calls: bool  # the output may hold <tool_call> blocks to turn into tool_calls


def structured(chat: ChatCompletionRequest, limits: RequestLimits) -> Structured:
    """Checks the request's tools and formats (400 on anything the model could not honour)."""
    tools = chat.tools or []
    choice = chat.tool_choice or ("auto" if tools else "none")
    paths = chat.paths
    _check_tools(tools, limits, paths)
    if choice != "none" and not tools:
        param = paths("tool_choice")
        raise INVALID_VALUE(param, message=f"Invalid value for '{param}': it requires 'tools'.")
    names = [tool.function.name for tool in tools]
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        param = paths("tool_choice.function.name")
        raise INVALID_VALUE(
            param,
            message=f"Invalid value for '{param}': no tool is named {choice.function.name[:64]!r}.",
        )
    constraint = _format_constraint(chat, limits)
    forced = choice == "required" or isinstance(choice, NamedToolChoice)
    if forced and constraint is not None:
        param = paths("response_format")
        raise UNSUPPORTED_PARAMETER(
            param,
            message=f"{param} cannot be combined with a tool_choice that forces a call; use one "
            "or the other.",
        )
    if forced:
        chosen = [
            t for t in tools if choice == "required" or t.function.name == choice.function.name
        ]
        constraint = {
            "type": "tool_calls",
            "tools": [
                {"name": t.function.name, "parameters": t.function.parameters or {}} for t in chosen
            ],
            "parallel": choice == "required" and chat.parallel_tool_calls is not False,
        }
    if choice == "none":
        return Structured(None, constraint, parse_tool_calls=False)
    tools_json = json.dumps(
        [tool.model_dump(exclude_none=True) for tool in tools], ensure_ascii=False
    )
    return Structured(tools_json, constraint, parse_tool_calls=True)


def _check_tools(tools: list, limits: RequestLimits, paths: ClientPaths) -> None:
    if len(tools) > limits.max_tools:
        param = paths("tools")
        raise INVALID_VALUE(
            param,
            message=f"Invalid value for '{param}': at most {limits.max_tools} tools per request.",
        )
    seen: set[str] = set()
    for index, tool in enumerate(tools):
        name = tool.function.name
        if name in seen:
            param = paths(f"tools[{index}].function.name")
            raise INVALID_VALUE(
                param,
                message=f"Invalid value for '{param}': {name!r} is already the name of another "
                "tool.",
            )
        seen.add(name)
        if tool.function.parameters is not None:
            param = paths(f"tools[{index}].function.parameters")
            check_schema(tool.function.parameters, param, limits)


def _format_constraint(chat: ChatCompletionRequest, limits: RequestLimits) -> dict | None:
    response_format = chat.response_format
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return {"type": "json_object"}
    spec = response_format.json_schema
    assert spec is not None  # the schema model requires it with this type
    schema = spec.json_schema if spec.json_schema is not None else {}
    check_schema(schema, chat.paths("response_format.json_schema.schema"), limits)
    return {"type": "json_schema", "schema": schema, "strict": bool(spec.strict)}


def check_schema(schema: dict[str, Any], param: str, limits: RequestLimits) -> None:
    """A JSON Schema a client sent: bounded, and valid against the meta-schema."""
    size = schema_bytes(schema)
    if size > limits.max_schema_bytes:
        raise INVALID_VALUE(
            param,
            message=f"Invalid value for '{param}': the schema is {size} bytes; this server "
            f"accepts at most {limits.max_schema_bytes}.",
        )
    if schema_depth(schema) > limits.max_schema_depth:
        raise INVALID_VALUE(
            param,
            message=f"Invalid value for '{param}': the schema nests deeper than "
            f"{limits.max_schema_depth} levels.",
        )
    try:
        # with the meta-schema's format checks: `pattern`s must be regular expressions
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(part) for part in exc.path)
        raise INVALID_VALUE(
            param,
            message=f"Invalid value for '{param}': not a valid JSON Schema"
            + (f" at '{where[:100]}'" if where else "")
            + f": {exc.message[:200]}.",
        ) from None
