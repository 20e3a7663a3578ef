"""Start tritonserver, optionally with the instance_group set from the environment.

    python3 triton_launch.py tritonserver --model-repository=/models [tritonserver flags...]

Triton reads `instance_group` only from `config.pbtxt`; it has no environment override. So that
a deployment can scale instances without rebuilding the image, this launcher reads

    TRITON_INSTANCE_COUNT   instances per GPU (KIND_GPU / KIND_AUTO with GPUs) or in all (KIND_CPU)
    TRITON_INSTANCE_KIND    KIND_GPU, KIND_CPU, KIND_AUTO or KIND_MODEL (also gpu, cpu, auto, model;
                            KIND_MODEL: one instance that places itself, e.g. with QWEN_VL_DEVICE_MAP)

When neither is set it execs the command unchanged, and the model repository baked into the
image (/models, root-owned, read-only to the server user) is used as it is. When either is set
it copies the repository to TRITON_RUNTIME_REPOSITORY (default /tmp/model_repository), replaces
each model's `instance_group [...]` with one group, points `--model-repository` at the copy and
execs. Everything else in `config.pbtxt` (parameters included) is left as it is; model
parameters already have their own environment overrides (QWEN_VL_<NAME>).

Before it execs, it forks the model watch (model_probe.py `watch`): Triton 2.51 never restarts
a decoupled model's Python-backend stub that died (the OOM killer, a crash in native code) and
keeps calling the model ready, so when the model answers its `describe` request with an error
twice within four questions the watch ends tritonserver, and the container's restart policy
(Kubernetes; Compose's `restart: unless-stopped`) starts a fresh one that loads the model again.

    TRITON_WATCH_MODEL      the model the watch asks (default qwen2_5_vl); "off" or empty: no watch

Standard library only: it runs under the Triton image's system python3 before anything else.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

KINDS = ("KIND_AUTO", "KIND_GPU", "KIND_CPU", "KIND_MODEL")
REPOSITORY_FLAGS = ("--model-repository", "--model-store")
DEFAULT_RUNTIME_REPOSITORY = "/tmp/model_repository"
DEFAULT_WATCHED_MODEL = "qwen2_5_vl"
_OFF = ("", "0", "off", "false", "no")


class LaunchError(ValueError):
    pass


def instance_override(env) -> tuple[int | None, str | None] | None:
    """(count, kind) from the environment; None when neither variable is set."""
    raw_count = (env.get("TRITON_INSTANCE_COUNT") or "").strip()
    raw_kind = (env.get("TRITON_INSTANCE_KIND") or "").strip()
    if not raw_count and not raw_kind:
        return None
    count = None
    if raw_count:
        if not raw_count.isdigit() or int(raw_count) < 1:
            raise LaunchError(
                f"TRITON_INSTANCE_COUNT must be a positive integer, got {raw_count!r}"
            )
        count = int(raw_count)
    kind = None
    if raw_kind:
        kind = raw_kind.upper()
        if not kind.startswith("KIND_"):
            kind = "KIND_" + kind
        if kind not in KINDS:
            raise LaunchError(
                f"TRITON_INSTANCE_KIND must be one of {', '.join(KINDS)}, got {raw_kind!r}"
            )
    return count, kind


def _block_end(text: str, open_index: int) -> int:
    """Index just past the `]` matching the `[` at open_index (strings and comments skipped)."""
    depth, i, n = 0, open_index, len(text)
    while i < n:
        ch = text[i]
        if ch == '"':
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
        elif ch == "#":
            while i < n and text[i] != "\n":
                i += 1
        elif ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    raise LaunchError("unbalanced brackets in instance_group")


_INSTANCE_GROUP = re.compile(r"^[ \t]*instance_group\s*:?\s*\[", re.MULTILINE)


def rewrite_instance_group(config_text: str, count: int | None, kind: str | None) -> str:
    """config.pbtxt text with its instance_group replaced by one group of `count` x `kind`.

    An unset count or kind keeps the value of the first existing group (Triton's defaults,
    1 and KIND_AUTO, when there is none). A `gpus: [...]` list is kept for KIND_GPU.
    """
    match = _INSTANCE_GROUP.search(config_text)
    old = ""
    if match:
        start, end = match.start(), _block_end(config_text, match.end() - 1)
        old = config_text[start:end]
    old_count = re.search(r"\bcount\s*:\s*(\d+)", old)
    old_kind = re.search(r"\bkind\s*:\s*(KIND_[A-Z]+)", old)
    old_gpus = re.search(r"\bgpus\s*:\s*\[[^\]]*\]", old)
    count = count if count is not None else int(old_count.group(1)) if old_count else 1
    kind = kind or (old_kind.group(1) if old_kind else "KIND_AUTO")
    fields = [f"count: {count}", f"kind: {kind}"]
    if kind == "KIND_GPU" and old_gpus:
        fields.append(old_gpus.group(0))
    group = "instance_group [ { " + ", ".join(fields) + " } ]"
    if not match:
        return config_text.rstrip("\n") + "\n\n" + group + "\n"
    return config_text[:start] + group + config_text[end:]


def render_repository(source: Path, target: Path, count: int | None, kind: str | None) -> list[str]:
    """Copy the model repository to `target` with every model's instance_group rewritten."""
    if target.resolve() == source.resolve():
        raise LaunchError("TRITON_RUNTIME_REPOSITORY must differ from the model repository")
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    lines = []
    for config in sorted(target.glob("*/config.pbtxt")):
        text = rewrite_instance_group(config.read_text(), count, kind)
        config.write_text(text)
        group = _INSTANCE_GROUP.search(text)
        lines.append(
            f"{config.parent.name}: {text[group.start() : _block_end(text, group.end() - 1)].strip()}"
        )
    return lines


def split_repository_flag(argv: list[str]) -> tuple[int, str, str] | None:
    """(index, prefix, path) of the model repository flag in argv, if there is exactly one:
    argv[index] == prefix + path."""
    found = []
    for i, arg in enumerate(argv):
        for flag in REPOSITORY_FLAGS:
            if arg.startswith(flag + "="):
                found.append((i, flag + "=", arg[len(flag) + 1 :]))
            elif arg == flag and i + 1 < len(argv):
                found.append((i + 1, "", argv[i + 1]))
    if len(found) > 1:
        raise LaunchError("only one --model-repository is supported with TRITON_INSTANCE_*")
    return found[0] if found else None


def plan(argv: list[str], env) -> tuple[list[str], list[str]]:
    """The command to exec and the log lines to print, rendering the repository if asked."""
    if not argv:
        raise LaunchError("usage: triton_launch.py tritonserver --model-repository=DIR [flags...]")
    override = instance_override(env)
    if override is None:
        return argv, []
    found = split_repository_flag(argv)
    if found is None:
        raise LaunchError("TRITON_INSTANCE_* is set but the command has no --model-repository")
    index, prefix, source = found
    target = Path(env.get("TRITON_RUNTIME_REPOSITORY") or DEFAULT_RUNTIME_REPOSITORY)
    lines = render_repository(Path(source), target, *override)
    argv = list(argv)
    argv[index] = prefix + str(target)
    return argv, [f"model repository {source} -> {target}"] + lines


def _flag(argv: list[str], name: str) -> str | None:
    """The value of `--name=value` or `--name value` in argv (the last one), or None."""
    value = None
    for i, arg in enumerate(argv):
        if arg.startswith(name + "="):
            value = arg[len(name) + 1 :]
        elif arg == name and i + 1 < len(argv):
            value = argv[i + 1]
    return value


def watch_target(argv: list[str], env) -> tuple[str, str] | None:
    """(Triton HTTP url, model) for the model watch; None when TRITON_WATCH_MODEL turns it off
    or the command serves no HTTP."""
    model = env.get("TRITON_WATCH_MODEL", DEFAULT_WATCHED_MODEL).strip()
    if model.lower() in _OFF:
        return None
    if (_flag(argv, "--allow-http") or "true").lower() in ("false", "0", "no", "off"):
        return None
    host = _flag(argv, "--http-address") or "127.0.0.1"
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{_flag(argv, '--http-port') or 8000}", model


def start_model_watch(url: str, model: str) -> None:
    """Forks the watch; this process (tritonserver once exec'd: the same pid) goes on. When
    the model died it SIGKILLs tritonserver (nothing of the dead model can drain; SIGTERM
    would wait --exit-timeout-secs for an unload that never ends), or SIGTERMs it when it is
    the container's init (pid 1 ignores SIGKILL from inside its namespace)."""
    server = os.getpid()
    if os.fork():
        return
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import model_probe

        def server_gone(seconds: float) -> bool:
            time.sleep(seconds)
            return os.getppid() != server

        if model_probe.watch(url, model, server_gone):
            print(
                f"triton_launch: model {model} died (its process is gone); ending tritonserver "
                "so that a fresh one is started",
                file=sys.stderr,
                flush=True,
            )
            os.kill(server, signal.SIGTERM if server == 1 else signal.SIGKILL)
    finally:
        os._exit(0)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        command, lines = plan(argv, os.environ)
    except (LaunchError, OSError) as exc:
        print(f"triton_launch: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from exc
    for line in lines:
        print(f"triton_launch: {line}", file=sys.stderr, flush=True)
    target = watch_target(command, os.environ)
    if target is not None:
        start_model_watch(*target)
    # exec: tritonserver replaces this process and receives SIGTERM from `docker stop` directly.
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
