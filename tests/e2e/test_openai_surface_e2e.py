"""The OpenAI chat surface end to end: the `openai` SDK → proxy (fetching http images from a
server on 127.0.0.1) → tritonserver → the tiny Qwen2.5-VL, checked against the processor's
own image token counts."""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest
import requests
from held_servers import server_fixture
from helpers import data_url
from PIL import Image
from qwen_vl_utils import smart_resize
from sample_images import encode
from stacks import running_stack, stack_launcher, tiny_checkpoint

SERVED = "qwen2.5-vl-7b-instruct"
MIN_PIXELS, MAX_PIXELS, LOW_MAX_PIXELS = 3136, 1003520, 200704


def two_tone(size, fmt, color):
    """A `color` image with a patch of another colour, encoded as `fmt`."""
    image = Image.new("RGB", size, color)
    image.paste(
        (255 - color[0], color[1], 255 - color[2]),
        (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2),
    )
    return encode(image, fmt)


# (width, height): large enough that the pixel budgets change the token counts.
BIG_JPEG = two_tone((1000, 700), "JPEG", (200, 40, 40))
MID_PNG = two_tone((640, 480), "PNG", (30, 160, 60))
SMALL_PNG = two_tone((300, 200), "PNG", (20, 40, 220))


def image_tokens(width, height, max_pixels, min_pixels=MIN_PIXELS):
    """Visual tokens of one image as the processor counts them: 28x28 pixels per token."""
    h, w = smart_resize(height, width, factor=28, min_pixels=min_pixels, max_pixels=max_pixels)
    return (h // 28) * (w // 28)


class _Images(BaseHTTPRequestHandler):
    routes = {}

    def do_GET(self):
        if self.path.startswith("/redirect?to="):
            self.send_response(302)
            self.send_header("Location", self.path[len("/redirect?to=") :])
            self.end_headers()
            return
        if self.path not in self.routes:
            self.send_error(404)
            return
        body, content_type = self.routes[self.path]
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_server():
    """Base URL of an HTTP server on 127.0.0.1 serving the test images."""
    _Images.routes = {
        "/big.jpg": (BIG_JPEG, "image/jpeg"),
        "/mid.png": (MID_PNG, "application/octet-stream"),
    }  # sniffed, not trusted
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def sdk(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def _messages(image_server):
    small = data_url(SMALL_PNG)
    return [
        {"role": "system", "content": "You compare pictures."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Compare these two pictures."},
                {
                    "type": "image_url",
                    "image_url": {"url": f"{image_server}/big.jpg", "detail": "low"},
                },
                {
                    "type": "image_url",
                    "image_url": {"url": f"{image_server}/mid.png", "max_pixels": 100352},
                },
            ],
        },
        {"role": "assistant", "content": "They differ in colour."},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": small, "detail": "high"}},
                {"type": "text", "text": "And this one?"},
            ],
        },
    ]


EXPECTED_IMAGE_TOKENS = (
    image_tokens(1000, 700, LOW_MAX_PIXELS)
    + image_tokens(640, 480, 100352)
    + image_tokens(300, 200, MAX_PIXELS)
)


def _stop_string(text):
    """Two printable characters of `text` (after its start) to use as a stop sequence."""
    for k in range(2, len(text) - 1):
        candidate = text[k : k + 2]
        if candidate.isprintable() and candidate.strip() and "\ufffd" not in candidate:
            return candidate
    pytest.fail(f"no usable stop string in {text!r}")


def test_acceptance_http_and_base64_images_detail_stop_seed_include_usage(base_url, image_server):
    client = sdk(base_url)
    request = dict(
        model=SERVED, messages=_messages(image_server), max_tokens=24, temperature=0.9, seed=1234
    )

    free = client.chat.completions.create(**request)
    details = free.usage.prompt_tokens_details
    assert details.model_extra["image_tokens"] == EXPECTED_IMAGE_TOKENS
    assert details.cached_tokens == 0
    assert free.usage.prompt_tokens > EXPECTED_IMAGE_TOKENS

    stop = _stop_string(free.choices[0].message.content)
    expected_text = free.choices[0].message.content.split(stop)[0]

    whole = client.chat.completions.create(**request, stop=[stop, "\u241e never"])
    chunks = list(
        client.chat.completions.create(
            **request,
            stop=[stop, "\u241e never"],
            stream=True,
            stream_options={"include_usage": True},
        )
    )

    # The seed makes the sampled tokens repeat, so the stop cuts the same text in both modes.
    assert whole.choices[0].message.content == expected_text
    assert whole.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == expected_text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage.model_dump() == whole.usage.model_dump()
    assert (
        usage_chunk.usage.prompt_tokens_details.model_extra["image_tokens"] == EXPECTED_IMAGE_TOKENS
    )
    assert whole.usage.prompt_tokens == free.usage.prompt_tokens


def test_detail_and_pixel_bounds_change_the_image_token_count(base_url, image_server):
    client = sdk(base_url)

    def count(**image_url):
        content = [
            {"type": "image_url", "image_url": {"url": f"{image_server}/big.jpg", **image_url}},
            {"type": "text", "text": "?"},
        ]
        completion = client.chat.completions.create(
            model=SERVED, max_tokens=1, messages=[{"role": "user", "content": content}]
        )
        return completion.usage.prompt_tokens_details.model_extra["image_tokens"]

    assert (
        count()
        == count(detail="auto")
        == count(detail="high")
        == image_tokens(1000, 700, MAX_PIXELS)
    )
    assert count(detail="low") == image_tokens(1000, 700, LOW_MAX_PIXELS) <= 256
    assert count(min_pixels=MAX_PIXELS) == image_tokens(
        1000, 700, MAX_PIXELS, min_pixels=MAX_PIXELS
    )
    assert count(max_pixels=50176) == image_tokens(1000, 700, 50176)


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_cover_every_completion_token(base_url, stream):
    client = sdk(base_url)
    request = dict(
        model=SERVED,
        max_tokens=12,
        logprobs=True,
        top_logprobs=3,
        messages=[{"role": "user", "content": "Tell me something."}],
    )
    if stream:
        chunks = list(
            client.chat.completions.create(
                **request, stream=True, stream_options={"include_usage": True}
            )
        )
        entries = [
            e
            for c in chunks
            if c.choices and c.choices[0].logprobs
            for e in c.choices[0].logprobs.content
        ]
        completion_tokens = chunks[-1].usage.completion_tokens
    else:
        completion = client.chat.completions.create(**request)
        entries = completion.choices[0].logprobs.content
        completion_tokens = completion.usage.completion_tokens
    assert len(entries) == completion_tokens == 12
    for entry in entries:
        assert entry.logprob <= 0 and isinstance(entry.bytes, list)
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob


def _n_request(stream):
    small = data_url(SMALL_PNG)
    return dict(
        model=SERVED,
        n=3,
        max_tokens=10,
        temperature=1.0,
        seed=4,
        stream=stream,
        logprobs=True,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": small}},
                    {"type": "text", "text": "Three captions, please."},
                ],
            }
        ],
    )


def test_n_choices_stream_and_non_stream_agree_and_usage_counts_every_choice(base_url):
    client = sdk(base_url)
    completion = client.chat.completions.create(**_n_request(False))
    assert [c.index for c in completion.choices] == [0, 1, 2]
    whole = [c.message.content for c in completion.choices]
    assert len(set(whole)) == 3, "seed + index: the choices sample differently"
    assert all(c.finish_reason in ("stop", "length") for c in completion.choices)
    chunks = list(
        client.chat.completions.create(**_n_request(True), stream_options={"include_usage": True})
    )
    streamed, finishes = {}, {}
    for chunk in chunks:
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert [streamed[i] for i in range(3)] == whole
    assert finishes == {i: c.finish_reason for i, c in enumerate(completion.choices)}
    assert chunks[-1].usage.completion_tokens == completion.usage.completion_tokens
    # every choice's tokens, not one choice's (logprobs: one entry per token)
    assert completion.usage.completion_tokens == sum(
        len(c.logprobs.content) for c in completion.choices
    )
    assert completion.usage.completion_tokens > max(
        len(c.logprobs.content) for c in completion.choices
    )
    assert completion.usage.prompt_tokens > 0


def test_n_beyond_the_models_cap_is_a_400_on_n(base_url):
    response = requests.post(
        f"{base_url}/v1/chat/completions",
        timeout=60,
        json={"model": SERVED, "n": 9, "messages": [{"role": "user", "content": "hi"}]},
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "n"


def test_request_fields_and_ignored_fields(base_url):
    response = requests.post(
        f"{base_url}/v1/chat/completions",
        timeout=60,
        json={
            "model": SERVED,
            "messages": [{"role": "user", "content": "hi"}],
            "max_completion_tokens": 3,
            "seed": 0,
            "top_p": 0.9,
            "top_k": 20,
            "presence_penalty": 0.5,
            "frequency_penalty": 0.5,
            "repetition_penalty": 1.1,
            "n": 1,
            "user": "e2e",
            "response_format": {"type": "text"},
            "service_tier": "auto",
            "prediction": {"type": "content", "content": "x"},
        },
    )
    assert response.status_code == 200, response.text
    assert response.headers["X-Ignored-Fields"] == "service_tier, prediction"
    assert response.json()["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize(
    "url_path, code",
    [
        ("http://169.254.169.254/latest/meta-data/", "image_url_forbidden"),
        ("http://localhost:{port}/big.jpg", "image_url_forbidden"),  # only 127.0.0.1 is allowed
        ("{server}/redirect?to=http://localhost:{port}/big.jpg", "image_url_forbidden"),
        ("{server}/missing.png", "image_fetch_failed"),
        ("file:///etc/passwd", "image_url_forbidden"),
    ],
)
def test_image_url_refusals(base_url, image_server, url_path, code):
    port = image_server.rsplit(":", 1)[1]
    url = url_path.format(server=image_server, port=port)
    with pytest.raises(openai.BadRequestError) as caught:
        sdk(base_url).chat.completions.create(
            model=SERVED,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "x"},
                        {"type": "image_url", "image_url": {"url": url}},
                    ],
                }
            ],
        )
    assert caught.value.code == code
    assert caught.value.param == "messages[0].content[1].image_url"


def test_model_errors_point_at_the_client_part(base_url):
    broken = data_url(MID_PNG[:80])  # PNG magic, no image
    with pytest.raises(openai.BadRequestError) as caught:
        sdk(base_url).chat.completions.create(
            model=SERVED,
            messages=[
                {"role": "user", "content": "first"},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "x"},
                        {"type": "image_url", "image_url": {"url": broken}},
                    ],
                },
            ],
        )
    assert caught.value.param == "messages[1].content[1].image_url"
    assert "Traceback" not in caught.value.message


def test_unsupported_part_and_models(base_url):
    client = sdk(base_url)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=SERVED,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "input_audio",
                            "input_audio": {"data": "UklGRg==", "format": "wav"},
                        }
                    ],
                }
            ],
        )
    assert (caught.value.code, caught.value.param) == (
        "unsupported_content_type",
        "messages[0].content[0]",
    )
    assert [m.id for m in client.models.list().data] == [SERVED]
    assert client.models.retrieve(SERVED).id == SERVED
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


# ---- lazy loading: Triton in explicit model control, the proxy loads on first use ------------


def _lazy_stack(tmp_path_factory):
    # wait_ready waits for /health here: nothing is loaded yet
    return running_stack(tiny_checkpoint(), ready_timeout=120, lazy_load=True)


# Starts ahead, while the tiers before run (tests/held_servers.py); nothing loads until the test.
lazy_stack = server_fixture("lazy_stack", _lazy_stack, scope="module", ahead=True)


def test_lazy_load_loads_once_on_the_first_requests(lazy_stack):
    base_url = lazy_stack.config.proxy_url
    assert "--model-control-mode=explicit" in stack_launcher.triton_command(lazy_stack.config)
    ready = requests.get(f"{base_url}/ready", timeout=5)
    assert ready.status_code == 503
    assert ready.json()["error"]["code"] == "model_not_loaded"
    assert (
        ready.json()["error"]["message"]
        == "model not loaded yet (lazy loading: the first request loads it)"
    )
    models = requests.get(f"{base_url}/v1/models", timeout=5).json()
    assert [m["id"] for m in models["data"]] == [SERVED]  # listed before it is loaded

    def ask(i):
        return requests.post(
            f"{base_url}/v1/chat/completions",
            timeout=240,
            json={
                "model": SERVED,
                "max_tokens": 3,
                "messages": [{"role": "user", "content": f"hello {i}"}],
            },
        )

    started = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(ask, range(4)))
    assert [r.status_code for r in responses] == [200] * 4, [r.text for r in responses]
    assert time.monotonic() - started < 240
    assert requests.get(f"{base_url}/ready", timeout=5).status_code == 200
    log = lazy_stack.triton_log.read_text(errors="replace")
    assert log.count("successfully loaded 'qwen2_5_vl'") == 1, log[-3000:]
    assert json.loads(ask(9).text)["choices"][0]["message"]["content"] is not None


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def test_a_tool_round_trip_with_an_image_through_the_whole_stack(base_url):
    """Tools reach the prompt (Qwen's tool section) and a call/result history renders; the
    random-weight model's answer itself means nothing."""
    client = sdk(base_url)
    image = {"type": "image_url", "image_url": {"url": data_url(SMALL_PNG)}}
    question = {"role": "user", "content": [image, {"type": "text", "text": "Weather there?"}]}
    plain = client.chat.completions.create(
        model=SERVED, messages=[question], max_tokens=2, temperature=0
    )
    with_tools = client.chat.completions.create(
        model=SERVED, messages=[question], tools=[WEATHER_TOOL], max_tokens=2, temperature=0
    )
    # the tool section (instructions and the schema) is in the prompt
    assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens + 50
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    history = [
        question,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 22C"},
    ]
    answer = client.chat.completions.create(
        model=SERVED, messages=history, tools=[WEATHER_TOOL], max_tokens=2, temperature=0
    )
    assert answer.usage.prompt_tokens > with_tools.usage.prompt_tokens
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
