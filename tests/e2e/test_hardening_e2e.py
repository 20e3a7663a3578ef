"""Hardening against the real stack (tiny checkpoint on a real tritonserver).

- The model's own checks behind the proxy's: an image whose header passes but whose data
  is broken gets the model's 400; an odd but valid image is served.
- A client that disconnects frees its slot in the model (the batch gauge on Triton's metrics
  port returns to 0; the request is counted as cancelled).
- Load at 4x the proxy's in-flight cap: every answer is 200 or 429 and every stream that
  started ends with [DONE].
- tritonserver killed mid-stream: an SSE error event and [DONE], /ready 503, its model stub
  gone with it; restarted on the same ports, the same proxy process serves again.
- The model's process (its Python-backend stub) killed under load, while tritonserver lives
  on and calls the model ready: the streams end with an SSE error event and [DONE] within
  seconds, /ready and new requests get 503 backend_unavailable, and the launcher's model
  watch restarts tritonserver, after which the same proxy serves again.

The last three use a stack of their own (this module's), never the session's, so killing its
tritonserver breaks no other test.
"""

import concurrent.futures
import json
import os
import signal
import time

import pytest
import requests
from held_servers import server_fixture
from helpers import data_url, sse_line_payloads, wait_until
from hostile_samples import GOOD_PNG, ONE_BY_ONE, PNG_16BIT
from stacks import running_stack, stack_launcher, tiny_checkpoint
from test_model_metrics_e2e import scrape

SERVED = "qwen2.5-vl-7b-instruct"
IN_FLIGHT_CAP = 2
# Sampled at temperature 2, the tiny random model talks for seconds before its EOS.
LONG = {"max_tokens": 2000, "temperature": 2.0, "seed": 7}
# Until the test ends it: 2000 tokens take over a minute here.
ENDLESS = {"max_tokens": 2000, "ignore_eos": True}
# Generous for a loaded CI machine; measured about 2 s. Before the liveness watchdog these
# streams ended only at the proxy's stream idle timeout (60 s).
STREAMS_END_WITHIN_S = 30


def chat(base_url, content, *, stream=False, timeout=120, **fields):
    return requests.post(
        f"{base_url}/v1/chat/completions",
        stream=stream,
        timeout=timeout,
        json={
            "model": SERVED,
            "stream": stream,
            "messages": [{"role": "user", "content": content}],
            **fields,
        },
    )


def image_message(url):
    return [
        {"type": "text", "text": "what is it?"},
        {"type": "image_url", "image_url": {"url": url}},
    ]


def status_of(url):
    try:
        return requests.get(url, timeout=5).status_code
    except requests.ConnectionError:
        return None


# ---- on the session stack ------------------------------------------------------------------


def test_the_model_still_refuses_what_only_decoding_reveals(base_url):
    broken = GOOD_PNG[:-30]  # the header is intact, the pixel data is cut
    response = chat(base_url, image_message(data_url(broken)), max_tokens=2)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_image"
    assert error["param"] == "messages[0].content[1].image_url"


@pytest.mark.parametrize("image", [ONE_BY_ONE, PNG_16BIT], ids=["1x1", "16-bit"])
def test_odd_but_valid_images_are_served(base_url, image):
    response = chat(base_url, image_message(data_url(image)), max_tokens=2)
    assert response.status_code == 200, response.text


def test_client_disconnect_frees_the_model_slot(stack, base_url):
    before = scrape(stack)
    with chat(base_url, "talk for a while", stream=True, **LONG) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        for _ in range(4):  # the role chunk and a few tokens: the sequence is in the batch
            next(line for line in lines if line)
    # Leaving the block closed the connection: the proxy cancels the Triton stream.

    def freed():
        after = scrape(stack)
        cancelled = after.get("qwen_vl_requests_finished_total:cancelled", 0) - before.get(
            "qwen_vl_requests_finished_total:cancelled", 0
        )
        return after["qwen_vl_batch_size"] == 0 and cancelled == 1

    wait_until(freed, timeout=10)
    assert chat(base_url, "still there?", max_tokens=2).status_code == 200


# ---- on a stack of this module's own -------------------------------------------------------


def _own_stack(tmp_path_factory):
    return running_stack(
        tiny_checkpoint(), proxy_args=["--max-concurrent-requests", str(IN_FLIGHT_CAP)]
    )


# Loads ahead, while the tiers before run (tests/held_servers.py).
own_stack = server_fixture("own_stack", _own_stack, scope="module", ahead=True)


def test_load_at_four_times_the_cap(own_stack):
    base_url = own_stack.config.proxy_url

    def one(i):
        if i % 2:
            response = chat(base_url, f"request {i}", max_tokens=16, temperature=1.0, seed=i)
            return response.status_code, response.headers, response.text, None
        with chat(
            base_url, f"request {i}", stream=True, max_tokens=16, temperature=1.0, seed=i
        ) as response:
            events = (
                sse_line_payloads(response.iter_lines(), strict=True)
                if response.status_code == 200
                else None
            )
            return (
                response.status_code,
                response.headers,
                response.text if events is None else "",
                events,
            )

    with concurrent.futures.ThreadPoolExecutor(4 * IN_FLIGHT_CAP) as pool:
        results = list(pool.map(one, range(4 * IN_FLIGHT_CAP)))
    statuses = [status for status, *_ in results]
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(200) >= IN_FLIGHT_CAP and statuses.count(429) >= 1, statuses
    for status, headers, text, events in results:
        if status == 429:
            assert headers["Retry-After"] == "1"
            assert json.loads(text)["error"]["code"] == "rate_limit_exceeded"
        elif events is not None:
            assert events[-1] == "[DONE]"
            assert not any(isinstance(e, dict) and "error" in e for e in events)
    assert chat(base_url, "after the load", max_tokens=2).status_code == 200


def test_tritonserver_killed_mid_stream_then_restarted(own_stack):
    base_url = own_stack.config.proxy_url
    proxy_pid = own_stack.proxy.pid
    with chat(base_url, "talk for a while", stream=True, **LONG) as response:
        assert response.status_code == 200
        lines = (line for line in response.iter_lines() if line)
        seen = [next(lines) for _ in range(4)]
        assert all(line.startswith(b"data: {") for line in seen)
        stubs = stack_launcher.group_members(own_stack.triton.pid)
        assert len(stubs) > 1, stubs  # tritonserver and its model's stub
        os.kill(own_stack.triton.pid, signal.SIGKILL)  # tritonserver alone, not its group
        own_stack.triton.wait()
        rest = sse_line_payloads(lines)
    # The stub ends itself when its tritonserver is gone (model.py's initialize).
    wait_until(lambda: not stack_launcher.group_members(own_stack.triton.pid), timeout=10)
    assert rest[-1] == "[DONE]"
    error = rest[-2]["error"]
    assert error["code"] == "backend_unavailable" and error["type"] == "service_unavailable"

    wait_until(lambda: status_of(f"{base_url}/ready") == 503, timeout=10)
    refused = chat(base_url, "anyone?", max_tokens=2)
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"

    # The same tritonserver command on the same ports; the proxy is not restarted.
    own_stack.start_triton()
    wait_until(lambda: status_of(f"{base_url}/ready") == 200, timeout=240, step=0.5)
    response = chat(base_url, "back again", max_tokens=4)
    assert response.status_code == 200, response.text
    assert own_stack.proxy.pid == proxy_pid and own_stack.proxy.poll() is None


def stub_of(stack) -> int:
    """The pid of the model's Python-backend stub under `stack`'s tritonserver."""
    for pid in stack_launcher.group_members(stack.triton.pid):
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            if cmdline.read().split(b"\0")[0].endswith(b"triton_python_backend_stub"):
                return pid
    raise AssertionError("no model stub in tritonserver's process group")


def test_model_process_killed_under_load_then_restarted_by_the_watch(own_stack):
    base_url = own_stack.config.proxy_url
    restarts = own_stack.model_restarts
    # Streams at the proxy's cap, each past its first tokens (they would run for minutes).
    streams = [
        chat(base_url, f"stream {i}", stream=True, **ENDLESS, seed=i) for i in range(IN_FLIGHT_CAP)
    ]
    readers = []
    for response in streams:
        assert response.status_code == 200
        lines = (line for line in response.iter_lines() if line)
        assert all(next(lines).startswith(b"data: {") for _ in range(3))
        readers.append(lines)
    triton_url = own_stack.config.triton_http_url
    assert stack_launcher.model_probe.ask(triton_url, "qwen2_5_vl") is True  # the pod's probe
    os.kill(stub_of(own_stack), signal.SIGKILL)  # as the OOM killer does
    killed = time.monotonic()
    ended = []
    for response, lines in zip(streams, readers):
        with response:
            rest = sse_line_payloads(lines)
        ended.append(time.monotonic() - killed)
        assert rest[-1] == "[DONE]"
        error = rest[-2]["error"]
        assert error["code"] == "backend_unavailable" and error["type"] == "service_unavailable"
    print(f"\nstreams ended {max(ended):.2f} s after the model's process died")
    assert max(ended) < STREAMS_END_WITHIN_S  # far below the 60 s stream idle timeout

    # Triton still says the model is ready (when it did not abort itself, as Triton 2.51 now
    # and then does when a stub dies holding a shared-memory lock); the proxy and the pod's
    # probe know better.
    assert status_of(f"{triton_url}/v2/models/qwen2_5_vl/ready") in (200, None)
    assert stack_launcher.model_probe.ask(triton_url, "qwen2_5_vl") is not True
    assert status_of(f"{base_url}/ready") == 503
    refused = chat(base_url, "anyone?", max_tokens=2)
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
    assert refused.json()["error"]["code"] == "backend_unavailable"
    assert "Stub" not in refused.text

    # The launcher's model watch (on from the start in `scripts/stack.py`) brings it back.
    watching = time.monotonic()
    own_stack.start_model_watch()
    wait_until(lambda: status_of(f"{base_url}/ready") == 200, timeout=240, step=0.2)
    response = chat(base_url, "back again", max_tokens=4)
    assert response.status_code == 200, response.text
    assert own_stack.model_restarts == restarts + 1
    print(
        f"serving again {time.monotonic() - watching:.1f} s after the watch started "
        f"({time.monotonic() - killed:.1f} s after the death)"
    )
