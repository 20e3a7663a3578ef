"""vLLM's extra sampling fields, the repetition guard and per-request timings in the engine:
the batched arithmetic on made-up logits, the text rules (stop strings kept, stop tokens left
out, min_tokens), and whole requests on the tiny checkpoint, alone and in mixed batches."""

import json

import pytest
import torch
from test_engine import ChoiceSink, RecordingSink, raw_request

from qwen_vl_backend.contract import TIMING_STAGES
from qwen_vl_backend.engine.detokenize import TextAssembler
from qwen_vl_backend.engine.repetition import RepetitionGuard
from qwen_vl_backend.engine.sampling import ResolvedSampling, TokenSampler, sample
from qwen_vl_backend.errors import RequestError
from qwen_vl_backend.request.params import parse_sampling_parameters
from qwen_vl_backend.request.prepare import prepare
from qwen_vl_backend.settings import ModelSettings

VOCAB = 64
PROMPT = "Describe a cat."


# ---- the batched arithmetic ------------------------------------------------------------------


def sampler(settings: ResolvedSampling) -> TokenSampler:
    return TokenSampler(settings, torch.tensor([1, 2]), VOCAB)


def steps(logits: torch.Tensor, samplers: list[TokenSampler], count: int) -> list[list[int]]:
    """`count` steps over the same logits: each row's tokens in order."""
    rows = [[] for _ in samplers]
    for _ in range(count):
        tokens, _ = sample(logits.clone(), samplers, [None] * len(samplers))
        for row, token in zip(rows, tokens):
            row.append(token)
    return rows


def test_a_logit_bias_forces_or_forbids_a_token():
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(0))
    top = int(logits.argmax())
    forced = sampler(ResolvedSampling(greedy=True, logit_bias=((7, 100.0),)))
    assert steps(logits, [forced], 3) == [[7, 7, 7]]
    banned = sampler(ResolvedSampling(greedy=True, logit_bias=((top, -100.0),)))
    assert top not in steps(logits, [banned], 3)[0]
    drawn = sampler(ResolvedSampling(greedy=False, seed=1, logit_bias=((9, 100.0),)))
    assert steps(logits, [drawn], 5) == [[9] * 5]


def test_min_tokens_holds_the_stop_tokens_back_that_long():
    logits = torch.zeros(1, VOCAB)
    logits[0, 5] = 10.0  # the stop token is the likeliest by far
    settings = ResolvedSampling(greedy=True, min_tokens=3, stop_tokens=(5,))
    tokens = steps(logits, [sampler(settings)], 5)[0]
    assert 5 not in tokens[:3] and tokens[3:] == [5, 5]


def test_min_p_keeps_only_the_tokens_near_the_top():
    logits = torch.zeros(1, VOCAB)
    logits[0, 3], logits[0, 4] = 5.0, 4.9  # two likely tokens, the rest far below
    settings = ResolvedSampling(greedy=False, temperature=2.0, min_p=0.5, seed=3)
    assert set(steps(logits, [sampler(settings)], 40)[0]) == {3, 4}
    free = ResolvedSampling(greedy=False, temperature=2.0, seed=3)
    assert len(set(steps(logits, [sampler(free)], 40)[0])) > 2


def test_rows_with_the_extras_draw_the_same_tokens_alone_and_in_a_mixed_batch():
    """Batch invariance: each row's tokens over several steps (min_tokens lifting mid-way)
    are the same whatever else shares the step."""
    logits = torch.randn(5, VOCAB, generator=torch.Generator().manual_seed(4)) * 2
    rows = [
        ResolvedSampling(greedy=False, seed=11, min_p=0.2, logit_bias=((2, 3.0), (8, -5.0))),
        ResolvedSampling(greedy=True, min_tokens=2, stop_tokens=(int(logits[1].argmax()),)),
        ResolvedSampling(greedy=True),  # plain greedy: decided by the batch-wide argmax
        ResolvedSampling(greedy=False, seed=5, temperature=0.7, top_k=10, repetition_penalty=1.2),
        ResolvedSampling(greedy=True, logit_bias=((int(logits[4].argmax()), -100.0),)),
    ]
    together = steps(logits, [sampler(settings) for settings in rows], 4)
    for row, settings in enumerate(rows):
        alone = steps(logits[row : row + 1], [sampler(settings)], 4)[0]
        assert together[row] == alone, row


# ---- the repetition guard --------------------------------------------------------------------


def first_stop(tokens: list[int], ngram: int, max_repeats: int) -> int | None:
    """How many tokens the guard let through before it stopped (None: it never did)."""
    guard = RepetitionGuard(ngram, max_repeats)
    for count, token in enumerate(tokens, start=1):
        if guard.push(token):
            return count
    return None


@pytest.mark.parametrize(
    ("tokens", "ngram", "max_repeats", "stops_after"),
    [
        ([1, 2] * 10, 2, 3, 8),  # the 4th "1 2" in a row
        ([9, 1, 2, 3] + [1, 2, 3] * 5, 3, 2, 10),  # a lead-in, then 3 times "1 2 3"
        ([7] * 20, 4, 2, 12),  # a period of 1 divides 4: "7 7 7 7" three times
        ([1, 2, 3] * 8, 2, 3, None),  # a period of 3 does not divide 2
        ([1, 2] * 3 + [5] + [1, 2] * 3, 2, 3, None),  # broken runs start over
        (list(range(40)), 1, 1, None),
        ([4, 4], 1, 1, 2),
    ],
)
def test_the_guard_stops_at_the_repeat_after_max_repeats(tokens, ngram, max_repeats, stops_after):
    assert first_stop(tokens, ngram, max_repeats) == stops_after


# ---- the text: stop strings kept, stop tokens left out, min_tokens --------------------------


def letters(ids) -> str:
    return "".join(chr(ord("a") + i) for i in ids)


def assembled(tokens, hidden_last=False, **options) -> tuple[str, int, bool]:
    assembler = TextAssembler(letters, **options)
    text = ""
    for position, token in enumerate(tokens):
        hidden = hidden_last and position == len(tokens) - 1
        text += assembler.push(token, hidden)[0]
        if assembler.stopped:
            break
    tail, _ = assembler.finish()
    return text + tail, assembler.num_tokens, assembler.stopped


def test_a_stop_string_can_stay_in_the_text():
    abcde = [0, 1, 2, 3, 4]
    assert assembled(abcde, stop=["cd"]) == ("ab", 4, True)
    assert assembled(abcde, stop=["cd"], include_stop=True) == ("abcd", 4, True)


def test_stop_strings_count_only_from_min_tokens_on():
    tokens = [0, 1, 0, 1, 0, 1]  # "ababab"
    assert assembled(tokens, stop=["ab"])[0] == ""
    # "ab" ends at tokens 2, 4 and 6: from 3 tokens on, the one ending at the 4th stops it
    assert assembled(tokens, stop=["ab"], min_tokens=3) == ("ab", 4, True)
    assert assembled(tokens, stop=["ab"], min_tokens=7) == ("ababab", 6, False)


def test_a_hidden_token_counts_without_its_text():
    assert assembled([0, 1, 2], hidden_last=True) == ("ab", 3, False)


# ---- whole requests on the tiny checkpoint ---------------------------------------------------


@pytest.fixture(scope="module")
def engine(checkpoint):
    from qwen_vl_backend.engine.batching import BatchingEngine

    engine = BatchingEngine(checkpoint, ModelSettings())
    yield engine
    assert engine.shutdown(30)


@pytest.fixture(scope="module")
def words(checkpoint) -> list[int]:
    """Token ids that decode to a word of 2+ ASCII letters on their own (not special)."""
    tokenizer = checkpoint.tokenizer
    special = set(tokenizer.all_special_ids)
    found = []
    for token in range(len(tokenizer)):
        text = tokenizer.decode([token])
        if token not in special and len(text) >= 2 and text.isascii() and text.isalpha():
            found.append(token)
    assert len(found) >= 4
    return found


def run(engine, content=PROMPT, stream=False, timings=False, **sampling):
    sink = RecordingSink()
    raw = raw_request(content, stream, **sampling)
    raw.return_timings = timings
    engine.submit(raw, sink)
    return sink.wait()


def text_of(checkpoint, *tokens) -> str:
    return checkpoint.tokenizer.decode(list(tokens))


EOS = 2  # <|im_end|> on the tiny checkpoint


def test_eos_stops_unless_ignore_eos_and_not_before_min_tokens(engine, checkpoint):
    assert EOS in checkpoint.eos_token_ids
    forced = {"logit_bias": {str(EOS): 100}, "max_tokens": 12}
    stopped = run(engine, **forced).final
    assert (stopped.text, stopped.num_tokens, stopped.finish_reason) == ("", 1, "stop")
    ignored = run(engine, ignore_eos=True, **forced).final
    assert (ignored.num_tokens, ignored.finish_reason) == (12, "length")
    greedy = run(engine, max_tokens=12).final.text
    held = run(engine, min_tokens=5, **forced).final
    # EOS banned for 5 tokens (the greedy ones), then sampled: counted, not shown
    assert held.num_tokens == 6 and held.finish_reason == "stop"
    assert greedy.startswith(held.text) and held.text


def test_stop_token_ids_stop_and_are_left_out_unless_asked(engine, checkpoint, words):
    word = words[0]
    sampling = {"logit_bias": {str(word): 100}, "stop_token_ids": [word], "max_tokens": 10}
    left_out = run(engine, **sampling).final
    assert (left_out.text, left_out.num_tokens, left_out.finish_reason) == ("", 1, "stop")
    kept = run(engine, include_stop_str_in_output=True, **sampling).final
    assert kept.text == text_of(checkpoint, word) and kept.finish_reason == "stop"


def test_a_stop_string_stays_in_the_text_when_asked(engine):
    full = run(engine).final.text
    stop = full[5:8]
    kept = run(engine, stop=[stop], include_stop_str_in_output=True).final
    assert kept.text == full[: full.index(stop) + len(stop)] and kept.finish_reason == "stop"


def test_special_tokens_show_when_not_skipped(engine, checkpoint):
    special = "<|object_ref_start|>"
    token = checkpoint.tokenizer.convert_tokens_to_ids(special)
    sampling = {"logit_bias": {str(token): 100}, "max_tokens": 3}
    assert run(engine, **sampling).final.text == ""
    assert run(engine, skip_special_tokens=False, **sampling).final.text == special * 3


def test_the_guard_stops_a_forced_loop_with_stop_and_a_flag(engine, checkpoint, words):
    a, b = words[:2]
    guard = {"ngram": 2, "max_repeats": 3}
    # +100 on one word: a loop of one token, which every 2-gram window repeats
    result = run(engine, logit_bias={str(a): 100}, repetition_guard=guard, max_tokens=50).final
    assert (result.num_tokens, result.finish_reason, result.repetition_detected) == (
        8,
        "stop",
        True,
    )
    assert result.text == text_of(checkpoint, *[a] * 8)
    assert engine.stats.repetition_stops >= 1
    streamed = run(
        engine, stream=True, logit_bias={str(b): 100}, repetition_guard=guard, max_tokens=50
    )
    assert streamed.final.repetition_detected and streamed.final.finish_reason == "stop"
    assert not any(chunk.repetition_detected for chunk in streamed.sends)
    # not before min_tokens; and a free-running greedy text is not a loop
    late = run(
        engine, logit_bias={str(a): 100}, repetition_guard=guard, min_tokens=20, max_tokens=50
    )
    assert late.final.num_tokens == 20 and late.final.repetition_detected
    free = run(engine, repetition_guard=guard, max_tokens=24).final
    assert free.finish_reason == "length" and not free.repetition_detected


def test_the_servers_default_guard_and_a_request_turning_it_off(make_engine, words):
    engine = make_engine(repetition_guard_ngram=1, repetition_guard_max_repeats=4)
    forced = {"logit_bias": {str(words[0]): 100}, "max_tokens": 30}
    assert run(engine, **forced).final.num_tokens == 5
    off = run(engine, repetition_guard={"ngram": 0}, **forced).final
    assert (off.num_tokens, off.finish_reason, off.repetition_detected) == (30, "length", False)


def test_prompt_logprobs_are_the_models_scores_of_the_prompt(engine, checkpoint):
    result = run(engine, prompt_logprobs=2, max_tokens=2).final
    prepared = prepare(raw_request(PROMPT), checkpoint, ModelSettings())
    ids = prepared.inputs["input_ids"][0]
    with torch.no_grad():
        reference = torch.log_softmax(checkpoint.model(input_ids=ids[None]).logits[0].float(), -1)
    entries = result.prompt_logprobs
    assert len(entries) == prepared.prompt_tokens and entries[0] is None
    for position, entry in enumerate(entries[1:]):
        token = int(ids[position + 1])
        expected = reference[position]
        assert entry[str(token)]["logprob"] == pytest.approx(float(expected[token]), abs=1e-4)
        assert entry[str(token)]["rank"] == int((expected > expected[token]).sum()) + 1
        assert entry[str(token)]["decoded_token"] == checkpoint.tokenizer.decode([token])
        ranks = sorted(e["rank"] for e in entry.values())
        assert ranks[:2] == [1, 2] and len(entry) in (2, 3)


def test_prompt_logprobs_do_not_depend_on_chunking_or_neighbours(make_engine):
    chunked = make_engine(max_step_tokens=8)
    neighbours = [RecordingSink() for _ in range(3)]
    for i, sink in enumerate(neighbours):
        chunked.submit(raw_request(f"noise {i} " * 3, max_tokens=20, temperature=1.0), sink)
    alone = make_engine()
    a = run(alone, prompt_logprobs=1, max_tokens=3).final.prompt_logprobs
    b = run(chunked, prompt_logprobs=1, max_tokens=3).final.prompt_logprobs
    for sink in neighbours:
        sink.wait()
    assert len(a) == len(b)
    for x, y in zip(a[1:], b[1:]):
        assert x.keys() == y.keys()
        for key in x:
            assert x[key]["logprob"] == pytest.approx(y[key]["logprob"], abs=1e-5)


def test_the_extras_give_the_same_tokens_alone_and_in_a_mixed_batch(make_engine, words):
    """A request with a logit bias, min-p, min_tokens and a seed gets the same text with
    other requests (greedy, sampled, penalised, with images or not) in its steps."""
    engine = make_engine()
    extras = {
        "temperature": 0.9,
        "seed": 21,
        "min_p": 0.05,
        "min_tokens": 10,
        "logit_bias": {str(words[1]): 4, str(words[2]): -100},
        "max_tokens": 24,
    }
    alone = run(engine, "hello there", **extras).final.text
    sinks = [RecordingSink() for _ in range(4)]
    engine.submit(raw_request("hello there", **extras), sinks[0])
    others = [
        {"temperature": 1.0, "seed": 3, "repetition_penalty": 1.3},
        {"logit_bias": {str(words[0]): 100}, "repetition_guard": {"ngram": 1, "max_repeats": 2}},
        {"temperature": 0.5, "seed": 4, "min_p": 0.3, "ignore_eos": True},
    ]
    for i, (sink, sampling) in enumerate(zip(sinks[1:], others)):
        engine.submit(raw_request(f"neighbour {i}", max_tokens=30, **sampling), sink)
    assert sinks[0].wait().final.text == alone
    for sink in sinks[1:]:
        sink.wait()


def test_timings_cover_every_stage_and_add_up_to_the_ttft(engine):
    from sample_images import encoded_image

    content = [{"type": "image"}, {"type": "text", "text": "What is it?"}]
    sink = RecordingSink()
    raw = raw_request(content, True, images=[encoded_image(size=(300, 200))], max_tokens=6)
    raw.return_timings = True
    engine.submit(raw, sink)
    final = sink.wait().final
    timings = final.timings
    assert set(timings) == set(TIMING_STAGES)
    assert all(seconds >= 0 for seconds in timings.values())
    parts = ("queue", "media_decode", "preprocess", "vision", "prefill")
    assert sum(timings[stage] for stage in parts) == pytest.approx(timings["ttft"], abs=1e-6)
    assert timings["media_decode"] > 0 and timings["vision"] > 0  # an image was decoded, encoded
    assert timings["mean_itl"] == pytest.approx(timings["decode"] / 5)
    assert all(chunk.timings is None for chunk in sink.sends)  # the final response only
    assert run(engine).final.timings is None  # not asked


def test_n_choices_share_the_request_level_outputs(engine):
    sink = ChoiceSink()
    raw = raw_request(PROMPT, False, n=2, prompt_logprobs=0, temperature=1.0, seed=2)
    raw.return_timings = True
    engine.submit(raw, sink)
    sink.wait()
    chunks = [sink.finals[0], sink.finals[1]]
    assert sum(chunk.prompt_logprobs is not None for chunk in chunks) == 1
    assert sum(chunk.timings is not None for chunk in chunks) == 1
    assert sink.final.timings is not None


@pytest.mark.parametrize(
    ("sampling", "param"),
    [
        ({"stop_token_ids": [1, 10**6]}, "stop_token_ids[1]"),
        ({"logit_bias": {"600": 1}}, "logit_bias"),
        ({"min_tokens": 30, "max_tokens": 20}, "min_tokens"),
    ],
)
def test_requests_the_model_cannot_serve_are_refused_naming_the_field(engine, sampling, param):
    sink = RecordingSink()
    engine.submit(raw_request(PROMPT, **sampling), sink)
    assert sink.done.wait(30)
    assert isinstance(sink.error, RequestError) and sink.error.param == param


def test_the_extras_parse_into_the_sampling_parameters():
    params = parse_sampling_parameters(
        json.dumps(
            {
                "logit_bias": {"7": 1, "07": -2.5, "9": 0},
                "stop_token_ids": [3, 3, 4],
                "min_tokens": 2,
                "ignore_eos": True,
                "skip_special_tokens": False,
                "include_stop_str_in_output": True,
                "min_p": 0.25,
                "prompt_logprobs": 0,
                "repetition_guard": {"ngram": 3, "max_repeats": 2},
            }
        )
    )
    assert params.logit_bias == ((7, -2.5), (9, 0.0))  # one entry per token: the later wins
    assert params.stop_token_ids == (3, 4)
    assert (params.min_tokens, params.ignore_eos, params.skip_special_tokens) == (2, True, False)
    assert (params.include_stop_str_in_output, params.min_p, params.prompt_logprobs) == (
        True,
        0.25,
        0,
    )
    assert (params.repetition_guard.ngram, params.repetition_guard.max_repeats) == (3, 2)
    plain = parse_sampling_parameters("{}")
    assert plain.skip_special_tokens and plain.prompt_logprobs is None
    assert plain.repetition_guard is None
