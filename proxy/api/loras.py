"""vLLM's runtime LoRA endpoints, behind the admin key (proxy/serving/auth.py):

    POST /v1/load_lora_adapter   {"lora_name": ..., "lora_path": ...}
    POST /v1/unload_lora_adapter {"lora_name": ...}

answered as vLLM answers them: a plain-text success line, or an error envelope (400 for a bad
body or a name already served, 404 for an unload of a name not served). Every replica loads
or unloads (proxy/transport/loras.py). The model decides which directories it reads (only
under its configured roots, symlinks resolved, sizes bounded); the proxy trusts no path either
and refuses what no root could hold before anything reaches Triton.
"""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from ..error_catalogue import (
    INVALID_LORA_NAME,
    INVALID_LORA_PATH,
    INVALID_TYPE,
    MISSING_REQUIRED_PARAMETER,
)
from ..keys import LORAS_KEY
from ..request.generation import read_json_object
from ..transport.contract import LORA_NAME, LORA_NAME_RULE

# Linux's PATH_MAX: no longer path can be opened.
MAX_LORA_PATH_CHARS = 4096
_PATH_SEPARATORS = re.compile(r"[/\\]")


async def load_lora_adapter(request: web.Request) -> web.Response:
    body = await read_json_object(request)
    name = lora_name(body)
    path = lora_path(body)
    await request.app[LORAS_KEY].load(name, path)
    return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")


async def unload_lora_adapter(request: web.Request) -> web.Response:
    body = await read_json_object(request)
    name = lora_name(body)
    await request.app[LORAS_KEY].unload(name)
    return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")


def _string_field(body: dict[str, Any], field: str) -> str:
    if field not in body:
        raise MISSING_REQUIRED_PARAMETER(field, path=field)
    value = body[field]
    if not isinstance(value, str):
        raise INVALID_TYPE(field, message=f"{field} must be a string.")
    return value


def lora_name(body: dict[str, Any]) -> str:
    name = _string_field(body, "lora_name")
    if not LORA_NAME.fullmatch(name):
        raise INVALID_LORA_NAME("lora_name", rule=LORA_NAME_RULE)
    return name


def lora_path(body: dict[str, Any]) -> str:
    """The body's `lora_path` when no configured root could hold anything else: not empty,
    within PATH_MAX, printable (no NUL, no control characters), no `..` component."""
    path = _string_field(body, "lora_path")
    if not path:
        reason = "it is empty"
    elif len(path) > MAX_LORA_PATH_CHARS:
        reason = f"it is longer than {MAX_LORA_PATH_CHARS} characters"
    elif not path.isprintable():
        reason = "it holds control characters"
    elif ".." in _PATH_SEPARATORS.split(path):
        reason = "it has a '..' component"
    else:
        return path
    raise INVALID_LORA_PATH("lora_path", reason=reason)
