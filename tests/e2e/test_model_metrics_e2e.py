"""The model's custom metrics on Triton's metrics port move as requests are served."""

import re
import time

import requests
from helpers import wait_until

SERVED = "qwen2.5-vl-7b-instruct"


def scrape(stack) -> dict[str, float]:
    text = requests.get(f"http://127.0.0.1:{stack.config.metrics_port}/metrics", timeout=5).text
    values = {}
    for line in text.splitlines():
        match = re.match(r"^(qwen_vl_\w+)(\{[^}]*\})?\s+([0-9.eE+-]+)$", line)
        if match:
            name, labels, value = match.groups()
            outcome = re.search(r'outcome="(\w+)"', labels or "")
            key = f"{name}:{outcome.group(1)}" if outcome else name
            values[key] = values.get(key, 0.0) + float(value)
    return values


def idle(stack) -> dict[str, float]:
    """The metrics once nothing runs or waits in the model: an earlier test's request (a
    cancelled stream's last tokens included) can no longer move them."""

    def quiet():
        values = scrape(stack)
        running = values.get("qwen_vl_batch_size", 0) + values.get("qwen_vl_waiting_requests", 0)
        return values if running == 0 else None

    return wait_until(quiet, what="an idle model")


def test_tokens_ttft_and_outcomes_are_counted(stack, base_url):
    before = idle(stack)
    usage = requests.post(
        f"{base_url}/v1/chat/completions",
        timeout=60,
        json={
            "model": SERVED,
            "max_tokens": 9,
            "temperature": 0,
            "messages": [{"role": "user", "content": "count my tokens"}],
        },
    ).json()["usage"]

    def settled():
        # the request is counted finished, and the host path's timers were reported when the
        # engine went idle after it
        after = scrape(stack)
        delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
        finished = delta.get("qwen_vl_requests_finished_total:length", 0) + delta.get(
            "qwen_vl_requests_finished_total:stop", 0
        )
        return (after, delta) if finished >= 1 and delta.get("qwen_vl_engine_steps_total") else None

    after, delta = wait_until(settled, what="the request's metrics")
    assert delta["qwen_vl_generated_tokens_total"] == usage["completion_tokens"]
    # the host path timers, reported when the engine went idle after the request
    assert delta["qwen_vl_engine_steps_total"] >= usage["completion_tokens"]
    assert delta["qwen_vl_engine_step_seconds_total"] > 0
    assert delta["qwen_vl_prompt_tokens_total"] == usage["prompt_tokens"]
    assert delta["qwen_vl_time_to_first_token_seconds_count"] == 1
    assert delta["qwen_vl_time_to_first_token_seconds_sum"] > 0
    assert (
        delta["qwen_vl_requests_finished_total:length"]
        + delta["qwen_vl_requests_finished_total:stop"]
        == 1
    )
    assert after["qwen_vl_batch_size"] == 0, "the batch gauge returns to zero when idle"


def test_constrained_requests_and_grammar_compiles_are_counted(stack, base_url):
    # a title of its own: the grammar is new to the model's cache, so it is compiled once
    schema = {
        "title": f"metrics {time.time_ns()}",
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["n"],
        "additionalProperties": False,
    }
    before = scrape(stack)
    for _ in range(2):
        response = requests.post(
            f"{base_url}/v1/chat/completions",
            timeout=60,
            json={
                "model": SERVED,
                "max_tokens": 20,
                "temperature": 0,
                "messages": [{"role": "user", "content": "a number"}],
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "n", "schema": schema},
                },
            },
        )
        assert response.status_code == 200, response.text
    time.sleep(0.2)
    after = scrape(stack)
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    assert delta["qwen_vl_constrained_requests_total"] == 2
    assert delta["qwen_vl_grammar_compile_seconds_count"] == 1  # the second hit the cache
    assert delta["qwen_vl_grammar_compile_seconds_sum"] > 0
