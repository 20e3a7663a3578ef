"""Slot handout and the prompt prefixes freed slots hold (pure)."""

import torch

from qwen_vl_backend.engine.slots import MIN_REUSED_TOKENS, SlotContent, SlotPool, shared_prefix

IMG = 9


def content(tokens, images=()):
    return SlotContent(torch.tensor(tokens), tuple(images))


def test_shared_prefix_stops_at_the_first_different_token_and_keeps_one_to_run():
    held = content([1, 2, 3, 4, 5])
    assert shared_prefix(held, content([1, 2, 3, 7, 7])) == 3
    assert shared_prefix(held, content([1, 2, 3, 4, 5])) == 4  # the last token must be computed
    assert shared_prefix(held, content([1, 2, 3, 4, 5, 6, 7])) == 5


def test_identical_placeholders_of_different_images_are_not_shared():
    tokens = [1, 2, IMG, IMG, IMG, 3, 4]
    held = content(tokens, [(2, b"cat")])
    assert shared_prefix(held, content(tokens + [5], [(2, b"dog")])) == 2
    assert shared_prefix(held, content(tokens + [5], [(2, b"cat")])) == len(tokens)


def test_pool_prefers_the_slot_holding_the_prefix_then_empty_slots_lowest_first():
    pool = SlotPool(3)
    assert [pool.take()[0] for _ in range(3)] == [0, 1, 2]
    long_prompt = list(range(40))
    pool.release(1, content(long_prompt))
    pool.release(0, None)
    pool.release(2, content([7] * 40))
    assert pool.take(content(long_prompt + [99])) == (1, 40)
    assert pool.take(content([5] * (MIN_REUSED_TOKENS + 4)))[0] == 0  # no match: the empty one
    assert pool.take()[0] == 2 and len(pool) == 0
