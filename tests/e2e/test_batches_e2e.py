"""The Batch API end to end: the `openai` SDK's files.create and batches.create → proxy →
tritonserver → the tiny random-weight Qwen2.5-VL. Every line answered once, in input order,
with the usage the model reports, admitted by the model as batch work; never the text."""

import json
import re
import time

import openai
import requests
from helpers import data_url
from sample_images import encoded_image

SERVED = "qwen2.5-vl-7b-instruct"
MAX_TOKENS = 6
LINES = 6


def line(n: int) -> dict:
    content: list[dict] = [{"type": "text", "text": f"Caption number {n}."}]
    if n % 2 == 0:
        image = data_url(encoded_image(size=(112 + 28 * n, 84)), "image/jpeg")
        content.insert(0, {"type": "image_url", "image_url": {"url": image}})
    return {
        "custom_id": f"caption-{n}",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": SERVED,
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
            "messages": [{"role": "user", "content": content}],
        },
    }


def admitted_as_batch(stack) -> float:
    text = requests.get(f"http://127.0.0.1:{stack.config.metrics_port}/metrics", timeout=5).text
    total = 0.0
    for found in re.finditer(
        r'^qwen_vl_requests_admitted_total\{[^}]*priority="batch"[^}]*\}\s+(\S+)$', text, re.M
    ):
        total += float(found.group(1))
    return total


def test_a_batch_of_image_and_text_lines_completes_with_every_line_once(stack, base_url):
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)
    content = "".join(json.dumps(line(n)) + "\n" for n in range(LINES)).encode()
    before = admitted_as_batch(stack)
    uploaded = client.files.create(file=("captions.jsonl", content), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    deadline = time.monotonic() + 120
    while batch.status not in ("completed", "failed", "cancelled", "expired"):
        assert time.monotonic() < deadline, f"batch still {batch.status}"
        time.sleep(0.2)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed", batch.errors
    assert batch.request_counts.model_dump() == {"total": LINES, "completed": LINES, "failed": 0}
    output = [json.loads(text) for text in client.files.content(batch.output_file_id).iter_lines()]
    assert [entry["custom_id"] for entry in output] == [f"caption-{n}" for n in range(LINES)]
    for n, entry in enumerate(output):
        body = entry["response"]["body"]
        assert entry["response"]["status_code"] == 200 and body["object"] == "chat.completion"
        usage = body["usage"]
        assert 1 <= usage["completion_tokens"] <= MAX_TOKENS
        assert (usage["prompt_tokens_details"]["image_tokens"] > 0) == (n % 2 == 0)
    assert batch.usage.output_tokens == sum(
        entry["response"]["body"]["usage"]["completion_tokens"] for entry in output
    )
    assert admitted_as_batch(stack) - before == LINES
