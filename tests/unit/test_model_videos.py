"""Video input in the model: decoding with PyAV (clips made here), Qwen's sampling and budget,
hostile inputs, and videos through the batching engine with the tiny checkpoint."""

import base64
import dataclasses
import json
import time

import pytest
import torch
from sample_images import encoded_image
from sample_videos import audio_only, clip, frame_list

from qwen_vl_backend.contract import ModelLimits
from qwen_vl_backend.engine.batching import BatchingEngine
from qwen_vl_backend.errors import RequestError
from qwen_vl_backend.media.videos import VideoOptions, decode_container, load_video, sample_indices
from qwen_vl_backend.modeling.checkpoint import load_checkpoint
from qwen_vl_backend.request.chat import parse_messages
from qwen_vl_backend.request.prepare import RawRequest, prepare
from qwen_vl_backend.settings import ModelSettings

LIMITS = ModelLimits()
OPTIONS = VideoOptions(
    fps=2.0, max_frames=64, min_pixels=3136, max_pixels=1003520, total_pixels=4096 * 784
)


# ---- decoding and sampling ---------------------------------------------------------------


def test_an_mp4_is_sampled_at_two_fps_on_the_28_pixel_grid():
    video = decode_container(clip(), "v", LIMITS, OPTIONS)
    frames, _, height, width = video.frames.shape
    assert frames == 4 and video.fps == pytest.approx(2.0)  # 2 s x 2 fps
    assert video.frames.dtype == torch.uint8 and height % 28 == 0 and width % 28 == 0
    assert video.decoded_frames < 60  # stopped after the last sampled frame


def test_a_webm_decodes():
    video = decode_container(clip("webm", "libvpx", fps=10), "v", LIMITS, OPTIONS)
    assert video.frames.shape[0] == 4


def test_a_long_clip_is_sampled_to_max_frames_without_decoding_every_frame():
    data = clip(seconds=60, fps=30, size=(32, 32))
    started = time.monotonic()
    video = decode_container(data, "v", LIMITS, OPTIONS)
    assert video.frames.shape[0] == 64
    assert video.decoded_frames < 1800
    assert video.fps == pytest.approx(64 / 1800 * 30)
    assert time.monotonic() - started < 10


def test_sampling_follows_smart_nframes():
    assert len(sample_indices(60, 30.0, 2.0, 64)) == 4  # 2 s at 2 fps
    assert len(sample_indices(30, 30.0, 2.0, 64)) == 4  # at least 4
    assert len(sample_indices(3000, 30.0, 2.0, 64)) == 64  # at most max_frames
    assert len(sample_indices(300, 30.0, 1.0, 64)) == 10
    assert sample_indices(300, 30.0, 1.0, 64)[0] == 0 and sample_indices(300, 30, 1, 64)[-1] == 299


def test_the_per_video_budget_bounds_the_frame_size():
    big = clip(size=(640, 480), seconds=2, fps=10)
    small_budget = dataclasses.replace(OPTIONS, total_pixels=256 * 784)
    video = decode_container(big, "v", LIMITS, small_budget)
    _, _, height, width = video.frames.shape
    assert height * width <= 256 * 784 / 4 * 2


def test_a_frame_list_is_padded_to_an_even_count():
    video = load_video(frame_list(5).encode(), "v", LIMITS, OPTIONS)
    assert video.frames.shape[0] == 6 and video.fps == 2.0
    assert torch.equal(video.frames[5], video.frames[4])


def test_png_and_webp_frame_lists():
    assert load_video(frame_list(4, "PNG", "png"), "v", LIMITS, OPTIONS).frames.shape[0] == 4
    assert load_video(frame_list(4, "WEBP", "webp"), "v", LIMITS, OPTIONS).frames.shape[0] == 4


# ---- hostile inputs ----------------------------------------------------------------------

MP4 = clip()


@pytest.mark.parametrize(
    ("element", "limits", "code"),
    [
        (MP4[: len(MP4) // 3], LIMITS, "invalid_video"),
        (b"\x00\x00\x00\x18ftypmp42" + b"\x13" * 500, LIMITS, "invalid_video"),
        (b"not a video at all", LIMITS, "invalid_video"),
        (audio_only(), LIMITS, "invalid_video"),
        (clip(seconds=0), LIMITS, "invalid_video"),
        (MP4, dataclasses.replace(LIMITS, max_video_seconds=1), "video_too_large"),
        (MP4, dataclasses.replace(LIMITS, max_video_source_pixels=1000), "video_too_large"),
        (b"data:video/jpeg;base64,%%%,abc", LIMITS, "invalid_video"),
        (b"data:video/jpeg;base64," + base64.b64encode(b"garbage"), LIMITS, "invalid_video"),
        (b"data:image/jpeg;base64,AAAA", LIMITS, "invalid_video"),
        (frame_list(65).encode(), LIMITS, "video_too_large"),
    ],
    ids=[
        "truncated",
        "corrupt",
        "not-a-container",
        "audio-only",
        "zero-frames",
        "too-long",
        "too-large",
        "bad-base64-frame",
        "frame-not-an-image",
        "wrong-data-url-type",
        "too-many-frames",
    ],
)
def test_hostile_videos_are_request_errors_fast(element, limits, code):
    started = time.monotonic()
    with pytest.raises(RequestError) as raised:
        load_video(element, "messages[0].content[0].video_url", limits, OPTIONS)
    assert raised.value.code == code
    assert raised.value.param == "messages[0].content[0].video_url"
    assert time.monotonic() - started < 2


def test_part_keys_outside_the_servers_bounds_name_the_key():
    for key, value in [("fps", 0), ("max_frames", 65), ("total_pixels", 10**9), ("fps", "x")]:
        messages = json.dumps([{"role": "user", "content": [{"type": "video", key: value}]}])
        with pytest.raises(RequestError) as raised:
            parse_messages(messages, [], video_elements=[MP4])
        assert raised.value.param == f"messages[0].content[0].video_url.{key}"


def test_more_videos_than_allowed_or_referred_to_are_refused():
    part = {"type": "video"}
    messages = json.dumps([{"role": "user", "content": [part, part, part]}])
    with pytest.raises(RequestError, match="at most 2 videos"):
        parse_messages(messages, [], video_elements=[MP4] * 3)
    messages = json.dumps([{"role": "user", "content": [part]}])
    with pytest.raises(RequestError, match="holds 2 videos"):
        parse_messages(messages, [], video_elements=[MP4] * 2)


def test_an_inline_video_url_part_is_accepted():
    url = "data:video/mp4;base64," + base64.b64encode(MP4).decode()
    part = {"type": "video_url", "video_url": {"url": url}, "fps": 1.0}
    messages = json.dumps([{"role": "user", "content": [part]}])
    converted = parse_messages(messages, [])
    assert converted[0]["content"][0]["video"].frames.shape[0] == 4  # 2 s at 1 fps, at least 4


# ---- through the engine ------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint_path):
    return load_checkpoint(tiny_checkpoint_path, "cpu", "float32")


SETTINGS = ModelSettings()
VIDEO_PROMPT = [{"type": "video"}, {"type": "text", "text": "What happens?"}]


def raw_request(content, images=(), videos=(), max_tokens=24):
    return RawRequest(
        request_id="v",
        messages=json.dumps([{"role": "user", "content": content}]),
        images=list(images),
        videos=list(videos),
        exclude_input_in_output=True,
        sampling_parameters=json.dumps({"max_tokens": max_tokens, "temperature": 0}),
    )


class Sink:
    def __init__(self):
        import threading

        self.final, self.error, self.done = None, None, threading.Event()

    def is_cancelled(self):
        return False

    def send(self, chunk):
        if chunk.final:
            self.final = chunk
            self.done.set()

    def fail(self, error):
        self.error = error
        self.done.set()

    def cancelled(self):
        self.done.set()

    def wait(self):
        assert self.done.wait(120) and self.error is None, self.error
        return self.final


def test_prepare_counts_video_tokens_and_positions_carry_time(checkpoint):
    prepared = prepare(raw_request(VIDEO_PROMPT, videos=[MP4]), checkpoint, SETTINGS)
    inputs = prepared.inputs
    assert inputs["pixel_values_videos"].shape[0] > 0
    grid = inputs["video_grid_thw"][0].tolist()
    assert prepared.video_tokens == grid[0] * grid[1] * grid[2] // 4 > 0
    assert prepared.image_tokens == 0 and prepared.prompt_tokens > prepared.video_tokens
    assert inputs["second_per_grid_ts"].tolist() == [pytest.approx(1.0)]  # 2 frames at 2 fps
    slow = [{"type": "video", "fps": 1.0}, {"type": "text", "text": "What happens?"}]
    other = prepare(raw_request(slow, videos=[clip(seconds=4)]), checkpoint, SETTINGS)
    assert other.inputs["second_per_grid_ts"].tolist() == [pytest.approx(2.0)]
    # same grid, different time per grid: the temporal positions differ
    assert other.inputs["video_grid_thw"].tolist() == inputs["video_grid_thw"].tolist()
    assert not torch.equal(other.positions, prepared.positions)


def test_a_video_request_generates_alone_and_batched_with_images_and_text(checkpoint):
    image = encoded_image(size=(112, 84))
    prompts = [
        (VIDEO_PROMPT, [], [MP4]),
        ("Describe a cat.", [], []),
        ([{"type": "image"}, {"type": "text", "text": "What is it?"}], [image], []),
        (
            [{"type": "image"}, {"type": "video", "fps": 1.0}, {"type": "text", "text": "Both?"}],
            [encoded_image(size=(56, 56), color=(0, 90, 0))],
            [frame_list(4)],
        ),
    ]
    alone_engine = BatchingEngine(checkpoint, dataclasses.replace(SETTINGS, max_batch_size=1))
    try:
        alone = []
        for content, images, videos in prompts:
            sink = Sink()
            alone_engine.submit(raw_request(content, images, videos, 16), sink)
            alone.append(sink.wait())
    finally:
        assert alone_engine.shutdown(30)
    assert alone[0].video_tokens > 0 and alone[0].prompt_tokens > alone[0].video_tokens
    assert alone[3].video_tokens > 0 and alone[3].image_tokens > 0
    engine = BatchingEngine(checkpoint, SETTINGS)
    try:
        sinks = [Sink() for _ in prompts]
        for (content, images, videos), sink in zip(prompts, sinks):
            engine.submit(raw_request(content, images, videos, 16), sink)
        batched = [sink.wait() for sink in sinks]
        assert engine.stats.largest_batch >= 3
    finally:
        assert engine.shutdown(30)
    for one, other in zip(alone, batched):
        assert (one.text, one.num_tokens) == (other.text, other.num_tokens)
    # And the video requests equal HF generate (the model's own video path).
    for (content, images, videos), one in zip(prompts, alone):
        if videos:
            request = prepare(raw_request(content, images, videos, 16), checkpoint, SETTINGS)
            with torch.inference_mode():
                out = checkpoint.model.generate(
                    **request.inputs, max_new_tokens=request.max_new_tokens, do_sample=False
                )
            assert one.text == checkpoint.decode(out[0, request.prompt_tokens :])


def test_decoding_stops_at_the_timeout():
    expired = dataclasses.replace(OPTIONS, timeout_s=0.0)
    with pytest.raises(RequestError) as raised:
        decode_container(clip(seconds=10), "v", LIMITS, expired)
    assert raised.value.code == "video_too_large" and "longer than" in raised.value.message
