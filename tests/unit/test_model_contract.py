"""The error contract between the model and the proxy: one text, two copies, round trips."""

from pathlib import Path

import pytest

from proxy import model_contract as proxy_side
from qwen_vl_backend import contract as model_side

ROOT = Path(__file__).resolve().parents[2]


def test_the_proxy_and_the_model_carry_the_same_contract():
    model_copy = ROOT / "model_repository/qwen2_5_vl/1/qwen_vl_backend/contract.py"
    assert (ROOT / "proxy/model_contract.py").read_bytes() == model_copy.read_bytes()


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
