"""`POST /v1/messages` end to end: the `anthropic` SDK → proxy → tritonserver → the tiny
random-weight Qwen2.5-VL, with an image, stream and not; a stop sequence reported by the model.
Shapes, usage and stop reasons, never what the text says."""

import base64

import anthropic
import httpx2
import pytest
from sample_images import encoded_image

SERVED = "qwen2.5-vl-7b-instruct"
MAX_TOKENS = 12
GREEDY = {"temperature": 0}  # sent as Anthropic's clients send it (not an argument of this SDK)


def image_message() -> list[dict]:
    data = base64.b64encode(encoded_image(size=(224, 160))).decode()
    image = {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/jpeg", "data": data},
    }
    return [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, image]}]


@pytest.fixture(scope="module")
def client(base_url):
    http = httpx2.Client(trust_env=False)
    try:
        yield anthropic.Anthropic(
            base_url=base_url, api_key="unused", max_retries=0, http_client=http
        )
    finally:
        http.close()


@pytest.fixture(scope="module")
def chat_prompt_tokens(base_url) -> int:
    """The same request's prompt_tokens from chat completions: the usage must be the same."""
    data = base64.b64encode(encoded_image(size=(224, 160))).decode()
    content = [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{data}"}},
    ]
    body = {
        "model": SERVED,
        "max_tokens": 1,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": content},
        ],
    }
    with httpx2.Client(trust_env=False) as http:
        response = http.post(f"{base_url}/v1/chat/completions", json=body, timeout=60)
    response.raise_for_status()
    return response.json()["usage"]["prompt_tokens"]


def check(message, prompt_tokens: int) -> str:
    assert message.id.startswith("msg_") and message.model == SERVED
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert 1 <= message.usage.output_tokens <= MAX_TOKENS
    if message.stop_reason == "max_tokens":
        assert message.usage.output_tokens == MAX_TOKENS
    assert message.usage.input_tokens == prompt_tokens
    assert all(block.type == "text" for block in message.content)
    return "".join(block.text for block in message.content)


def test_create_and_stream_with_an_image(client, chat_prompt_tokens):
    kwargs = {
        "model": SERVED,
        "max_tokens": MAX_TOKENS,
        "system": "Be brief.",
        "messages": image_message(),
        "extra_body": GREEDY,
    }
    whole = check(client.messages.create(**kwargs), chat_prompt_tokens)
    with client.messages.stream(**kwargs) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert check(final, chat_prompt_tokens) == streamed
    assert streamed == whole  # greedy: the same answer either way


def test_a_stop_sequence_the_model_meets_is_reported(client):
    kwargs = {"model": SERVED, "max_tokens": MAX_TOKENS, "extra_body": GREEDY}
    messages = [{"role": "user", "content": "Describe a cat."}]
    full = "".join(b.text for b in client.messages.create(messages=messages, **kwargs).content)
    assert len(full) >= 6, full
    stop = full[3:6]

    message = client.messages.create(messages=messages, stop_sequences=[stop], **kwargs)
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", stop)
    assert "".join(b.text for b in message.content) == full[: full.index(stop)]
