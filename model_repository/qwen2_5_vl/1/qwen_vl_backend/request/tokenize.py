"""The `tokenize` and `detokenize` tasks (contract.Task): answers about a prompt, no generation.

Tokenize renders the prompt through the path a generation takes (`prepare.render`: template,
media decoded and resized with their budgets, the processor), so its count is the
`prompt_tokens` a generation of the same request reports, visual tokens included, and each
image's and video's resized size is the one the vision tower would see.
"""

from __future__ import annotations

from ..contract import Input, PromptPart, Task, TokenizeResult
from ..errors import RequestError
from ..modeling.checkpoint import Checkpoint
from ..settings import ModelSettings
from .prepare import RawRequest, check_token_ids, render


def prompt_parts(inputs: dict, checkpoint: Checkpoint) -> list[PromptPart]:
    """The prompt in order: runs of text tokens and each image's or video's placeholder tokens
    (one grid row of the processor each), with the pixels it was resized to."""
    vision = checkpoint.model.config.vision_config
    merge = vision.spatial_merge_size**2
    grids = {
        checkpoint.image_token_id: ("image", inputs.get("image_grid_thw")),
        checkpoint.video_token_id: ("video", inputs.get("video_grid_thw")),
    }
    pending = {
        token: iter([] if grid is None else grid.tolist()) for token, (_, grid) in grids.items()
    }
    ids = inputs["input_ids"][0].tolist()
    parts: list[PromptPart] = []
    text, position = 0, 0
    while position < len(ids):
        token = ids[position]
        grid = next(pending[token], None) if token in pending else None
        if grid is None:
            text, position = text + 1, position + 1
            continue
        if text:
            parts.append(PromptPart("text", text))
            text = 0
        kind = grids[token][0]
        t, h, w = grid
        tokens = t * h * w // merge
        frames = t * vision.temporal_patch_size if kind == "video" else None
        parts.append(PromptPart(kind, tokens, w * vision.patch_size, h * vision.patch_size, frames))
        position += tokens
    if text:
        parts.append(PromptPart("text", text))
    return parts


def tokenize(
    raw: RawRequest, checkpoint: Checkpoint, settings: ModelSettings, context_length: int
) -> TokenizeResult:
    _, inputs = render(raw, checkpoint, settings)
    ids = inputs["input_ids"][0].tolist()
    strings = checkpoint.tokenizer.convert_ids_to_tokens(ids) if raw.return_token_strs else None
    return TokenizeResult(len(ids), context_length, ids, prompt_parts(inputs, checkpoint), strings)


def detokenize(raw: RawRequest, checkpoint: Checkpoint) -> str:
    """The text of `input_ids`, special tokens included (vLLM's detokenize)."""
    ids = raw.input_ids
    if ids is None:
        raise RequestError("detokenize needs 'input_ids'", Input.INPUT_IDS.value)
    check_token_ids(ids, checkpoint)
    return checkpoint.tokenizer.decode(ids, skip_special_tokens=False)


def answer_task(
    task: Task,
    raw: RawRequest,
    checkpoint: Checkpoint,
    settings: ModelSettings,
    context_length: int,
) -> str:
    """The `text_output` of a task other than generation."""
    if task is Task.TOKENIZE:
        return tokenize(raw, checkpoint, settings, context_length).encode()
    if task is Task.DETOKENIZE:
        return detokenize(raw, checkpoint)
    raise ValueError(f"{task} is not answered here")
