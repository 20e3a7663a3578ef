"""A real tritonserver with the tiny checkpoint behind the real proxy, once per session; it
starts loading as soon as collection is over, while the tiers before run, and stops right
after the last test that uses it (tests/held_servers.py)."""

import contextlib

import pytest
from held_servers import server_fixture
from otlp_receiver import OtlpReceiver
from stacks import ADMIN_KEY, running_stack, tiny_checkpoint, wait_for_stops


@pytest.fixture(scope="session", autouse=True)
def stacks_stopped_behind():
    """Set up before every stack fixture, so torn down after them: the stacks the modules
    stopped behind (running_stack's stop_behind) are gone before the session ends."""
    yield
    wait_for_stops()


@contextlib.contextmanager
def session_stack(tmp_path_factory):
    # Test-only: lets the proxy fetch images the tests serve on 127.0.0.1. Traces go to the
    # session's receiver, roots sampled never: only a request whose traceparent says sampled
    # is traced (test_tracing_e2e.py), so the other tests' requests cost a context each.
    # Triton's own tracing is set up but OFF; the tracing test turns it on for its request.
    # LoRA adapters load at run time from lora_root, through the admin endpoints
    # (test_loras_e2e.py); no adapter is declared, so every other test runs on the base weights.
    lora_root = tmp_path_factory.mktemp("lora_root")
    with OtlpReceiver() as receiver:
        endpoint = receiver.endpoint
        with running_stack(
            tiny_checkpoint(),
            proxy_args=["--image-fetch-allow-private-hosts", "127.0.0.1"]
            + ["--trace-otlp-endpoint", endpoint, "--trace-sample-ratio", "0"]
            + ["--admin-api-key", ADMIN_KEY],
            triton_args=[
                *("--trace-config", "mode=opentelemetry", "--trace-config", "level=OFF"),
                *("--trace-config", f"opentelemetry,url={endpoint}/v1/traces"),
                *("--trace-config", "opentelemetry,bsp_schedule_delay=200"),
            ],
            extra_env={
                "QWEN_VL_OTLP_TRACES_ENDPOINT": endpoint,
                "QWEN_VL_TRACE_SAMPLE_RATIO": "0",
                "OTEL_BSP_SCHEDULE_DELAY": "200",  # ms between exports (5000 by default)
                "QWEN_VL_LORA_ROOTS": str(lora_root),
            },
        ) as running:
            running.otlp_receiver, running.lora_root = receiver, lora_root
            yield running


stack = server_fixture("stack", session_stack, ahead=True)


@pytest.fixture(scope="session")
def otlp_receiver(stack):
    """Where the session stack's proxy and model send their traces (tests/otlp_receiver.py)."""
    return stack.otlp_receiver


@pytest.fixture(scope="session")
def base_url(stack) -> str:
    return stack.config.proxy_url
