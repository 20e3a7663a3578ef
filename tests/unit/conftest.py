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


# PEFT module-name patterns of the test adapters (tests/unit/test_lora.py): the text layers'
# projections, and those plus the vision blocks' and the merger's linears.
LORA_TEXT = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"
LORA_TEXT_VISION = (
    r".*(language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    r"|visual\.blocks.*\.(qkv|proj|gate_proj|up_proj|down_proj)|visual\.merger\.mlp\.(0|2))$"
)
# name → (target_modules, r, lora_alpha, use_rslora, seed)
LORA_ADAPTERS = {
    "text": (LORA_TEXT, 4, 8, False, 1),
    "vision": (LORA_TEXT_VISION, 8, 16, True, 2),
    "qv": (["q_proj", "v_proj"], 2, 4, False, 3),
    "mlp": (r".*language_model.*\.(gate_proj|up_proj|down_proj)$", 4, 4, False, 4),
    "wide": (LORA_TEXT, 16, 16, False, 5),  # above the tests' max_lora_rank
    "patch": (r".*visual\.patch_embed\.proj$", 4, 4, False, 6),  # a module not served
}


@pytest.fixture(scope="session")
def lora_adapters(tmp_path_factory, tiny_checkpoint_path):
    """{name: directory} of random PEFT adapters on the tiny checkpoint (seeded, B non-zero:
    init_lora_weights=False draws both A and B), saved by PEFT itself."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2_5_VLForConditionalGeneration

    root = tmp_path_factory.mktemp("loras")
    made = {}
    for name, (targets, rank, alpha, rslora, seed) in LORA_ADAPTERS.items():
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            tiny_checkpoint_path, dtype=torch.float32
        )
        torch.manual_seed(seed)
        config = LoraConfig(
            r=rank,
            lora_alpha=alpha,
            use_rslora=rslora,
            target_modules=targets,
            init_lora_weights=False,
        )
        get_peft_model(model, config).save_pretrained(root / name)
        made[name] = root / name
    return made
