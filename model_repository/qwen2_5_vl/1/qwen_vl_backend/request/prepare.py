"""A Triton request's raw inputs → model-ready tensors and generation limits."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch

from ..contract import DEFAULT_PRIORITY, Input, Priority, Task
from ..errors import RequestError
from ..media.videos import Video
from ..modeling.checkpoint import Checkpoint
from ..settings import ModelSettings
from .chat import decode_image_elements, decode_video_elements, parse_messages
from .params import SamplingParams, parse_sampling_parameters
from .tools import parse_tools, render_prompt

IMAGE_PLACEHOLDER = "<|image_pad|>"
VIDEO_PLACEHOLDER = "<|video_pad|>"


@dataclass
class RawRequest:
    """The inputs exactly as they arrived (tensor names of the model's contract)."""

    request_id: str = ""
    messages: str | None = None
    text_input: str | None = None
    images: list[bytes] = field(default_factory=list)
    videos: list[bytes] = field(default_factory=list)
    stream: bool = False
    sampling_parameters: str | None = None
    exclude_input_in_output: bool = False
    return_finish_reason: bool = False
    return_num_input_tokens: bool = False
    return_num_output_tokens: bool = False
    tools: str | None = None  # JSON list of OpenAI function tools
    priority: str | None = None  # a contract.Priority name; None: the default class
    return_timings: bool = False  # the last response carries the request's stage timings
    task: str | None = None  # a contract.Task name; None: generate
    input_ids: list[int] | None = None  # a prompt as token ids, instead of messages/text_input
    add_generation_prompt: bool = True
    add_special_tokens: bool | None = None  # None: false for messages, true for text_input
    return_token_strs: bool = False
    # W3C trace context (`traceparent`, `tracestate`) from the request's parameters, read only
    # when tracing is on (engine/tracing.py); None: none
    trace_context: dict[str, str] | None = None
    lora: str | None = None  # the LoRA adapter's served name; None or empty: the base weights
    lora_path: str | None = None  # load_lora: the adapter's directory


@dataclass
class PreparedRequest:
    raw: RawRequest
    inputs: dict[str, Any]  # the processor's tensors, on the CPU
    prompt: str
    prompt_tokens: int
    image_tokens: int
    sampling: SamplingParams
    max_new_tokens: int
    # mrope positions [3, prompt_tokens] and the shift decode positions get after the images
    positions: torch.Tensor | None = None
    rope_delta: int = 0
    # The visual items (images and videos) in order of appearance in the prompt: one digest
    # each of its exact vision-tower input (pixels and grid: the embedding cache key), its first
    # token position, and its tower input (patches [n, 1176], grid (t, h, w)).
    image_keys: list[bytes] = field(default_factory=list)
    image_starts: list[int] = field(default_factory=list)
    visual: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    video_tokens: int = 0


def parse_priority(name: str | None) -> Priority:
    """The request's scheduling class from its `priority` input; absent: the default."""
    if name is None:
        return DEFAULT_PRIORITY
    try:
        return Priority(name)
    except ValueError:
        names = " or ".join(f"'{p}'" for p in Priority)
        raise RequestError(
            f"'priority' must be {names}, not {name[:40]!r}", Input.PRIORITY.value
        ) from None


def parse_task(name: str | None) -> Task:
    """What the request asks for, from its `task` input; absent: a generation."""
    if name is None:
        return Task.GENERATE
    try:
        return Task(name)
    except ValueError:
        names = ", ".join(f"'{task}'" for task in Task)
        raise RequestError(f"'task' must be one of {names}, not {name[:40]!r}", "task") from None


def _vision_inputs(messages: list[dict]) -> tuple[list, list[Video]]:
    """The images (resized with their parts' budgets) and videos, each in order of appearance.
    An image part with a budget was resized into it by the decode sandbox already (a second
    smart_resize is not idempotent: it may shrink an image the first grew past max_pixels)."""
    from qwen_vl_utils import fetch_image

    images, videos = [], []
    for message in messages:
        content = message.get("content")
        for part in content if isinstance(content, list) else []:
            if part.get("type") == "image":
                images.append(part["image"] if "max_pixels" in part else fetch_image(part))
            elif part.get("type") == "video":
                videos.append(part["video"])
    return images, videos


def _prompt_and_images(raw: RawRequest, checkpoint: Checkpoint, settings: ModelSettings):
    limits = settings.limits()
    if raw.messages is not None:
        vision = {"min_pixels": settings.min_pixels, "max_pixels": settings.max_pixels}
        messages = parse_messages(
            raw.messages, raw.images, vision, limits, raw.videos, settings.video_decode_timeout_s
        )
        prompt = render_prompt(
            checkpoint.processor, messages, parse_tools(raw.tools), raw.add_generation_prompt
        )
        return (prompt, *_vision_inputs(messages))
    if raw.text_input is None:
        raise RequestError("one of 'messages', 'text_input' or 'input_ids' is required", "messages")
    placeholders = raw.text_input.count(IMAGE_PLACEHOLDER)
    if placeholders != len(raw.images):
        raise RequestError(
            f"text_input has {placeholders} {IMAGE_PLACEHOLDER} placeholders "
            f"but {len(raw.images)} images were sent",
            "text_input",
        )
    placeholders = raw.text_input.count(VIDEO_PLACEHOLDER)
    if placeholders != len(raw.videos):
        raise RequestError(
            f"text_input has {placeholders} {VIDEO_PLACEHOLDER} placeholders "
            f"but {len(raw.videos)} videos were sent",
            "text_input",
        )
    # resized into the server's budget by the decode sandbox
    budget = {"min_pixels": settings.min_pixels, "max_pixels": settings.max_pixels}
    images = decode_image_elements(raw.images, limits, budget)
    videos = decode_video_elements(raw.videos, limits, settings.video_decode_timeout_s)
    return raw.text_input, images, videos


def _max_new_tokens(
    sampling: SamplingParams, prompt_tokens: int, checkpoint: Checkpoint, settings: ModelSettings
) -> int:
    """The request's max_tokens clamped to the server cap; the context must hold it (vLLM's rule)."""
    limit = checkpoint.max_model_len
    room = limit - prompt_tokens
    if room <= 0:
        raise RequestError(
            f"This model's maximum context length is {limit} tokens. However, your messages "
            f"resulted in {prompt_tokens} tokens. Please reduce the length of the messages.",
            "messages",
            "context_length_exceeded",
        )
    if sampling.max_tokens is None:
        return max(1, min(settings.default_max_tokens, settings.max_tokens_cap, room))
    wanted = min(sampling.max_tokens, settings.max_tokens_cap)
    if wanted > room:
        raise RequestError(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{prompt_tokens + wanted} tokens ({prompt_tokens} in the messages, {wanted} in the "
            "completion). Please reduce the length of the messages or completion.",
            "max_tokens",
            "context_length_exceeded",
        )
    return wanted


def _positions(model, inputs) -> tuple[torch.Tensor, int]:
    """mrope positions of the prompt [3, L] and the decode shift; text-only prompts count 0…L-1."""
    input_ids = inputs["input_ids"]
    if inputs.get("image_grid_thw") is None and inputs.get("video_grid_thw") is None:
        return torch.arange(input_ids.shape[1]).expand(3, -1), 0
    positions, deltas = model.model.get_rope_index(
        input_ids,
        inputs["mm_token_type_ids"],
        image_grid_thw=inputs.get("image_grid_thw"),
        video_grid_thw=inputs.get("video_grid_thw"),
        second_per_grid_ts=inputs.get("second_per_grid_ts"),
        attention_mask=inputs["attention_mask"],
    )
    return positions[:, 0], int(deltas.reshape(-1)[0])


def _items(inputs, kind: str, token_id: int, merge: int) -> list[tuple[int, bytes, tuple]]:
    """(first token position, digest, (patches, grid)) of each image or video of `inputs`."""
    grid = inputs.get(f"{kind}_grid_thw")
    if grid is None:
        return []
    pixels = inputs["pixel_values" if kind == "image" else "pixel_values_videos"]
    positions = (inputs["input_ids"][0] == token_id).nonzero()[:, 0].tolist()
    items, start, token = [], 0, 0
    for thw in grid:
        patches = int(thw.prod())
        rows = pixels[start : start + patches].contiguous()
        digest = hashlib.blake2b(str(thw.tolist()).encode(), digest_size=20)
        digest.update(rows.numpy().tobytes())
        items.append((positions[token], digest.digest(), (rows, thw)))
        start += patches
        token += patches // merge
    return items


def _visual_items(inputs, checkpoint: Checkpoint) -> list[tuple[int, bytes, tuple]]:
    """Images and videos together, in order of appearance in the prompt."""
    merge = checkpoint.model.model.visual.spatial_merge_size**2
    config = checkpoint.model.config
    images = _items(inputs, "image", config.image_token_id, merge)
    videos = _items(inputs, "video", config.video_token_id, merge)
    return sorted(images + videos, key=lambda item: item[0])


def _process(
    checkpoint: Checkpoint, prompt: str, images: list, videos: list[Video], special_tokens: bool
):
    kwargs: dict[str, Any] = {"add_special_tokens": special_tokens}
    if videos:
        from transformers.video_utils import VideoMetadata

        kwargs |= {
            "videos": [video.frames for video in videos],
            "video_metadata": [
                VideoMetadata(total_num_frames=len(video.frames), fps=video.fps) for video in videos
            ],
            # frames are sampled and on the 28-pixel grid already (videos.py, Qwen's budget)
            "videos_kwargs": {"do_sample_frames": False, "do_resize": False},
        }
    return checkpoint.processor(text=[prompt], images=images or None, return_tensors="pt", **kwargs)


def check_token_ids(ids: list[int], checkpoint: Checkpoint) -> None:
    """Every id one of the tokenizer's (errors name `input_ids[i]`)."""
    vocabulary = len(checkpoint.tokenizer)
    for index, token in enumerate(ids):
        if not 0 <= token < vocabulary:
            raise RequestError(
                f"{token} is not a token id of this model (0 to {vocabulary - 1})",
                f"{Input.INPUT_IDS.value}[{index}]",
            )


def _token_prompt(raw: RawRequest, checkpoint: Checkpoint) -> tuple[str, dict[str, Any]]:
    """A prompt of token ids: the ids as they are (no template, no tokenizer), its text for
    echoing. Ids that stand for images or videos would have no media to show: refused."""
    ids, param = raw.input_ids or [], Input.INPUT_IDS.value
    if raw.messages is not None or raw.text_input is not None:
        raise RequestError("send one of 'messages', 'text_input' or 'input_ids'", param)
    if not ids:
        raise RequestError("'input_ids' must hold at least one token id", param)
    if raw.images or raw.videos:
        raise RequestError("a prompt of token ids takes no images or videos", param)
    check_token_ids(ids, checkpoint)
    placeholders = {checkpoint.image_token_id, checkpoint.video_token_id}
    for index, token in enumerate(ids):
        if token in placeholders:
            raise RequestError(
                f"{token} is an image or video placeholder, which needs its media: send such "
                "prompts as messages",
                f"{param}[{index}]",
            )
    tensor = torch.tensor([ids], dtype=torch.long)
    text = checkpoint.tokenizer.decode(ids, skip_special_tokens=False)
    return text, {"input_ids": tensor, "attention_mask": torch.ones_like(tensor)}


def render(
    raw: RawRequest, checkpoint: Checkpoint, settings: ModelSettings
) -> tuple[str, dict[str, Any]]:
    """The prompt exactly as a generation prefills it: its text and the processor's tensors
    (token ids, the media's pixels and grids). Generation and `tokenize` both take it from
    here, so a tokenize count is the generation's prompt_tokens."""
    if raw.input_ids is not None:
        return _token_prompt(raw, checkpoint)
    prompt, images, videos = _prompt_and_images(raw, checkpoint, settings)
    special_tokens = raw.add_special_tokens
    if special_tokens is None:  # the template writes the special tokens a chat needs
        special_tokens = raw.messages is None
    return prompt, _process(checkpoint, prompt, images, videos, special_tokens)


def prepare(raw: RawRequest, checkpoint: Checkpoint, settings: ModelSettings) -> PreparedRequest:
    """Everything a request needs before the engine sees it; runs on a worker thread."""
    sampling = parse_sampling_parameters(raw.sampling_parameters)
    prompt, inputs = render(raw, checkpoint, settings)
    prompt_tokens = int(inputs["input_ids"].shape[1])
    image_tokens = int((inputs["input_ids"] == checkpoint.image_token_id).sum())
    video_tokens = int((inputs["input_ids"] == checkpoint.video_token_id).sum())
    items = _visual_items(inputs, checkpoint)
    max_new_tokens = _max_new_tokens(sampling, prompt_tokens, checkpoint, settings)
    with torch.no_grad():
        positions, rope_delta = _positions(checkpoint.model, inputs)
    return PreparedRequest(
        raw=raw,
        inputs=inputs,
        prompt=prompt,
        prompt_tokens=prompt_tokens,
        image_tokens=image_tokens,
        sampling=sampling,
        max_new_tokens=max_new_tokens,
        positions=positions,
        rope_delta=rope_delta,
        image_keys=[key for _, key, _ in items],
        image_starts=[start for start, _, _ in items],
        visual=[item for _, _, item in items],
        video_tokens=video_tokens,
    )
