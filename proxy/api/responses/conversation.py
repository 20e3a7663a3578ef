"""A request's input as stored, and stored turns as input again.

- `stored_input_items`: the request's `input` as OpenAI lists it (`GET
  /v1/responses/{id}/input_items`: each item with an id, a string input as one user message),
  each image part holding the digest of the bytes the model got (`image_digest`) instead of
  the image: the bytes go to the blob store once (an http(s) image is kept as fetched, so a
  later turn sends the model what it saw, not what the URL serves by then; its URL is kept
  for listing).
- `history_input`: the turns of a stored conversation (proxy/state/responses.py `history`)
  as input items, oldest first: each turn's input, then its output; images read back from the
  blob store and sent as data: URLs, so the client never uploads them again.
- `listed_input_items`: stored items as the list endpoint shows them, images as their URL or
  a data: URL of their bytes.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

from ...error_catalogue import INVALID_VALUE, NO_SUCH_OBJECT, STATE_DISABLED
from ...media.images import IMAGE
from ...media.kinds import REMOTE_SCHEMES, url_scheme
from ...state.blobs import BlobStore, BlobTooLarge, digest_of
from ...state.files import FileStore
from ...state.responses import Turn
from ...transport.contract import sniff_image
from .protocol import (
    HISTORY_PATH,
    FunctionCallItem,
    FunctionCallOutputItem,
    InputImage,
    InputText,
    MessageItem,
    ResponsesRequest,
    history_items,
)

_MAX_ITEM_ID = 64  # the column's width; a longer client id is replaced


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _item_id(item: Any, prefix: str) -> str:
    given = (item.model_extra or {}).get("id")
    if isinstance(given, str) and 0 < len(given) <= _MAX_ITEM_ID:
        return given
    return _id(prefix)


def image_parts(request: ResponsesRequest) -> Iterator[InputImage]:
    """The request's own image parts, in order of appearance."""
    if isinstance(request.input, str):
        return
    for item in request.input:
        if isinstance(item, MessageItem) and not isinstance(item.content, str):
            yield from (part for part in item.content if isinstance(part, InputImage))


def stored_input_items(
    request: ResponsesRequest, media: Sequence[bytes]
) -> tuple[list[dict[str, Any]], dict[str, bytes]]:
    """The request's input items to store, and their images by digest. `media`: the bytes of
    the request's own images (`image_parts`), in the same order."""
    if isinstance(request.input, str):
        text = [{"type": "input_text", "text": request.input}]
        return [{"id": _id("msg"), "type": "message", "role": "user", "content": text}], {}
    images: dict[str, bytes] = {}
    data = iter(media)
    items: list[dict[str, Any]] = []
    for item in request.input:
        if isinstance(item, MessageItem):
            items.append(
                {
                    "id": _item_id(item, "msg"),
                    "type": "message",
                    "role": item.role,
                    "content": _stored_content(item, data, images),
                }
            )
        elif isinstance(item, FunctionCallItem):
            items.append(
                {
                    "id": _item_id(item, "fc"),
                    "type": "function_call",
                    "call_id": item.call_id,
                    "name": item.name,
                    "arguments": item.arguments,
                    "status": "completed",
                }
            )
        else:
            assert isinstance(item, FunctionCallOutputItem)
            items.append(
                {
                    "id": _item_id(item, "fco"),
                    "type": "function_call_output",
                    "call_id": item.call_id,
                    "output": item.output,
                    "status": "completed",
                }
            )
    return items, images


def _stored_content(
    item: MessageItem, data: Iterator[bytes], images: dict[str, bytes]
) -> list[dict[str, Any]]:
    if isinstance(item.content, str):
        kind = "output_text" if item.role == "assistant" else "input_text"
        return [{"type": kind, "text": item.content}]
    parts: list[dict[str, Any]] = []
    for part in item.content:
        if isinstance(part, InputImage):
            image = next(data)
            digest = digest_of(image)
            images[digest] = image
            url = part.image_url or ""
            parts.append(
                {
                    "type": "input_image",
                    "detail": part.detail,
                    # An http(s) URL is listed as sent; a data: URL is rebuilt from the blob.
                    "image_url": url if url_scheme(url) in REMOTE_SCHEMES else None,
                    "image_digest": digest,
                }
            )
        elif isinstance(part, InputText):
            parts.append({"type": "input_text", "text": part.text})
        else:
            parts.append({"type": "output_text", "text": part.text})
    return parts


async def resolve_file_images(
    request: ResponsesRequest, files: FileStore | None, tenant: str, max_image_bytes: int
) -> None:
    """Gives each image part that names an uploaded file (`file_id`, the Files API) the file's
    bytes as a data: URL, so the rest of the path sees an image like any other. The file must be
    the caller's, live, within the image byte limit and an image by its bytes. `files` None:
    this proxy keeps no state, so no file can be named."""
    for path, part in _file_image_parts(request):
        param = f"{path}.file_id"
        if files is None:
            raise STATE_DISABLED(param, what="files")
        stored = await files.get(tenant, part.file_id)
        if stored is None:
            raise NO_SUCH_OBJECT(param, kind="File", id=part.file_id[:_MAX_ITEM_ID])
        if stored.bytes > max_image_bytes:
            raise IMAGE.too_many_bytes(param, max_image_bytes)
        image = await files.blobs.read_bytes(stored.digest, max_image_bytes)
        if image is None:  # deleted and swept between the two reads
            raise NO_SUCH_OBJECT(param, kind="File", id=part.file_id[:_MAX_ITEM_ID])
        if sniff_image(image) is None:
            raise IMAGE.not_this_kind(param)
        part.image_url = _data_url(image)


def _file_image_parts(request: ResponsesRequest) -> Iterator[tuple[str, InputImage]]:
    if isinstance(request.input, str):
        return
    for i, item in enumerate(request.input):
        if isinstance(item, MessageItem) and not isinstance(item.content, str):
            for j, part in enumerate(item.content):
                if isinstance(part, InputImage) and part.image_url is None and part.file_id:
                    yield f"input[{i}].content[{j}]", part


def _data_url(image: bytes) -> str:
    kind = sniff_image(image) or "webp"  # stored images were recognised when they came in
    return f"data:image/{kind};base64,{base64.b64encode(image).decode('ascii')}"


async def _history_image(blobs: BlobStore, digest: str, max_bytes: int) -> bytes:
    try:
        image = await blobs.read_bytes(digest, max_bytes)
    except BlobTooLarge:  # the limit was lowered since the image was stored
        raise IMAGE.too_many_bytes(HISTORY_PATH, max_bytes) from None
    if image is None:
        raise INVALID_VALUE(
            HISTORY_PATH,
            message="An image of the stored conversation is no longer available; start a new "
            "conversation with the image in 'input'.",
        )
    return image


async def history_input(turns: Sequence[Turn], blobs: BlobStore, max_image_bytes: int) -> list[Any]:
    """The turns as input items, oldest first (each turn's input, then its output), images
    as data: URLs of their stored bytes."""
    items: list[dict[str, Any]] = []
    cache: dict[str, str] = {}  # one image in many turns is read once
    for turn in turns:
        for item in turn.input_items:
            items.append(await _as_input(item, blobs, max_image_bytes, cache))
        items.extend(turn.output)
    return history_items(items)


async def _as_input(
    item: dict[str, Any], blobs: BlobStore, max_image_bytes: int, cache: dict[str, str]
) -> dict[str, Any]:
    content = item.get("content")
    if not isinstance(content, list):
        return item
    parts = []
    for part in content:
        digest = part.get("image_digest")
        if digest is None:
            parts.append(part)
            continue
        if digest not in cache:
            cache[digest] = _data_url(await _history_image(blobs, digest, max_image_bytes))
        image = {"type": "input_image", "image_url": cache[digest]}
        if part.get("detail") is not None:
            image["detail"] = part["detail"]
        parts.append(image)
    return {**item, "content": parts}


async def listed_input_items(
    items: Sequence[dict[str, Any]], blobs: BlobStore, max_image_bytes: int
) -> list[dict[str, Any]]:
    """Stored input items as `GET /v1/responses/{id}/input_items` lists them."""
    listed = []
    for item in items:
        content = item.get("content")
        if item.get("type") == "message":
            item = {**item, "status": "completed"}
        if isinstance(content, list):
            parts = []
            for part in content:
                if part.get("type") == "input_image":
                    url = part.get("image_url")
                    if url is None:
                        url = await _listed_image(blobs, part["image_digest"], max_image_bytes)
                    part = {
                        "type": "input_image",
                        "detail": part.get("detail") or "auto",
                        "file_id": None,
                        "image_url": url,
                    }
                parts.append(part)
            item = {**item, "content": parts}
        listed.append(item)
    return listed


async def _listed_image(blobs: BlobStore, digest: str, max_bytes: int) -> str | None:
    """A data: URL of the image; None if it is gone or over the limit (listing shows what
    is there rather than failing the page)."""
    try:
        image = await blobs.read_bytes(digest, max_bytes)
    except BlobTooLarge:
        return None
    return None if image is None else _data_url(image)
