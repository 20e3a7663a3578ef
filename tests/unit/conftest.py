"""Fixtures the engine tests share: the tiny checkpoint loaded once per module, and engines
made with settings overrides and shut down after each test. A module that loads its checkpoint
differently defines its own `checkpoint`, which takes precedence here."""

import dataclasses

import pytest

from qwen_vl_backend.engine.batching import BatchingEngine
from qwen_vl_backend.modeling.checkpoint import load_checkpoint
from qwen_vl_backend.settings import ModelSettings


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint_path):
    return load_checkpoint(tiny_checkpoint_path, "cpu", "float32")


@pytest.fixture
def make_engine(checkpoint):
    """`make_engine(**settings)`: a BatchingEngine with those ModelSettings fields replaced."""
    engines = []

    def make(**settings):
        engines.append(BatchingEngine(checkpoint, dataclasses.replace(ModelSettings(), **settings)))
        return engines[-1]

    yield make
    for engine in engines:
        assert engine.shutdown(30)
