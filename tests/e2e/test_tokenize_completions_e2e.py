"""/tokenize, /detokenize and /v1/completions through the whole stack (proxy, tritonserver, the
tiny checkpoint): tokenize counts are the prompt_tokens of the same request's generation, for
text, images of different `detail` and a video; the openai SDK's completions."""

import base64

import openai
import pytest
import requests
from sample_images import encoded_image
from sample_videos import clip

SERVED = "qwen2.5-vl-7b-instruct"


def data_url(data: bytes, media_type: str) -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def image(detail: str | None = None, size=(300, 200), **budget) -> dict:
    url = {"url": data_url(encoded_image("PNG", size=size), "image/png"), **budget}
    if detail is not None:
        url["detail"] = detail
    return {"type": "image_url", "image_url": url}


CONVERSATIONS = {
    "text": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Describe a cat in one line."},
    ],
    "images": [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Compare these."},
                image("low", size=(640, 480)),
                image("high", size=(640, 480)),
                image(),
                image(size=(200, 300), max_pixels=8 * 28 * 28),
            ],
        }
    ],
    "video": [
        {
            "role": "user",
            "content": [
                {
                    "type": "video_url",
                    "video_url": {"url": data_url(clip(seconds=2.0), "video/mp4"), "fps": 2.0},
                },
                {"type": "text", "text": "What happens?"},
            ],
        }
    ],
}


def post(base_url: str, path: str, body: dict) -> dict:
    response = requests.post(f"{base_url}{path}", json={"model": SERVED, **body}, timeout=180)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("case", CONVERSATIONS)
def test_tokenize_counts_the_prompt_tokens_of_the_same_chat_completion(base_url, case):
    messages = CONVERSATIONS[case]
    tokenized = post(base_url, "/tokenize", {"messages": messages})
    chat = post(base_url, "/v1/chat/completions", {"messages": messages, "max_tokens": 1})
    usage = chat["usage"]
    assert tokenized["count"] == usage["prompt_tokens"] == len(tokenized["tokens"])
    assert sum(part["tokens"] for part in tokenized["parts"]) == tokenized["count"]
    assert tokenized["max_model_len"] > tokenized["count"]
    details = usage["prompt_tokens_details"]
    by_kind = {
        kind: sum(p["tokens"] for p in tokenized["parts"] if p["type"] == kind)
        for kind in ("image", "video")
    }
    assert by_kind["image"] == details["image_tokens"]
    assert by_kind["video"] == details.get("video_tokens", 0)


def test_each_image_part_shows_its_detail_budget(base_url):
    tokenized = post(base_url, "/tokenize", {"messages": CONVERSATIONS["images"]})
    low, high, auto, small = [p for p in tokenized["parts"] if p["type"] == "image"]
    assert low["width"] * low["height"] <= 448 * 448 < high["width"] * high["height"]
    assert (high["width"], high["height"]) == (644, 476)  # 640x480 on the 28-pixel grid
    assert (auto["width"], auto["height"]) == (308, 196)
    assert small["tokens"] <= 8
    for part in (low, high, auto, small):
        assert part["tokens"] == part["width"] * part["height"] // (28 * 28)


def test_a_video_part_shows_its_frames(base_url):
    tokenized = post(base_url, "/tokenize", {"messages": CONVERSATIONS["video"]})
    (video,) = [p for p in tokenized["parts"] if p["type"] == "video"]
    assert video["frames"] == 4 and video["tokens"] > 0


def test_a_prompt_round_trips_through_detokenize(base_url):
    prompt = "Once upon a time, 很久以前"
    tokenized = post(base_url, "/tokenize", {"prompt": prompt, "return_token_strs": True})
    assert len(tokenized["token_strs"]) == tokenized["count"]
    assert post(base_url, "/detokenize", {"tokens": tokenized["tokens"]}) == {"prompt": prompt}
    completion = post(base_url, "/v1/completions", {"prompt": prompt, "max_tokens": 1})
    assert completion["usage"]["prompt_tokens"] == tokenized["count"]


def test_bad_tokenize_requests_are_400s_naming_the_field(base_url):
    response = requests.post(f"{base_url}/detokenize", json={"tokens": [1, 10**9]}, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["param"] == "tokens[1]"
    response = requests.post(f"{base_url}/tokenize", json={"prompt": "<|image_pad|>"}, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"


# ---- /v1/completions with the openai SDK ---------------------------------------------------


@pytest.fixture(scope="module")
def client(base_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)


def complete(client: openai.OpenAI, **fields):
    return client.completions.create(model=SERVED, **{"max_tokens": 8, "temperature": 0, **fields})


def test_stream_and_non_stream_give_the_same_text(client):
    whole = complete(client, prompt="Once upon a time")
    assert whole.object == "text_completion" and whole.choices[0].text
    assert whole.usage.completion_tokens == 8 and whole.choices[0].finish_reason == "length"
    chunks = list(complete(client, prompt="Once upon a time", stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_a_token_id_prompt_is_the_same_prompt_as_its_text(client, base_url):
    ids = post(base_url, "/tokenize", {"prompt": "Once upon a time"})["tokens"]
    by_ids = complete(client, prompt=ids, echo=True)
    by_text = complete(client, prompt="Once upon a time", echo=True)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_text.choices[0].text.startswith("Once upon a time")
    assert by_ids.usage.prompt_tokens == len(ids)


def test_a_list_of_prompts_gets_n_choices_each(client):
    result = complete(client, prompt=["Once upon", "In the beginning"], n=2)
    assert [c.index for c in result.choices] == [0, 1, 2, 3]
    alone = complete(client, prompt="In the beginning")
    assert result.choices[2].text == result.choices[3].text == alone.choices[0].text


def test_logprobs_cover_each_token_with_offsets(client):
    result = complete(client, prompt="Once upon", logprobs=2)
    choice_logprobs = result.choices[0].logprobs
    assert len(choice_logprobs.tokens) == result.usage.completion_tokens
    # 2 alternatives and the chosen token, keyed by text (tokens that decode alike share a key)
    assert all(1 <= len(top) <= 3 for top in choice_logprobs.top_logprobs)
    # greedy: each chosen token is its step's most likely one
    for token, logprob, top in zip(
        choice_logprobs.tokens, choice_logprobs.token_logprobs, choice_logprobs.top_logprobs
    ):
        assert logprob == pytest.approx(max(top.values())) and token in top
    offsets = choice_logprobs.text_offset
    assert offsets[0] == 0 and offsets == sorted(offsets)


def test_echo_with_logprobs_scores_the_prompt(client):
    result = complete(client, prompt="Once upon a time", echo=True, logprobs=1, max_tokens=2)
    logprobs = result.choices[0].logprobs
    prompt_tokens = result.usage.prompt_tokens
    assert len(logprobs.tokens) == prompt_tokens + 2
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert all(value is not None for value in logprobs.token_logprobs[1:])
    assert "".join(logprobs.tokens[:prompt_tokens]) == "Once upon a time"
    assert logprobs.text_offset[prompt_tokens] == len("Once upon a time")


def test_best_of_returns_the_n_best_of_best_of_and_bills_them_all(client):
    sampled = {"prompt": "Once upon", "temperature": 1.0, "seed": 7, "max_tokens": 6}
    # best_of 4 samples the 4 choices n=4 does (choice i seeded seed + i)
    every = complete(client, n=4, logprobs=0, **sampled)
    mean = {
        c.text: sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs)
        for c in every.choices
    }
    result = complete(client, n=2, best_of=4, **sampled)
    assert [c.index for c in result.choices] == [0, 1]
    assert all(c.logprobs is None for c in result.choices)
    assert [c.text for c in result.choices] == sorted(mean, key=mean.get, reverse=True)[:2]
    assert result.usage.completion_tokens == every.usage.completion_tokens
    with pytest.raises(openai.BadRequestError) as caught:
        complete(client, prompt="x", best_of=2, stream=True)
    assert caught.value.body["param"] == "best_of"


def test_suffix_is_refused_by_name(client):
    with pytest.raises(openai.BadRequestError) as caught:
        complete(client, prompt="x", suffix="y")
    assert caught.value.body["param"] == "suffix"
