"""Tools in the prompt: the `tools` input, assistant tool calls and tool results, rendered in
Qwen's format (`<tools>` in the system turn, `<tool_call>` blocks, `<tool_response>` blocks).

Qwen2.5-VL checkpoints' chat templates have no tool section (the text-only Qwen2.5 template
does), so a conversation that uses tools is rendered with the template shipped here,
templates/qwen2_5_vl_tools.jinja, unless the checkpoint's own template knows tools. Templates
are rendered only by transformers' sandboxed renderer and never come from a client.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from ..errors import RequestError

TOOLS_TEMPLATE = Path(__file__).with_name("templates") / "qwen2_5_vl_tools.jinja"


@cache
def tools_template() -> str:
    return TOOLS_TEMPLATE.read_text()


def parse_tools(text: str | None) -> list[dict] | None:
    """The `tools` input: a JSON list of OpenAI function tools; None when absent or empty."""
    if not text:
        return None
    try:
        tools = json.loads(text)
    except ValueError as exc:
        raise RequestError("tools is not valid JSON", "tools") from exc
    if not isinstance(tools, list):
        raise RequestError("tools must be a list", "tools")
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise RequestError(
                "a tool must be {'type': 'function', 'function': {'name': ...}}", f"tools[{index}]"
            )
    return tools or None


def tool_calls(message: dict, param: str) -> list[dict] | None:
    """An assistant message's `tool_calls` in the shape templates take: `arguments` as an
    object when it is a JSON object (OpenAI sends a string), else as sent."""
    calls = message.get("tool_calls")
    if calls is None:
        return None
    if not isinstance(calls, list):
        raise RequestError("tool_calls must be a list", f"{param}.tool_calls")
    converted = []
    for index, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise RequestError(
                "a tool call needs function.name", f"{param}.tool_calls[{index}].function"
            )
        converted.append(
            {
                "id": call.get("id"),
                "type": "function",
                "function": {"name": function["name"], "arguments": _arguments(function)},
            }
        )
    return converted


def _arguments(function: dict) -> Any:
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments if arguments is not None else {}


def uses_tools(messages: list[dict], tools: list[dict] | None) -> bool:
    return bool(tools) or any(m["role"] == "tool" or m.get("tool_calls") for m in messages)


def render_prompt(
    processor: Any,
    messages: list[dict],
    tools: list[dict] | None,
    add_generation_prompt: bool = True,
) -> str:
    """The prompt text: the checkpoint's template, or the tool template when the conversation
    uses tools and the checkpoint's template does not know them."""
    options: dict[str, Any] = {"tokenize": False, "add_generation_prompt": add_generation_prompt}
    if uses_tools(messages, tools):
        own = getattr(processor, "chat_template", None) or ""
        if "tools" not in own:
            options["chat_template"] = tools_template()
        options["tools"] = tools
    return processor.apply_chat_template(messages, **options)
