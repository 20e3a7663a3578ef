"""Untrusted media decoded in a pool of locked-down worker processes.

Image and video decoders (Pillow's plugins, PyAV's bundled FFmpeg) are the attack surface of a
vision-language server: a crafted file that overflows a decoder owns the process it runs in.
Here they run only in worker processes started from this file (`python -I sandbox.py`, never a
fork of a process holding weights, threads or sockets), which before their first task:
drop root for `nobody`, set PR_SET_NO_NEW_PRIVS and PR_SET_DUMPABLE 0, die with their parent,
take resource limits (address space, CPU seconds, open files, no processes, no file writes, no
core dumps) and install a seccomp filter that refuses sockets, process creation, exec and
tracing. What each worker could enforce comes back in its ready message (`Worker.enforced`).

Only allowlisted inputs reach a decoder: images that Pillow's JPEG, PNG, GIF or WebP plugin
opens; videos whose container is MP4/MOV or Matroska/WebM (the demuxer is named at open, never
probed, and its name checked) and whose every video stream is H.264, HEVC, VP8, VP9, AV1 or
MPEG-4 part 2, checked before a packet is decoded.

Pixels come back through a sealed memfd each worker shares with its parent, metadata as a small
JSON list; nothing is unpickled from a worker. A refusal is a key of `MESSAGES` with numbers,
formatted by the parent; a worker that crashes, hangs past its deadline, breaks a limit or
answers out of protocol is killed and replaced in the background, and its task gets the fixed
`DecodeFailed` message. No decoder text, path or address leaves a worker.

This file is standalone (standard library, numpy, Pillow, PyAV) and copied byte for byte as
`qwen_vl_backend/media/sandbox.py` (the model) and `proxy/media/sandbox.py` (the proxy).
"""

from __future__ import annotations

import atexit
import base64
import binascii
import ctypes
import errno
import io
import json
import math
import mmap
import os
import platform
import queue
import resource
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass

IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "WEBP")
# The demuxer named at open for each sniffed container family, and the names it may report.
VIDEO_DEMUXERS = {"iso": "mp4", "ebml": "matroska"}
# (PyAV reports a demuxer named at open by that name, a probed one by FFmpeg's full name.)
VIDEO_CONTAINERS = frozenset({"mp4", "matroska", "mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm"})
VIDEO_CODECS = ("h264", "hevc", "vp8", "vp9", "av1", "mpeg4")
GRID = 28  # Qwen2.5-VL's resize grid: 14-pixel patches merged 2x2
FRAME_FACTOR = 2  # frames go into the vision tower in pairs
MIN_FRAMES = 4  # qwen-vl-utils' FPS_MIN_FRAMES
FRAME_MAX_PIXELS = 768 * GRID * GRID  # qwen-vl-utils' VIDEO_MAX_TOKEN_NUM per frame
MAX_CONTAINER_FPS = 240  # a header claiming more frames per second than this is refused
MAX_RATIO = 200  # qwen-vl-utils refuses to resize more elongated pictures
# Only a pool started with test hooks honours these markers (tests set DECODE_SANDBOX_TEST_HOOKS
# in the server's environment); a request alone cannot turn them on.
TEST_HOOKS_ENV = "DECODE_SANDBOX_TEST_HOOKS"
CRASH_MARKER = b"SANDBOX-TEST-CRASH"
HANG_MARKER = b"SANDBOX-TEST-HANG"

MESSAGES = {
    "not_image": "image is not a JPEG, PNG, WebP or GIF file",
    "undecodable_image": "image could not be decoded",
    "image_bomb": "image is too large to decode",
    "no_pixels": "image has no pixels",
    "image_pixels": "image is {}x{} pixels; at most {} pixels are accepted",
    "image_aspect": "image is {}x{}; its aspect ratio must be at most {:g}:1",
    "not_container": "video is not an MP4, MOV, WebM or MKV file",
    "container": "video container is not MP4, MOV, WebM or MKV",
    "codec": "video stream is not H.264, HEVC, VP8, VP9, AV1 or MPEG-4 part 2",
    "unopenable": "video could not be opened",
    "no_stream": "video has no video stream",
    "no_size": "video has no picture size in its header",
    "no_frames": "video has no frames",
    "video_pixels": "video is {}x{} pixels; at most {} pixels per frame are accepted",
    "video_seconds": "video is {:.1f} s long; at most {} s are accepted",
    "video_rate": "video header claims {} frames in {:.1f} s",
    "frame_pixels": "video frame is {}x{} pixels; at most {} are accepted",
    "video_timeout": "video took longer than {:g} s to decode",
    "undecodable_video": "video could not be decoded",
    "no_decodable": "video has no decodable frames",
    "size_changes": "video changes size mid-stream",
    "video_aspect": "video is {}x{}; its aspect ratio must be at most {}:1",
    "frame_base64": "video frame {} is not valid base64",
    "empty_frame": "video frame list has an empty frame",
    "too_many_frames": "video has {} frames; at most {} are accepted",
    "frame_sizes": "video frames must all have the same size",
    "output_size": "decoded media is too large",
}


class Refused(ValueError):
    """The input breaks a rule: `MESSAGES[key]` formatted with `args` (numbers only), and the
    error code the caller answers with."""

    def __init__(self, code: str, key: str, *args: float):
        super().__init__(key)
        self.code, self.key, self.args_ = code, key, args

    @property
    def message(self) -> str:
        prefix, _, key = self.key.rpartition(":")
        text = MESSAGES[key].format(*self.args_[1:] if prefix else self.args_)
        return f"video frame {self.args_[0]}: {text}" if prefix else text


class DecodeFailed(RuntimeError):
    """The worker crashed, hung, broke a limit or left the protocol; the input is blamed."""

    message = "media could not be decoded"


class SandboxBusy(RuntimeError):
    """No worker became free in time."""


def describe(config: SandboxConfig, enforced: dict) -> str:
    """One log line: the pool and what its workers enforce (and what they could not)."""
    missing = sorted(name for name, done in enforced.items() if not done)
    return (
        f"decode sandbox: {config.workers} workers, {config.memory_mib} MiB, {config.cpu_s} s "
        f"CPU per item; enforced: {', '.join(sorted(n for n, d in enforced.items() if d))}; "
        f"not enforced: {', '.join(missing) or 'nothing'}"
    )


@dataclass(frozen=True)
class SandboxConfig:
    """A pool's size and each worker's limits (the settings that fill it say why)."""

    workers: int = 2
    memory_mib: int = 2048  # RLIMIT_AS
    cpu_s: int = 30  # RLIMIT_CPU per task
    open_files: int = 64  # RLIMIT_NOFILE
    output_mib: int = 128  # the shared pixel buffer (pages are used only when written)
    max_tasks: int = 32  # tasks before a worker is replaced (a compromise does not linger)
    wait_s: float = 30.0  # longest wait for a free worker
    start_timeout_s: float = 60.0
    video: bool = True  # load PyAV in the workers
    test_hooks: bool = False
    python: str = ""  # the interpreter workers run; "" finds one

    @classmethod
    def from_env(cls, **values) -> SandboxConfig:
        return cls(**values, test_hooks=os.environ.get(TEST_HOOKS_ENV) == "1")


# ---- the parent side: a pool of workers ------------------------------------------------------


def python_executable(configured: str = "") -> str:
    """A Python interpreter: a process embedded in another binary (Triton's backend stub) has
    no usable sys.executable, so fall back to the python next to the stdlib's prefix."""
    if configured:
        return configured
    if os.path.basename(sys.executable).startswith("python"):
        return sys.executable
    for name in (f"python{sys.version_info[0]}.{sys.version_info[1]}", "python3"):
        candidate = os.path.join(sys.prefix, "bin", name)
        if os.access(candidate, os.X_OK):
            return candidate
    return "python3"


class Worker:
    """One worker process, its request pipe, its reply pipe and its shared pixel buffer."""

    def __init__(self, config: SandboxConfig):
        self.tasks = 0
        size = config.output_mib * 1024 * 1024
        self._memfd = os.memfd_create("decode-output", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self._memfd, size)
        # The worker may neither shrink (a read past the end would kill the parent with SIGBUS)
        # nor grow the buffer.
        seals = fcntl_seals()
        if seals:
            import fcntl

            fcntl.fcntl(self._memfd, fcntl.F_ADD_SEALS, seals)
        self.buffer = mmap.mmap(self._memfd, size)
        settings = {
            "memory_mib": config.memory_mib,
            "cpu_s": config.cpu_s,
            "open_files": config.open_files,
            "max_tasks": config.max_tasks,
            "video": config.video,
            "test_hooks": config.test_hooks,
            "fd": self._memfd,
        }
        self.process = subprocess.Popen(
            [
                python_executable(config.python),
                "-I",
                os.path.abspath(__file__),
                json.dumps(settings),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,  # decoder chatter may hold addresses: never logged
            pass_fds=(self._memfd,),
            env=_worker_env(),
            start_new_session=True,
        )
        self.enforced: dict = {}

    def wait_ready(self, timeout_s: float) -> None:
        self.enforced = self._reply(time.monotonic() + timeout_s)

    def run(self, task: str, data: bytes, args: dict, timeout_s: float):
        """(pixels as a numpy array or None, metadata list); Refused or DecodeFailed."""
        deadline = time.monotonic() + timeout_s
        self.tasks += 1
        header = json.dumps({"task": task, "args": args}).encode()
        _write_all(
            self.process.stdin.fileno(), struct.pack(">IQ", len(header), len(data)), deadline
        )
        _write_all(self.process.stdin.fileno(), header, deadline)
        _write_all(self.process.stdin.fileno(), data, deadline)
        reply = self._reply(deadline)
        if "refused" in reply:
            code, key, numbers = reply["refused"]
            if _valid_refusal(code, key, numbers):
                raise Refused(code, key, *numbers)
            raise DecodeFailed
        shape, meta = reply.get("shape"), reply.get("meta")
        if not isinstance(meta, list) or not _valid_shape(shape, len(self.buffer)):
            raise DecodeFailed
        if not shape:
            return None, meta
        import numpy as np

        count = math.prod(shape)
        pixels = np.frombuffer(self.buffer, dtype=np.uint8, count=count).reshape(shape).copy()
        return pixels, meta

    def _reply(self, deadline: float) -> dict:
        fd = self.process.stdout.fileno()
        (length,) = struct.unpack(">I", _read_exact(fd, 4, deadline))
        if length > 65536:
            raise DecodeFailed
        try:
            reply = json.loads(_read_exact(fd, length, deadline))
        except ValueError:
            raise DecodeFailed from None
        if not isinstance(reply, dict) or reply.get("failed"):
            raise DecodeFailed
        return reply

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        for pipe in (self.process.stdin, self.process.stdout):
            try:
                pipe.close()
            except OSError:
                pass
        self.buffer.close()
        os.close(self._memfd)


def _worker_env() -> dict[str, str]:
    """Nothing of the parent's environment but where shared libraries are; one BLAS thread."""
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    if os.environ.get("LD_LIBRARY_PATH"):
        env["LD_LIBRARY_PATH"] = os.environ["LD_LIBRARY_PATH"]
    return env


def fcntl_seals() -> int:
    try:
        import fcntl

        return fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
    except AttributeError:  # Python before 3.9 or a platform without file seals
        return 0


def _valid_refusal(code, key, numbers) -> bool:
    known = key.rpartition(":")[2] in MESSAGES and key.rpartition(":")[0] in ("", "frame")
    return (
        isinstance(code, str)
        and code.isidentifier()
        and len(code) < 40
        and isinstance(key, str)
        and known
        and isinstance(numbers, list)
        and len(numbers) < 8
        and all(isinstance(n, int | float) and not isinstance(n, bool) for n in numbers)
    )


def _valid_shape(shape, capacity: int) -> bool:
    if not isinstance(shape, list) or len(shape) > 4:
        return False
    if not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape):
        return False
    return not shape or math.prod(shape) <= capacity


def _write_all(fd: int, data: bytes, deadline: float) -> None:
    view = memoryview(data)
    while view:
        _wait(fd, select.POLLOUT, deadline)
        try:
            view = view[os.write(fd, view[: 1 << 20]) :]
        except (BrokenPipeError, ConnectionResetError):
            raise DecodeFailed from None


def _read_exact(fd: int, count: int, deadline: float) -> bytes:
    chunks, left = [], count
    while left:
        _wait(fd, select.POLLIN, deadline)
        chunk = os.read(fd, left)
        if not chunk:
            raise DecodeFailed  # the worker died
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _wait(fd: int, event: int, deadline: float) -> None:
    poller = select.poll()
    poller.register(fd, event)
    left = deadline - time.monotonic()
    if left <= 0 or not poller.poll(left * 1000):
        raise DecodeFailed  # past the task's deadline: the worker hangs


class DecodePool:
    """Pre-started workers; a task takes a free one and one that fails is replaced off the
    request path by a background thread."""

    def __init__(self, config: SandboxConfig, on_ready=None):
        self.config = config
        self._on_ready = on_ready  # called once with the first worker's `enforced`
        self._idle: queue.Queue[Worker] = queue.Queue()
        self._wanted: queue.Queue[bool] = queue.Queue()
        self._all: set[Worker] = set()
        self._lock = threading.Lock()
        self._closed = False
        self.replaced = 0  # workers replaced after a failure or their last task
        self.enforced: dict = {}
        self._starter = threading.Thread(
            target=self._start_loop, name="decode-sandbox", daemon=True
        )
        self._starter.start()
        for _ in range(config.workers):
            self._wanted.put(True)

    def run(self, task: str, data: bytes, args: dict, timeout_s: float):
        """Decode `data` with `task` in a worker: (pixels or None, metadata)."""
        try:
            worker = self._idle.get(timeout=self.config.wait_s)
        except queue.Empty:
            raise SandboxBusy from None
        try:
            result = worker.run(task, data, args, timeout_s)
        except Refused:
            self._release(worker)
            raise
        except (DecodeFailed, OSError, ValueError, struct.error):
            self._retire(worker)
            raise DecodeFailed from None
        self._release(worker)
        return result

    def wait_ready(self, count: int = 1, timeout_s: float = 60.0) -> None:
        """Block until `count` workers are idle (tests and start-up checks)."""
        deadline = time.monotonic() + timeout_s
        while self._idle.qsize() < count and time.monotonic() < deadline:
            time.sleep(0.02)

    def _release(self, worker: Worker) -> None:
        if worker.tasks >= self.config.max_tasks:
            self._retire(worker)
        else:
            self._idle.put(worker)

    def _retire(self, worker: Worker) -> None:
        with self._lock:
            self._all.discard(worker)
            self.replaced += 1
        worker.kill()
        if not self._closed:
            self._wanted.put(True)

    def _start_loop(self) -> None:
        while self._wanted.get():
            if self._closed:
                return
            try:
                worker = Worker(self.config)
            except OSError:
                time.sleep(1.0)  # no process or memfd now (limits): try again
                self._wanted.put(True)
                continue
            try:
                worker.wait_ready(self.config.start_timeout_s)
            except (DecodeFailed, OSError, ValueError, struct.error):
                worker.kill()
                time.sleep(1.0)
                self._wanted.put(True)
                continue
            with self._lock:
                if self._closed:
                    worker.kill()
                    return
                self._all.add(worker)
                first, self.enforced = not self.enforced, worker.enforced
            if first and self._on_ready is not None:
                self._on_ready(worker.enforced)
            self._idle.put(worker)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            workers = list(self._all)
            self._all.clear()
        self._wanted.put(False)
        for worker in workers:
            worker.kill()
        self._starter.join(timeout=self.config.start_timeout_s)


# ---- the worker side: hardening ------------------------------------------------------------

_PR_SET_PDEATHSIG, _PR_SET_DUMPABLE, _PR_SET_SECCOMP, _PR_SET_NO_NEW_PRIVS = 1, 4, 22, 38
_SECCOMP_MODE_FILTER = 2
_RET_ALLOW, _RET_KILL_PROCESS, _RET_ERRNO = 0x7FFF0000, 0x80000000, 0x00050000
_CLONE_THREAD = 0x00010000
# (audit arch, syscalls refused with EPERM, clone, clone3): sockets, process creation, exec,
# tracing other processes.
_SYSCALLS = {
    "x86_64": (
        0xC000003E,
        # socket connect accept bind listen socketpair accept4 fork vfork execve execveat
        # ptrace process_vm_readv process_vm_writev
        (41, 42, 43, 49, 50, 53, 288, 57, 58, 59, 322, 101, 310, 311),
        56,
        435,
    ),
    "aarch64": (
        0xC00000B7,
        (198, 199, 200, 201, 202, 203, 242, 221, 281, 117, 270, 271),
        220,
        435,
    ),
}


class ProcessPool:
    """A process's one DecodePool. `start` gives the pool of a configuration, keeping the running
    one when its configuration is the same (many apps or engines in one process start it: each
    new pool's workers cost a Python start and their decoders' imports); `get` gives the
    running pool, or one of `default()`'s configuration on first use (tools, tests). Whatever
    runs is closed at the process's exit."""

    def __init__(self) -> None:
        self._pool: DecodePool | None = None
        self._config: SandboxConfig | None = None
        self._lock = threading.Lock()
        self._closed_at_exit = False

    def start(self, config: SandboxConfig, on_ready=None) -> DecodePool:
        with self._lock:
            if self._pool is not None and config == self._config:
                return self._pool
            if self._pool is not None:
                self._pool.close()
            return self._run(config, on_ready)

    def get(self, default) -> DecodePool:
        with self._lock:
            return self._pool if self._pool is not None else self._run(default(), None)

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.close()
            self._pool, self._config = None, None

    def _run(self, config: SandboxConfig, on_ready) -> DecodePool:
        self._pool, self._config = DecodePool(config, on_ready=on_ready), config
        if not self._closed_at_exit:
            atexit.register(self.close)
            self._closed_at_exit = True
        return self._pool


class _Filter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_ushort),
        ("jt", ctypes.c_ubyte),
        ("jf", ctypes.c_ubyte),
        ("k", ctypes.c_uint),
    ]


class _Program(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_Filter))]


def seccomp_program(machine: str) -> list[tuple[int, int, int, int]] | None:
    """The classic-BPF filter for `machine`, or None where no table is known."""
    if machine not in _SYSCALLS:
        return None
    arch, denied, clone, clone3 = _SYSCALLS[machine]
    ld_abs, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    eperm, enosys = _RET_ERRNO | errno.EPERM, _RET_ERRNO | errno.ENOSYS
    # A syscall made through another ABI (int 0x80 on x86_64) kills the worker.
    program = [(ld_abs, 0, 0, 4), (jeq, 1, 0, arch), (ret, 0, 0, _RET_KILL_PROCESS)]
    program.append((ld_abs, 0, 0, 0))
    if machine == "x86_64":  # x32 numbers
        program += [(jge, 0, 1, 0x40000000), (ret, 0, 0, eperm)]
    for number in denied:
        program += [(jeq, 0, 1, number), (ret, 0, 0, eperm)]
    # clone3 hides its flags in memory: ENOSYS makes the C library fall back to clone.
    program += [(jeq, 0, 1, clone3), (ret, 0, 0, enosys)]
    # clone: threads (CLONE_THREAD) yes, new processes no.
    program += [(jeq, 0, 4, clone), (ld_abs, 0, 0, 16), (jset, 0, 1, _CLONE_THREAD)]
    program += [(ret, 0, 0, _RET_ALLOW), (ret, 0, 0, eperm), (ret, 0, 0, _RET_ALLOW)]
    return program


def _install_seccomp(libc) -> bool:
    program = seccomp_program(platform.machine())
    if program is None:
        return False
    filters = (_Filter * len(program))(*(_Filter(*line) for line in program))
    prog = _Program(len(program), filters)
    done = libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0)
    return done == 0


def _drop_root() -> bool:
    if os.getuid() != 0:
        return True
    try:
        os.setgroups([])
        os.setgid(65534)  # nobody / nogroup: nothing of root's to read, kill or write
        os.setuid(65534)
    except OSError:
        return False
    return True


def harden(settings: dict) -> dict:
    """Lock this process down; what could be enforced (the ready message)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong]
    libc.prctl.argtypes += [ctypes.c_ulong]
    enforced = {"parent_death": libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, None, 0, 0) == 0}
    if os.getppid() == 1:
        os._exit(0)  # the parent is gone already
    enforced["not_root"] = _drop_root()
    enforced["not_dumpable"] = libc.prctl(_PR_SET_DUMPABLE, 0, None, 0, 0) == 0
    cpu = settings["cpu_s"]
    limits = {
        "address_space": (resource.RLIMIT_AS, settings["memory_mib"] * 1024 * 1024),
        "cpu": (resource.RLIMIT_CPU, cpu * (settings["max_tasks"] + 1)),
        "open_files": (resource.RLIMIT_NOFILE, settings["open_files"]),
        "processes": (resource.RLIMIT_NPROC, 0),
        "file_size": (resource.RLIMIT_FSIZE, 0),
        "core": (resource.RLIMIT_CORE, 0),
    }
    for name, (which, value) in limits.items():
        try:
            resource.setrlimit(which, (value, value))
            enforced[name] = True
        except (ValueError, OSError):
            enforced[name] = False
    enforced["no_new_privs"] = libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, None, 0, 0) == 0
    enforced["seccomp"] = enforced["no_new_privs"] and _install_seccomp(libc)
    return enforced


def _task_cpu_limit(seconds: int) -> None:
    """This task may use `seconds` of CPU beyond what the worker used so far (SIGXCPU kills)."""
    used = resource.getrusage(resource.RUSAGE_SELF)
    spent = math.ceil(used.ru_utime + used.ru_stime)
    hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    soft = spent + seconds if hard == resource.RLIM_INFINITY else min(spent + seconds, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


# ---- the worker side: tasks ----------------------------------------------------------------


def smart_resize(height: int, width: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """qwen-vl-utils' smart_resize: the grid size nearest the picture's, area in bounds."""
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise Refused("invalid_image", "image_aspect", width, height, MAX_RATIO)
    h_bar = max(GRID, round(height / GRID) * GRID)
    w_bar = max(GRID, round(width / GRID) * GRID)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / GRID) * GRID
        w_bar = math.floor(width / beta / GRID) * GRID
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / GRID) * GRID
        w_bar = math.ceil(width * beta / GRID) * GRID
    return h_bar, w_bar


def _open_image(data: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)


def _sniff_image(data: bytes) -> bool:
    return (
        data[:3] == b"\xff\xd8\xff"
        or data[:8] == b"\x89PNG\r\n\x1a\n"
        or data[:4] == b"GIF8"
        or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")
    )


def image_header(data: bytes, args: dict):
    """Format and size from the header alone (no pixel decoded)."""
    from PIL import Image

    if not _sniff_image(data):
        raise Refused("invalid_image", "not_image")
    try:
        with _open_image(data) as image:
            return None, [image.format.lower(), image.size[0], image.size[1]]
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise Refused("image_too_large", "image_bomb") from None
    except Exception:  # Pillow raises many types for hostile headers; none leaves the worker
        raise Refused("invalid_image", "undecodable_image") from None


def decode_image(data: bytes, args: dict):
    """RGB pixels (H, W, 3) of an image, checked from its header first; resized onto the
    grid when `args` has a budget (min_pixels, max_pixels)."""
    from PIL import Image

    if not _sniff_image(data):
        raise Refused("invalid_image", "not_image")
    try:
        image = _open_image(data)
        _check_image_size(image.size, args)  # from the header, before decoding pixels
        image.load()
        image = _to_rgb(image)
    except Refused:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise Refused("image_too_large", "image_bomb") from None
    except MemoryError:
        raise Refused("image_too_large", "image_bomb") from None
    except Exception:
        raise Refused("invalid_image", "undecodable_image") from None
    if "max_pixels" in args:
        height, width = smart_resize(
            image.height, image.width, args["min_pixels"], args["max_pixels"]
        )
        if (width, height) != image.size:
            image = image.resize((width, height))  # qwen-vl-utils' fetch_image: bicubic
    import numpy as np

    return np.asarray(image), []


def _check_image_size(size, args: dict) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise Refused("invalid_image", "no_pixels")
    if width * height > args["max_source_pixels"]:
        raise Refused("image_too_large", "image_pixels", width, height, args["max_source_pixels"])
    if max(width, height) / min(width, height) > args["max_aspect_ratio"]:
        raise Refused("invalid_image", "image_aspect", width, height, args["max_aspect_ratio"])


def _to_rgb(image):
    """Any mode to RGB as a viewer would show it: 16-bit scaled down, transparency over white."""
    import numpy as np
    from PIL import Image

    if image.mode.startswith("I") or image.mode == "F":
        pixels = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(pixels.max()), 1.0)
        image = Image.fromarray(np.clip(pixels / top * 255.0, 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def frame_pixels(options: dict, frames: int) -> tuple[int, int]:
    """(min, max) pixels per frame: qwen-vl-utils' fetch_video budget, the total shared by
    the frames (two frames make one temporal patch), the part's max_pixels below it."""
    budget = max(
        min(FRAME_MAX_PIXELS, options["total_pixels"] / frames * FRAME_FACTOR),
        int(options["min_pixels"] * 1.05),
    )
    return options["min_pixels"], int(min(options["max_pixels"], budget))


class FrameResizer:
    """Each frame onto the grid within the video's budget as it is decoded, so a long 4K clip
    never holds its frames at full size; every frame must have the first one's size."""

    def __init__(self, count: int, options: dict, size_error: str):
        self.low, self.high = frame_pixels(options, count)
        self.size_error = size_error
        self.source: tuple[int, int] | None = None
        self.target: tuple[int, int] = (0, 0)

    def __call__(self, pixels):
        import numpy as np
        from PIL import Image

        height, width = pixels.shape[:2]
        if self.source is None:
            if max(height, width) / min(height, width) > MAX_RATIO:
                raise Refused("invalid_video", "video_aspect", width, height, MAX_RATIO)
            self.source = (height, width)
            self.target = smart_resize(height, width, self.low, self.high)
        if (height, width) != self.source:
            raise Refused("invalid_video", self.size_error)
        if self.target == self.source:
            return pixels
        new_h, new_w = self.target
        return np.asarray(Image.fromarray(pixels).resize((new_w, new_h), Image.BICUBIC))


def decode_frame_list(data: bytes, args: dict):
    """A client-sampled frame list (the base64 payload): each frame an image with the image
    checks, one size for all, padded to an even count of at least MIN_FRAMES, resized."""
    options, limits = args["options"], args["limits"]
    parts = data.split(b",")
    if not parts or any(not p.strip() for p in parts):
        raise Refused("invalid_video", "empty_frame")
    if len(parts) > options["max_frames"]:
        raise Refused("video_too_large", "too_many_frames", len(parts), options["max_frames"])
    frame_limits = {**limits, "max_source_pixels": limits["max_video_source_pixels"]}
    deadline = time.monotonic() + options["timeout_s"]
    count = max(len(parts) + len(parts) % FRAME_FACTOR, MIN_FRAMES)
    resize = FrameResizer(count, options, "frame_sizes")
    frames = []
    for index, part in enumerate(parts):
        _check_deadline(deadline, options)
        try:
            raw = base64.b64decode(b"".join(part.split()), validate=True)
        except (binascii.Error, ValueError):
            raise Refused("invalid_video", "frame_base64", index) from None
        try:
            pixels = decode_image(raw, frame_limits)[0]
        except Refused as exc:
            code = "video_too_large" if exc.code == "image_too_large" else "invalid_video"
            raise Refused(code, f"frame:{exc.key}", index, *exc.args_) from None
        frames.append(resize(pixels))
    # Padded as qwen-vl-utils does: the last frame repeated.
    frames += [frames[-1]] * (count - len(frames))
    import numpy as np

    return np.stack(frames), [options["fps"], 0]


def _check_deadline(deadline: float, options: dict) -> None:
    if time.monotonic() > deadline:
        raise Refused("video_too_large", "video_timeout", options["timeout_s"])


def _allowed_codec_ids() -> frozenset:
    from av.codec import Codec

    return frozenset(Codec(name, "r").id for name in VIDEO_CODECS)


def open_container(data: bytes, family: str):
    """The container opened with the demuxer its signature names, refused unless that demuxer
    and every video stream's codec are on the allowlists (before any packet is decoded)."""
    import av

    demuxer = VIDEO_DEMUXERS.get(family)
    if demuxer is None:
        raise Refused("invalid_video", "not_container")
    try:
        container = av.open(io.BytesIO(data), mode="r", format=demuxer)
    except Exception:
        raise Refused("invalid_video", "unopenable") from None
    allowed = _allowed_codec_ids()
    if container.format.name not in VIDEO_CONTAINERS:
        container.close()
        raise Refused("invalid_video", "container")
    for stream in container.streams:
        if stream.type == "video" and stream.codec_context.codec.id not in allowed:
            container.close()
            raise Refused("invalid_video", "codec")
    return container


def _probe(container, limits: dict):
    """(duration, frames, rate) of the first video stream, refused when over the limits."""
    if not container.streams.video:
        raise Refused("invalid_video", "no_stream")
    stream = container.streams.video[0]
    codec = stream.codec_context
    width, height = int(codec.width or 0), int(codec.height or 0)
    rate = float(stream.average_rate or stream.guessed_rate or stream.base_rate or 0)
    duration = 0.0
    if stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    if duration <= 0 and container.duration is not None:
        duration = container.duration / 1_000_000  # av.time_base
    frames = int(stream.frames or 0)
    if frames <= 0 and duration > 0 and rate > 0:
        frames = round(duration * rate)
    if duration <= 0 and frames > 0 and rate > 0:
        duration = frames / rate
    if width < 1 or height < 1:
        raise Refused("invalid_video", "no_size")
    if frames <= 0 or duration <= 0 or not math.isfinite(duration) or rate <= 0:
        raise Refused("invalid_video", "no_frames")
    most = limits["max_video_source_pixels"]
    if width * height > most:
        raise Refused("video_too_large", "video_pixels", width, height, most)
    if duration > limits["max_video_seconds"]:
        raise Refused("video_too_large", "video_seconds", duration, limits["max_video_seconds"])
    if rate > MAX_CONTAINER_FPS or frames > max(duration, 1.0) * MAX_CONTAINER_FPS:
        raise Refused("invalid_video", "video_rate", frames, duration)
    return duration, frames, rate


def sample_indices(total: int, rate: float, fps: float, max_frames: int) -> list[int]:
    """qwen-vl-utils' smart_nframes: total / rate * fps frames, clamped to [4, max_frames]
    and to the clip, an even count, evenly spaced over the clip."""
    import numpy as np

    low = math.ceil(MIN_FRAMES / FRAME_FACTOR) * FRAME_FACTOR
    high = max(FRAME_FACTOR, max_frames // FRAME_FACTOR * FRAME_FACTOR)
    wanted = min(max(total / rate * fps, low), high, total)
    count = max(FRAME_FACTOR, int(wanted // FRAME_FACTOR) * FRAME_FACTOR)
    return [int(i) for i in np.round(np.linspace(0, total - 1, count))]


def decode_container(data: bytes, args: dict):
    """Sampled, resized RGB frames of a container: (T, H, W, 3), [sample fps, frames decoded]."""
    options, limits = args["options"], args["limits"]
    deadline = time.monotonic() + options["timeout_s"]
    container = open_container(data, args["family"])
    try:
        _, total, rate = _probe(container, limits)
        indices = sample_indices(total, rate, options["fps"], options["max_frames"])
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1  # a worker may start no threads (RLIMIT_NPROC)
        resize = FrameResizer(len(indices), options, "size_changes")
        frames, decoded = _decode_at(container, rate, indices, limits, options, deadline, resize)
    finally:
        container.close()
    import numpy as np

    return np.stack(frames), [len(indices) / total * rate, decoded]


def _decode_at(container, rate, indices, limits, options, deadline, resize):
    """The frames shown at `indices` / rate seconds, decoded in order and only as far as the
    last one. Between far-apart targets it seeks (to the keyframe before the next target) once
    it has seen the keyframe interval and the gap is over twice that, so a sparse sample of a
    long clip does not decode every frame. A seek that lands at or behind where decoding was
    (a longer GOP than seen) turns seeking off: from there it decodes straight through.
    Returns (frames as resized HxWx3 uint8 arrays, frames decoded)."""
    stream = container.streams.video[0]
    base, origin = stream.time_base, stream.start_time or 0
    targets = [index / rate for index in indices]
    slack = 0.5 / rate
    picked: list = []
    state = {"gop": 0.0, "previous_key": None, "seek_from": None, "seek_to": 0.0, "may_seek": True}
    decoded = 0
    while len(picked) < len(targets):
        seeked = False
        try:
            for frame in container.decode(stream):
                _check_deadline(deadline, options)
                most = limits["max_video_source_pixels"]
                if frame.width * frame.height > most:
                    raise Refused(
                        "video_too_large", "frame_pixels", frame.width, frame.height, most
                    )
                decoded += 1
                if frame.pts is not None and base is not None:
                    at = float((frame.pts - origin) * base)
                else:
                    at = (decoded - 1) / rate
                _note_keyframes(state, frame, at)
                array = None
                while len(picked) < len(targets) and at >= targets[len(picked)] - slack:
                    array = array if array is not None else resize(_rgb(frame))
                    picked.append(array)
                if len(picked) == len(targets):
                    break
                if (
                    state["may_seek"]
                    and state["gop"]
                    and targets[len(picked)] - at > 2 * state["gop"]
                ):
                    state["seek_to"] = targets[len(picked)]
                    container.seek(
                        int(state["seek_to"] / base) + origin, stream=stream, backward=True
                    )
                    seeked = True
                    state["seek_from"], state["previous_key"] = at, None
                    break
        except Refused:
            raise
        except Exception:
            if not picked:
                raise Refused("invalid_video", "undecodable_video") from None
            break
        if not seeked:
            break
    if not picked:
        raise Refused("invalid_video", "no_decodable")
    # A header that overstated the clip: the missing tail repeats the last frame.
    picked += [picked[-1]] * (len(targets) - len(picked))
    return picked, decoded


def _rgb(frame):
    # One thread: FFmpeg's swscale would start more, which RLIMIT_NPROC refuses.
    return frame.reformat(format="rgb24", threads=1).to_ndarray()


def _note_keyframes(state: dict, frame, at: float) -> None:
    if state["seek_from"] is not None:  # the first frame after a seek
        state["may_seek"] = state["may_seek"] and at > state["seek_from"]
        state["gop"] = max(state["gop"], state["seek_to"] - at)  # it landed this far before
        state["seek_from"] = None
    if frame.key_frame:
        previous = state["previous_key"]
        if previous is not None and at > previous:
            state["gop"] = max(state["gop"], at - previous)
        state["previous_key"] = at


TASKS = {
    "image_header": image_header,
    "image": decode_image,
    "frames": decode_frame_list,
    "video": decode_container,
}


def _test_hook(data: bytes) -> None:
    """Markers within the first bytes, so they can ride behind an image signature."""
    if CRASH_MARKER in data[:64]:
        ctypes.string_at(0)  # a decoder's SIGSEGV
    if HANG_MARKER in data[:64]:
        while True:
            pass


def _confinement(data: bytes, args: dict):
    """What this worker is refused (tests only): [a socket, a child process, a file write],
    True where refused, and its uid."""
    import socket

    def fork():
        if os.fork() == 0:
            os._exit(0)

    def write():
        path = f"/tmp/decode-sandbox-probe-{os.getpid()}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)
            os.unlink(path)

    refused = []
    for attempt in (lambda: socket.socket().close(), fork, write):
        try:
            attempt()
            refused.append(False)
        except OSError:
            refused.append(True)
    return None, [*refused, os.getuid()]


def _worker_main(settings: dict) -> None:
    reply_fd = os.dup(1)
    os.dup2(2, 1)  # anything a library prints goes where stderr goes (nowhere)
    buffer = mmap.mmap(settings["fd"], 0)
    import numpy  # noqa: F401  (loaded before the limits: imports open files)
    from PIL import Image

    Image.init()
    warnings.simplefilter("error", Image.DecompressionBombWarning)  # a bomb fails, never warns
    if settings["video"]:
        import av  # noqa: F401 (idem)

        av.logging.set_level(None)
        _allowed_codec_ids()
    tasks = {**TASKS, "confinement": _confinement} if settings["test_hooks"] else TASKS
    enforced = harden(settings)
    _send(reply_fd, enforced)
    for _ in range(settings["max_tasks"]):
        request = _receive()
        if request is None:
            return
        task, args, data = request
        _task_cpu_limit(settings["cpu_s"])
        if settings["test_hooks"]:
            _test_hook(data)
        _send(reply_fd, _run(tasks[task], args, data, buffer))


def _run(task, args: dict, data: bytes, buffer) -> dict:
    try:
        pixels, meta = task(data, args)
    except Refused as exc:
        return {"refused": [exc.code, exc.key, list(exc.args_)]}
    except Exception:  # a decoder's own error: its text stays here
        return {"failed": True}
    if pixels is None:
        return {"shape": [], "meta": meta}
    if pixels.nbytes > len(buffer):
        return {"refused": ["image_too_large", "output_size", []]}
    import numpy as np

    np.frombuffer(buffer, dtype=np.uint8, count=pixels.size)[:] = pixels.reshape(-1)
    return {"shape": list(pixels.shape), "meta": meta}


def _send(fd: int, message: dict) -> None:
    body = json.dumps(message).encode()
    os.write(fd, struct.pack(">I", len(body)) + body)


def _receive():
    head = _read_stdin(12)
    if head is None:
        return None
    header_size, data_size = struct.unpack(">IQ", head)
    header = json.loads(_read_stdin(header_size))
    return header["task"], header["args"], _read_stdin(data_size) or b""


def _read_stdin(count: int) -> bytes | None:
    chunks, left = [], count
    while left:
        chunk = os.read(0, min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


if __name__ == "__main__":
    _worker_main(json.loads(sys.argv[1]))
