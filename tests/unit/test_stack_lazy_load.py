"""scripts/stack.py's lazy-load switch: Triton in explicit model control, the proxy told so,
and the flag with its SERVE_LAZY_LOAD fallback."""

import pytest
import stack


@pytest.fixture(autouse=True)
def fake_tritonserver(monkeypatch):
    monkeypatch.setattr(stack, "find_tritonserver", lambda: ("/opt/tritonserver", None))
    monkeypatch.delenv("SERVE_LAZY_LOAD", raising=False)


def test_lazy_load_adds_explicit_model_control_and_the_proxy_flag():
    config = stack.StackConfig(model="m", lazy_load=True, proxy_args=["--log-level", "DEBUG"])
    assert "--model-control-mode=explicit" in stack.triton_command(config)
    command = stack.proxy_command(config)
    assert "--lazy-load" in command and command[-2:] == ["--log-level", "DEBUG"]


def test_eager_by_default():
    config = stack.StackConfig(model="m")
    assert not any("model-control-mode" in arg for arg in stack.triton_command(config))
    assert "--lazy-load" not in stack.proxy_command(config)


@pytest.mark.parametrize(
    "argv, env, expected",
    [
        ([], None, False),
        (["--lazy-load"], None, True),
        ([], "true", True),
        ([], "0", False),
        (["--no-lazy-load"], "1", False),
    ],
)
def test_flag_and_environment(monkeypatch, argv, env, expected):
    if env is not None:
        monkeypatch.setenv("SERVE_LAZY_LOAD", env)
    assert stack.parse_args(argv).lazy_load is expected
