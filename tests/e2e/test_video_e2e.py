"""Video through the whole stack (proxy, tritonserver, the tiny checkpoint): containers and
frame lists, tokens in the usage, stream == non-stream, hostile videos refused."""

import base64
import time

import pytest
import requests
from helpers import sse_payloads
from sample_videos import audio_only, clip, frame_list, hostile_clips

SERVED = "qwen2.5-vl-7b-instruct"
TEXT = {"type": "text", "text": "What happens in the video?"}


def container_url(data: bytes, media_type: str) -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def post(base_url: str, parts: list, **fields) -> requests.Response:
    body = {
        "model": SERVED,
        "messages": [{"role": "user", "content": [*parts, TEXT]}],
        "max_tokens": 8,
        "temperature": 0,
        **fields,
    }
    return requests.post(f"{base_url}/v1/chat/completions", json=body, timeout=180)


def video(url: str, **fields) -> dict:
    return {"type": "video_url", "video_url": {"url": url, **fields}}


MP4 = container_url(clip("mp4", "mpeg4", seconds=2.0, size=(64, 48)), "video/mp4")
WEBM = container_url(clip("webm", "libvpx", seconds=2.0, size=(64, 48)), "video/webm")
FRAMES = frame_list(4)


@pytest.mark.parametrize("url", [MP4, WEBM, FRAMES], ids=["mp4", "webm", "frames"])
def test_a_video_adds_its_tokens_and_streams_as_it_completes(base_url, url):
    text_only = post(base_url, []).json()["usage"]
    response = post(base_url, [video(url)])
    assert response.status_code == 200, response.text
    completion = response.json()
    details = completion["usage"]["prompt_tokens_details"]
    assert details["video_tokens"] > 0
    assert (
        completion["usage"]["prompt_tokens"] >= text_only["prompt_tokens"] + details["video_tokens"]
    )
    streamed = post(base_url, [video(url)], stream=True)
    events = [e for e in sse_payloads(streamed.text) if e != "[DONE]" and e["choices"]]
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
    assert text == completion["choices"][0]["message"]["content"]


def test_fps_changes_the_frames_sampled(base_url):
    long_clip = container_url(clip("mp4", "mpeg4", seconds=6.0, size=(64, 48)), "video/mp4")
    slow = post(base_url, [video(long_clip, fps=1.0)]).json()["usage"]
    fast = post(base_url, [video(long_clip, fps=4.0)]).json()["usage"]
    fast_tokens = fast["prompt_tokens_details"]["video_tokens"]
    assert fast_tokens > slow["prompt_tokens_details"]["video_tokens"]


@pytest.mark.parametrize(
    ("url", "code"),
    [
        (container_url(clip()[: len(clip()) // 3], "video/mp4"), "invalid_video"),  # truncated
        (container_url(b"\x00\x00\x00\x18ftypisom" + b"\xde\xad" * 200, "video/mp4"), "invalid_video"),
        (container_url(audio_only(), "video/mp4"), "invalid_video"),
        (container_url(clip(), "video/ogg"), "invalid_video"),  # a type the model does not take
        ("data:video/jpeg;base64,@@@,AAAA", "invalid_video"),
        ("http://169.254.169.254/clip.mp4", "video_url_forbidden"),  # cloud metadata: SSRF
    ],
    ids=["truncated", "corrupt", "audio-only", "wrong-mime", "bad-frames", "ssrf"],
)  # fmt: skip
def test_hostile_videos_are_400_and_the_server_stays_healthy(base_url, url, code):
    response = post(base_url, [video(url)])
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == code
    assert requests.get(f"{base_url}/ready", timeout=5).status_code == 200


def test_ttft_of_a_ten_second_480p_clip(base_url, capsys):
    """Not a timed assertion: the number goes to the report (pytest -s shows it)."""
    ten_seconds = container_url(clip("mp4", "mpeg4", seconds=10.0, size=(854, 480)), "video/mp4")
    started = time.perf_counter()
    response = requests.post(
        f"{base_url}/v1/chat/completions",
        json={
            "model": SERVED,
            "messages": [{"role": "user", "content": [video(ten_seconds), TEXT]}],
            "max_tokens": 4,
            "temperature": 0,
            "stream": True,
        },
        timeout=300,
        stream=True,
    )
    first = None
    for line in response.iter_lines():
        if line.startswith(b"data: {") and b'"content":"' in line and b'"content":""' not in line:
            first = time.perf_counter()
            break
    assert response.status_code == 200 and first is not None
    with capsys.disabled():
        print(
            f"\nTTFT, 10-s 854x480 MP4 (mpeg4, 30 fps), tiny checkpoint: {1000 * (first - started):.0f} ms"
        )


@pytest.mark.parametrize("name", ["jpeg2000-mkv", "jpeg2000-mp4"])
def test_a_jpeg2000_video_is_refused_by_the_sandbox_and_the_next_request_is_served(base_url, name):
    """CVE-2026-22778's shape: a JPEG 2000 stream in an allowlisted container. The model's
    decode sandbox refuses its codec before a packet is decoded, with a fixed message."""
    media_type = "video/x-matroska" if name.endswith("mkv") else "video/mp4"
    response = post(base_url, [video(container_url(hostile_clips()[name], media_type))])
    assert response.status_code == 400, response.text
    assert "0x" not in response.text and "jpeg2000" not in response.text.lower()
    error = response.json()["error"]
    assert error["message"] == "video stream is not H.264, HEVC, VP8, VP9, AV1 or MPEG-4 part 2"
    assert error["param"] == "messages[0].content[0].video_url"
    assert post(base_url, [video(MP4)]).status_code == 200
