"""Model settings: `config.pbtxt` parameters, each overridable by environment.

Every parameter `name` can be overridden by `QWEN_VL_<NAME>` (e.g. `QWEN_VL_MODEL`), so one
model repository serves any checkpoint without editing files inside a container image.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields

from .contract import MAX_GUARD_NGRAM, ModelLimits

# What the proxy learns through `describe`; its defaults are the defaults here.
_LIMITS = ModelLimits()

ENV_PREFIX = "QWEN_VL_"

# from_pretrained(device_map=...) strategies that split one model over the instance's GPUs.
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
# The engine's text forward (`forward`) and torch.compile modes (`compile`).
FORWARDS = ("lean", "hf")
COMPILE_MODES = ("auto", "on", "off")
# From this many usable cores up, the derived torch_threads leaves one for the serving threads.
RESERVE_A_CORE_FROM = 4
_MEMORY = re.compile(r"\d+(\.\d+)?\s*([KMGT]i?B)?", re.IGNORECASE)


@dataclass(frozen=True)
class ModelSettings:
    # HF hub id or local directory of a Qwen2.5-VL checkpoint.
    model: str = "Qwen/Qwen2.5-VL-7B-Instruct"
    # auto: bfloat16 on GPU, float32 on CPU (CPUs lack fast bf16 matmuls).
    dtype: str = "auto"
    # auto: the Triton instance's GPU for KIND_GPU, else cpu.
    device: str = "auto"
    attn_implementation: str = "sdpa"
    # "": the whole model on `device` (one GPU). auto / balanced / balanced_low_0 / sequential:
    # from_pretrained(device_map=...) splits it over every GPU the instance sees (a model larger
    # than one GPU; docs/deploy.md "Models larger than one GPU"); inputs go to the GPU of the
    # embeddings. Use instance_group KIND_MODEL with it.
    device_map: str = ""
    # With device_map: per-device caps, `0:75GiB,1:75GiB` (GPU index or cpu: size); "": none.
    max_memory: str = ""
    # Completion length when the request names none.
    default_max_tokens: int = 1024
    # Server-wide ceiling on a request's max_tokens; larger requests are clamped.
    max_tokens_cap: int = _LIMITS.max_tokens
    # 0: the checkpoint's max_position_embeddings.
    max_model_len: int = 0
    # Qwen's 28-pixel grid: images are resized into [min_pixels, max_pixels].
    min_pixels: int = _LIMITS.min_pixels
    max_pixels: int = _LIMITS.max_pixels
    # Hostile-input bounds, checked before decoding: source pixels from the image header,
    # elongation (Qwen's resize refuses beyond 200:1), images per request.
    max_source_pixels: int = _LIMITS.max_source_pixels
    max_aspect_ratio: float = _LIMITS.max_aspect_ratio
    max_images: int = _LIMITS.max_images
    # Video (docs/engine.md "Video"): videos per request, the longest clip and the largest
    # frame by the container header (refused before decoding), frames sampled per video, the
    # default sampling rate, one video's pixel budget over all its frames (~ tokens x 784),
    # and how long decoding one video may take on the preparation pool.
    max_videos: int = _LIMITS.max_videos
    max_video_seconds: int = _LIMITS.max_video_seconds
    max_video_frames: int = _LIMITS.max_video_frames
    video_fps: float = _LIMITS.video_fps
    video_total_pixels: int = _LIMITS.video_total_pixels
    max_video_source_pixels: int = _LIMITS.max_video_source_pixels
    video_decode_timeout_s: float = 30.0
    # The decode sandbox (docs/security.md): worker processes that decode images and videos,
    # each under these limits. Workers: media decoded at once (more queue for decode_wait).
    # Memory: a worker's address space, above a 40-megapixel image's decode (~0.5 GiB) and
    # PyAV's mappings. CPU: seconds of CPU one item may use before the kernel kills its worker.
    # Tasks: items a worker decodes before it is replaced, so a compromised decoder sees
    # few later requests' media (1: a fresh process per item, at a process start each).
    decode_workers: int = 2
    decode_memory_mib: int = 2048
    decode_cpu_s: int = 30
    decode_worker_tasks: int = 32
    # Sequences decoded together (KV-cache slots); more requests wait for a free slot. On CUDA
    # the slots come from free memory instead (kv_cache_memory_fraction), and this with
    # max_cache_tokens only sets the slot length.
    max_batch_size: int = 16
    # KV-cache size in tokens, preallocated at load as max_batch_size slots of
    # max_cache_tokens / max_batch_size tokens each (capped at the context length): memory is
    # bounded by configuration, not by traffic, and a request needing more (prompt + max_tokens)
    # than one slot is refused.
    max_cache_tokens: int = 131072
    # CUDA only: the share of the memory free after the weights load that the KV cache takes,
    # as many slots of the length above as fit (docs/engine.md "KV cache"); the rest is for a
    # step's activations and the vision tower. vLLM's default gpu_memory_utilization is the
    # same 0.9, of the whole card. 0: size by max_batch_size and max_cache_tokens as on CPU.
    kv_cache_memory_fraction: float = 0.9
    # CUDA only: the most slots memory sizing may create (vLLM's default max_num_seqs); a
    # step decodes every running sequence, so this bounds a step's decode rows.
    gpu_max_batch_size: int = 256
    # KV slots batch-priority requests (the Batch API's lines) may hold at once; interactive
    # ones may use every slot. Half by default: batch work fills idle capacity, yet a burst of
    # interactive requests always finds slots without waiting for batch rows to finish (running
    # rows are never preempted). 0: half the slots (at least one); more than the slots: all.
    max_batch_priority_slots: int = 0
    # Tokens one engine step may compute: every running sequence's next token plus as many
    # prompt tokens (and image tokens through the vision tower) as fit. It bounds how long a
    # running stream waits when requests arrive. 0: 256 on CPU, 2048 on GPU (docs/engine.md
    # has the CPU measurements behind 256).
    max_step_tokens: int = 0
    # Threads that decode images and run the processor and chat template, so the engine thread
    # only runs the model.
    preprocess_workers: int = 2
    # Patches (14x14 pixel squares, before the 2x2 merge) in vision-tower work at once; more
    # images wait for the next job. It bounds the tower's activation memory; 16384 holds one
    # video at video_total_pixels or three images at max_pixels. An item larger than this
    # runs alone.
    max_vision_patches: int = 16384
    # Vision-tower outputs kept for repeated images (LRU); 0 turns the cache off.
    image_cache_mb: int = 256
    # Most choices (`n`) one request may ask for; each takes a KV-cache slot.
    max_choices: int = _LIMITS.max_choices
    # CPU float32 only: hold the text model's weights in oneDNN's prepacked layout, about twice
    # as fast for decode-sized matrix products (see qwen_vl_backend/modeling/cpu_linear.py).
    cpu_packed_linear: bool = True
    # The text forward of an engine step. lean: the engine's own decoder (fused q/k/v and
    # gate/up GEMMs, none of HF's per-call module machinery; qwen_vl_backend/modeling/decoder.py,
    # docs/engine.md "Lean forward"). hf: transformers' module stack over the same slot cache,
    # the reference the lean one is tested against, kept selectable for comparison and as a
    # fallback.
    forward: str = "lean"
    # torch.compile the lean forward's per-layer dense parts, one static shape per bucket of step
    # rows (padded), compiled at load. On CUDA a step's hundreds of small kernel launches cost
    # more than its math, which is what compiling is for; on CPU it measured no faster than the
    # eager lean step and would give up the oneDNN-prepacked weights (docs/engine.md). auto: off
    # on every device until the compiled step has run on a GPU (nothing here has yet); on / off
    # force it. A compile failure logs a warning and runs eagerly; it never fails the load.
    compile: str = "auto"
    # The bucket row counts to compile, e.g. "1,2,4,8,16,64,256"; a step runs in the smallest
    # that holds it and steps larger than the largest run eagerly. "": powers of two up to the
    # largest step the scheduler can build (every step compiled).
    compile_buckets: str = ""
    # Constrained output (`structured`, docs/engine.md): tools per request, the largest schema
    # (compact JSON bytes, each tool's parameters counted alone) and the deepest nesting of
    # objects and arrays in one that a request may send; compiled grammars kept for reuse (LRU,
    # estimated bytes; 0: none).
    max_tools: int = _LIMITS.max_tools
    max_schema_bytes: int = _LIMITS.max_schema_bytes
    max_schema_depth: int = _LIMITS.max_schema_depth
    grammar_cache_mb: int = 64
    # Requests waiting beyond this are refused with UNAVAILABLE instead of queuing forever.
    max_queued_requests: int = 64
    # How long finalize waits for in-flight generations before abandoning them.
    shutdown_timeout_s: float = 30.0
    # Tokens per streamed response (vLLM's stream_interval): 1 sends every token as it comes;
    # more trades chunk granularity for fewer sends (each Triton send is a round trip). The
    # first token always goes out at once, and a client whose sends fall behind gets its
    # backlog coalesced into one response whatever this says.
    stream_interval: int = 1
    # How often running and waiting requests are asked whether their client cancelled (one
    # round trip with tritonserver each, on the sender thread). 50 ms stops a cancelled
    # stream well within a human-noticeable delay while costing nothing per step.
    cancel_poll_ms: int = 50
    # Seconds between reports of the host path's timers (forward, sampling, detokenizing,
    # sends, ...; docs/engine.md "Host path"): the qwen_vl_engine_step* metrics and a debug log
    # line, also whenever the engine goes idle. 60 s under load is a few metric updates a
    # minute, nothing next to a step; 0: never.
    timing_log_s: float = 60.0
    # CPU only: torch's intra-op threads for the engine's forwards. 0: derived from the cores
    # this process may run on, less one from 4 cores up (resolve_torch_threads): the spare core
    # serves tritonserver's gRPC, the response sender and the proxy, which otherwise preempt an
    # OpenMP thread mid-GEMM and leave the step's other threads waiting at its barrier; on 2-3
    # cores a core is too large a share of the GEMMs to give up (docs/engine.md "Threads").
    torch_threads: int = 0
    # The n-gram loop guard's default for requests that send no `repetition_guard`
    # (docs/engine.md "Repetition guard"): a choice stops (finish_reason stop,
    # repetition_detected) once its last `ngram` tokens have come `max_repeats` + 1 times in a
    # row. 0: off, as vLLM and OpenAI never stop a choice for repeating itself; a document-
    # reading deployment may turn it on (ngram 8, max_repeats 4 stops a loop after 40 tokens).
    repetition_guard_ngram: int = 0
    repetition_guard_max_repeats: int = 4
    # OpenTelemetry traces (engine/tracing.py, docs/observability.md "Traces"): the OTLP/HTTP
    # collector's base URL ("": no tracing, nothing computed), the share of requests without a
    # traceparent that are traced (those with one follow its sampled flag, so the proxy
    # decides), and the service.name the spans carry.
    otlp_traces_endpoint: str = ""
    trace_sample_ratio: float = 1.0
    trace_service_name: str = "qwen-vl-model"
    # LoRA adapters (docs/engine.md "LoRA adapters"), each served under its name as a model of
    # its own: "name=dir,name=dir", a dir relative to the model version folder or absolute. The
    # version folder's multi_lora.json (Triton vllm_backend's file: {"name": "dir"}) and every
    # loras/<name>/ folder holding an adapter are declared too. Declared adapters are trusted
    # configuration, read and checked at load (a bad one fails the load).
    lora_adapters: str = ""
    # Directories (comma-separated) under which the load_lora task accepts an adapter at run
    # time, checked after resolving symlinks; "": no run-time loading (the default: a client
    # with the admin key still must not make the server read arbitrary files).
    lora_roots: str = ""
    # Adapters resident on the device at once (slots; others load on their first request and
    # the least recently used idle one leaves). A step with adapter rows multiplies by every
    # slot's stacked A/B (docs/engine.md), so its extra cost grows with this; 4 covers the
    # target mix of four fine-tunes in one batch. 0: no adapters.
    max_loras: int = 4
    # The largest adapter rank served. Every slot is padded to it, so a step's extra work is
    # proportional to it whatever the adapters' own ranks; 16 is vLLM's default and what most
    # fine-tunes use (raise it for rank-32/64 adapters, at that cost).
    max_lora_rank: int = 16
    # The largest adapter_model.safetensors read (MiB): bounds the host memory and read time of
    # one load. A 7B rank-64 adapter on every text and vision projection is ~650 MiB in float32.
    max_lora_mb: int = 1024

    def __post_init__(self):
        if not 0.0 <= self.trace_sample_ratio <= 1.0:
            raise ValueError(
                f"parameter trace_sample_ratio={self.trace_sample_ratio}: between 0 and 1"
            )
        if self.stream_interval < 1:
            raise ValueError(f"parameter stream_interval={self.stream_interval}: at least 1")
        if self.max_batch_priority_slots < 0:
            raise ValueError(
                f"parameter max_batch_priority_slots={self.max_batch_priority_slots}: "
                "0 (half the slots) or more"
            )
        if self.cancel_poll_ms < 1:
            raise ValueError(f"parameter cancel_poll_ms={self.cancel_poll_ms}: at least 1")
        if self.device_map not in ("", *DEVICE_MAPS):
            raise ValueError(
                f"parameter device_map={self.device_map!r}: expected one of "
                f"{', '.join(DEVICE_MAPS)}, or empty for one device"
            )
        self.max_memory_map()
        for name, allowed in (("forward", FORWARDS), ("compile", COMPILE_MODES)):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"parameter {name}={getattr(self, name)!r}: expected one of {', '.join(allowed)}"
                )
        self.compile_bucket_sizes()
        for name in ("decode_workers", "decode_memory_mib", "decode_cpu_s", "decode_worker_tasks"):
            if getattr(self, name) < 1:
                raise ValueError(f"parameter {name}={getattr(self, name)}: at least 1")
        if self.torch_threads < 0:
            raise ValueError(f"parameter torch_threads={self.torch_threads}: 0 (derive) or more")
        if not 0 <= self.repetition_guard_ngram <= MAX_GUARD_NGRAM:
            raise ValueError(
                f"parameter repetition_guard_ngram={self.repetition_guard_ngram}: 0 (off) to "
                f"{MAX_GUARD_NGRAM}"
            )
        for name in ("max_loras", "max_lora_rank", "max_lora_mb"):
            if getattr(self, name) < (0 if name == "max_loras" else 1):
                raise ValueError(f"parameter {name}={getattr(self, name)}: too small")
        self.lora_adapter_dirs()
        if self.repetition_guard_max_repeats < 1:
            raise ValueError(
                f"parameter repetition_guard_max_repeats={self.repetition_guard_max_repeats}: "
                "at least 1"
            )

    def compile_bucket_sizes(self) -> list[int]:
        """`compile_buckets` as ascending row counts; [] when it is empty (derive them)."""
        try:
            sizes = sorted({int(part) for part in self.compile_buckets.split(",") if part.strip()})
        except ValueError:
            sizes = [0]
        if sizes and sizes[0] < 1:
            raise ValueError(
                f"parameter compile_buckets={self.compile_buckets!r}: expected positive row "
                "counts separated by commas, such as 1,2,4,8,16,64,256"
            )
        return sizes

    def lora_adapter_dirs(self) -> dict[str, str]:
        """`lora_adapters` as {name: dir}."""
        adapters: dict[str, str] = {}
        for item in filter(None, (part.strip() for part in self.lora_adapters.split(","))):
            name, sep, directory = (x.strip() for x in item.partition("="))
            if not sep or not name or not directory or name in adapters:
                raise ValueError(
                    f"parameter lora_adapters={self.lora_adapters!r}: expected distinct "
                    "name=dir entries separated by commas"
                )
            adapters[name] = directory
        return adapters

    def lora_root_dirs(self) -> list[str]:
        return [part.strip() for part in self.lora_roots.split(",") if part.strip()]

    def resolve_torch_threads(self, cores: int) -> int:
        """Intra-op threads for `cores` usable cores (os.sched_getaffinity)."""
        if self.torch_threads > 0:
            return self.torch_threads
        return cores - 1 if cores >= RESERVE_A_CORE_FROM else max(1, cores)

    def resolve_compile(self, device: str) -> bool:
        # "auto" stays off until a GPU run has validated the compiled step (docs/engine.md).
        return self.compile == "on"

    def max_memory_map(self) -> dict[int | str, str] | None:
        """`max_memory` as from_pretrained takes it: {0: "75GiB", 1: "75GiB", "cpu": ...}."""
        text = self.max_memory.strip()
        if not text:
            return None

        def bad(why: str) -> ValueError:
            return ValueError(f"parameter max_memory={self.max_memory!r}: {why}")

        if not self.device_map:
            raise bad("needs a device_map (auto, balanced, ...)")
        caps: dict[int | str, str] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            device, sep, size = (x.strip() for x in item.partition(":"))
            if not sep or not device or not size:
                raise bad(f"expected <device>:<size> such as 0:75GiB, got {item!r}")
            if device.isdigit():
                key: int | str = int(device)
            elif device.lower() in ("cpu", "disk"):
                key = device.lower()
            else:
                raise bad(f"device {device!r} is neither a GPU index nor cpu")
            if not _MEMORY.fullmatch(size):
                raise bad(f"size {size!r} is not a number of bytes or like 75GiB / 80GB")
            if key in caps:
                raise bad(f"device {device} given twice")
            caps[key] = size.replace(" ", "")
        return caps

    @classmethod
    def from_parameters(
        cls, parameters: Mapping[str, str], env: Mapping[str, str] = os.environ
    ) -> ModelSettings:
        values = {}
        for field in fields(cls):
            # An empty variable (compose's `${X:-}`) means "not set", not "use the built-in default".
            raw = env.get(ENV_PREFIX + field.name.upper()) or parameters.get(field.name)
            if not raw:
                continue
            try:
                values[field.name] = _cast(field.default, raw)
            except ValueError as exc:
                raise ValueError(f"parameter {field.name}={raw!r}: {exc}") from exc
        return cls(**values)

    def limits(self, context_length: int = 0) -> ModelLimits:
        """What requests may ask of this model (the `describe` answer): every `ModelLimits`
        field from the setting of the same name, but for the three that are not settings;
        `context_length` is the loaded checkpoint's."""
        same_name = {
            f.name: getattr(self, f.name) for f in fields(ModelLimits) if hasattr(self, f.name)
        }
        return ModelLimits(
            **{
                **same_name,
                "max_tokens": self.max_tokens_cap,
                # each choice takes a slot, so no more choices than slots
                "max_choices": min(self.max_choices, self.max_batch_size),
                "context_length": context_length,
            }
        )

    def batch_priority_slots(self, slots: int) -> int:
        """The most of `slots` KV slots batch-priority requests may hold."""
        if self.max_batch_priority_slots > 0:
            return min(self.max_batch_priority_slots, slots)
        return max(1, slots // 2)

    def step_tokens(self, device: str) -> int:
        if self.max_step_tokens > 0:
            return self.max_step_tokens
        return 2048 if device.startswith("cuda") else 256

    def resolve_device(self, instance_kind: str, device_id: int | str) -> str:
        """Where the model goes; with a device_map, "cuda" (the map places it, over the GPUs)."""
        if self.device_map:
            return "cuda"
        if self.device != "auto":
            return self.device
        return f"cuda:{int(device_id)}" if instance_kind.upper() == "GPU" else "cpu"

    def resolve_dtype(self, device: str) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if device.startswith("cuda") else "float32"


def _cast(default, raw: str):
    if isinstance(default, bool):
        return raw.strip().lower() in {"1", "true", "yes", "on"}
    return type(default)(raw)


def config_parameters(model_config: Mapping) -> dict[str, str]:
    """`parameters { key: "name" value: { string_value: "..." } }` → {name: value}."""
    return {
        name: spec.get("string_value", "")
        for name, spec in model_config.get("parameters", {}).items()
    }
