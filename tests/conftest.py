"""Fixtures shared by every tier: the tiny checkpoint. pytest.ini puts the repository root,
scripts/ and the model's helper modules on the path."""

import pytest
import stack


@pytest.fixture(scope="session")
def tiny_checkpoint_path() -> str:
    """The locally built random-weight Qwen2.5-VL (cached after the first build)."""
    return stack.tiny_checkpoint()
