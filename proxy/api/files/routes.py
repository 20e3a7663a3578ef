"""The Files API: `POST /v1/files` (multipart upload), `GET /v1/files` (list),
`GET /v1/files/{file_id}`, `GET /v1/files/{file_id}/content`, `DELETE /v1/files/{file_id}`,
in OpenAI's shapes, scoped to the caller's tenant (proxy/state/tenancy.py).

An upload streams from the multipart reader to the blob store one chunk at a time (the route
is `Admit.UPLOAD`: each read within --request-body-timeout-s, the size bounded here by
--file-max-bytes, never by --max-request-bytes); no part of it is kept when it fails. A batch
input file is not checked line by line here: the batch validator turns each bad line into an
error-file entry (a file is never refused for one line).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from aiohttp import BodyPartReader, web

from ...error_catalogue import (
    FILE_TOO_LARGE,
    INVALID_VALUE,
    MISSING_REQUIRED_PARAMETER,
    NO_SUCH_OBJECT,
)
from ...keys import CONFIG_KEY
from ...serving.admission import read_within_body_timeout
from ...state.blobs import CHUNK_BYTES, BlobRef, BlobTooLarge
from ...state.context import require_state
from ...state.files import LIST_LIMIT_MAX, UPLOAD_PURPOSES, FileStore, StoredFile, UnknownCursor
from ...state.tenancy import request_tenant

WHAT = "files"  # for the --no-state answer
FILE, PURPOSE = "file", "purpose"
EXPIRES_ANCHOR, EXPIRES_SECONDS = "expires_after[anchor]", "expires_after[seconds]"
TEXT_FIELDS = (PURPOSE, EXPIRES_ANCHOR, EXPIRES_SECONDS)
# OpenAI's bounds on `expires_after[seconds]`: an hour to 30 days.
EXPIRES_AFTER_S = (3600, 30 * 24 * 3600)
# The largest text field read (purpose, expires_after[...]): they are words and numbers.
TEXT_FIELD_MAX_BYTES = 1024
FILENAME_MAX_CHARS = 1000
# What a multipart body may hold besides the file (boundaries, part headers, the text
# fields): a declared Content-Length beyond the limit plus this is refused unread.
MULTIPART_OVERHEAD_BYTES = 64 * 1024


def _files(request: web.Request) -> FileStore:
    database, blobs = require_state(request, WHAT)
    return FileStore(database, blobs, request.app[CONFIG_KEY].state)


def _not_found(file_id: str) -> Exception:
    return NO_SUCH_OBJECT("file_id", kind="File", id=file_id)


async def _stored_file(request: web.Request, files: FileStore) -> StoredFile:
    file_id = request.match_info["file_id"]
    stored = await files.get(request_tenant(request), file_id)
    if stored is None:
        raise _not_found(file_id)
    return stored


# ---- POST /v1/files --------------------------------------------------------------------


async def create_file(request: web.Request) -> web.Response:
    files = _files(request)
    limit = files.settings.file_max_bytes
    if request.content_type != "multipart/form-data":
        raise INVALID_VALUE(
            None,
            message="POST /v1/files takes a multipart/form-data body with the fields 'file' and "
            "'purpose'.",
        )
    length = request.content_length
    if length is not None and length > limit + MULTIPART_OVERHEAD_BYTES:
        raise FILE_TOO_LARGE(FILE, limit=limit)
    reader = await request.multipart()
    fields: dict[str, str] = {}
    upload: tuple[str, BlobRef] | None = None
    while (part := await read_within_body_timeout(request, reader.next())) is not None:
        if not isinstance(part, BodyPartReader):
            raise INVALID_VALUE(None, message="Nested multipart bodies are not accepted.")
        if part.name == FILE:
            if upload is not None:
                raise INVALID_VALUE(FILE, message="Send one 'file' per request.")
            if PURPOSE in fields:
                _purpose(fields)  # refused before the file is read
            upload = (_filename(part), await _store(request, files, part, limit))
        elif part.name in TEXT_FIELDS:
            fields[part.name] = await _text(request, part)
        else:  # fields OpenAI may add later: read past, never kept
            async for _ in _chunks(request, part):
                pass
    purpose = _purpose(fields)
    ttl_s = _expires_after(fields)
    if upload is None:
        raise MISSING_REQUIRED_PARAMETER(FILE, path=FILE)
    filename, ref = upload
    stored = await files.add(request_tenant(request), purpose, filename, ref, ttl_s=ttl_s)
    return web.json_response(stored.to_openai())


async def _chunks(request: web.Request, part: BodyPartReader) -> AsyncIterator[bytes]:
    while chunk := await read_within_body_timeout(request, part.read_chunk(CHUNK_BYTES)):
        yield chunk


async def _store(
    request: web.Request, files: FileStore, part: BodyPartReader, limit: int
) -> BlobRef:
    try:
        return await files.blobs.put_stream(_chunks(request, part), max_bytes=limit)
    except BlobTooLarge:
        raise FILE_TOO_LARGE(FILE, limit=limit) from None


async def _text(request: web.Request, part: BodyPartReader) -> str:
    data = bytearray()
    async for chunk in _chunks(request, part):
        data += chunk
        if len(data) > TEXT_FIELD_MAX_BYTES:
            raise INVALID_VALUE(
                part.name,
                message=f"'{part.name}' is longer than {TEXT_FIELD_MAX_BYTES} bytes.",
            )
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise INVALID_VALUE(part.name, message=f"'{part.name}' must be UTF-8 text.") from None


def _filename(part: BodyPartReader) -> str:
    filename = part.filename or FILE  # OpenAI's SDK always names it; curl -F may not
    if len(filename) > FILENAME_MAX_CHARS:
        raise INVALID_VALUE(
            FILE, message=f"The file's name is longer than {FILENAME_MAX_CHARS} characters."
        )
    return filename


def _purpose(fields: dict[str, str]) -> str:
    purpose = fields.get(PURPOSE)
    if not purpose:
        raise MISSING_REQUIRED_PARAMETER(PURPOSE, path=PURPOSE)
    if purpose not in UPLOAD_PURPOSES:
        accepted = ", ".join(f"'{name}'" for name in UPLOAD_PURPOSES)
        raise INVALID_VALUE(
            PURPOSE,
            message=f"Invalid value for 'purpose': {purpose!r}; this server accepts {accepted}.",
        )
    return purpose


def _expires_after(fields: dict[str, str]) -> float | None:
    """The client's `expires_after` in seconds (anchored at creation), or None."""
    anchor, seconds = fields.get(EXPIRES_ANCHOR), fields.get(EXPIRES_SECONDS)
    if anchor is None and seconds is None:
        return None
    if anchor != "created_at":
        raise INVALID_VALUE(
            EXPIRES_ANCHOR, message="Invalid value for 'expires_after[anchor]': use 'created_at'."
        )
    low, high = EXPIRES_AFTER_S
    try:
        value = int(seconds or "")
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise INVALID_VALUE(
            EXPIRES_SECONDS,
            message=f"Invalid value for 'expires_after[seconds]': an integer from {low} to {high}.",
        )
    return float(value)


# ---- GET /v1/files ---------------------------------------------------------------------


async def list_files(request: web.Request) -> web.Response:
    files = _files(request)
    query = request.query
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise INVALID_VALUE("order", message="Invalid value for 'order': use 'asc' or 'desc'.")
    limit = _limit(query.get("limit"))
    after = query.get("after") or None
    try:
        page = await files.list(
            request_tenant(request),
            purpose=query.get("purpose") or None,
            limit=limit,
            after=after,
            order=order,
        )
    except UnknownCursor:
        raise INVALID_VALUE(
            "after", message=f"Invalid value for 'after': no file {after} to list after."
        ) from None
    return web.json_response(page.to_openai())


def _limit(text: str | None) -> int:
    if text is None:
        return LIST_LIMIT_MAX
    try:
        limit = int(text)
    except ValueError:
        limit = 0
    if not 1 <= limit <= LIST_LIMIT_MAX:
        raise INVALID_VALUE(
            "limit", message=f"Invalid value for 'limit': an integer from 1 to {LIST_LIMIT_MAX}."
        )
    return limit


# ---- GET /v1/files/{file_id}, its content, DELETE --------------------------------------


async def retrieve_file(request: web.Request) -> web.Response:
    files = _files(request)
    return web.json_response((await _stored_file(request, files)).to_openai())


async def file_content(request: web.Request) -> web.StreamResponse:
    """The bytes as stored, streamed one chunk at a time."""
    files = _files(request)
    stored = await _stored_file(request, files)
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = stored.bytes
    await response.prepare(request)
    if request.method != "HEAD":
        async for chunk in files.content(stored):
            await response.write(chunk)
    await response.write_eof()
    return response


async def delete_file(request: web.Request) -> web.Response:
    files = _files(request)
    file_id = request.match_info["file_id"]
    if not await files.delete(request_tenant(request), file_id):
        raise _not_found(file_id)
    body: dict[str, Any] = {"id": file_id, "object": "file", "deleted": True}
    return web.json_response(body)
