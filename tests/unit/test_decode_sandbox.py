"""The decode sandbox (qwen_vl_backend/media/sandbox.py, copied as proxy/media/sandbox.py):
hostile and malformed media get a fixed refusal, a worker that crashes, hangs or breaks a limit
is replaced and the next item decodes, and a worker can neither open a socket, start a process
nor write a file. One pool with the test hooks serves the module (a worker start is the cost)."""

import dataclasses
import platform
import re
from pathlib import Path

import numpy as np
import pytest
from hostile_samples import (
    BOMB_PNG,
    CORRUPT_JPEG,
    GOOD_JPEG,
    GOOD_PNG,
    OVER_40MP_PNG,
    TRUNCATED_HEADER_PNG,
    TRUNCATED_JPEG,
    png_header_only,
)
from sample_images import encoded_image
from sample_videos import clip, hostile_clips

from qwen_vl_backend.contract import ModelLimits
from qwen_vl_backend.errors import RequestError
from qwen_vl_backend.media import decoding, sandbox
from qwen_vl_backend.media.images import decode_image
from qwen_vl_backend.media.videos import VideoOptions, decode_container

ROOT = Path(__file__).resolve().parents[2]
LIMITS = ModelLimits()
OPTIONS = VideoOptions(fps=2.0, max_frames=64, min_pixels=3136, max_pixels=1003520,
                       total_pixels=4096 * 784, timeout_s=30.0)  # fmt: skip
IMAGE_ARGS = {"max_source_pixels": LIMITS.max_source_pixels, "max_aspect_ratio": 200.0}
# What an error body must never carry: an address, a path, a decoder's or Python's words.
LEAK = re.compile(
    r"\b0x[0-9a-fA-F]{4,}|/\w+/|Traceback|PIL|libav|ffmpeg|avcodec|Errno|\.py\b", re.I
)
CRASH = b"\x89PNG\r\n\x1a\n" + sandbox.CRASH_MARKER
HANG = b"\x89PNG\r\n\x1a\n" + sandbox.HANG_MARKER


@pytest.fixture(scope="module")
def pool():
    """One worker with the test hooks, installed as the model's pool for the module."""
    hooked = sandbox.DecodePool(sandbox.SandboxConfig(workers=1, test_hooks=True))
    previous, decoding.pool = decoding.pool, lambda: hooked
    hooked.wait_ready()
    yield hooked
    decoding.pool = previous
    hooked.close()


def refused(call) -> RequestError:
    with pytest.raises(RequestError) as caught:
        call()
    assert not LEAK.search(caught.value.message), caught.value.message
    return caught.value


def test_the_proxy_and_the_model_carry_the_same_sandbox():
    model_copy = ROOT / "model_repository/qwen2_5_vl/1/qwen_vl_backend/media/sandbox.py"
    assert (ROOT / "proxy/media/sandbox.py").read_bytes() == model_copy.read_bytes()


def test_a_worker_is_locked_down(pool):
    enforced = pool.enforced
    for limit in ("address_space", "cpu", "open_files", "processes", "file_size", "core"):
        assert enforced[limit], limit
    assert enforced["no_new_privs"] and enforced["not_dumpable"] and enforced["not_root"]
    if platform.machine() in ("x86_64", "aarch64"):
        assert enforced["seccomp"]
    _, (socket, child, write, uid) = pool.run("confinement", b"", {}, 10)
    assert (socket, child, write) == (enforced["seccomp"], True, True)
    assert uid != 0


@pytest.mark.parametrize(
    "data, code",
    [
        (TRUNCATED_HEADER_PNG, "invalid_image"),
        (TRUNCATED_JPEG, "invalid_image"),
        (CORRUPT_JPEG, "invalid_image"),
        (BOMB_PNG, "image_too_large"),  # 10 gigapixels claimed in a few bytes
        (png_header_only(10_000, 10_000), "image_too_large"),  # Pillow only warns: an error
        (OVER_40MP_PNG, "image_too_large"),
        (GOOD_PNG[:60], "invalid_image"),  # cut inside its pixels
    ],
    ids=["cut-header", "cut-jpeg", "corrupt-jpeg", "bomb", "warned-bomb", "over-40mp", "cut-data"],
)
def test_a_hostile_image_is_refused_with_a_fixed_message(pool, data, code):
    assert refused(lambda: decode_image(data, "image[0]")).code == code


@pytest.mark.parametrize("name", sorted(hostile_clips()))
def test_a_container_or_codec_off_the_allowlist_is_refused_before_decoding(pool, name):
    data = hostile_clips()[name]
    error = refused(lambda: decode_container(data, "video[0]", LIMITS, OPTIONS))
    assert error.code == "invalid_video"
    assert error.message in (sandbox.MESSAGES["codec"], sandbox.MESSAGES["not_container"])


def test_a_jpeg2000_stream_never_reaches_a_decoder(pool):
    """The codec check comes before the first packet: the refusal is the allowlist's."""
    error = refused(
        lambda: decode_container(hostile_clips()["jpeg2000-mkv"], "video[0]", LIMITS, OPTIONS)
    )
    assert error.message == sandbox.MESSAGES["codec"]


def test_a_video_over_the_frame_size_is_refused_from_its_header(pool):
    data = clip("mp4", "mpeg4", seconds=0.1, fps=10, size=(4096, 2176))  # over 4K UHD
    error = refused(lambda: decode_container(data, "video[0]", LIMITS, OPTIONS))
    assert (error.code, error.message) == (
        "video_too_large",
        "video is 4096x2176 pixels; at most 8294400 pixels per frame are accepted",
    )


def test_a_truncated_video_is_refused(pool):
    data = clip("mp4", "mpeg4", seconds=1.0)
    error = refused(lambda: decode_container(data[: len(data) // 3], "video[0]", LIMITS, OPTIONS))
    assert error.code in ("invalid_video", "video_too_large")


@pytest.mark.parametrize("hostile", [CRASH, HANG], ids=["crash", "hang"])
def test_a_worker_that_dies_or_hangs_is_replaced_and_the_next_image_decodes(pool, hostile):
    replaced = pool.replaced
    with pytest.raises(sandbox.DecodeFailed):
        pool.run("image", hostile, IMAGE_ARGS, timeout_s=0.5)
    assert pool.replaced == replaced + 1
    pixels, _ = pool.run("image", GOOD_JPEG, IMAGE_ARGS, timeout_s=30)
    assert pixels.shape == (24, 32, 3)


def test_a_crash_reaches_the_model_as_a_fixed_invalid_image(pool):
    error = refused(lambda: decode_image(CRASH, "messages[0].content[0].image_url"))
    assert (error.code, error.message) == ("invalid_image", "image could not be decoded")
    assert error.param == "messages[0].content[0].image_url"
    assert decode_image(GOOD_PNG, "image[0]").size == (32, 24)


def test_a_worker_over_its_cpu_limit_is_killed():
    config = sandbox.SandboxConfig(workers=1, cpu_s=1, test_hooks=True)
    strict = sandbox.DecodePool(config)
    try:
        with pytest.raises(sandbox.DecodeFailed):  # the kernel's SIGXCPU, not the deadline
            strict.run("image", HANG, IMAGE_ARGS, timeout_s=60)
        assert strict.run("image_header", GOOD_PNG, {}, timeout_s=30)[1] == ["png", 32, 24]
    finally:
        strict.close()


def test_a_worker_over_its_memory_limit_refuses_instead_of_growing():
    strict = sandbox.DecodePool(sandbox.SandboxConfig(workers=1, memory_mib=160, video=False))
    big = encoded_image("PNG", size=(4000, 3000))  # 36 MB of RGB, over what is left of 160 MiB
    try:
        with pytest.raises((sandbox.Refused, sandbox.DecodeFailed)):
            strict.run("image", big, IMAGE_ARGS, timeout_s=30)
        assert strict.run("image_header", GOOD_PNG, {}, timeout_s=30)[1] == ["png", 32, 24]
    finally:
        strict.close()


def test_pixels_come_back_resized_into_the_budget(pool):
    image = decode_image(
        encoded_image("PNG", size=(640, 480)), "image[0]", budget={"max_pixels": 50_000}
    )
    assert image.width % 28 == 0 and image.height % 28 == 0 and image.width * image.height <= 50_000


def test_the_parent_trusts_nothing_a_worker_answers():
    assert sandbox._valid_refusal("invalid_image", "image_pixels", [1, 2, 3])
    assert sandbox._valid_refusal("invalid_video", "frame:image_bomb", [3])
    assert not sandbox._valid_refusal("invalid_image", "free text from a decoder", [])
    assert not sandbox._valid_refusal("invalid image!", "no_pixels", [])
    assert not sandbox._valid_refusal("invalid_image", "image_pixels", ["0x7ffd1234"])
    assert not sandbox._valid_refusal("invalid_image", "other:no_pixels", [])
    assert sandbox._valid_shape([2, 3, 3], 18) and sandbox._valid_shape([], 0)
    assert not sandbox._valid_shape([2, 3, 4], 18)  # beyond the shared buffer
    assert not sandbox._valid_shape([-1, 3], 100) and not sandbox._valid_shape([1.5], 100)
    assert not sandbox._valid_shape([True], 100) and not sandbox._valid_shape("3", 100)


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
def test_the_seccomp_filter_checks_the_arch_first_and_ends_allowing(machine):
    program = sandbox.seccomp_program(machine)
    assert program[0] == (0x20, 0, 0, 4)  # load the audit arch
    assert program[2] == (0x06, 0, 0, 0x80000000)  # another ABI: the process is killed
    assert program[-1] == (0x06, 0, 0, 0x7FFF0000)
    assert sandbox.seccomp_program("riscv64") is None


def test_a_pool_without_hooks_decodes_the_markers_as_images():
    """The hooks are the environment's, never a request's: without them a marker is data."""
    plain = dataclasses.replace(sandbox.SandboxConfig(), workers=1, video=False)
    assert not plain.test_hooks
    strict = sandbox.DecodePool(plain)
    try:
        with pytest.raises(sandbox.Refused):
            strict.run("image", CRASH, IMAGE_ARGS, timeout_s=30)
        assert strict.replaced == 0
    finally:
        strict.close()


class LyingPool:
    """A pool whose worker answers out of shape (as a compromised one could)."""

    def __init__(self, answer):
        self.answer = answer

    def run(self, task, data, args, timeout_s):
        return self.answer


@pytest.mark.parametrize(
    "answer",
    [(None, []), (np.zeros((2, 2), np.uint8), []), (np.zeros((2, 2, 3), np.uint8), ["0x1f"])],
    ids=["no-pixels", "wrong-shape", "text-metadata"],
)
def test_an_answer_of_the_wrong_shape_is_a_failed_decode(monkeypatch, answer):
    monkeypatch.setattr(decoding, "pool", lambda: LyingPool(answer))
    error = refused(lambda: decode_image(GOOD_PNG, "image[0]"))
    assert (error.code, error.message) == ("invalid_image", "image could not be decoded")
    if answer[0] is not None and answer[0].ndim == 3:
        return
    error = refused(lambda: decode_container(clip(seconds=0.2), "video[0]", LIMITS, OPTIONS))
    assert error.code == "invalid_video"


def test_the_log_line_names_what_is_not_enforced():
    line = sandbox.describe(sandbox.SandboxConfig(), {"seccomp": False, "cpu": True})
    assert line.endswith("enforced: cpu; not enforced: seccomp")
