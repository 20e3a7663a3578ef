"""A real tritonserver with the tiny checkpoint behind the real proxy, once per session."""

import pytest
from stacks import running_stack, wait_for_stops


@pytest.fixture(scope="session", autouse=True)
def stacks_stopped_behind():
    """Set up before every stack fixture, so torn down after them: the stacks the modules
    stopped behind are gone before the session ends."""
    yield
    wait_for_stops()


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
