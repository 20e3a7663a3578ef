"""Starting whole stacks (tritonserver + proxy) of the tests' own on loopback."""

import contextlib
import functools
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import stack as stack_launcher  # scripts/stack.py

# Nothing runs when a test stack stops, so Triton's drain time after SIGTERM only matters when
# its shutdown sticks: Triton 2.51 in explicit model control (the lazy-load stack) now and then
# never unloads the model and waits the whole timeout out (30 s in production).
EXIT_TIMEOUT_S = 5


# Stacks stopping while the next tests run (a Triton takes about 2 s to exit).
_stopper = ThreadPoolExecutor(max_workers=2, thread_name_prefix="stack-stop")
_stopping: list[Future] = []


# Opens the session stack's LoRA load/unload endpoints (conftest.py, test_loras_e2e.py).
ADMIN_KEY = "e2e-admin-key"


@contextlib.contextmanager
def running_stack(model: str, ready_timeout: float = 240, *, stop_behind=False, **overrides):
    """A stack of its own on free loopback ports, with fresh logs, stopped on exit; with
    `stop_behind`, stopping goes on while the next tests run (`wait_for_stops` ends it)."""
    overrides.setdefault("exit_timeout_s", EXIT_TIMEOUT_S)
    running = stack_launcher.Stack(stack_launcher.loopback_config(model, **overrides))
    for log in (running.triton_log, running.proxy_log):
        log.unlink(missing_ok=True)
    try:
        running.start()
        running.wait_ready(timeout=ready_timeout)
        yield running
    finally:
        if stop_behind:
            _stopping.append(_stopper.submit(running.stop))
        else:
            running.stop()


_building = threading.Lock()


@functools.cache
def _tiny_checkpoint() -> str:
    return stack_launcher.tiny_checkpoint()


def tiny_checkpoint() -> str:
    """The tiny checkpoint's path, built once (stacks start on several threads at once)."""
    with _building:
        return _tiny_checkpoint()


def wait_for_stops() -> None:
    """Until every stack stopped behind has stopped; a stop's error is raised here."""
    while _stopping:
        _stopping.pop().result()
