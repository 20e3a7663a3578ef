"""Starting whole stacks (tritonserver + proxy) of the tests' own on loopback."""

import contextlib

import stack as stack_launcher  # scripts/stack.py

# Nothing runs when a test stack stops, so Triton's drain time after SIGTERM only matters when
# its shutdown sticks: Triton 2.51 in explicit model control (the lazy-load stack) now and then
# never unloads the model and waits the whole timeout out (30 s in production).
EXIT_TIMEOUT_S = 5


@contextlib.contextmanager
def running_stack(model: str, ready_timeout: float = 240, **overrides):
    """A stack of its own on free loopback ports, with fresh logs, stopped on exit."""
    overrides.setdefault("exit_timeout_s", EXIT_TIMEOUT_S)
    running = stack_launcher.Stack(stack_launcher.loopback_config(model, **overrides))
    for log in (running.triton_log, running.proxy_log):
        log.unlink(missing_ok=True)
    try:
        running.start()
        running.wait_ready(timeout=ready_timeout)
        yield running
    finally:
        running.stop()
