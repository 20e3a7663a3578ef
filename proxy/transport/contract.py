"""What the Triton model and the OpenAI proxy must agree on: tensor names, the model's limits,
the rules both sides check a request by, and how an error crosses gRPC.

Tensors: `Input` and `Output` (`INPUTS`, `OUTPUTS`) are the names in config.pbtxt (a test
checks them); model.py and the proxy's backend name tensors only through them. `Priority`
names the scheduling classes the `priority` input takes. The
`describe` input asks the model for its limits instead of a completion: one response whose
`text_output` is `ModelLimits.encode()`, then the final flag. The `task` input asks for a
tokenization instead (`Task`: tokenize answers `TokenizeResult`, detokenize the text).

Limits: `ModelLimits` holds what a request may ask of the model as the running model has it,
config.pbtxt with the `QWEN_VL_*` environment overrides applied. Its defaults are the model's
defaults; the proxy uses them too when the model cannot be asked.

Rules (checked on both sides from these definitions, never restated): the sampling table
(`SAMPLING_FIELDS`: each field's type and range), the chat roles, the `<tool_call>` tags, the
media sniffers (`sniff_image`, `sniff_video`: magic bytes, never declared types), the `data:`
URL parser and the JSON-Schema depth walker. Where the proxy is stricter than the model it says
so where it narrows (a flag, or a named narrowing), never with a second number.

Errors: gRPC streaming carries only an error *message* to the client, no status code, so the
model writes its errors as data: a fixed prefix, then a JSON object {"kind", "message",
"param", "code"}. `kind` says what the client should do:
- invalid_request: the request is wrong (HTTP 400); `message` is written for the client and
  `param` is the client's path to the offending field (`messages[1].content[2].image_url`:
  the model keeps the message and part indices of the request it got, and the proxy keeps
  the client's);
- busy: the model's queue is full, retry later (HTTP 503 with Retry-After);
- unavailable: the model is shutting down, retry elsewhere (HTTP 503);
- not_found: the request names something the model does not serve, e.g. an unknown LoRA
  adapter (HTTP 404, code model_not_found);
- internal: the server failed (HTTP 500); `message` carries only the request id.

This file exists twice, byte for byte: here (the model folder deploys on its own) and as
proxy/transport/contract.py (the proxy image has no model folder).
tests/unit/test_model_contract.py fails when the copies differ.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, fields
from enum import StrEnum


class Input(StrEnum):
    """The model's inputs, as named in config.pbtxt; both sides use these, never literals."""

    MESSAGES = "messages"
    TEXT_INPUT = "text_input"
    IMAGE = "image"
    VIDEO = "video"
    STREAM = "stream"
    SAMPLING_PARAMETERS = "sampling_parameters"
    EXCLUDE_INPUT_IN_OUTPUT = "exclude_input_in_output"
    RETURN_FINISH_REASON = "return_finish_reason"
    RETURN_NUM_INPUT_TOKENS = "return_num_input_tokens"
    RETURN_NUM_OUTPUT_TOKENS = "return_num_output_tokens"
    # true: the request's last response carries `timings` (its stages, `TIMING_STAGES`)
    RETURN_TIMINGS = "return_timings"
    TOOLS = "tools"
    # The request's `Priority` class by name. An input of its own, not a field of
    # `sampling_parameters`: it says when the request runs, not what it samples, and a named
    # input in config.pbtxt lets any Triton client (perf_analyzer's input data, genai-perf) set
    # it. Not Triton's own request priority either: that orders Triton's scheduler queues,
    # which this decoupled model does not use (requests wait in the engine's own queue).
    PRIORITY = "priority"
    # What the request asks for, a `Task` by name; absent: a generation.
    TASK = "task"
    # A prompt as token ids, taken as they are (no template): legacy completions' token
    # prompts; the ids `detokenize` turns into text.
    INPUT_IDS = "input_ids"
    # How a prompt is rendered and tokenized (vLLM's names): the template's generation prompt
    # after `messages` (default true), the tokenizer's special tokens (default: false for
    # `messages`, true for `text_input`).
    ADD_GENERATION_PROMPT = "add_generation_prompt"
    ADD_SPECIAL_TOKENS = "add_special_tokens"
    # `tokenize` only: the answer lists each token's string too.
    RETURN_TOKEN_STRS = "return_token_strs"
    DESCRIBE = "describe"
    # The LoRA adapter a generation, tokenization or image runs with, by its served name;
    # absent or empty: the base weights. For the `load_lora` / `unload_lora` tasks, the adapter
    # the task is about.
    LORA = "lora"
    # `load_lora` only: the adapter's directory (PEFT's adapter_config.json +
    # adapter_model.safetensors). The model accepts it only under its configured roots.
    LORA_PATH = "lora_path"


class Output(StrEnum):
    """The model's outputs, as named in config.pbtxt."""

    TEXT_OUTPUT = "text_output"
    FINISH_REASON = "finish_reason"
    NUM_INPUT_TOKENS = "num_input_tokens"
    NUM_OUTPUT_TOKENS = "num_output_tokens"
    NUM_IMAGE_TOKENS = "num_image_tokens"
    NUM_VIDEO_TOKENS = "num_video_tokens"
    LOGPROBS = "logprobs"
    INDEX = "index"
    # The stop string that ended a choice (vLLM's `stop_reason`), with its finish_reason "stop";
    # absent when EOS, the length or a grammar ended it.
    STOP_REASON = "stop_reason"
    # JSON object of stage → seconds (`TIMING_STAGES`), on the request's last response when
    # `return_timings` asks for it
    TIMINGS = "timings"
    # JSON list, vLLM's prompt_logprobs shape, on the request's first response when the
    # `prompt_logprobs` sampling parameter asks for it
    PROMPT_LOGPROBS = "prompt_logprobs"
    # true on a choice's last response when the repetition guard ended it (finish_reason stop)
    REPETITION_DETECTED = "repetition_detected"
    # On a request's last response: how many of its images and videos the vision tower did
    # not run for (answered from the embedding cache, or by a vision job another request had
    # already queued or started for the same image). The proxy counts it per replica, the
    # cache-hit ratio its adapter/image-aware routing is judged by.
    MEDIA_CACHE_HITS = "media_cache_hits"


INPUTS = tuple(Input)
OUTPUTS = tuple(Output)
DESCRIBE_INPUT = Input.DESCRIBE


class Priority(StrEnum):
    """A request's scheduling class, in admission order: the engine admits every waiting
    interactive request before any waiting batch one, and batch requests hold a bounded share
    of the KV slots (docs/engine.md "Priority classes"). The Batch API runs its lines as
    `batch`; a request that names none is `interactive`."""

    INTERACTIVE = "interactive"
    BATCH = "batch"


DEFAULT_PRIORITY = Priority.INTERACTIVE


class Task(StrEnum):
    """What a request to the model asks for (the `task` input). `tokenize` renders and
    tokenizes the prompt exactly as a generation would (template, media decoded and resized,
    the processor) and answers `TokenizeResult`; `detokenize` answers the text of
    `input_ids`. None of them generates or holds a KV slot: one response whose `text_output` is
    the answer (JSON for tokenize, the text for detokenize), then the final flag."""

    GENERATE = "generate"
    TOKENIZE = "tokenize"
    DETOKENIZE = "detokenize"
    # LoRA adapters (docs/deploy.md "LoRA adapters"): `list_loras` answers a JSON list of
    # `LoraAdapter`; `load_lora` loads `lora_path` under the name in `lora` and answers the
    # new `LoraAdapter`; `unload_lora` drops the adapter named in `lora` and answers its
    # `LoraAdapter`. An unknown name is a `not_found` error.
    LIST_LORAS = "list_loras"
    LOAD_LORA = "load_lora"
    UNLOAD_LORA = "unload_lora"


# The highest `fps` a video part may ask to be sampled at; max_video_frames bounds the cost.
MAX_VIDEO_FPS = 60.0

# Qwen2.5-VL merges 2x2 patches of 14x14 pixels into one visual token: 28x28 pixels each.
PIXELS_PER_TOKEN = 28 * 28


@dataclass(frozen=True)
class ModelLimits:
    # Every image is resized onto the 28-pixel grid with its area in [min_pixels, max_pixels];
    # a request may ask for any budget inside that range.
    min_pixels: int = 4 * PIXELS_PER_TOKEN
    max_pixels: int = 1280 * PIXELS_PER_TOKEN
    max_images: int = 16
    # Width x height per image from its header, before decoding (40 MP = 120 MB of RGB).
    max_source_pixels: int = 40_000_000
    # qwen-vl-utils refuses to resize images more elongated than this.
    max_aspect_ratio: float = 200.0
    # A request's max_tokens is clamped to this.
    max_tokens: int = 8192
    # Choices (`n`) per request; each takes a KV-cache slot.
    max_choices: int = 8
    # Videos (the `video` input and inline video_url parts) per request.
    max_videos: int = 2
    # Longest clip by its container header, refused before decoding.
    max_video_seconds: int = 600
    # Frames sampled from one video (an even count; a frame list may hold at most this many).
    max_video_frames: int = 64
    # Frames per second sampled when the part names no fps (qwen-vl-utils' default).
    video_fps: float = 2.0
    # One video's pixel budget over all its sampled frames, about total_pixels / 784 visual
    # tokens: 4096 tokens, half of a default 8192-token slot; at 64 frames each gets 128
    # tokens (qwen-vl-utils' per-frame minimum), fewer frames get more (up to 768 each).
    video_total_pixels: int = 4096 * PIXELS_PER_TOKEN
    # Width x height per frame from the container header, before decoding (4K UHD).
    max_video_source_pixels: int = 3840 * 2160
    # Tools per request and the size and nesting of one JSON Schema (a tool's parameters or
    # response_format's), bounding grammar compile time and memory; hostile schemas nest deeply.
    max_tools: int = 64
    max_schema_bytes: int = 32 * 1024
    max_schema_depth: int = 16
    # Prompt plus completion tokens; 0 when not known (the checkpoint is not loaded).
    context_length: int = 0

    def encode(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def decode(cls, text: str) -> ModelLimits | None:
        """The limits in a `describe` response; None when the text is not such an object.
        Fields it lacks (an older model) keep their defaults; unknown ones are ignored."""
        try:
            raw = json.loads(text)
        except ValueError:
            return None
        if not isinstance(raw, dict):
            return None
        values = {}
        for field in fields(cls):
            value = raw.get(field.name)
            if _is_number(value) and value >= 0:
                values[field.name] = type(field.default)(value)
        return cls(**values)


# A LoRA adapter's served name is a request's `model`, a metrics label and a log field: a
# letter or digit, then plain characters (Hugging Face's `org/name` included), as long as a model
# id usually is. The proxy refuses other names before asking the model; the model refuses them
# from a client and from its configuration alike.
MAX_LORA_NAME_CHARS = 128
LORA_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._:/@+-]{{0,{MAX_LORA_NAME_CHARS - 1}}}")
LORA_NAME_RULE = (
    f"1 to {MAX_LORA_NAME_CHARS} letters, digits or ._:/@+- characters, starting with a letter "
    "or digit"
)


@dataclass(frozen=True)
class LoraAdapter:
    """A LoRA adapter the model serves under `name` (a request's `model`), on top of the base
    weights (`/v1/models` lists it with the base model as `parent`). `rank` is PEFT's r;
    `vision` is true when it adapts the vision tower too (its image embeddings are its own);
    `resident` says whether its weights are in memory now (at most `max_loras` are; others
    load on their first request)."""

    name: str
    rank: int
    vision: bool = False
    resident: bool = False

    @staticmethod
    def encode_list(adapters: list[LoraAdapter]) -> str:
        return json.dumps([asdict(adapter) for adapter in adapters])

    @classmethod
    def decode_list(cls, text: str) -> list[LoraAdapter] | None:
        """The adapters in a `list_loras` answer (or one in a load/unload answer, as a list of
        one); None when the text is not such a value."""
        try:
            raw = json.loads(text)
            items = raw if isinstance(raw, list) else [raw]
            return [
                cls(
                    str(item["name"]),
                    int(item["rank"]),
                    bool(item.get("vision")),
                    bool(item.get("resident")),
                )
                for item in items
            ]
        except (ValueError, TypeError, KeyError):
            return None


@dataclass(frozen=True)
class PromptPart:
    """One stretch of a tokenized prompt, in order: a run of text tokens (the template's and
    the messages' text), or one image's or video's placeholder tokens with the size it was
    resized to (and, for a video, the frames sampled)."""

    type: str  # "text", "image" or "video"
    tokens: int
    width: int | None = None
    height: int | None = None
    frames: int | None = None


@dataclass(frozen=True)
class TokenizeResult:
    """The `tokenize` task's answer: the prompt's token ids as a generation would prefill them
    (`count` of them, the `prompt_tokens` its usage reports), the context length a request may
    use, and the prompt's parts (their tokens add up to `count`)."""

    count: int
    max_model_len: int
    tokens: list[int]
    parts: list[PromptPart]
    token_strs: list[str] | None = None

    def encode(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def decode(cls, text: str) -> TokenizeResult | None:
        """The result in a `tokenize` response; None when the text is not such an object."""
        try:
            raw = json.loads(text)
            parts = [PromptPart(**part) for part in raw["parts"]]
            return cls(
                int(raw["count"]),
                int(raw["max_model_len"]),
                [int(token) for token in raw["tokens"]],
                parts,
                raw.get("token_strs"),
            )
        except (ValueError, TypeError, KeyError):
            return None


def _is_number(value: object) -> bool:
    """A JSON number: not a bool, not NaN or infinite (ints are exact at any size)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return isinstance(value, int) or math.isfinite(value)


# ---- rules -------------------------------------------------------------------------------

INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_STOP_STRINGS = 16  # as OpenAI's API
MAX_TOP_LOGPROBS = 20  # as OpenAI's API
# Entries of `stop_token_ids` and `logit_bias`: bounds of this server, so a request's token
# lists stay small next to its prompt (a bias row is dense over the vocabulary anyway).
MAX_STOP_TOKEN_IDS = 256
MAX_LOGIT_BIAS = 1024
# The longest n-gram the repetition guard watches (it keeps the last n tokens per sequence).
MAX_GUARD_NGRAM = 1024

# What a `SamplingField` holds (its `kind`).
NUMBER, BOOLEAN, TOKEN_IDS, TOKEN_MAP = "number", "boolean", "token_ids", "token_map"


@dataclass(frozen=True)
class SamplingField:
    """One field of `sampling_parameters` and what it may hold, by `kind`:
    - NUMBER: a number in [low, high] (`low` itself excluded when `low_open`), an integer when
      `integer`;
    - BOOLEAN: true or false;
    - TOKEN_IDS: a list of at most `max_items` token ids, integers in [low, high];
    - TOKEN_MAP: an object of at most `max_items` entries, each key a token id written in
      decimal digits (OpenAI's `logit_bias`), each value a number in [low, high].
    Token ids are checked against the vocabulary where it is known: in the model."""

    name: str
    integer: bool
    low: float = 0
    high: float = 0
    low_open: bool = False
    kind: str = NUMBER
    max_items: int = 0

    def problem(self, value: object) -> str | None:
        """Why `value` is not acceptable, or None (None itself is "not set": acceptable)."""
        if value is None:
            return None
        if self.kind == BOOLEAN:
            return None if isinstance(value, bool) else "must be a boolean"
        if self.kind == TOKEN_IDS:
            return self._token_ids_problem(value)
        if self.kind == TOKEN_MAP:
            return self._token_map_problem(value)
        return self._number_problem(value)

    def _number_problem(self, value: object) -> str | None:
        if not _is_number(value):
            return "must be a number"
        if self.integer and not isinstance(value, int):  # 5.0 too: JSON types are strict
            return "must be an integer"
        low_ok = value > self.low if self.low_open else value >= self.low
        if not (low_ok and value <= self.high):
            return f"must be {self.range_text()}"
        return None

    def _token_ids_problem(self, value: object) -> str | None:
        if not isinstance(value, list):
            return "must be a list of token ids"
        if len(value) > self.max_items:
            return f"takes at most {self.max_items} token ids"
        for index, item in enumerate(value):
            if not _is_number(item) or not isinstance(item, int) or not self._in_range(item):
                return f"[{index}] must be a token id: an integer {self.range_text()}"
        return None

    def _token_map_problem(self, value: object) -> str | None:
        if not isinstance(value, dict):
            return "must be an object mapping token ids to numbers"
        if len(value) > self.max_items:
            return f"takes at most {self.max_items} entries"
        for key, item in value.items():
            if not token_id_key(key):
                return f"keys must be token ids in decimal digits, not {str(key)[:40]!r}"
            if not _is_number(item) or not self._in_range(item):
                return f"[{key!r}] must be a number {self.range_text()}"
        return None

    def _in_range(self, value: float) -> bool:
        return (value > self.low if self.low_open else value >= self.low) and value <= self.high

    def range_text(self) -> str:
        low = "greater than" if self.low_open else "at least"
        text = (lambda x: str(int(x))) if self.integer else (lambda x: f"{x:g}")  # noqa: E731
        return f"{low} {text(self.low)} and at most {text(self.high)}"


def token_id_key(key: object) -> int | None:
    """The token id a TOKEN_MAP key writes (ASCII digits, within int32); None for any other."""
    if not isinstance(key, str) or not key.isascii() or not key.isdigit() or len(key) > 10:
        return None
    token = int(key)
    return token if token <= INT32_MAX else None


_OPENAI_SAMPLING_FIELDS = (
    SamplingField("max_tokens", True, 1, INT32_MAX),
    SamplingField("temperature", False, 0, 2),
    SamplingField("top_p", False, 0, 1, low_open=True),
    SamplingField("top_k", True, -1, INT32_MAX),  # -1 (or 0): no top-k
    SamplingField("repetition_penalty", False, 0, 10, low_open=True),
    SamplingField("presence_penalty", False, -2, 2),
    SamplingField("frequency_penalty", False, -2, 2),
    SamplingField("seed", True, INT64_MIN, INT64_MAX),
    SamplingField("n", True, 1, INT32_MAX),  # the model's max_choices caps it further
    SamplingField("top_logprobs", True, 0, MAX_TOP_LOGPROBS),
)
# vLLM's extras (docs/engine.md "Sampling"): no stop (EOS, stop_token_ids, stop
# strings, the repetition guard) before min_tokens tokens; EOS does not stop; more
# tokens that stop like EOS; OpenAI's logit bias by token id; keep tokens of at least
# min_p times the top probability; the stop string or token kept in the text; special
# tokens' text kept; the prompt tokens' logprobs (vLLM's shape).
VLLM_EXTRA_SAMPLING_FIELDS = (
    SamplingField("min_tokens", True, 0, INT32_MAX),
    SamplingField("ignore_eos", False, kind=BOOLEAN),
    SamplingField(
        "stop_token_ids", True, 0, INT32_MAX, kind=TOKEN_IDS, max_items=MAX_STOP_TOKEN_IDS
    ),
    SamplingField("logit_bias", False, -100, 100, kind=TOKEN_MAP, max_items=MAX_LOGIT_BIAS),
    SamplingField("min_p", False, 0, 1),
    SamplingField("include_stop_str_in_output", False, kind=BOOLEAN),
    SamplingField("skip_special_tokens", False, kind=BOOLEAN),
    SamplingField("prompt_logprobs", True, 0, MAX_TOP_LOGPROBS),
)
SAMPLING_FIELDS = {
    field.name: field for field in (*_OPENAI_SAMPLING_FIELDS, *VLLM_EXTRA_SAMPLING_FIELDS)
}
VLLM_EXTRAS = tuple(field.name for field in VLLM_EXTRA_SAMPLING_FIELDS)

# The repetition guard (`repetition_guard`: {"ngram": n, "max_repeats": k}): generation stops
# (finish_reason stop, `repetition_detected`) once the last n tokens have come k + 1 times in a
# row; ngram 0 turns a server default off for the request.
REPETITION_GUARD = "repetition_guard"
REPETITION_GUARD_FIELDS = {
    field.name: field
    for field in (
        SamplingField("ngram", True, 0, MAX_GUARD_NGRAM),
        SamplingField("max_repeats", True, 1, INT32_MAX),
    )
}

# The stages of a request's `timings` output, seconds each, as the model measures them from
# the request's arrival at the model: waiting (for preparation and for a KV slot), decoding
# its images and videos, the rest of preparation (template, resizing, processor, positions),
# vision-tower stages run for its media, the rest of the way to its first token (prompt
# chunks, and the steps they share), ttft (the sum of the five), then the decode (first to
# last token) and its mean inter-token latency. The proxy adds `media_fetch` and counts ttft
# from the request's arrival at the proxy.
TIMING_STAGES = (
    "queue",
    "media_decode",
    "preprocess",
    "vision",
    "prefill",
    "ttft",
    "decode",
    "mean_itl",
)


def decode_timings(text: str) -> dict[str, float]:
    """The `timings` output: every known stage with a finite, non-negative number of seconds
    (anything else is left out)."""
    try:
        raw = json.loads(text)
    except ValueError:
        return {}
    if not isinstance(raw, dict):
        return {}
    return {
        stage: float(raw[stage])
        for stage in TIMING_STAGES
        if _is_number(raw.get(stage)) and raw[stage] >= 0
    }


# Chat roles the model's template renders (the proxy maps OpenAI's `developer` to `system`).
ROLES = ("system", "user", "assistant", "tool")
# How Qwen writes a tool call in its output; the model's grammar emits these, the proxy parses.
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"

# Image formats by their first bytes; WebP is RIFF....WEBP. Enough bytes to tell: 12.
_IMAGE_MAGIC = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
)
SNIFF_BYTES = 12
# What a client-sampled frame list (`data:video/jpeg;base64,<f1>,<f2>,...`) may hold.
FRAME_FORMATS = ("jpeg", "png", "webp")
FRAME_LIST_PREFIX = b"data:video/"


def sniff_image(data: bytes) -> str | None:
    """The image format from magic bytes (declared types and file names are not trusted)."""
    for magic, name in _IMAGE_MAGIC:
        if data.startswith(magic):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def sniff_video(data: bytes) -> str | None:
    """The container family from its signature: `iso` (MP4, MOV, 3GP), `ebml` (WebM, MKV),
    `avi`, or `frames` for a client's frame list; None for anything else."""
    if data[4:8] == b"ftyp":
        return "iso"
    if data.startswith(b"\x1a\x45\xdf\xa3"):
        return "ebml"
    if data[:4] == b"RIFF" and data[8:12] == b"AVI ":
        return "avi"
    if data.startswith(FRAME_LIST_PREFIX):
        return "frames"
    return None


def split_data_url(url: str) -> tuple[str, str] | None:
    """(media type, base64 payload) of `data:<type>[;param...];base64,<payload>`, the media
    type lower-cased; None when `url` is not a base64 data URL."""
    head, comma, payload = url.partition(",")
    if not comma or head[:5].lower() != "data:":
        return None
    media_type, *params = head[5:].split(";")
    if not params or params[-1].strip().lower() != "base64" or "/" not in media_type:
        return None
    return media_type.strip().lower(), payload


def video_option_bounds(limits: ModelLimits) -> dict[str, tuple[float, float, bool]]:
    """The range each option of a video part may take under `limits`: (low, high, whether
    `low` itself is excluded). Unset options take the model's defaults (video_fps, ...)."""
    return {
        "fps": (0.0, MAX_VIDEO_FPS, True),
        "max_frames": (2, limits.max_video_frames, False),
        "min_pixels": (limits.min_pixels, limits.max_pixels, False),
        "max_pixels": (limits.min_pixels, limits.max_pixels, False),
        "total_pixels": (limits.min_pixels, limits.video_total_pixels, False),
    }


def schema_bytes(schema: object) -> int:
    """A JSON Schema's size as both sides count it: compact JSON (no spaces), UTF-8."""
    return len(json.dumps(schema, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))


def schema_depth(value: object) -> int:
    """How deeply objects and arrays nest (iteratively: a hostile schema must not recurse)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children)
    return deepest


ERROR_PREFIX = "qwen_vl_error: "
ERROR_KINDS = ("invalid_request", "busy", "unavailable", "not_found", "internal")


@dataclass(frozen=True)
class ModelError:
    kind: str
    message: str
    param: str | None = None
    code: str | None = None

    def encode(self) -> str:
        return ERROR_PREFIX + json.dumps(asdict(self), ensure_ascii=False)


def decode_error(text: str) -> ModelError | None:
    """The model's error in a Triton error message; None for anything else (Triton's own)."""
    if not text.startswith(ERROR_PREFIX):
        return None
    try:
        fields = json.loads(text[len(ERROR_PREFIX) :])
    except ValueError:
        return None
    if not isinstance(fields, dict) or fields.get("kind") not in ERROR_KINDS:
        return None
    text_or_none = lambda value: value if isinstance(value, str) else None  # noqa: E731
    return ModelError(
        fields["kind"],
        str(fields.get("message") or ""),
        text_or_none(fields.get("param")),
        text_or_none(fields.get("code")),
    )
