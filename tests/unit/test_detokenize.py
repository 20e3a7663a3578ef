import random

import pytest

from qwen_vl_backend.engine.detokenize import (
    IncrementalDetokenizer,
    StopStringMatcher,
    TextAssembler,
)

# A byte-level "tokenizer": token i is VOCAB[i]; decoding joins the bytes, as byte-level BPE does.
ZH = "你好世界".encode()  # 12 bytes, 3 per character
VOCAB = [
    b"a",
    b" b",
    ZH[:1],
    ZH[1:2],
    ZH[2:4],
    ZH[4:6],
    ZH[6:],
    b"\x80",
    b"\xff",
    "é".encode()[:1],
    "é".encode()[1:],
    b"STOP",
    b"ST",
    b"OP",
    b"",
]


def decode(ids):
    return b"".join(VOCAB[i] for i in ids).decode("utf-8", errors="replace")


def stream(ids, stop=()):
    assembler = TextAssembler(decode, stop)
    deltas = []
    for token in ids:
        text, _ = assembler.push(token)
        if text:
            deltas.append(text)
        if assembler.stopped:
            break
    tail, _ = assembler.finish()
    return deltas, tail, assembler


def test_split_chinese_characters_are_held_back_until_complete():
    deltas, tail, _ = stream([2, 3, 4, 5, 6])
    assert "".join(deltas) + tail == "你好世界"
    assert all("\ufffd" not in d for d in deltas)
    # Token 4 completes 你 but starts 好, so nothing shows until token 5 completes both.
    assert deltas == ["你好", "世界"]


@pytest.mark.parametrize("seed", range(200))
def test_stream_concatenation_equals_one_shot_decode(seed):
    rng = random.Random(seed)
    ids = [rng.randrange(len(VOCAB) - 3) for _ in range(rng.randrange(1, 40))]
    deltas, tail, _ = stream(ids)
    assert "".join(deltas) + tail == decode(ids)


def test_invalid_bytes_are_flushed_exactly_as_decode_at_the_end():
    ids = [0, 2, 3]  # "a" then an unfinished three-byte character
    deltas, tail, _ = stream(ids)
    assert deltas == ["a"]
    assert tail == decode(ids)[1:] and "\ufffd" in tail


def test_token_counts_cover_every_token_once():
    assembler = TextAssembler(decode)
    counts = [assembler.push(t)[1] for t in [2, 3, 4, 0, 14, 14, 1]]
    counts.append(assembler.finish()[1])
    assert sum(counts) == 7 == assembler.num_tokens


def test_stop_string_is_cut_and_not_returned():
    deltas, tail, assembler = stream([0, 12, 13, 0, 0], stop=["STOP"])
    assert assembler.stopped
    assert "".join(deltas) + tail == "a"


def test_partial_stop_prefix_is_released_when_it_does_not_complete():
    deltas, tail, assembler = stream([0, 12, 0], stop=["STOP"])
    assert not assembler.stopped and assembler.stop_string is None
    assert deltas == ["a", "STa"]
    assert tail == ""


def test_stop_matcher_earliest_of_several_wins():
    matcher = StopStringMatcher(["world", "lo w"])
    assert matcher.matched is None
    assert matcher.push("hello world") == "hel"
    assert matcher.stopped and matcher.matched == "lo w"
    assert matcher.push("more") == "" and matcher.flush() == ""


def test_detokenizer_flush_after_clean_stream_is_empty():
    detok = IncrementalDetokenizer(decode)
    assert [detok.push(t) for t in (0, 1)] == ["a", " b"]
    assert detok.flush() == ""
