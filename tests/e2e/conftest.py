"""A real tritonserver with the tiny checkpoint behind the real proxy, once per session."""

import pytest
from stacks import running_stack


@pytest.fixture(scope="session")
def stack(tiny_checkpoint_path):
    # Test-only: lets the proxy fetch images the tests serve on 127.0.0.1.
    with running_stack(
        tiny_checkpoint_path, proxy_args=["--image-fetch-allow-private-hosts", "127.0.0.1"]
    ) as running:
        yield running


@pytest.fixture(scope="session")
def base_url(stack) -> str:
    return stack.config.proxy_url
