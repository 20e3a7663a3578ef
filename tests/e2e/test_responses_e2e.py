"""`POST /v1/responses` end to end: the `openai` SDK's `client.responses.create` → proxy →
tritonserver → the tiny random-weight Qwen2.5-VL. Shapes and usage only, never the text."""

import openai
import pytest
from helpers import data_url
from sample_images import encoded_image

SERVED = "qwen2.5-vl-7b-instruct"
MAX_OUTPUT_TOKENS = 12


def image_input():
    return [
        {
            "role": "user",
            "content": [
                {"type": "input_text", "text": "What is this?"},
                {
                    "type": "input_image",
                    "image_url": data_url(encoded_image(size=(224, 160)), "image/jpeg"),
                },
            ],
        }
    ]


def chat_usage(client):
    """The chat completion's usage for the same input (the usage must be the same)."""
    completion = client.chat.completions.create(
        model=SERVED,
        max_tokens=MAX_OUTPUT_TOKENS,
        messages=[
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {
                        "type": "image_url",
                        "image_url": {
                            "url": data_url(encoded_image(size=(224, 160)), "image/jpeg")
                        },
                    },
                ],
            },
        ],
    )
    return completion.usage


def check_response(response, chat):
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.model == SERVED and response.error is None
    assert response.status in ("completed", "incomplete")
    message = response.output[0]
    assert (message.type, message.role) == ("message", "assistant")
    assert message.content[0].type == "output_text"
    assert response.output_text == message.content[0].text
    usage = response.usage
    assert usage.input_tokens == chat.prompt_tokens
    assert usage.input_tokens_details.image_tokens == chat.prompt_tokens_details.image_tokens > 0
    assert 1 <= usage.output_tokens <= MAX_OUTPUT_TOKENS
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    if response.status == "incomplete":
        assert response.incomplete_details.reason == "max_output_tokens"
        assert usage.output_tokens == MAX_OUTPUT_TOKENS


def test_sdk_responses_non_stream_with_an_image(base_url):
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused")
    response = client.responses.create(
        model=SERVED,
        instructions="Be brief.",
        input=image_input(),
        max_output_tokens=MAX_OUTPUT_TOKENS,
    )
    check_response(response, chat_usage(client))
    assert response.instructions == "Be brief."


def test_sdk_responses_stream_with_an_image(base_url):
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused")
    events = list(
        client.responses.create(
            model=SERVED,
            instructions="Be brief.",
            input=image_input(),
            max_output_tokens=MAX_OUTPUT_TOKENS,
            stream=True,
        )
    )
    types = [event.type for event in events]
    assert types[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert types[-1] in ("response.completed", "response.incomplete")
    assert types[-4:-1] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    response = events[-1].response
    assert response.output_text == "".join(deltas)
    check_response(response, chat_usage(client))


def test_sdk_two_turn_conversation_with_an_image(base_url):
    """Turn 2 names turn 1 by `previous_response_id` and sends text only: the model gets the
    turn-1 image again from the proxy's store, exactly as if the client had sent it all."""
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused")
    first = client.responses.create(
        model=SERVED, input=image_input(), max_output_tokens=MAX_OUTPUT_TOKENS
    )
    assert first.store is True and first.status in ("completed", "incomplete")
    second = client.responses.create(
        model=SERVED,
        input="And what colour is it?",
        previous_response_id=first.id,
        max_output_tokens=MAX_OUTPUT_TOKENS,
    )
    assert second.previous_response_id == first.id and second.status in ("completed", "incomplete")
    image_tokens = first.usage.input_tokens_details.image_tokens
    assert second.usage.input_tokens_details.image_tokens == image_tokens > 0
    # The same conversation sent in full, unstored: the very same prompt.
    full = client.responses.create(
        model=SERVED,
        store=False,
        input=[
            *image_input(),
            {"role": "assistant", "content": [{"type": "output_text", "text": first.output_text}]},
            {"role": "user", "content": "And what colour is it?"},
        ],
        max_output_tokens=MAX_OUTPUT_TOKENS,
    )
    assert full.usage.input_tokens == second.usage.input_tokens > first.usage.input_tokens

    assert client.responses.retrieve(second.id).output_text == second.output_text
    (item,) = client.responses.input_items.list(second.id).data
    assert (item.role, item.content[0].text) == ("user", "And what colour is it?")
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
