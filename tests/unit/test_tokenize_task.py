"""The model's tokenize and detokenize tasks and raw prompts (text_input, input_ids) on the tiny
checkpoint: a tokenize count is the prompt_tokens a generation of the same request reports."""

import json
import threading

import pytest
from sample_images import encoded_image
from sample_videos import clip

from qwen_vl_backend.contract import PIXELS_PER_TOKEN, Task, TokenizeResult
from qwen_vl_backend.errors import RequestError
from qwen_vl_backend.request.prepare import RawRequest, parse_task, prepare
from qwen_vl_backend.request.tokenize import answer_task, detokenize, tokenize
from qwen_vl_backend.settings import ModelSettings

SETTINGS = ModelSettings()
CONTEXT = 4096
# Two images of one picture with different budgets: the second is shrunk onto 8 tokens.
SMALL_BUDGET = 8 * PIXELS_PER_TOKEN
TWO_IMAGES = [
    {"type": "text", "text": "Compare these."},
    {"type": "image"},
    {"type": "image", "max_pixels": SMALL_BUDGET},
]
VIDEO = [{"type": "video", "fps": 2.0}, {"type": "text", "text": "What happens?"}]


def messages_request(content, images=(), videos=(), **fields) -> RawRequest:
    return RawRequest(
        request_id="t",
        messages=json.dumps([{"role": "user", "content": content}]),
        images=list(images),
        videos=list(videos),
        exclude_input_in_output=True,
        sampling_parameters=json.dumps({"max_tokens": 4, "temperature": 0}),
        **fields,
    )


CASES = {
    "text": lambda: messages_request("Describe a cat in one line."),
    "two images": lambda: messages_request(TWO_IMAGES, images=[encoded_image(size=(300, 200))] * 2),
    "video": lambda: messages_request(VIDEO, videos=[clip(seconds=2.0, size=(64, 48))]),
    "text_input": lambda: RawRequest(text_input="Once upon a time", sampling_parameters="{}"),
    "input_ids": lambda: RawRequest(input_ids=[270, 353, 92, 492], sampling_parameters="{}"),
}


@pytest.mark.parametrize("case", CASES)
def test_the_count_is_the_prompt_a_generation_prefills(checkpoint, case):
    raw = CASES[case]()
    result = tokenize(raw, checkpoint, SETTINGS, CONTEXT)
    prepared = prepare(raw, checkpoint, SETTINGS)
    assert result.count == prepared.prompt_tokens == len(result.tokens)
    assert result.tokens == prepared.inputs["input_ids"][0].tolist()
    assert sum(part.tokens for part in result.parts) == result.count
    image_tokens = sum(p.tokens for p in result.parts if p.type == "image")
    video_tokens = sum(p.tokens for p in result.parts if p.type == "video")
    assert (image_tokens, video_tokens) == (prepared.image_tokens, prepared.video_tokens)
    assert result.max_model_len == CONTEXT


def test_each_image_part_has_its_resized_size_and_budget(checkpoint):
    raw = CASES["two images"]()
    parts = tokenize(raw, checkpoint, SETTINGS, CONTEXT).parts
    images = [part for part in parts if part.type == "image"]
    assert [part.type for part in parts] == ["text", "image", "text", "image", "text"]
    full, small = images
    for image in images:
        assert image.width % 28 == 0 and image.height % 28 == 0
        assert image.tokens == image.width * image.height // PIXELS_PER_TOKEN
    assert (full.width, full.height) == (308, 196)  # 300x200 on the 28-pixel grid
    assert small.width * small.height <= SMALL_BUDGET < full.width * full.height


def test_a_video_part_counts_its_frames(checkpoint):
    parts = tokenize(CASES["video"](), checkpoint, SETTINGS, CONTEXT).parts
    (video,) = [part for part in parts if part.type == "video"]
    assert video.frames == 4  # 2 s at 2 fps
    # Two frames share one temporal patch: tokens per frame pair are the grid's.
    assert video.tokens == (video.frames // 2) * video.width * video.height // PIXELS_PER_TOKEN


def test_the_generation_prompt_and_token_strings_are_as_asked(checkpoint):
    with_prompt = tokenize(messages_request("hi"), checkpoint, SETTINGS, CONTEXT)
    without = tokenize(
        messages_request("hi", add_generation_prompt=False, return_token_strs=True),
        checkpoint,
        SETTINGS,
        CONTEXT,
    )
    assert with_prompt.tokens[: without.count] == without.tokens
    assert with_prompt.count > without.count
    assert with_prompt.token_strs is None
    assert without.token_strs == checkpoint.tokenizer.convert_ids_to_tokens(without.tokens)


def test_detokenize_is_the_text_of_the_ids_special_tokens_kept(checkpoint):
    text = "<|im_start|>user\nhello world"
    ids = tokenize(RawRequest(text_input=text), checkpoint, SETTINGS, CONTEXT).tokens
    assert detokenize(RawRequest(input_ids=ids), checkpoint) == text


def test_the_answer_round_trips_through_the_contract(checkpoint):
    text = answer_task(Task.TOKENIZE, CASES["two images"](), checkpoint, SETTINGS, CONTEXT)
    assert TokenizeResult.decode(text) == tokenize(
        CASES["two images"](), checkpoint, SETTINGS, CONTEXT
    )


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (RawRequest(input_ids=[1, 10**6]), "input_ids[1]"),
        (RawRequest(input_ids=[-1]), "input_ids[0]"),
        (RawRequest(input_ids=[]), "input_ids"),
        (RawRequest(input_ids=[1], text_input="x"), "input_ids"),
        (RawRequest(input_ids=[1], images=[b"x"]), "input_ids"),
        (RawRequest(text_input="<|image_pad|>"), "text_input"),
    ],
)
def test_bad_prompts_name_their_input(checkpoint, raw, param):
    with pytest.raises(RequestError) as caught:
        tokenize(raw, checkpoint, SETTINGS, CONTEXT)
    assert caught.value.param == param


def test_placeholder_ids_need_their_media(checkpoint):
    raw = RawRequest(input_ids=[5, checkpoint.image_token_id])
    with pytest.raises(RequestError) as caught:
        tokenize(raw, checkpoint, SETTINGS, CONTEXT)
    assert caught.value.param == "input_ids[1]"


def test_an_unknown_task_is_a_request_error():
    assert parse_task(None) is Task.GENERATE
    with pytest.raises(RequestError) as caught:
        parse_task("summarize")
    assert caught.value.param == "task"


class AnswerSink:
    def __init__(self):
        self.text, self.error, self.done = None, None, threading.Event()

    def answer(self, text):
        self.text = text
        self.done.set()

    def fail(self, error):
        self.error = error
        self.done.set()


class ChunkSink:
    def __init__(self):
        self.chunks, self.done = [], threading.Event()

    def is_cancelled(self):
        return False

    def send(self, chunk):
        self.chunks.append(chunk)
        if chunk.final:
            self.done.set()

    def fail(self, error):
        raise AssertionError(error)

    def cancelled(self):
        raise AssertionError("cancelled")


def test_the_engine_answers_tasks_without_a_slot(make_engine):
    engine = make_engine()
    sink, failing = AnswerSink(), AnswerSink()
    engine.submit_task(Task.TOKENIZE, CASES["two images"](), sink)
    engine.submit_task(Task.DETOKENIZE, RawRequest(input_ids=[10**6]), failing)
    assert sink.done.wait(60) and failing.done.wait(60)
    assert TokenizeResult.decode(sink.text).count > 0 and engine.running == 0
    assert isinstance(failing.error, RequestError) and failing.error.param == "input_ids[0]"


@pytest.mark.parametrize("stream", [False, True])
def test_a_raw_prompt_is_echoed_in_front_when_not_excluded(make_engine, checkpoint, stream):
    engine = make_engine()
    sink = ChunkSink()
    ids = [270, 353, 92, 492]
    raw = RawRequest(
        input_ids=ids,
        stream=stream,
        exclude_input_in_output=False,
        sampling_parameters=json.dumps({"max_tokens": 6, "temperature": 0}),
    )
    engine.submit(raw, sink)
    assert sink.done.wait(60)
    prompt = checkpoint.tokenizer.decode(ids)
    text = "".join(chunk.text for chunk in sink.chunks)
    assert text.startswith(prompt) and len(text) > len(prompt)
    assert sink.chunks[0].text.startswith(prompt)
    assert sink.chunks[-1].prompt_tokens == len(ids)
