"""vLLM's sampling extras, the n-gram loop guard, usage on every chunk and per-request timings
through the whole stack (the `openai` SDK → proxy → tritonserver → the tiny checkpoint), sent
as the SDK sends extensions: `extra_body`."""

import re
from pathlib import Path

import openai
import pytest
import requests
from helpers import data_url, wait_until
from sample_images import encoded_image
from tokenizers import Tokenizer

SERVED = "qwen2.5-vl-7b-instruct"
MESSAGES = [{"role": "user", "content": "Describe a cat."}]
EOS = "<|im_end|>"


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def vocabulary(tiny_checkpoint_path) -> Tokenizer:
    return Tokenizer.from_file(str(Path(tiny_checkpoint_path) / "tokenizer.json"))


@pytest.fixture(scope="module")
def word(vocabulary) -> int:
    """A token id that decodes to a word of ASCII letters on its own."""
    for token in range(vocabulary.get_vocab_size()):
        text = vocabulary.decode([token])
        if len(text) >= 2 and text.isascii() and text.isalpha():
            return token
    raise AssertionError("no word token in the tiny vocabulary")


def create(client, **kwargs):
    return client.chat.completions.create(
        model=SERVED, messages=kwargs.pop("messages", MESSAGES), temperature=0, **kwargs
    )


def model_metric(stack, name: str) -> float:
    text = requests.get(f"http://127.0.0.1:{stack.config.metrics_port}/metrics", timeout=5).text
    return sum(float(m) for m in re.findall(rf"^{name}\{{[^}}]*\}} ([0-9.eE+-]+)$", text, re.M))


def test_the_loop_guard_stops_a_forced_loop(client, stack, vocabulary, word):
    before = model_metric(stack, "qwen_vl_repetition_stops_total")
    guard = {"repetition_guard": {"ngram": 2, "max_repeats": 3}}
    response = create(client, max_tokens=60, logit_bias={str(word): 100}, extra_body=guard)
    choice = response.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.model_extra["repetition_detected"] is True
    # a one-token loop fills every 2-gram window: the 4th "w w" in a row ends it
    assert response.usage.completion_tokens == 8
    assert choice.message.content == vocabulary.decode([word] * 8)
    wait_until(
        lambda: model_metric(stack, "qwen_vl_repetition_stops_total") == before + 1,
        what="the model's repetition counter",
    )

    stream = create(
        client, max_tokens=60, logit_bias={str(word): 100}, extra_body=guard, stream=True
    )
    finishes = [
        chunk.choices[0].model_dump()
        for chunk in stream
        if chunk.choices and chunk.choices[0].finish_reason
    ]
    assert len(finishes) == 1 and finishes[0]["finish_reason"] == "stop"
    assert finishes[0]["repetition_detected"] is True

    free = create(client, max_tokens=16, extra_body=guard).choices[0]
    assert free.finish_reason == "length" and "repetition_detected" not in free.model_extra


def test_eos_ignore_eos_min_tokens_and_stop_token_ids(client, vocabulary, word):
    eos = vocabulary.token_to_id(EOS)
    forced_eos = {str(eos): 100}
    stopped = create(client, max_tokens=10, logit_bias=forced_eos)
    assert stopped.choices[0].finish_reason == "stop" and stopped.usage.completion_tokens == 1
    ignored = create(client, max_tokens=10, logit_bias=forced_eos, extra_body={"ignore_eos": True})
    assert ignored.choices[0].finish_reason == "length"
    assert ignored.usage.completion_tokens == 10
    held = create(client, max_tokens=10, logit_bias=forced_eos, extra_body={"min_tokens": 4})
    assert held.choices[0].finish_reason == "stop" and held.usage.completion_tokens == 5
    shown = create(
        client,
        max_tokens=3,
        logit_bias=forced_eos,
        extra_body={"ignore_eos": True, "skip_special_tokens": False},
    )
    assert shown.choices[0].message.content == EOS * 3

    forced = {"logit_bias": {str(word): 100}, "max_tokens": 10}
    by_id = create(client, extra_body={"stop_token_ids": [word]}, **forced)
    assert by_id.choices[0].finish_reason == "stop" and by_id.choices[0].message.content == ""
    kept = create(
        client, extra_body={"stop_token_ids": [word], "include_stop_str_in_output": True}, **forced
    )
    assert kept.choices[0].message.content == vocabulary.decode([word])


def test_min_p_with_a_seed_repeats_and_prompt_logprobs_cover_the_prompt(client):
    sampled = dict(temperature=1.0, seed=9, max_tokens=12, extra_body={"min_p": 0.2})
    first = client.chat.completions.create(model=SERVED, messages=MESSAGES, **sampled)
    again = client.chat.completions.create(model=SERVED, messages=MESSAGES, **sampled)
    assert first.choices[0].message.content == again.choices[0].message.content

    scored = create(client, max_tokens=2, extra_body={"prompt_logprobs": 1})
    entries = scored.model_extra["prompt_logprobs"]
    assert len(entries) == scored.usage.prompt_tokens and entries[0] is None
    for entry in entries[1:]:
        assert 1 <= len(entry) <= 2 and min(e["rank"] for e in entry.values()) == 1
        assert all(
            e["logprob"] <= 0 and isinstance(e["decoded_token"], str) for e in entry.values()
        )

    with pytest.raises(openai.BadRequestError) as caught:
        create(client, max_tokens=2, stream=True, extra_body={"prompt_logprobs": 1})
    assert caught.value.body["param"] == "prompt_logprobs"
    with pytest.raises(openai.BadRequestError) as caught:
        create(client, max_tokens=2, extra_body={"stop_token_ids": [10**6]})
    assert caught.value.body["param"] == "stop_token_ids[0]"  # the model's vocabulary check


def test_continuous_usage_and_timings_on_a_streamed_image_request(client, base_url):
    # An image no other test sends: the session stack's image cache would otherwise answer
    # it (a repeat runs no vision stage, vision_ms 0) when an earlier test sent the same one.
    image = data_url(encoded_image(size=(120, 90), color=(17, 201, 93)), "image/png")
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": image}},
                {"type": "text", "text": "What is it?"},
            ],
        }
    ]
    stream = create(
        client,
        messages=messages,
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},
        extra_body={"timings": True},
    )
    chunks = list(stream)
    assert all(chunk.usage is not None for chunk in chunks)
    completion = [chunk.usage.completion_tokens for chunk in chunks]
    assert completion == sorted(completion) and completion[0] == 0 and completion[-1] == 6
    prompt = {chunk.usage.prompt_tokens for chunk in chunks}
    assert len(prompt) == 1 and prompt.pop() > 12  # the image's tokens and the text's
    timings = chunks[-1].model_extra["timings"]
    assert all("timings" not in chunk.model_extra for chunk in chunks[:-1])
    stages = ("queue", "media_fetch", "media_decode", "preprocess", "vision", "prefill")
    assert all(timings[f"{stage}_ms"] >= 0 for stage in stages)
    assert timings["media_decode_ms"] > 0 and timings["vision_ms"] > 0
    assert timings["ttft_ms"] >= sum(timings[f"{stage}_ms"] for stage in stages[2:]) - 0.01
    assert timings["mean_itl_ms"] * 5 == pytest.approx(timings["decode_ms"], abs=0.01)
    metrics = requests.get(f"{base_url}/metrics", timeout=5).text
    assert re.search(r'qwen_vl_proxy_request_stage_seconds_count\{stage="vision"\} [1-9]', metrics)
