"""A real tritonserver with the tiny checkpoint behind the real proxy, once per session; it
starts loading as soon as collection is over, while the tiers before run, and stops right
after the last test that uses it (tests/held_servers.py)."""

import pytest
from held_servers import server_fixture
from stacks import running_stack, tiny_checkpoint, wait_for_stops


@pytest.fixture(scope="session", autouse=True)
def stacks_stopped_behind():
    """Set up before every stack fixture, so torn down after them: the stacks the modules
    stopped behind (running_stack's stop_behind) are gone before the session ends."""
    yield
    wait_for_stops()


def session_stack(tmp_path_factory):
    # Test-only: lets the proxy fetch images the tests serve on 127.0.0.1.
    return running_stack(
        tiny_checkpoint(), proxy_args=["--image-fetch-allow-private-hosts", "127.0.0.1"]
    )


stack = server_fixture("stack", session_stack, ahead=True)


@pytest.fixture(scope="session")
def base_url(stack) -> str:
    return stack.config.proxy_url
