"""A real tritonserver with the tiny checkpoint behind the real proxy, once per session."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import stack as stack_launcher  # noqa: E402


@pytest.fixture(scope="session")
def stack(tiny_checkpoint_path):
    config = stack_launcher.StackConfig(
        model=tiny_checkpoint_path, host="127.0.0.1",
        http_port=stack_launcher.free_port(), grpc_port=stack_launcher.free_port(),
        metrics_port=stack_launcher.free_port(), proxy_port=stack_launcher.free_port(),
        # Test-only: lets the proxy fetch images the tests serve on 127.0.0.1.
        proxy_args=["--image-fetch-allow-private-hosts", "127.0.0.1"],
    )
    running = stack_launcher.Stack(config)
    for log in (running.triton_log, running.proxy_log):
        log.unlink(missing_ok=True)
    running.start()
    try:
        running.wait_ready(timeout=240)
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="session")
def base_url(stack) -> str:
    return stack.config.proxy_url
