"""The device_map / max_memory settings (a model split over several GPUs) and how they reach
from_pretrained. No GPU runs here: the split itself is untested on GPUs (docs/deploy.md)."""

from __future__ import annotations

import pytest
import torch

from qwen_vl_backend.engine.kv_cache import SlotKVCache, StepLayout, layer_devices
from qwen_vl_backend.modeling import checkpoint as checkpoint_module
from qwen_vl_backend.modeling.checkpoint import load_checkpoint
from qwen_vl_backend.settings import ModelSettings


def test_device_map_is_off_by_default_and_one_device_as_before():
    settings = ModelSettings.from_parameters({"device_map": "", "max_memory": ""}, env={})
    assert settings.device_map == "" and settings.max_memory_map() is None
    assert settings.resolve_device("GPU", 1) == "cuda:1"
    assert settings.resolve_device("CPU", 0) == "cpu"


@pytest.mark.parametrize("strategy", ["auto", "balanced", "balanced_low_0", "sequential"])
def test_device_map_strategies_and_their_environment_override(strategy):
    settings = ModelSettings.from_parameters(
        {"device_map": ""}, env={"QWEN_VL_DEVICE_MAP": strategy}
    )
    assert settings.device_map == strategy
    # the map places the model over GPUs: bfloat16 by default, whatever the instance kind
    assert settings.resolve_device("MODEL", 0) == "cuda"
    assert settings.resolve_dtype(settings.resolve_device("MODEL", 0)) == "bfloat16"


def test_bad_device_map_names_the_parameter():
    with pytest.raises(ValueError, match=r"parameter device_map='everywhere'.*auto"):
        ModelSettings.from_parameters({"device_map": "everywhere"}, env={})


def test_max_memory_parses_into_the_dict_from_pretrained_takes():
    settings = ModelSettings.from_parameters(
        {"device_map": "auto", "max_memory": "0:75GiB, 1:75GiB,cpu:200GB"}, env={}
    )
    assert settings.max_memory_map() == {0: "75GiB", 1: "75GiB", "cpu": "200GB"}
    assert ModelSettings(device_map="auto", max_memory="0:80000000000").max_memory_map() == {
        0: "80000000000"
    }


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("0=75GiB", "expected <device>:<size>"),
        ("gpu0:75GiB", "neither a GPU index nor cpu"),
        ("0:lots", "not a number of bytes"),
        ("0:75GiB,0:70GiB", "given twice"),
        ("0:", "expected <device>:<size>"),
    ],
)
def test_bad_max_memory_names_the_parameter(value, why):
    with pytest.raises(ValueError, match=rf"parameter max_memory={value!r}: .*{why}"):
        ModelSettings.from_parameters({"device_map": "auto", "max_memory": value}, env={})


def test_max_memory_without_a_device_map_is_refused():
    with pytest.raises(ValueError, match="parameter max_memory=.*needs a device_map"):
        ModelSettings.from_parameters({"max_memory": "0:75GiB"}, env={})


class _Captured(Exception):
    pass


def test_load_checkpoint_hands_device_map_and_max_memory_to_from_pretrained(monkeypatch):
    from transformers import Qwen2_5_VLForConditionalGeneration

    seen = {}

    def capture(name, **kwargs):
        seen.update(kwargs, name=name)
        raise _Captured

    monkeypatch.setattr(Qwen2_5_VLForConditionalGeneration, "from_pretrained", capture)
    caps = ModelSettings(device_map="balanced", max_memory="0:75GiB,1:75GiB").max_memory_map()
    with pytest.raises(_Captured):
        load_checkpoint("some/model", "cuda", "bfloat16", device_map="balanced", max_memory=caps)
    assert seen["device_map"] == "balanced" and seen["max_memory"] == {0: "75GiB", 1: "75GiB"}
    assert seen["dtype"] == torch.bfloat16
    seen.clear()
    with pytest.raises(_Captured):
        load_checkpoint("some/model", "cuda:0", "bfloat16")
    assert "device_map" not in seen and "max_memory" not in seen  # one device: as before


def test_tiny_checkpoint_loads_through_a_device_map(tiny_checkpoint_path):
    # On a machine without GPUs accelerate maps every module to the CPU: the device_map path
    # (no .to(device); the device is the embeddings') end to end, on one device.
    loaded = load_checkpoint(tiny_checkpoint_path, "ignored", "float32", device_map="auto")
    assert loaded.device == checkpoint_module.input_device(loaded.model) == "cpu"
    # transformers sets hf_device_map only when the map spans several devices
    placed = getattr(loaded.model, "hf_device_map", {"": "cpu"})
    assert set(map(str, placed.values())) == {"cpu"}
    assert layer_devices(loaded.model) == [torch.device("cpu")] * len(
        loaded.model.model.language_model.layers
    )


def test_kv_cache_keeps_each_layer_next_to_its_weights():
    cache = SlotKVCache(2, 2, 8, 1, 4, torch.float32, ["cpu", "meta"])
    assert [k.device.type for k in cache.keys] == ["cpu", "meta"]
    layout = StepLayout([0, 1], [3, 2], [], "cpu")  # unequal lengths: a key mask
    assert layout.on(torch.device("cpu")) is layout
    moved = layout.on(torch.device("meta"))
    assert moved.token_slots.device.type == "meta" and moved.decode_view()[3].device.type == "meta"
    assert layout.on(torch.device("meta")) is moved and layout.token_slots.device.type == "cpu"
