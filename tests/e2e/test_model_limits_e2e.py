"""The real model, through a real tritonserver, describes the limits it enforces: its settings
from config.pbtxt with the stack's QWEN_VL_* environment applied (what the proxy adopts)."""

import dataclasses
from pathlib import Path

from helpers import config_pbtxt_parameters
from stacks import stack_launcher

from proxy.transport.backend import TritonBackend
from proxy.transport.contract import ModelLimits
from qwen_vl_backend.settings import ModelSettings

MODEL_CONFIG = Path(__file__).resolve().parents[2] / "model_repository/qwen2_5_vl/config.pbtxt"


async def test_the_model_describes_the_limits_it_enforces(stack):
    backend = TritonBackend(stack.config.triton_grpc_url)
    try:
        described = await backend.describe("qwen2_5_vl")
    finally:
        await backend.close()
    settings = ModelSettings.from_parameters(
        config_pbtxt_parameters(MODEL_CONFIG), env=stack_launcher.stack_env(stack.config)
    )
    assert described is not None and described.context_length > 0
    expected = settings.limits(context_length=described.context_length)
    assert described == ModelLimits(**dataclasses.asdict(expected))
