import json

import pytest

from qwen_vl_backend.contract import ERROR_PREFIX
from qwen_vl_backend.errors import RequestError
from qwen_vl_backend.request.params import parse_sampling_parameters


def test_empty_means_defaults():
    params = parse_sampling_parameters(None)
    assert params.max_tokens is None and params.stop == () and not params.greedy


def test_fields_are_parsed_and_stop_becomes_a_tuple():
    params = parse_sampling_parameters(
        json.dumps(
            {
                "max_tokens": 7,
                "temperature": 0,
                "top_p": 0.5,
                "top_k": 3,
                "seed": 42,
                "stop": "END",
                "repetition_penalty": 1.1,
                "unknown_key": 1,
            }
        )
    )
    assert (params.max_tokens, params.top_p, params.top_k, params.seed) == (7, 0.5, 3, 42)
    assert params.greedy and params.stop == ("END",) and params.repetition_penalty == 1.1


@pytest.mark.parametrize(
    "raw, param",
    [
        ("not json", "sampling_parameters"),
        ("[1]", "sampling_parameters"),
        ('{"max_tokens": 0}', "max_tokens"),
        ('{"max_tokens": -5}', "max_tokens"),
        ('{"max_tokens": 1.5}', "max_tokens"),
        ('{"max_tokens": "10"}', "max_tokens"),
        ('{"temperature": 3}', "temperature"),
        ('{"temperature": true}', "temperature"),
        ('{"top_p": 0}', "top_p"),
        ('{"stop": [1, 2]}', "stop"),
        ('{"stop": ' + json.dumps(["x"] * 17) + "}", "stop"),
    ],
)
def test_invalid_values_are_request_errors_naming_the_field(raw, param):
    with pytest.raises(RequestError) as err:
        parse_sampling_parameters(raw)
    assert err.value.param == param
    assert err.value.model_error().encode().startswith(ERROR_PREFIX)
