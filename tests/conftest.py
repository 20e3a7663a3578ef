"""Fixtures shared by every tier: the tiny checkpoint and the model helper modules' path."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_checkpoint_path() -> str:
    """The locally built random-weight Qwen2.5-VL (cached after the first build)."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "build_tiny_checkpoint.py")],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip().splitlines()[-1]
