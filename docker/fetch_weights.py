"""Put the checkpoint that the Triton model will load into the Hugging Face cache, then exit.

Run by the `fetch-weights` service of docker/compose.yaml before `triton` starts. Triton sits on
an internal network with no route to the hub, so the weights must already be in the shared
HF cache volume (HF_HOME) when it loads the model with HF_HUB_OFFLINE=1.

The checkpoint is QWEN_VL_MODEL, else the `model` parameter of the model's config.pbtxt:
- a local directory (offline weights mounted into the container): checked, nothing to fetch;
- a hub id: downloaded into HF_HOME (a no-op when already complete); with HF_HUB_OFFLINE=1
  only checked against the cache, for hosts whose cache volume was filled beforehand.

Exit status 0 when the checkpoint is ready to load, 1 otherwise (with the reason on stderr).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

MODEL_REPOSITORY = "/models"
MODEL_NAME = "qwen2_5_vl"
_TRUE = {"1", "true", "yes", "on"}


def configured_model(env, repository: str = MODEL_REPOSITORY, model_name: str = MODEL_NAME) -> str:
    """QWEN_VL_MODEL, else the `model` parameter of config.pbtxt."""
    model = (env.get("QWEN_VL_MODEL") or "").strip()
    if model:
        return model
    config = Path(env.get("TRITON_MODEL_REPOSITORY") or repository) / model_name / "config.pbtxt"
    match = re.search(
        r'key:\s*"model"\s*value:\s*\{\s*string_value:\s*"([^"]*)"', config.read_text()
    )
    if not match or not match.group(1):
        raise ValueError(f"no QWEN_VL_MODEL and no `model` parameter in {config}")
    return match.group(1)


def is_local_path(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~")) or Path(model).is_dir()


def ensure_checkpoint(model: str, offline: bool, download: Callable[..., str]) -> str:
    """Where the checkpoint is (a directory), downloading it unless offline; raises if missing."""
    if is_local_path(model):
        path = Path(model).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{model} is not a checkpoint directory (no config.json): mount the weights there"
            )
        return str(path)
    return download(repo_id=model, local_files_only=offline)


def main() -> int:
    env = os.environ
    try:
        model = configured_model(env)
        offline = (env.get("HF_HUB_OFFLINE") or "").strip().lower() in _TRUE
        if not is_local_path(model):
            print(
                f"fetch_weights: {'checking the cache for' if offline else 'fetching'} {model} "
                f"into {env.get('HF_HOME', '~/.cache/huggingface')}",
                file=sys.stderr,
                flush=True,
            )
        from huggingface_hub import snapshot_download  # the model image has it (transformers)

        path = ensure_checkpoint(model, offline, snapshot_download)
    except Exception as exc:  # noqa: BLE001 - one readable line for the compose logs, then exit 1
        print(
            f"fetch_weights: {model if 'model' in locals() else 'checkpoint'} is not available: "
            f"{type(exc).__name__}: {exc}",
            file=sys.stderr,
            flush=True,
        )
        return 1
    print(f"fetch_weights: ready: {path}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
