"""A Triton request's raw inputs → model-ready tensors and generation limits."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch

from .chat import decode_image_elements, parse_messages
from .checkpoint import Checkpoint
from .errors import RequestError
from .params import SamplingParams, parse_sampling_parameters
from .settings import ModelSettings
from .tools import parse_tools, render_prompt

IMAGE_PLACEHOLDER = "<|image_pad|>"


@dataclass
class RawRequest:
    """The inputs exactly as they arrived (tensor names of the model's contract)."""

    request_id: str = ""
    messages: str | None = None
    text_input: str | None = None
    images: list[bytes] = field(default_factory=list)
    stream: bool = False
    sampling_parameters: str | None = None
    exclude_input_in_output: bool = False
    return_finish_reason: bool = False
    return_num_input_tokens: bool = False
    return_num_output_tokens: bool = False
    tools: str | None = None  # JSON list of OpenAI function tools


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
    # one digest per image of its exact vision-tower input (pixels and grid): the embedding cache key
    image_keys: list[bytes] = field(default_factory=list)
    image_starts: list[int] = field(default_factory=list)  # each image's first token position


def _vision_inputs(messages: list[dict]):
    from qwen_vl_utils import process_vision_info

    images, _videos = process_vision_info(messages)
    return images


def _resize(images, settings: ModelSettings):
    from qwen_vl_utils import fetch_image

    return [
        fetch_image(
            {"image": image, "min_pixels": settings.min_pixels, "max_pixels": settings.max_pixels}
        )
        for image in images
    ]


def _prompt_and_images(raw: RawRequest, checkpoint: Checkpoint, settings: ModelSettings):
    if raw.messages is not None:
        vision = {"min_pixels": settings.min_pixels, "max_pixels": settings.max_pixels}
        messages = parse_messages(raw.messages, raw.images, vision, settings.limits())
        prompt = render_prompt(checkpoint.processor, messages, parse_tools(raw.tools))
        return prompt, _vision_inputs(messages)
    if raw.text_input is None:
        raise RequestError("one of 'messages' or 'text_input' is required", "messages")
    placeholders = raw.text_input.count(IMAGE_PLACEHOLDER)
    if placeholders != len(raw.images):
        raise RequestError(
            f"text_input has {placeholders} {IMAGE_PLACEHOLDER} placeholders "
            f"but {len(raw.images)} images were sent",
            "text_input",
        )
    return raw.text_input, _resize(decode_image_elements(raw.images, settings.limits()), settings)


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
    if inputs.get("image_grid_thw") is None:
        return torch.arange(input_ids.shape[1]).expand(3, -1), 0
    positions, deltas = model.model.get_rope_index(
        input_ids,
        inputs["mm_token_type_ids"],
        image_grid_thw=inputs["image_grid_thw"],
        attention_mask=inputs["attention_mask"],
    )
    return positions[:, 0], int(deltas.reshape(-1)[0])


def _image_keys(inputs) -> list[bytes]:
    grid = inputs.get("image_grid_thw")
    if grid is None:
        return []
    keys, start = [], 0
    for thw in grid.tolist():
        patches = thw[0] * thw[1] * thw[2]
        pixels = inputs["pixel_values"][start : start + patches].contiguous()
        digest = hashlib.blake2b(str(thw).encode(), digest_size=20)
        digest.update(pixels.numpy().tobytes())
        keys.append(digest.digest())
        start += patches
    return keys


def _image_starts(inputs, image_token_id: int, merge: int) -> list[int]:
    grid = inputs.get("image_grid_thw")
    if grid is None:
        return []
    positions = (inputs["input_ids"][0] == image_token_id).nonzero()[:, 0].tolist()
    starts, index = [], 0
    for thw in grid.tolist():
        starts.append(positions[index])
        index += thw[0] * thw[1] * thw[2] // merge
    return starts


def prepare(raw: RawRequest, checkpoint: Checkpoint, settings: ModelSettings) -> PreparedRequest:
    """Everything a request needs before the engine sees it; runs on a worker thread."""
    sampling = parse_sampling_parameters(raw.sampling_parameters)
    prompt, images = _prompt_and_images(raw, checkpoint, settings)
    inputs = checkpoint.processor(text=[prompt], images=images or None, return_tensors="pt")
    prompt_tokens = int(inputs["input_ids"].shape[1])
    image_tokens = int((inputs["input_ids"] == checkpoint.image_token_id).sum())
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
        image_keys=_image_keys(inputs),
        image_starts=_image_starts(
            inputs, checkpoint.image_token_id, checkpoint.model.model.visual.spatial_merge_size**2
        ),
    )
