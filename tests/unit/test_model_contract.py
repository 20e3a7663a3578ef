"""The contract between the model and the proxy (tensor names, limits, errors): one text, two
copies, round trips, and config.pbtxt in agreement."""

import dataclasses
import re
from pathlib import Path

import pytest
from helpers import config_pbtxt_parameters, data_url
from sample_images import encoded_image

from proxy.request.schema import parse_chat_request
from proxy.request.translate import ServerLimits, prepare_chat
from proxy.transport import contract as proxy_side
from qwen_vl_backend import contract as model_side
from qwen_vl_backend.errors import RequestError
from qwen_vl_backend.request.chat import parse_messages
from qwen_vl_backend.settings import ModelSettings

ROOT = Path(__file__).resolve().parents[2]
PNG = encoded_image("PNG", size=(8, 6))
BROKEN = data_url(b"\xff\xd8\xff not really a JPEG", "image/jpeg")


def image_url_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def test_the_proxy_and_the_model_carry_the_same_contract():
    model_copy = ROOT / "model_repository/qwen2_5_vl/1/qwen_vl_backend/contract.py"
    assert (ROOT / "proxy/transport/contract.py").read_bytes() == model_copy.read_bytes()


@pytest.mark.parametrize("kind", model_side.ERROR_KINDS)
def test_an_error_the_model_encodes_decodes_on_the_proxy_side(kind):
    sent = model_side.ModelError(
        kind, "größer als 40 MP", "messages[0].content[1]", "image_too_large"
    )
    assert proxy_side.decode_error(sent.encode()) == proxy_side.ModelError(
        kind, "größer als 40 MP", "messages[0].content[1]", "image_too_large"
    )


@pytest.mark.parametrize(
    "text",
    [
        "Request for unknown model: 'x' is not found",  # Triton's own words
        "qwen_vl_error: not json",
        'qwen_vl_error: {"kind": "tea", "message": "x"}',
        'qwen_vl_error: ["internal"]',
    ],
)
def test_other_texts_are_not_model_errors(text):
    assert proxy_side.decode_error(text) is None


MODEL_CONFIG = ROOT / "model_repository/qwen2_5_vl/config.pbtxt"


def _pbtxt_names(section: str) -> list[str]:
    """The tensor names of config.pbtxt's `input [...]` or `output [...]` block."""
    text = MODEL_CONFIG.read_text()
    block = re.search(rf"^{section} \[(.*?)^\]", text, re.S | re.M)
    assert block is not None
    return re.findall(r'name: "([a-z_]+)"', block[1])


def test_config_pbtxt_declares_the_contracts_tensors():
    assert tuple(_pbtxt_names("input")) == model_side.INPUTS
    assert tuple(_pbtxt_names("output")) == model_side.OUTPUTS


def test_config_pbtxt_parameters_are_the_settings_defaults():
    """config.pbtxt restates every default (operators read and edit it there); they agree."""
    written = config_pbtxt_parameters(MODEL_CONFIG)
    defaults = ModelSettings()
    assert set(written) == {field.name for field in dataclasses.fields(ModelSettings)}
    assert ModelSettings.from_parameters(written, env={}) == defaults


def test_the_settings_defaults_are_the_contracts_limits():
    assert ModelSettings().limits() == model_side.ModelLimits()


def test_limits_round_trip_with_environment_overrides_applied():
    settings = ModelSettings.from_parameters(
        {"max_images": "16"}, env={"QWEN_VL_MAX_IMAGES": "4", "QWEN_VL_MAX_PIXELS": "200704"}
    )
    sent = settings.limits(context_length=32768)
    received = proxy_side.ModelLimits.decode(sent.encode())
    assert received == proxy_side.ModelLimits(max_images=4, max_pixels=200704, context_length=32768)


def test_choices_are_capped_by_the_slots():
    assert ModelSettings(max_choices=8, max_batch_size=2).limits().max_choices == 2


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"max_images": 3, "new_field": 1}', proxy_side.ModelLimits(max_images=3)),
        ('{"max_images": "3", "max_tokens": -1, "min_pixels": true}', proxy_side.ModelLimits()),
        ("[]", None),
        ("not json", None),
    ],
)
def test_limits_from_older_newer_or_broken_models(text, expected):
    assert proxy_side.ModelLimits.decode(text) == expected


def test_the_model_names_the_clients_image_part_in_what_the_proxy_sends():
    """The proxy keeps message and part indices, so the model's `param` is the client's path."""
    body = {
        "messages": [
            {"role": "user", "content": [image_url_part(data_url(PNG))]},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": [{"type": "text", "text": "and"}, image_url_part(BROKEN)]},
        ]
    }
    prepared = prepare_chat(parse_chat_request(body), ServerLimits())
    request = prepared.to_triton("qwen2_5_vl", [PNG, b"\xff\xd8\xff not really a JPEG"])
    with pytest.raises(RequestError) as raised:
        parse_messages(request.messages_json, request.media["image"])
    assert raised.value.param == prepared.media[1].param == "messages[2].content[1].image_url"
