"""Starting whole stacks (tritonserver + proxy) of the tests' own on loopback."""

import contextlib

import stack as stack_launcher  # scripts/stack.py


@contextlib.contextmanager
def running_stack(model: str, ready_timeout: float = 240, **overrides):
    """A stack of its own on free loopback ports, with fresh logs, stopped on exit."""
    running = stack_launcher.Stack(stack_launcher.loopback_config(model, **overrides))
    for log in (running.triton_log, running.proxy_log):
        log.unlink(missing_ok=True)
    try:
        running.start()
        running.wait_ready(timeout=ready_timeout)
        yield running
    finally:
        running.stop()
