#!/usr/bin/env python3
"""Start tritonserver and the OpenAI proxy together, wait until ready, stop both on a signal.

    python scripts/stack.py [--model ID_OR_PATH] [--host 0.0.0.0] [--proxy-port 9000] ...

The same functions start the stack for the end-to-end tests (on loopback, on free ports).
"""

from __future__ import annotations

import argparse
import atexit
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL_REPOSITORY = ROOT / "model_repository"
TRITON_MODEL = "qwen2_5_vl"
DEFAULT_HUB_MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"


def _load_model_probe():
    """docker/model_probe.py (the Triton pod's probe; standard library only) as a module."""
    spec = importlib.util.spec_from_file_location("model_probe", ROOT / "docker" / "model_probe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


model_probe = _load_model_probe()


def pytriton_home() -> Path | None:
    """The tritonserver folder of the nvidia-pytriton wheel (bin/, backends/, the Python-backend
    stubs), found without importing pytriton; None when the wheel is not installed."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or spec.origin is None:
        return None
    home = Path(spec.origin).parent / "tritonserver"
    return home if (home / "bin" / "tritonserver").exists() else None


def find_tritonserver() -> tuple[str, str | None]:
    """(binary, backend directory): a tritonserver on PATH wins over the pytriton wheel's."""
    on_path = shutil.which("tritonserver")
    if on_path:
        return on_path, None
    home = pytriton_home()
    if home is None:
        raise SystemExit(
            "no tritonserver on PATH and nvidia-pytriton is not installed: run scripts/setup"
        )
    return str(home / "bin" / "tritonserver"), str(home / "backends")


def hub_reachable(timeout: float = 3.0) -> bool:
    try:
        urllib.request.urlopen(
            "https://huggingface.co/api/models/" + DEFAULT_HUB_MODEL, timeout=timeout
        )
        return True
    except (urllib.error.URLError, OSError, ValueError):
        return False


def tiny_checkpoint(preset: str = "tiny") -> str:
    """The path of scripts/build_tiny_checkpoint.py's `preset` checkpoint, built if missing."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "build_tiny_checkpoint.py"), "--preset", preset],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip().splitlines()[-1]


def choose_model(requested: str | None) -> tuple[str, str]:
    """(model, why): the requested model, the hub default, or the locally built tiny one."""
    if requested:
        return requested, "as configured"
    if hub_reachable():
        return DEFAULT_HUB_MODEL, "the default checkpoint from the Hugging Face hub"
    return tiny_checkpoint(), (
        "the hub is unreachable and no model was configured: serving a TINY "
        "RANDOM-WEIGHT checkpoint built locally, its answers are meaningless "
        "(set QWEN_VL_MODEL to a real checkpoint)"
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    """Whether something listens on `port` at `host` (a server's leftover TIME_WAIT sockets
    do not count: servers bind with SO_REUSEADDR too)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
        return False


# ---- processes and process groups (Linux /proc; elsewhere these know nothing) -------------


def _proc_stat(pid: int | str) -> list[str]:
    """The fields of /proc/<pid>/stat after the name (state, ppid, pgrp, ...)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return []
    return stat[stat.rfind(")") + 2 :].split()


def group_members(pgid: int) -> list[int]:
    """The live processes of process group `pgid` (zombies are already dead)."""
    members = []
    for proc in Path("/proc").glob("[0-9]*"):
        fields = _proc_stat(proc.name)
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
            members.append(int(proc.name))
    return members


def end_process_group(proc: subprocess.Popen, wait_s: float = 10.0) -> None:
    """SIGKILL all that is left of the process group `proc` leads (a tritonserver's stubs
    included), reap `proc`, and wait until the group is empty."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    deadline = time.monotonic() + wait_s
    while group_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def _listening_inodes(port: int) -> set[str]:
    """The socket inodes listening on TCP `port` (any address)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(fields[9])
    return inodes


def group_listens_on(pgid: int, port: int) -> bool:
    """Whether a process of group `pgid` holds the listening socket on `port`; True where
    /proc cannot tell (not Linux)."""
    if not Path("/proc/net/tcp").exists():
        return True
    wanted = {f"socket:[{inode}]" for inode in _listening_inodes(port)}
    for pid in group_members(pgid):
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(fd) in wanted:
                    return True
            except OSError:
                continue
    return False


@dataclass
class StackConfig:
    model: str
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    proxy_port: int = 9000
    served_model_name: str | None = None
    log_dir: Path = ROOT / ".cache" / "logs"
    extra_env: dict = field(default_factory=dict)
    proxy_args: list = field(default_factory=list)
    triton_args: list = field(default_factory=list)  # more tritonserver flags
    # Triton starts with no model loaded (explicit model control); the proxy's first chat
    # request loads it, as the original server did.
    lazy_load: bool = False
    # Seconds tritonserver lets running generations finish after SIGTERM before it exits.
    exit_timeout_s: int = 30
    # The proxy's --state-dir (its SQLite database); None: the proxy's own default.
    state_dir: Path | None = None
    # Restart tritonserver when the model's process dies (`Stack.watch_model`).
    watch_model: bool = False

    @property
    def proxy_url(self) -> str:
        return f"http://{_connect_host(self.host)}:{self.proxy_port}"

    @property
    def triton_http_url(self) -> str:
        return f"http://{_connect_host(self.host)}:{self.http_port}"

    @property
    def triton_grpc_url(self) -> str:
        return f"{_connect_host(self.host)}:{self.grpc_port}"

    def ports(self) -> list[tuple[int, str]]:
        """(port, what and which flag sets it) for every port the stack listens on."""
        return [
            (self.proxy_port, "the OpenAI proxy, --proxy-port"),
            (self.http_port, "Triton HTTP, --http-port"),
            (self.grpc_port, "Triton gRPC, --grpc-port"),
            (self.metrics_port, "Triton metrics, --metrics-port"),
        ]

    def ports_taken(self) -> list[str]:
        """A sentence for each of the stack's ports that something already listens on."""
        return [
            f"port {port} ({what}) is already in use on {self.host}"
            for port, what in self.ports()
            if port_in_use(self.host, port)
        ]


def loopback_config(model: str, **overrides) -> StackConfig:
    """A stack on 127.0.0.1 with free ports: for tests and benchmarks beside other stacks.
    Its proxy stores its state in a fresh directory of its own (not the user's), kept across
    proxy restarts and removed when this process exits."""
    ports = {name: free_port() for name in ("http_port", "grpc_port", "metrics_port", "proxy_port")}
    if "state_dir" not in overrides:
        overrides["state_dir"] = Path(tempfile.mkdtemp(prefix="qwen-vl-stack-state-"))
        atexit.register(shutil.rmtree, overrides["state_dir"], ignore_errors=True)
    return StackConfig(model=model, host="127.0.0.1", **{**ports, **overrides})


def _connect_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "") else host


def stack_env(config: StackConfig) -> dict:
    env = dict(os.environ)
    # The Python-backend stub finds its interpreter (and so torch, transformers) through PATH.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["QWEN_VL_MODEL"] = config.model
    env.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    env.update(config.extra_env)
    return env


def triton_command(config: StackConfig) -> list[str]:
    binary, backends = find_tritonserver()
    cmd = [
        binary,
        f"--model-repository={MODEL_REPOSITORY}",
        f"--http-port={config.http_port}",
        f"--grpc-port={config.grpc_port}",
        f"--metrics-port={config.metrics_port}",
        f"--http-address={config.host}",
        f"--grpc-address={config.host}",
        f"--metrics-address={config.host}",
        f"--exit-timeout-secs={config.exit_timeout_s}",
        "--log-info=true",
        # config.pbtxt is complete: without this, Triton starts an extra stub just to ask
        # model.py for a config, paying the model's imports (torch, transformers) twice.
        "--disable-auto-complete-config",
    ]
    if config.lazy_load:
        cmd.append("--model-control-mode=explicit")
    if backends:
        cmd.append(f"--backend-directory={backends}")
    return cmd + list(config.triton_args)


def proxy_command(config: StackConfig) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "proxy",
        "--host",
        config.host,
        "--port",
        str(config.proxy_port),
        "--triton-url",
        config.triton_grpc_url,
        "--triton-model",
        TRITON_MODEL,
    ]
    if config.served_model_name:
        cmd += ["--served-model-name", config.served_model_name]
    if config.lazy_load:
        cmd.append("--lazy-load")
    if config.state_dir is not None:
        cmd += ["--state-dir", str(config.state_dir)]
    return cmd + list(config.proxy_args)


def _get_status(url: str, timeout: float = 2.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
    except (urllib.error.URLError, OSError):
        return None


class Stack:
    """tritonserver + proxy as child processes, each in a process group of its own (with
    tritonserver's Python-backend stubs in its group), logs in files, stopped together."""

    def __init__(self, config: StackConfig):
        self.config = config
        self.triton: subprocess.Popen | None = None
        self.proxy: subprocess.Popen | None = None
        self.model_restarts = 0  # tritonservers the model watch restarted
        self._watch_stop = threading.Event()
        self._watch: threading.Thread | None = None
        self._restarting = threading.Lock()  # held while the watch replaces tritonserver
        self._was_ready = False  # wait_ready saw the whole stack ready once
        config.log_dir.mkdir(parents=True, exist_ok=True)
        self.triton_log = config.log_dir / f"triton-{config.grpc_port}.log"
        self.proxy_log = config.log_dir / f"proxy-{config.proxy_port}.log"

    def start(self) -> None:
        self.start_triton()
        self.start_proxy()
        if self.config.watch_model:
            self.start_model_watch()

    def start_model_watch(self) -> None:
        """`watch_model` in a thread of its own, until `stop`."""
        if self._watch is None:
            self._watch = threading.Thread(target=self.watch_model, name="model-watch")
            self._watch.start()

    def watch_model(self) -> None:
        """Until `stop`: restarts tritonserver when the model's process died. Triton 2.51 never
        restarts a decoupled model's Python-backend stub and keeps reporting the model ready,
        and a model whose stub died cannot be reloaded in place (its unload never ends), so a
        fresh tritonserver is the way back (docs/deploy.md). Dead means: Triton answers the
        model's `describe` request with an error while it says the model is loaded
        (docker/model_probe.py `watch`, as the model image's launcher does). A tritonserver
        that exits by itself once the stack was ready is restarted too: Triton sometimes
        aborts when a stub dies holding a shared-memory lock (`boost::interprocess::
        lock_exception`). One that exits before the stack was ever ready is left to `running`
        (a start failure is not retried)."""
        url = self.config.triton_http_url
        while True:
            died = model_probe.watch(url, TRITON_MODEL, self._idle_while_triton_runs)
            if self._watch_stop.is_set() or not (died or self._was_ready):
                return
            why = "the model's process died" if died else "tritonserver exited"
            print(f"[stack] {why}; restarting tritonserver", file=sys.stderr)
            with self._restarting:
                self.model_restarts += 1
                self.start_triton()

    def _idle_while_triton_runs(self, seconds: float) -> bool:
        """The model watch's pause: True (stop watching) once stopping or tritonserver exited."""
        return self._watch_stop.wait(seconds) or self.triton.poll() is not None

    def running(self) -> bool:
        """Both servers run; a tritonserver the model watch is replacing counts as running."""
        with self._restarting:
            watched = self._watch is not None and self._watch.is_alive()
            return self.proxy.poll() is None and (watched or self.triton.poll() is None)

    def start_proxy(self) -> None:
        """The proxy alone: in front of this stack's tritonserver, or (started this way
        only) of tritonservers its --triton-url names."""
        self.proxy = self._spawn(proxy_command(self.config), self.proxy_log, stack_env(self.config))

    def start_triton(self) -> None:
        """(Re)start tritonserver on the configured ports; the proxy reconnects by itself.
        What is left of a previous tritonserver's group (its stubs) is ended first."""
        if self.triton is not None:
            end_process_group(self.triton)
        self.triton = self._spawn(
            triton_command(self.config), self.triton_log, stack_env(self.config)
        )

    def _spawn(self, cmd, log_path: Path, env) -> subprocess.Popen:
        with open(log_path, "ab", buffering=0) as log:
            return subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def wait_ready(self, timeout: float = 300.0, progress=None) -> None:
        """Until the proxy's /ready is 200 (which means Triton has the model loaded); with
        lazy loading, until the proxy's /health is 200 (the first request loads the model).
        An answer counts only once this stack's own processes hold the ports it came through,
        never another server's that answers there."""
        probe = "/health" if self.config.lazy_load else "/ready"
        deadline = time.monotonic() + timeout
        started = time.monotonic()
        while time.monotonic() < deadline:
            for name, proc, log in (
                ("tritonserver", self.triton, self.triton_log),
                ("proxy", self.proxy, self.proxy_log),
            ):
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}; log:\n{_tail(log)}")
            triton = _get_status(f"{self.config.triton_http_url}/v2/models/{TRITON_MODEL}/ready")
            proxy = _get_status(f"{self.config.proxy_url}{probe}")
            if progress:
                progress(time.monotonic() - started, triton == 200, proxy == 200)
            if proxy == 200 and self._listening_itself():
                self._was_ready = True
                return
            time.sleep(0.5)
        raise TimeoutError(
            f"stack not ready after {timeout:.0f}s; triton log:\n{_tail(self.triton_log)}"
        )

    def _listening_itself(self) -> bool:
        """Whether the proxy's port is this stack's proxy's and Triton's gRPC port (the one
        the proxy asks) this stack's tritonserver's, when it started one."""
        if not group_listens_on(self.proxy.pid, self.config.proxy_port):
            return False
        return self.triton is None or group_listens_on(self.triton.pid, self.config.grpc_port)

    def stop(self, timeout: float = 40.0) -> None:
        """SIGTERM to both (the proxy drains, Triton unloads the model), then whatever is left
        of either process group, stubs included, is killed."""
        self._watch_stop.set()
        if self._watch is not None:
            self._watch.join()
        started = [proc for proc in (self.proxy, self.triton) if proc is not None]
        for proc in started:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in started:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
            end_process_group(proc)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _progress_line(elapsed: float, triton_ready: bool, proxy_ready: bool) -> None:
    state = "model loaded, waiting for proxy" if triton_ready else "loading model in tritonserver"
    print(f"\r[serve] {state} ... {elapsed:5.0f}s", end="", file=sys.stderr, flush=True)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def parse_args(argv=None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(description="Serve Qwen2.5-VL: tritonserver + OpenAI proxy.")
    parser.add_argument(
        "--model",
        default=env("QWEN_VL_MODEL"),
        help="HF id or local path (env QWEN_VL_MODEL); default: the 7B from the hub, "
        "or a tiny random checkpoint when the hub is unreachable",
    )
    parser.add_argument(
        "--host",
        default=env("SERVE_HOST", "0.0.0.0"),
        help="address both servers bind (env SERVE_HOST)",
    )
    parser.add_argument("--proxy-port", type=int, default=int(env("PROXY_PORT", "9000")))
    parser.add_argument("--http-port", type=int, default=int(env("TRITON_HTTP_PORT", "8000")))
    parser.add_argument("--grpc-port", type=int, default=int(env("TRITON_GRPC_PORT", "8001")))
    parser.add_argument("--metrics-port", type=int, default=int(env("TRITON_METRICS_PORT", "8002")))
    parser.add_argument(
        "--ready-timeout",
        type=float,
        default=float(env("SERVE_READY_TIMEOUT", "1800")),
        help="seconds to wait for the model to load (a 7B download takes a while)",
    )
    parser.add_argument(
        "--lazy-load",
        action=argparse.BooleanOptionalAction,
        default=env("SERVE_LAZY_LOAD", "").strip().lower() in ("1", "true", "yes", "on"),
        help="start Triton with no model loaded; the first chat request loads it "
        "(env SERVE_LAZY_LOAD)",
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    config = StackConfig(
        model="",
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        proxy_port=args.proxy_port,
        lazy_load=args.lazy_load,
        watch_model=True,
    )
    taken = config.ports_taken()
    if taken:  # before anything starts: its readiness would be the other server's
        for sentence in taken:
            print(f"[serve] {sentence}: stop what holds it or pick another port", file=sys.stderr)
        return 2
    config.model, why = choose_model(args.model)
    print(f"[serve] model: {config.model} ({why})", file=sys.stderr)
    stack = Stack(config)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        stack.start()
        print(f"[serve] logs: {stack.triton_log} {stack.proxy_log}", file=sys.stderr)
        stack.wait_ready(args.ready_timeout, _progress_line)
        print(
            f"\n[serve] ready\n"
            f"  OpenAI API      {config.proxy_url}/v1/chat/completions\n"
            f"  Triton HTTP     {config.triton_http_url}   gRPC {config.triton_grpc_url}\n"
            f"  Triton metrics  http://{_connect_host(config.host)}:{config.metrics_port}/metrics\n"
            f"[serve] Ctrl-C stops both",
            file=sys.stderr,
        )
        while stack.running():
            time.sleep(1)
        print("[serve] a server exited; stopping", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\n[serve] stopping", file=sys.stderr)
        return 0
    except (RuntimeError, TimeoutError) as err:
        print(f"\n[serve] {err}", file=sys.stderr)
        return 1
    finally:
        # A second Ctrl-C or SIGTERM must not cut the stop short and leave servers behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stack.stop()


if __name__ == "__main__":
    sys.exit(main())
