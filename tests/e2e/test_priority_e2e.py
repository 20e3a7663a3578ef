"""A client's `priority` crosses the whole stack: the proxy sends the class in the model's
`priority` input, the engine admits the request in that class (its per-class counter on
Triton's metrics port moves), and an unknown class is a 400 naming the field."""

import re

import requests

SERVED = "qwen2.5-vl-7b-instruct"


def admitted(stack) -> dict[str, float]:
    """qwen_vl_requests_admitted_total by priority class."""
    text = requests.get(f"http://127.0.0.1:{stack.config.metrics_port}/metrics", timeout=5).text
    counts: dict[str, float] = {}
    for line in text.splitlines():
        match = re.match(
            r'^qwen_vl_requests_admitted_total\{[^}]*priority="(\w+)"[^}]*\}\s+(\S+)$', line
        )
        if match:
            counts[match[1]] = counts.get(match[1], 0.0) + float(match[2])
    return counts


def chat(base_url, **fields):
    return requests.post(
        f"{base_url}/v1/chat/completions",
        timeout=60,
        json={
            "model": SERVED,
            "max_tokens": 4,
            "messages": [{"role": "user", "content": "which queue am I in?"}],
            **fields,
        },
    )


def test_the_class_a_client_names_is_the_class_the_engine_admits(stack, base_url):
    before = admitted(stack)
    for priority in ("batch", "batch", None):
        response = chat(base_url, **({"priority": priority} if priority else {}))
        assert response.status_code == 200, response.text
    # no wait: a request is counted at admission, before its first token
    after = admitted(stack)
    assert after["batch"] - before.get("batch", 0.0) == 2
    assert after["interactive"] - before.get("interactive", 0.0) == 1


def test_an_unknown_class_is_refused_before_the_model(stack, base_url):
    response = chat(base_url, priority="urgent")
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "priority"
