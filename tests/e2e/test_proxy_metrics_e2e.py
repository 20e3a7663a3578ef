"""The proxy's /metrics and request log against the real stack: they agree with Triton's
metrics (:8002) and join Triton's log by request id."""

import dataclasses
import json
import re
import subprocess

import requests
from helpers import data_url, sse_line_payloads, wait_until
from sample_images import encoded_image
from stacks import stack_launcher

SERVED = "qwen2.5-vl-7b-instruct"
TRITON_MODEL = "qwen2_5_vl"
CHAT = "/v1/chat/completions"


SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def scrape(url: str) -> dict:
    """{(sample name as exposed, labels): value} (prometheus_client's parser would rename
    Triton's counters, which lack the `_total` suffix)."""
    text = requests.get(f"{url}/metrics", timeout=5).text
    samples = {}
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if match and not line.startswith("#"):
            name, labels, value = match.groups()
            samples[(name, frozenset(LABEL.findall(labels or "")))] = float(value)
    return samples


def pick(samples: dict, name: str, **labels) -> float:
    """The sum over the series of `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, lbls), v in samples.items() if n == name and wanted <= lbls)


def triton_metrics_url(stack) -> str:
    return f"http://127.0.0.1:{stack.config.metrics_port}"


def wait_idle(stack, base_url):
    """Earlier tests' generations (cancelled ones included) have left the model and proxy, and
    the proxy has asked the model for its limits: it asks on first use (a `describe` request
    Triton counts as one more success), which must not fall inside a test's deltas when the
    test runs first."""
    card = requests.get(f"{base_url}/v1/models/{SERVED}", timeout=10).json()
    if "max_model_len" not in card:
        first_use = {
            "model": SERVED,
            "max_tokens": 1,
            "messages": [{"role": "user", "content": "Hi"}],
        }
        assert requests.post(f"{base_url}{CHAT}", json=first_use, timeout=60).status_code == 200

    def idle():
        model, proxy = scrape(triton_metrics_url(stack)), scrape(base_url)
        return (
            pick(model, "qwen_vl_batch_size") == 0
            and pick(model, "qwen_vl_waiting_requests") == 0
            and pick(proxy, "qwen_vl_proxy_requests_in_flight") == 0
        )

    wait_until(idle, what="an idle stack")


def test_streamed_image_request_moves_proxy_and_triton_metrics_alike(stack, base_url):
    wait_idle(stack, base_url)
    proxy_before, model_before = scrape(base_url), scrape(triton_metrics_url(stack))
    request_id = "metrics-e2e-streamed-image"

    with requests.post(
        f"{base_url}{CHAT}",
        stream=True,
        timeout=60,
        headers={"X-Request-Id": request_id},
        json={
            "model": SERVED,
            "stream": True,
            "max_tokens": 16,
            "temperature": 0,
            "stream_options": {"include_usage": True},
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Describe this image."},
                        {"type": "image_url", "image_url": {"url": data_url(encoded_image("PNG"))}},
                    ],
                }
            ],
        },
    ) as resp:
        assert resp.status_code == 200
        assert resp.headers["X-Request-Id"] == request_id
        events = sse_line_payloads(resp.iter_lines())
    assert events[-1] == "[DONE]"
    usage = events[-2]["usage"]
    content_chunks = sum(
        1 for e in events[:-1] if e.get("choices") and e["choices"][0]["delta"].get("content")
    )
    assert usage["completion_tokens"] > 0 and usage["prompt_tokens_details"]["image_tokens"] > 0

    # Triton counts a decoupled request when it releases it, just after the final response.
    success = {"model": TRITON_MODEL}

    def model_moved():
        after = scrape(triton_metrics_url(stack))
        moved = pick(after, "nv_inference_request_success", **success) - pick(
            model_before, "nv_inference_request_success", **success
        )
        return after if moved >= 1 else None

    model_after = wait_until(model_moved, what="nv_inference_request_success to move")
    proxy_after = scrape(base_url)

    def model_delta(name, **labels):
        return pick(model_after, name, **labels) - pick(model_before, name, **labels)

    def proxy_delta(name, **labels):
        return pick(proxy_after, name, **labels) - pick(proxy_before, name, **labels)

    # Tokens: the response's usage, the proxy's counters and the model's counters agree.
    assert (
        proxy_delta("qwen_vl_proxy_completion_tokens_total", model=SERVED)
        == usage["completion_tokens"]
    )
    assert model_delta("qwen_vl_generated_tokens_total") == usage["completion_tokens"]
    assert proxy_delta("qwen_vl_proxy_prompt_tokens_total", model=SERVED) == usage["prompt_tokens"]
    assert model_delta("qwen_vl_prompt_tokens_total") == usage["prompt_tokens"]
    image_tokens = usage["prompt_tokens_details"]["image_tokens"]
    assert proxy_delta("qwen_vl_proxy_image_tokens_total", model=SERVED) == image_tokens
    assert model_delta("qwen_vl_image_tokens_total") == image_tokens

    # Triton's own counters: one successful request, no failure.
    assert model_delta("nv_inference_request_success", **success) == 1
    assert model_delta("nv_inference_request_failure", **success) == 0

    # One request, one TTFT on each side; the proxy's encloses the model's.
    assert proxy_delta("qwen_vl_proxy_requests_total", route=CHAT, method="POST", status="200") == 1
    assert proxy_delta("qwen_vl_proxy_request_duration_seconds_count", route=CHAT) == 1
    assert proxy_delta("qwen_vl_proxy_time_to_first_token_seconds_count", model=SERVED) == 1
    assert model_delta("qwen_vl_time_to_first_token_seconds_count") == 1
    proxy_ttft = proxy_delta("qwen_vl_proxy_time_to_first_token_seconds_sum", model=SERVED)
    assert proxy_ttft >= model_delta("qwen_vl_time_to_first_token_seconds_sum") > 0
    assert (
        proxy_delta("qwen_vl_proxy_inter_token_latency_seconds_count", model=SERVED)
        == content_chunks - 1
    )
    assert proxy_delta("qwen_vl_proxy_images_total", source="inline") == 1
    assert proxy_delta("qwen_vl_proxy_image_decode_seconds_count") == 1
    assert pick(proxy_after, "qwen_vl_proxy_requests_in_flight") == 0
    assert proxy_delta("qwen_vl_proxy_rejected_requests_total") == 0


def test_a_rejection_is_counted_by_cause_on_the_live_proxy(base_url):
    before = scrape(base_url)
    resp = requests.post(
        f"{base_url}{CHAT}", data=b"{nope", timeout=10, headers={"Content-Type": "application/json"}
    )
    assert resp.status_code == 400
    after = scrape(base_url)
    cause = {"cause": "invalid_request"}
    assert (
        pick(after, "qwen_vl_proxy_rejected_requests_total", **cause)
        - pick(before, "qwen_vl_proxy_rejected_requests_total", **cause)
    ) == 1


# ---- logs join by request id ------------------------------------------------------------

TRITON_DONE = (
    r"request {id} done: (\d+) prompt \((\d+) image, \d+ video\) \+ (\d+) completion tokens"
)


def triton_done_line(stack, request_id: str):
    pattern = re.compile(TRITON_DONE.format(id=re.escape(request_id)))
    return wait_until(
        lambda: pattern.search(stack.triton_log.read_text(errors="replace")),
        what=f"Triton's log line for {request_id}",
    )


def chat(base_url: str, request_id: str):
    resp = requests.post(
        f"{base_url}{CHAT}",
        timeout=60,
        headers={"X-Request-Id": request_id},
        json={
            "model": SERVED,
            "max_tokens": 6,
            "temperature": 0,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What color is it?"},
                        {
                            "type": "image_url",
                            "image_url": {"url": data_url(encoded_image(), "image/jpeg")},
                        },
                    ],
                }
            ],
        },
    )
    assert resp.status_code == 200 and resp.headers["X-Request-Id"] == request_id
    return resp.json()["usage"]


def test_proxy_and_triton_text_logs_join_by_request_id(stack, base_url):
    request_id = "join-text-logs"
    usage = chat(base_url, request_id)

    proxy_pattern = re.compile(rf"request {re.escape(request_id)} POST {CHAT} -> 200 .*")
    proxy_line = wait_until(
        lambda: proxy_pattern.search(stack.proxy_log.read_text(errors="replace")),
        what="the proxy's log line",
    ).group(0)
    triton = triton_done_line(stack, request_id)

    prompt, image, completion = (int(n) for n in triton.groups())
    assert (
        f"prompt_tokens={prompt} " in proxy_line
        and f"completion_tokens={completion} " in proxy_line
    )
    assert f"image_tokens={image} " in proxy_line
    assert (prompt, completion) == (usage["prompt_tokens"], usage["completion_tokens"])
    assert f"model={SERVED} " in proxy_line and "stream=false" in proxy_line


def test_json_log_lines_join_triton_by_request_id(stack, tmp_path):
    """A second proxy, in JSON log format, in front of the same Triton."""
    config = dataclasses.replace(
        stack.config, proxy_port=stack_launcher.free_port(), proxy_args=["--log-format", "json"]
    )
    log_path = tmp_path / "proxy.jsonl"
    with open(log_path, "wb") as log:
        proxy = subprocess.Popen(
            stack_launcher.proxy_command(config),
            cwd=stack_launcher.ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(
            lambda: stack_launcher._get_status(f"{config.proxy_url}/ready") == 200,
            what="the JSON-logging proxy",
        )
        request_id = "join-json-logs"
        usage = chat(config.proxy_url, request_id)

        def request_entry():
            entries = [
                json.loads(line) for line in log_path.read_text().splitlines() if line.strip()
            ]
            return next((e for e in entries if e.get("request_id") == request_id), None)

        entry = wait_until(request_entry, what="the proxy's JSON line")
    finally:
        proxy.terminate()
        proxy.wait(30)

    # Every line the proxy wrote is one JSON object.
    for line in log_path.read_text().splitlines():
        assert isinstance(json.loads(line), dict), line
    assert entry["message"] == "request" and entry["logger"] == "proxy.access"
    assert entry["route"] == CHAT and entry["status"] == 200 and entry["stream"] is False
    assert entry["model"] == SERVED and entry["duration_ms"] > 0
    assert entry["prompt_tokens"] == usage["prompt_tokens"]
    assert entry["completion_tokens"] == usage["completion_tokens"]
    prompt, image, completion = (int(n) for n in triton_done_line(stack, request_id).groups())
    assert (entry["prompt_tokens"], entry["image_tokens"], entry["completion_tokens"]) == (
        prompt,
        image,
        completion,
    )
