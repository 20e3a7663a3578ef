"""video_url parts through the proxy: containers and frame lists inline, budgets within the
model's limits, counted and sized before the model sees them, video tokens in the usage."""

from __future__ import annotations

import base64
import json

import pytest
from proxy_fakes import JPEG_BYTES, PNG_BYTES, FakeBackend, script

from proxy.transport.backend import GenerationChunk
from proxy.transport.contract import ModelLimits

# The first bytes of an MP4 (ISO base media `ftyp` box): the proxy reads signatures only;
# the container is the model's to parse.
MP4 = b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2" + b"\x00" * 64
WEBM = b"\x1a\x45\xdf\xa3" + b"\x00" * 64
FRAMES = "data:video/jpeg;base64," + ",".join(
    base64.b64encode(frame).decode() for frame in (JPEG_BYTES, JPEG_BYTES, PNG_BYTES)
)


def video_part(url: str, **fields) -> dict:
    return {"type": "video_url", "video_url": {"url": url, **fields}}


def data(payload: bytes, media_type: str) -> str:
    return f"data:{media_type};base64,{base64.b64encode(payload).decode()}"


def body(*parts, **fields) -> dict:
    content = [*parts, {"type": "text", "text": "what happens?"}]
    return {"messages": [{"role": "user", "content": content}], **fields}


async def post(client, request: dict) -> tuple[int, dict]:
    resp = await client.post("/v1/chat/completions", json=request)
    return resp.status, await resp.json()


async def test_containers_and_frame_lists_reach_the_model_as_the_video_input(make_client):
    backend = FakeBackend()
    client = await make_client(backend)
    status, _ = await post(client, body(video_part(data(MP4, "video/mp4")), video_part(FRAMES)))
    assert status == 200
    sent = backend.last_request
    assert sent.media["video"] == [MP4, FRAMES.encode()]
    parts = json.loads(sent.messages_json)[0]["content"]
    total = ModelLimits().video_total_pixels
    assert parts[:2] == [{"type": "video", "total_pixels": total}] * 2
    status, _ = await post(client, body(video_part(data(WEBM, "video/webm"))))
    assert status == 200 and backend.last_request.media["video"] == [WEBM]


async def test_images_and_videos_travel_in_their_own_inputs_in_order(make_client):
    backend = FakeBackend()
    client = await make_client(backend)
    image = {"type": "image_url", "image_url": {"url": data(PNG_BYTES, "image/png")}}
    status, _ = await post(client, body(image, video_part(data(MP4, "video/mp4")), image))
    assert status == 200
    assert backend.last_request.media == {"image": [PNG_BYTES, PNG_BYTES], "video": [MP4]}


async def test_sampling_fields_within_the_models_limits_go_to_the_model(make_client):
    backend = FakeBackend()
    backend.limits = ModelLimits(max_video_frames=32, video_total_pixels=2_000_000)
    client = await make_client(backend)
    part = video_part(data(MP4, "video/mp4"), fps=1.0, max_frames=16, total_pixels=1_000_000)
    status, _ = await post(client, body(part))
    assert status == 200
    sent = json.loads(backend.last_request.messages_json)[0]["content"][0]
    assert sent == {"type": "video", "fps": 1.0, "max_frames": 16, "total_pixels": 1_000_000}


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"max_frames": 65}, "messages[0].content[0].video_url.max_frames"),
        ({"fps": 61.0}, "messages[0].content[0].video_url.fps"),
        ({"total_pixels": 10**12}, "messages[0].content[0].video_url.total_pixels"),
        ({"max_pixels": 10**9}, "messages[0].content[0].video_url.max_pixels"),
        ({"fps": 0}, "messages[0].content[0].video_url.fps"),
    ],
)
async def test_budgets_outside_the_servers_range_are_400(make_client, fields, param):
    backend = FakeBackend()
    client = await make_client(backend)
    status, error = await post(client, body(video_part(data(MP4, "video/mp4"), **fields)))
    assert (status, error["error"]["param"]) == (400, param)
    assert backend.requests == []


@pytest.mark.parametrize(
    ("url", "code"),
    [
        (data(MP4, "video/ogg"), "invalid_video"),  # a type the model does not take
        (data(b"not a container at all", "video/mp4"), "invalid_video"),
        ("data:video/mp4;base64,@@@", "invalid_video"),
        ("data:video/jpeg;base64,bm90IGFuIGltYWdl", "invalid_video"),  # a frame that is no image
        ("data:video/jpeg;base64,", "invalid_video"),
        ("file:///etc/passwd", "video_url_forbidden"),
        ("nonsense", "invalid_video_url"),
    ],
)
async def test_what_is_not_a_video_is_400_naming_the_part(make_client, url, code):
    backend = FakeBackend()
    client = await make_client(backend)
    status, error = await post(client, body(video_part(url)))
    assert (status, error["error"]["code"]) == (400, code)
    assert error["error"]["param"] == "messages[0].content[0].video_url"
    assert backend.requests == []


async def test_video_count_and_bytes_are_limited_before_anything_is_sent(make_client):
    backend = FakeBackend()
    backend.limits = ModelLimits(max_videos=1)
    two = body(video_part(data(MP4, "video/mp4")), video_part(data(MP4, "video/mp4")))
    status, error = await post(await make_client(backend), two)
    assert (status, error["error"]["code"]) == (400, "too_many_videos")
    small = await make_client(backend, max_video_bytes=50)
    status, error = await post(small, body(video_part(data(MP4, "video/mp4"))))
    assert (status, error["error"]["code"]) == (400, "video_too_large")
    assert backend.requests == []


async def test_remote_videos_need_fetching_enabled(make_client):
    client = await make_client(FakeBackend(), image_fetch=False)
    status, error = await post(client, body(video_part("https://example.com/clip.mp4")))
    assert (status, error["error"]["code"]) == (400, "video_url_forbidden")


async def test_video_tokens_are_reported_beside_image_tokens(make_client):
    chunks = [
        GenerationChunk(
            "ok", "stop", prompt_tokens=900, completion_tokens=1, image_tokens=64, video_tokens=800
        )
    ]
    client = await make_client(FakeBackend(chunks))
    status, completion = await post(client, body(video_part(data(MP4, "video/mp4"))))
    assert status == 200
    details = completion["usage"]["prompt_tokens_details"]
    assert (details["image_tokens"], details["video_tokens"]) == (64, 800)


async def test_an_image_only_usage_keeps_its_shape(make_client):
    client = await make_client(FakeBackend(script("hi", image_tokens=4)))
    status, completion = await post(client, body())
    assert "video_tokens" not in completion["usage"]["prompt_tokens_details"]
