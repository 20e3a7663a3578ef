"""The whole stack: OpenAI clients → proxy → tritonserver → the Qwen2.5-VL model."""

import json
import re
import time
from pathlib import Path

import openai
import pytest
import requests
from helpers import data_url, sse_line_payloads, wait_until
from sample_images import encoded_image

ROOT = Path(__file__).resolve().parents[2]
SERVED = "qwen2.5-vl-7b-instruct"


def chat(base_url, *, stream=False, **payload):
    """POST a chat completion (`stream`: a streamed one, its body left to read)."""
    payload.setdefault("model", SERVED)
    if stream:
        payload["stream"] = True
    url = f"{base_url}/v1/chat/completions"
    return requests.post(url, json=payload, timeout=60, stream=stream)


def test_original_client_example_prints_a_completion(base_url, tmp_path, capsys, monkeypatch):
    image = tmp_path / "example.jpg"
    image.write_bytes(encoded_image(size=(224, 160)))
    source = (ROOT / "client" / "example_requests.py").read_text()
    assert "http://localhost:9000/v1/chat/completions" in source
    monkeypatch.setattr("sys.argv", ["example_requests.py", str(image)])
    exec(
        compile(source.replace("http://localhost:9000", base_url), "example_requests.py", "exec"),
        {"__name__": "__main__"},
    )
    body = json.loads(capsys.readouterr().out)
    assert body["object"] == "chat.completion" and body["model"] == SERVED
    assert body["id"].startswith("chatcmpl-") and len(body["id"]) > len("chatcmpl-")
    assert isinstance(body["created"], int)
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"]
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    # The 224x160 image alone is dozens of prompt tokens; the prompt is more than the text.
    assert usage["prompt_tokens"] > 40 and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_ids_are_unique_per_request(base_url):
    ids = {
        chat(base_url, messages=[{"role": "user", "content": "hi"}], max_tokens=2).json()["id"]
        for _ in range(3)
    }
    assert len(ids) == 3


def test_streaming_chunk_by_chunk_matches_non_stream(base_url):
    request = dict(
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Describe:"},
                    {"type": "image_url", "image_url": {"url": data_url(encoded_image("PNG"))}},
                ],
            }
        ],
        max_tokens=20,
        temperature=0,
    )
    whole = chat(base_url, **request).json()
    with chat(base_url, stream=True, stream_options={"include_usage": True}, **request) as response:
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        events = sse_line_payloads(response.iter_lines(), strict=True)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    content_chunks = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert len(content_chunks) > 1
    finish = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finish) == 1 and finish[0]["choices"][0]["finish_reason"] == "length"
    streamed = "".join(c["choices"][0]["delta"]["content"] for c in content_chunks)
    assert streamed == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


def test_openai_sdk_non_stream(base_url):
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused")
    completion = client.chat.completions.create(
        model=SERVED,
        max_tokens=12,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {
                        "type": "image_url",
                        "image_url": {"url": data_url(encoded_image(), "image/jpeg")},
                    },
                ],
            }
        ],
    )
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content
    assert (
        completion.usage.completion_tokens == 12 and completion.choices[0].finish_reason == "length"
    )


def test_openai_sdk_stream_yields_role_deltas_and_finish_reason(base_url):
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused")
    chunks = list(
        client.chat.completions.create(
            model=SERVED,
            max_tokens=16,
            stream=True,
            messages=[{"role": "user", "content": "Tell me a story."}],
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1
    assert chunks[-1].choices[0].finish_reason == "length"


def _streamed_deltas(base_url, payload):
    with chat(base_url, stream=True, **payload) as response:
        events = sse_line_payloads(response.iter_lines())  # decoded as strict UTF-8
    deltas = [e["choices"] for e in events if e != "[DONE]"]
    return [choices[0]["delta"].get("content") or "" for choices in deltas if choices]


def test_chinese_round_trip_streams_whole_characters(base_url):
    """Seeded sampling makes stream and non-stream produce the same tokens to compare."""
    outputs = []
    for seed in range(4):
        payload = {
            "model": SERVED,
            "max_tokens": 64,
            "temperature": 1.0,
            "seed": seed,
            "messages": [{"role": "user", "content": "这张图片里有什么？请用中文详细描述。"}],
        }
        whole = chat(base_url, **payload).json()["choices"][0]["message"]["content"]
        # A character split across deltas would surface as extra U+FFFD in the stream, which
        # the one-shot decode of the same tokens does not have.
        assert "".join(_streamed_deltas(base_url, payload)) == whole
        outputs.append(whole)
    assert any(re.search("[\u4e00-\u9fff]", text) for text in outputs), outputs


def _cancel_count(stack) -> int:
    return stack.triton_log.read_text(errors="replace").count("cancelled after")


def test_client_disconnect_cancels_generation_and_next_request_is_prompt(stack, base_url):
    before = _cancel_count(stack)
    response = chat(
        base_url,
        stream=True,
        max_tokens=4000,
        temperature=1.0,
        seed=1,
        messages=[{"role": "user", "content": "go"}],
    )
    lines = response.iter_lines()
    for _ in range(4):
        next(lines)
    response.close()
    wait_until(lambda: _cancel_count(stack) != before, what="the model to see the cancellation")
    assert _cancel_count(stack) == before + 1
    started = time.monotonic()
    assert (
        chat(base_url, messages=[{"role": "user", "content": "hi"}], max_tokens=4).status_code
        == 200
    )
    assert time.monotonic() - started < 10


def image_only_body(url: str) -> bytes:
    """A chat request whose one message is one image part."""
    part = {"type": "image_url", "image_url": {"url": url}}
    return json.dumps({"model": SERVED, "messages": [{"role": "user", "content": [part]}]}).encode()


@pytest.mark.parametrize(
    "body, status, code",
    [
        (b"{not json", 400, None),
        (json.dumps({"model": SERVED}).encode(), 400, None),
        (json.dumps({"model": SERVED, "messages": []}).encode(), 400, None),
        (image_only_body("data:image/png;base64,@@@notbase64"), 400, "invalid_image"),
        (image_only_body(data_url(encoded_image("PNG")[:60])), 400, None),
        (
            json.dumps({"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}).encode(),
            404,
            "model_not_found",
        ),
    ],
)
def test_bad_requests_get_the_error_envelope(base_url, body, status, code):
    response = requests.post(
        f"{base_url}/v1/chat/completions",
        data=body,
        timeout=30,
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and "Traceback" not in response.text and "/work" not in response.text
    if code:
        assert error["code"] == code
    assert (
        chat(
            base_url, messages=[{"role": "user", "content": "still alive?"}], max_tokens=2
        ).status_code
        == 200
    )


def test_models_health_and_ready(base_url):
    assert requests.get(f"{base_url}/health", timeout=5).status_code == 200
    assert requests.get(f"{base_url}/ready", timeout=5).status_code == 200
    models = requests.get(f"{base_url}/v1/models", timeout=5).json()
    assert [m["id"] for m in models["data"]] == [SERVED]
