"""The LoRA adapters the model serves, as the proxy knows them, and the one place a request's
`model` becomes a Triton model and an adapter.

A request's `model` is a served base name (`--served-model-name`, `--model-map`) or an
adapter's name. The model owns its adapters (declared in its config, or loaded at run time
through POST /v1/load_lora_adapter) and lists them when asked (`list_loras`,
proxy/transport/contract.py); the proxy asks every replica of each served Triton model and
keeps the union. It asks again when a name it does not know arrives, at most every
`REFRESH_MIN_INTERVAL_S` (so a flood of unknown names costs one question per interval, and
concurrent askers share it), when /v1/models is listed after that interval, and after every
load or unload it sends. A proxy worker that did not send a load learns of it from the first
request naming the adapter; an adapter another worker unloaded is answered 404 by the model.

Load and unload go to every replica (any of them may get the adapter's next request); a load
that fails on one is unloaded again from those that took it, so replicas serve the same set.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from ..error_catalogue import (
    BACKEND_UNAVAILABLE,
    INTERNAL_ERROR,
    LORA_ALREADY_LOADED,
    MODEL_NOT_FOUND,
    TIMEOUT,
    APIError,
)
from .backend import Backend, TritonRequest
from .contract import LoraAdapter, Task
from .shared import SharedCalls

log = logging.getLogger("proxy.loras")

# Between two questions to the model about its adapters, unless the proxy itself loaded or
# unloaded one: unknown names (typos, scanners) must not turn into a question each.
REFRESH_MIN_INTERVAL_S = 3.0
# A load reads the adapter's weights from disk into host memory off the engine thread: seconds
# for ranks up to 64 on a 7B; this bounds a stuck filesystem, not a normal load.
LORA_TASK_TIMEOUT_S = 300.0
# A list is answered from memory; /v1/models and unknown names wait for it, so a model that
# cannot answer holds them no longer than its `describe` would (backend._DESCRIBE_TIMEOUT_S).
LIST_TIMEOUT_S = 10.0
# Adapter names labelled in metrics; later ones count as OTHER_ADAPTERS. Names come from the
# operator (declared or loaded with the admin key), but loads over months must not grow the
# series without bound.
MAX_LABELLED_ADAPTERS = 64
OTHER_ADAPTERS = "other-lora"


@dataclass(frozen=True)
class ResolvedModel:
    """What a request's `model` names: the served name responses echo, the Triton model that
    serves it, and the adapter it runs with (None: the base weights)."""

    served_name: str
    triton_model: str
    lora: str | None = None


@dataclass(frozen=True)
class ServedAdapter:
    adapter: LoraAdapter
    parent: str  # the base model's served name
    triton_model: str


class LoraCatalog:
    """The adapters of every served Triton model; one per proxy process."""

    def __init__(
        self,
        backend: Backend,
        served_models: dict[str, str],
        default_name: str,
        *,
        clock: Callable[[], float] = time.monotonic,
        is_loaded: Callable[[str], bool] = lambda triton_model: True,
    ) -> None:
        self._backend = backend
        self._served = served_models
        self._default = default_name
        # Each Triton model's parent name: the first served name mapped to it (the default
        # served name first).
        self._parents: dict[str, str] = {}
        for name, triton_model in served_models.items():
            self._parents.setdefault(triton_model, name)
        self._clock = clock
        self._is_loaded = is_loaded  # with --lazy-load, an unloaded model cannot be asked
        self._adapters: dict[str, ServedAdapter] = {}
        self._asked_at: float | None = None
        self._asking: SharedCalls[None] = SharedCalls()
        self._labelled: set[str] = set()
        # Loads and unloads one at a time (two loads of one name must not undo each other),
        # each counted: a list asked before one ended must not overwrite what it changed.
        self._changing = asyncio.Lock()
        self._changes = 0

    @property
    def adapters(self) -> list[ServedAdapter]:
        return list(self._adapters.values())

    def parent_of(self, triton_model: str) -> str:
        return self._parents[triton_model]

    async def resolve(self, requested: str | None) -> ResolvedModel:
        """What a request's `model` names (None: the default served name); an unknown name is
        404 model_not_found, as OpenAI answers."""
        name = self._default if requested is None else requested
        if name in self._served:
            return ResolvedModel(name, self._served[name])
        if name not in self._adapters:
            await self.refresh()
        served = self._adapters.get(name)
        if served is None:
            names = ", ".join(f"`{n}`" for n in self._served)
            raise MODEL_NOT_FOUND(
                "model", message=f"The model `{name}` does not exist. This server serves {names}."
            )
        return ResolvedModel(name, served.triton_model, lora=name)

    def metrics_label(self, served_name: str) -> str:
        """`served_name` as a metrics label: base names and the first MAX_LABELLED_ADAPTERS
        adapter names as they are, later adapters as OTHER_ADAPTERS."""
        if served_name in self._served or served_name in self._labelled:
            return served_name
        if len(self._labelled) < MAX_LABELLED_ADAPTERS:
            self._labelled.add(served_name)
            return served_name
        return OTHER_ADAPTERS

    async def refresh(self, *, max_age_s: float = REFRESH_MIN_INTERVAL_S) -> None:
        """Asks the model for its adapters unless it was asked within `max_age_s`; concurrent
        callers share one question."""
        if self._asked_at is not None and self._clock() - self._asked_at < max_age_s:
            return
        await self._asking.join(None, self._ask)

    async def _ask(self) -> None:
        changes = self._changes
        try:
            adapters: dict[str, ServedAdapter] = {}
            for triton_model, parent in self._parents.items():
                if not self._is_loaded(triton_model):
                    continue
                for adapter in await self._listed(triton_model):
                    if adapter.name not in self._served:  # a served base name wins
                        adapters.setdefault(
                            adapter.name, ServedAdapter(adapter, parent, triton_model)
                        )
            if changes == self._changes:
                self._adapters = adapters
        finally:
            # a load or unload during the question: ask again next time
            self._asked_at = self._clock() if changes == self._changes else None

    async def _listed(self, triton_model: str) -> list[LoraAdapter]:
        """The adapters any replica of `triton_model` lists; a replica that cannot be asked
        (down, or a model from before adapters) lists none."""
        listed: list[LoraAdapter] = []
        for address, backend in await replicas(self._backend):
            try:
                listed += await lora_task(backend, triton_model, Task.LIST_LORAS)
            except Exception as exc:  # listing must not fail the request that asked
                log.info("replica %s did not list %r's adapters: %r", address, triton_model, exc)
        return listed

    async def load(self, name: str, path: str) -> LoraAdapter:
        """Loads the adapter at `path` (the model checks it is under its roots) as `name` on
        every replica of the default model; all of them or none."""
        async with self._changing:
            await self.refresh(max_age_s=0)
            if name in self._served or name in self._adapters:
                raise LORA_ALREADY_LOADED("lora_name", name=name)
            triton_model = self._served[self._default]
            adapter = await self._load_everywhere(triton_model, name, path)
            self._changes += 1
            self._adapters[name] = ServedAdapter(adapter, self._parents[triton_model], triton_model)
        log.info("LoRA adapter %r loaded", name)
        return adapter

    async def _load_everywhere(self, triton_model: str, name: str, path: str) -> LoraAdapter:
        loaded: list[Backend] = []
        adapter = None
        try:
            for _, backend in await replicas(self._backend):
                adapter = (await lora_task(backend, triton_model, Task.LOAD_LORA, name, path))[0]
                loaded.append(backend)
        except BaseException:
            for backend in loaded:  # replicas must serve the same set
                with contextlib.suppress(Exception):
                    await lora_task(backend, triton_model, Task.UNLOAD_LORA, name)
            raise
        if adapter is None:  # no replica at all
            raise BACKEND_UNAVAILABLE()
        return adapter

    async def unload(self, name: str) -> LoraAdapter:
        """Unloads the adapter `name` from every replica that serves it."""
        async with self._changing:
            await self.refresh(max_age_s=0)
            served = self._adapters.get(name)
            if served is None:
                raise MODEL_NOT_FOUND("lora_name", message=f"The model `{name}` does not exist.")
            answers: list[LoraAdapter] = []
            try:
                for _, backend in await replicas(self._backend):
                    try:
                        answers += await lora_task(
                            backend, served.triton_model, Task.UNLOAD_LORA, name
                        )
                    except APIError as exc:
                        if exc.code != MODEL_NOT_FOUND.code:  # not: a replica without it
                            raise
            finally:
                self._changes += 1
                self._asked_at = None  # what each replica still serves: ask next time
                if answers:
                    self._adapters.pop(name, None)
        if not answers:
            raise MODEL_NOT_FOUND("lora_name", message=f"The model `{name}` does not exist.")
        log.info("LoRA adapter %r unloaded from %d replicas", name, len(answers))
        return answers[0]


async def replicas(backend: Backend) -> list[tuple[str, Backend]]:
    """(address, backend) of each replica behind `backend`: Upstreams' own, or itself."""
    each = getattr(backend, "replicas", None)
    return await each() if each is not None else [("backend", backend)]


async def lora_task(
    backend: Backend,
    triton_model: str,
    task: Task,
    name: str | None = None,
    path: str | None = None,
) -> list[LoraAdapter]:
    """The model's answer to a LoRA task: the adapters it lists, loaded or unloaded."""
    request = TritonRequest(
        triton_model, None, {}, {}, stream=False, task=task, lora=name, lora_path=path
    )
    request_id = f"{task.value}-{uuid.uuid4().hex[:12]}"
    timeout_s = LIST_TIMEOUT_S if task is Task.LIST_LORAS else LORA_TASK_TIMEOUT_S
    try:
        async with asyncio.timeout(timeout_s):
            async with contextlib.aclosing(backend.generate(request, request_id)) as chunks:
                text = "".join([chunk.text async for chunk in chunks])
    except TimeoutError:
        log.error("request %s: no %s answer within %gs", request_id, task, timeout_s)
        raise TIMEOUT(message=f"The model did not answer {task} in time.") from None
    adapters = LoraAdapter.decode_list(text)
    if adapters is None or (task is not Task.LIST_LORAS and not adapters):
        log.error("request %s: unreadable %s answer from the model: %r", request_id, task, text)
        raise INTERNAL_ERROR(request_id=request_id)
    return adapters
