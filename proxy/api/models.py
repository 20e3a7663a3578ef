"""`GET /v1/models`, `GET /v1/models/{model}` and the probes (`/health`, `/ready`)."""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from ..error_catalogue import MODEL_NOT_FOUND, MODEL_NOT_LOADED, MODEL_NOT_READY
from ..keys import (
    BACKEND_KEY,
    CONFIG_KEY,
    LOADER_KEY,
    LORAS_KEY,
    MODEL_LIMITS_KEY,
    STARTED_AT_KEY,
)
from ..transport.loras import ServedAdapter

log = logging.getLogger("proxy")


def model_card(app: web.Application, name: str, triton_model: str) -> dict[str, Any]:
    """OpenAI's model object, with vLLM's `root` (the weights it serves: a base model's own
    name, never a path) and `parent` (a LoRA adapter's base model; null for a base model)."""
    card: dict[str, Any] = {
        "id": name,
        "object": "model",
        "created": app[STARTED_AT_KEY],
        "owned_by": "triton",
        "root": app[LORAS_KEY].parent_of(triton_model),
        "parent": None,
    }
    # vLLM's field: the context one request can use, once the model has told it.
    known = app[MODEL_LIMITS_KEY].known(triton_model)
    if known is not None and known.context_length > 0:
        card["max_model_len"] = known.context_length
    return card


def adapter_card(app: web.Application, served: ServedAdapter) -> dict[str, Any]:
    return {
        **model_card(app, served.adapter.name, served.triton_model),
        "parent": served.parent,
    }


async def served_models(app: web.Application) -> list[str]:
    """Served names whose Triton model is in Triton's repository (loaded or not, so lazily
    loaded models are listed); the configured names when Triton cannot be asked."""
    served = app[CONFIG_KEY].served_models
    try:
        index = await app[BACKEND_KEY].repository_index()
    except Exception as exc:  # listing models must not fail because Triton is busy or down
        log.warning("Triton's model repository index is unavailable (%r); listing all", exc)
        return list(served)
    return [name for name, triton_model in served.items() if triton_model in index]


async def served_adapters(app: web.Application, names: list[str]) -> list[ServedAdapter]:
    """The LoRA adapters of the listed served models, as the model last reported them
    (asked again when that was more than a few seconds ago)."""
    catalog = app[LORAS_KEY]
    await catalog.refresh()
    return [served for served in catalog.adapters if served.parent in names]


async def list_models(request: web.Request) -> web.Response:
    app = request.app
    names = await served_models(app)
    served = app[CONFIG_KEY].served_models
    cards = [model_card(app, name, served[name]) for name in names]
    cards += [adapter_card(app, adapter) for adapter in await served_adapters(app, names)]
    return web.json_response({"object": "list", "data": cards})


async def retrieve_model(request: web.Request) -> web.Response:
    app = request.app
    name = request.match_info["model"]
    names = await served_models(app)
    if name in names:
        return web.json_response(model_card(app, name, app[CONFIG_KEY].served_models[name]))
    for adapter in await served_adapters(app, names):
        if adapter.adapter.name == name:
            return web.json_response(adapter_card(app, adapter))
    raise MODEL_NOT_FOUND("model", message=f"The model `{name}` does not exist.")


async def health(request: web.Request) -> web.Response:
    """Liveness: the process serves HTTP; says nothing about Triton."""
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    """Readiness: Triton reports the default model loaded, so completions can be served.

    With --lazy-load, a model nobody has asked for yet is "not loaded" (503) until the first
    chat request loads it.
    """
    app = request.app
    model = app[CONFIG_KEY].server.triton_model
    if await app[BACKEND_KEY].is_ready(model):
        return web.json_response({"status": "ready"})
    if LOADER_KEY in app and not app[LOADER_KEY].is_loaded(model):
        raise MODEL_NOT_LOADED()
    raise MODEL_NOT_READY()
