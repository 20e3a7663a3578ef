"""The LoRA adapters a model serves (docs/engine.md "LoRA adapters"): which exist (declared in
its configuration, or loaded at run time by the `load_lora` task), which are resident in the
device slots the decoder and the vision tower multiply by (at most `max_loras`, least recently
used idle one evicted), and their loading, which runs on a thread of its own.

Lifecycle of a request's adapter: preparation resolves the name (unknown: `not_found`) and asks
the loader thread to read the adapter if it is not resident; admission (engine thread) takes a
slot: an empty one, else the least recently used one no sequence or vision job pins. Installing
is a copy of weights already read and moved to the device, so the engine thread never reads a
file. A request whose adapter is not read yet, or finds every slot pinned, waits at the head of
its class's queue; running streams go on meanwhile. A pinned adapter is never evicted; an
unloaded one leaves its slot once its last pin goes.
"""

from __future__ import annotations

import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..contract import LORA_NAME, LORA_NAME_RULE, MAX_LORA_NAME_CHARS, Input, LoraAdapter, Task
from ..errors import NotFoundError, RequestError
from ..modeling.lora import (
    CONFIG_FILE,
    AdapterWeights,
    TextLora,
    VisionLora,
    model_shapes,
    read_adapter,
    resolve_under,
)
from ..settings import ModelSettings

log = logging.getLogger(__name__)

# vllm_backend's declaration file in the model version folder: {"name": "directory"}.
MULTI_LORA_FILE = "multi_lora.json"
# A folder of the model version whose subfolders (each an adapter) are declared by their names.
LORAS_FOLDER = "loras"


@dataclass(eq=False)
class Adapter:
    name: str
    directory: Path
    rank: int
    text: bool  # adapts the text layers
    vision: bool  # adapts the vision tower (its image embeddings are its own)
    digest: str  # of its weights file: what its cached images and KV prefixes are keyed by
    slot: int | None = None  # resident in this slot
    staged: AdapterWeights | None = None  # read and on the device, waiting for a slot
    staging: bool = False
    error: RequestError | None = None  # reading it failed after it was accepted
    removed: bool = False

    def info(self) -> LoraAdapter:
        return LoraAdapter(self.name, self.rank, self.vision, self.slot is not None)

    def text_slot(self, slot: int | None) -> int:
        return slot if slot is not None and self.text else -1

    def vision_slot(self, slot: int | None) -> int:
        return slot if slot is not None and self.vision else -1


class AdapterRegistry:
    def __init__(
        self, model, settings: ModelSettings, declared: dict[str, Path], text: TextLora | None
    ):
        self._model = model
        self._settings = settings
        self._text = text
        self._vision: VisionLora | None = None
        self._device = model.get_input_embeddings().weight.device
        self._shapes = model_shapes(model) if text is not None else {}
        self._layers = model.config.text_config.num_hidden_layers
        self._roots = [Path(root).resolve() for root in settings.lora_root_dirs()]
        slots = settings.max_loras if text is not None else 0
        self._slots: list[Adapter | None] = [None] * slots
        self._pins = [0] * slots
        self._last_use = [0] * slots
        self._uses = 0
        self._by_name: dict[str, Adapter] = {}
        self._lock = threading.RLock()  # acquire pins under it
        self._read_lock = threading.Lock()  # one adapter read at a time
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="qwen-vl-lora")
        for name, directory in declared.items():
            self._declare(name, directory)

    @property
    def enabled(self) -> bool:
        return bool(self._slots)

    def shutdown(self) -> None:
        self._loader.shutdown(wait=False, cancel_futures=True)

    # ---- any thread ----------------------------------------------------------------------

    def resolve(self, name: str | None) -> Adapter | None:
        """The adapter a request names (None: the base weights); not_found if unknown."""
        if not name:
            return None
        with self._lock:
            adapter = self._by_name.get(name)
        if adapter is None:
            raise NotFoundError(
                f"The model '{name[:MAX_LORA_NAME_CHARS]}' does not exist.", "model"
            )
        return adapter

    def prefetch(self, adapter: Adapter) -> None:
        """Have the loader thread read `adapter` unless it is resident or read already."""
        with self._lock:
            if adapter.slot is not None or adapter.staged is not None or adapter.staging:
                return
            adapter.staging = True
        self._loader.submit(self._stage, adapter)

    def submit_task(self, task: Task, raw, sink) -> None:
        """list_loras / load_lora / unload_lora, answered on the loader thread (in order)."""
        self._loader.submit(self._answer, task, raw, sink)

    # ---- the engine thread ---------------------------------------------------------------

    def acquire(self, adapter: Adapter) -> int | None:
        """A pinned slot holding `adapter`, installing it if it is read; None while it is
        being read or every slot is pinned (the request waits and asks again next step)."""
        with self._lock:
            if adapter.error is not None:
                raise adapter.error
            if adapter.slot is None and adapter.removed:
                raise NotFoundError(f"The model '{adapter.name}' does not exist.", "model")
            if adapter.slot is None:
                if adapter.staged is None:
                    if not adapter.staging:
                        adapter.staging = True
                        self._loader.submit(self._stage, adapter)
                    return None
                slot = self._free_slot()
                if slot is None:
                    return None
                self._install(slot, adapter)
            self.pin(adapter.slot)
            return adapter.slot

    def pin(self, slot: int) -> None:
        with self._lock:
            self._pins[slot] += 1
            self._uses += 1
            self._last_use[slot] = self._uses

    def release(self, slot: int) -> None:
        with self._lock:
            self._pins[slot] -= 1
            owner = self._slots[slot]
            if self._pins[slot] == 0 and owner is not None and owner.removed:
                self._evict(slot)

    def pinned(self) -> int:
        return sum(self._pins)

    def _free_slot(self) -> int | None:
        idle = [i for i, owner in enumerate(self._slots) if owner is None]
        if idle:
            return idle[0]
        unpinned = [i for i in range(len(self._slots)) if self._pins[i] == 0]
        if not unpinned:
            return None
        slot = min(unpinned, key=self._last_use.__getitem__)
        self._evict(slot)
        return slot

    def _evict(self, slot: int) -> None:
        owner = self._slots[slot]
        if owner is not None:
            owner.slot = None
            log.info("LoRA adapter %s left slot %d", owner.name, slot)
        self._slots[slot] = None

    def _install(self, slot: int, adapter: Adapter) -> None:
        weights, adapter.staged = adapter.staged, None
        self._text.install(slot, weights)
        if weights.touches_vision:
            self.vision_lora().install(slot, weights)
        self._slots[slot], adapter.slot = adapter, slot
        log.info("LoRA adapter %s resident in slot %d", adapter.name, slot)

    def vision_lora(self) -> VisionLora:
        """The vision tower's hooks and stacks, made with the first vision adapter."""
        if self._vision is None:
            self._vision = VisionLora(self._model.model.visual, len(self._slots), self._text.rank)
        return self._vision

    @property
    def vision(self) -> VisionLora | None:
        return self._vision

    # ---- reading adapters ----------------------------------------------------------------

    def _read(self, directory: Path) -> AdapterWeights:
        settings = self._settings
        with self._read_lock:
            return read_adapter(
                directory,
                self._shapes,
                self._layers,
                settings.max_lora_rank,
                settings.max_lora_mb * 2**20,
            )

    def _stage(self, adapter: Adapter) -> None:
        try:
            weights = self._read(adapter.directory).to(self._device, self._model.dtype)
            error = None if weights.digest == adapter.digest else "its weights changed on disk"
        except RequestError as exc:
            weights, error = None, exc.message
        except Exception as exc:  # e.g. no device memory left: its requests fail, not the loader
            log.exception("reading LoRA adapter %s failed", adapter.name)
            weights, error = None, type(exc).__name__
        with self._lock:
            adapter.staging = False
            if error is None:
                adapter.staged = weights
            else:
                log.error("LoRA adapter %s can no longer be read: %s", adapter.name, error)
                adapter.error = RequestError(f"the adapter '{adapter.name}' cannot be loaded")

    def _declare(self, name: str, directory: Path) -> None:
        """A configured adapter: read and checked now (a bad one fails the model's load),
        resident while slots are empty."""
        try:
            weights = self._read(directory)
        except RequestError as exc:
            raise ValueError(f"LoRA adapter {name} ({directory}): {exc.message}") from None
        adapter = self._register(name, directory, weights)
        slot = next((i for i, owner in enumerate(self._slots) if owner is None), None)
        if slot is not None:
            adapter.staged = weights.to(self._device, self._model.dtype)
            self._install(slot, adapter)

    def _register(self, name: str, directory: Path, weights: AdapterWeights) -> Adapter:
        if not LORA_NAME.fullmatch(name):
            raise RequestError(f"an adapter name is {LORA_NAME_RULE}", Input.LORA.value)
        adapter = Adapter(
            name,
            directory,
            weights.rank,
            bool(weights.text),
            weights.touches_vision,
            weights.digest,
        )
        with self._lock:
            if name in self._by_name:
                raise RequestError(f"an adapter named '{name}' is already loaded", Input.LORA.value)
            self._by_name[name] = adapter
        log.info(
            "LoRA adapter %s: rank %d, %s",
            name,
            adapter.rank,
            "text+vision" if adapter.vision else "text",
        )
        return adapter

    # ---- tasks -----------------------------------------------------------------------------

    def _answer(self, task: Task, raw, sink) -> None:
        try:
            text = LoraAdapter.encode_list(self._task(task, raw))
        except Exception as exc:
            sink.fail(exc)
            return
        try:
            sink.answer(text)
        except Exception:
            log.exception("request %s: its %s answer could not be sent", raw.request_id, task)

    def _task(self, task: Task, raw) -> list[LoraAdapter]:
        if task is Task.LIST_LORAS:
            with self._lock:
                return [adapter.info() for adapter in self._by_name.values()]
        if not raw.lora:
            raise RequestError("'lora' names the adapter", Input.LORA.value)
        if task is Task.UNLOAD_LORA:
            return [self._unload(raw.lora)]
        directory = resolve_under(self._roots, raw.lora_path or "")
        if not self.enabled:
            raise RequestError("this server serves no LoRA adapters (max_loras is 0)")
        if raw.lora in self._by_name:  # before reading: the answer is the same either way
            raise RequestError(f"an adapter named '{raw.lora}' is already loaded", Input.LORA.value)
        return [self._register(raw.lora, directory, self._read(directory)).info()]

    def _unload(self, name: str) -> LoraAdapter:
        with self._lock:
            adapter = self._by_name.pop(name, None)
            if adapter is None:
                raise NotFoundError(
                    f"The model '{name[:MAX_LORA_NAME_CHARS]}' does not exist.", "model"
                )
            adapter.removed, adapter.staged = True, None
            info = adapter.info()
            if adapter.slot is not None and self._pins[adapter.slot] == 0:
                self._evict(adapter.slot)
        log.info("LoRA adapter %s unloaded", name)
        return info


def declared_adapters(settings: ModelSettings, model_dir: str | None) -> dict[str, Path]:
    """{name: directory} of the configured adapters: `lora_adapters`, the version folder's
    multi_lora.json, and its loras/<name>/ folders; relative directories are the version
    folder's."""
    base = Path(model_dir) if model_dir else Path.cwd()
    adapters = {name: base / directory for name, directory in settings.lora_adapter_dirs().items()}
    listing = base / MULTI_LORA_FILE
    if model_dir and listing.is_file():
        try:
            entries = json.loads(listing.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ValueError(f"{listing}: not valid JSON ({exc})") from None
        if not isinstance(entries, dict) or not all(isinstance(v, str) for v in entries.values()):
            raise ValueError(f'{listing}: expected {{"name": "directory", ...}}')
        for name, directory in entries.items():
            adapters.setdefault(name, base / directory)
    folder = base / LORAS_FOLDER
    if model_dir and folder.is_dir():
        for child in sorted(folder.iterdir()):
            if (child / CONFIG_FILE).is_file():
                adapters.setdefault(child.name, child)
    return adapters
