"""Device memory in the engine, testable on a CPU: the KV cache sized from a (fake) free-memory
figure, the device set per thread, the vision patch budget, a byte-accurate embedding cache, and
out-of-memory errors (injected) that fail only the requests they concern."""

import dataclasses
import threading
from types import SimpleNamespace

import pytest
import torch
from sample_images import encoded_image
from test_engine import IMAGE_PROMPT, RecordingSink, raw_request, run

from qwen_vl_backend.engine import memory
from qwen_vl_backend.engine.batching import BatchingEngine
from qwen_vl_backend.engine.embedding_cache import EmbeddingCache
from qwen_vl_backend.errors import DeviceMemoryError
from qwen_vl_backend.settings import ModelSettings

SETTINGS = ModelSettings()
GiB = 2**30


# ---- the KV cache from free GPU memory --------------------------------------------------


class Layer:
    def __init__(self, device):
        self.device = torch.device(device)

    def parameters(self):
        return iter([SimpleNamespace(device=self.device)])


def qwen_7b_on(*devices):
    """Qwen2.5-VL-7B's text shapes in bf16, its 28 layers spread over `devices` in order."""
    text = SimpleNamespace(hidden_size=3584, num_attention_heads=28, num_key_value_heads=4)
    layers = [Layer(devices[i * len(devices) // 28]) for i in range(28)]
    return SimpleNamespace(
        config=SimpleNamespace(text_config=text),
        dtype=torch.bfloat16,
        device="cpu",
        model=SimpleNamespace(language_model=SimpleNamespace(layers=layers)),
    )


PER_TOKEN = 28 * 2 * 4 * 128 * 2  # layers x (K, V) x KV heads x head dim x bf16: 56 KiB


def sized(free, model=None, **settings):
    model = model or qwen_7b_on("cuda:0")
    figure = free if callable(free) else (lambda device: free)
    return memory.size_kv_cache(dataclasses.replace(SETTINGS, **settings), model, 32768, figure)


def test_a_gpu_gets_the_slots_that_fit_its_free_memory():
    # 8192-token slots (max_cache_tokens / max_batch_size); 4 GiB free, 90 % of it for the cache
    small = sized(4 * GiB)
    assert small.max_batch_size == int(4 * GiB * 0.9) // PER_TOKEN // 8192 == 8
    assert small.max_cache_tokens == 8 * 8192
    # A large card is used beyond 16 sequences, up to gpu_max_batch_size.
    assert sized(60 * GiB).max_batch_size == int(60 * GiB * 0.9) // PER_TOKEN // 8192 == 123
    assert sized(130 * GiB).max_batch_size == 256
    assert sized(130 * GiB, gpu_max_batch_size=64).max_batch_size == 64
    # The slot length is the settings' longest sequence.
    assert sized(4 * GiB, max_cache_tokens=65536).max_batch_size == 16  # 4096-token slots


def test_memory_for_less_than_one_sequence_fails_the_load_with_the_way_out():
    with pytest.raises(RuntimeError, match="lower max_cache_tokens / max_batch_size"):
        sized(256 * 2**20)


def test_layers_split_over_gpus_take_the_tightest_one():
    model = qwen_7b_on("cuda:0", "cuda:1")  # 14 layers each
    free = {torch.device("cuda:0"): 2 * GiB, torch.device("cuda:1"): 40 * GiB}
    result = sized(lambda device: free[device], model)
    assert result.max_batch_size == int(2 * GiB * 0.9) // (PER_TOKEN // 2) // 8192


def test_cpu_and_a_zero_fraction_keep_the_configured_cache(checkpoint):
    assert sized(4 * GiB, qwen_7b_on("cpu")) == SETTINGS
    assert sized(4 * GiB, kv_cache_memory_fraction=0.0).max_batch_size == 16
    engine = BatchingEngine(checkpoint, SETTINGS)
    try:
        assert engine.limits.max_choices == SETTINGS.max_choices
        assert engine.slot_len == SETTINGS.max_cache_tokens // SETTINGS.max_batch_size
    finally:
        assert engine.shutdown(30)


def test_each_thread_makes_the_models_gpu_current(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    for device in ("cuda:1", "cpu", "cuda"):
        memory.use_device(device)
    assert calls == [torch.device("cuda:1")]


# ---- vision jobs and the embedding cache -------------------------------------------------


def test_the_patch_budget_splits_vision_jobs_and_the_tokens_do_not_change(make_engine):
    content = [{"type": "text", "text": "Two:"}, {"type": "image"}, {"type": "image"}]
    # 112 x 112 pixels: an 8 x 8 grid of 14-pixel patches, 64 each
    images = [encoded_image(size=(112, 112), color=(9, 9, 9)), encoded_image(size=(112, 112))]
    one_job = make_engine()
    expected = run(one_job, content, images=images).final.text
    assert (one_job.stats.vision_jobs, one_job.stats.largest_vision_patches) == (1, 128)
    budgeted = make_engine(max_vision_patches=64)
    assert run(budgeted, content, images=images).final.text == expected
    assert (budgeted.stats.vision_jobs, budgeted.stats.largest_vision_patches) == (2, 64)


def test_the_embedding_cache_counts_and_keeps_only_an_entrys_own_bytes():
    job_output = torch.randn(100, 8)
    cache = EmbeddingCache(max_bytes=10 * 8 * 4)
    cache.put(b"a", job_output[20:30])
    kept = cache.get(b"a")
    assert cache.bytes == kept.untyped_storage().nbytes() == 10 * 8 * 4
    assert torch.equal(kept, job_output[20:30])
    whole = torch.randn(10, 8)
    cache.put(b"b", whole)  # evicts "a"; a tensor that owns its storage is kept as is
    assert cache.get(b"b") is whole and b"a" not in cache and cache.bytes == 320


# ---- out-of-memory errors, injected ------------------------------------------------------


def out_of_memory_when(engine, too_big):
    """The engine's forward raises torch.OutOfMemoryError for steps `too_big` says so of."""
    forward = engine._forward

    def guarded(step):
        if too_big(step):
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return forward(step)

    engine._forward = guarded


def test_a_prefill_too_big_for_memory_is_retried_in_smaller_chunks(make_engine):
    expected = run(make_engine(), IMAGE_PROMPT, images=[encoded_image(size=(112, 84))]).final
    engine = make_engine()
    out_of_memory_when(engine, lambda step: any(length > 8 for _, _, length in step.chunks))
    result = run(engine, IMAGE_PROMPT, images=[encoded_image(size=(112, 84))]).final
    assert result.text == expected.text and engine.stats.out_of_memory > 0
    assert engine.stats.largest_step_tokens > 8  # it was planned larger, and ran smaller


def test_a_request_that_never_fits_fails_alone_while_a_stream_goes_on(make_engine):
    sampling = dict(stream=True, max_tokens=40, temperature=1.0, seed=1)  # no EOS before 213
    expected = run(make_engine(), "go", **sampling).streamed_text
    engine = make_engine()
    out_of_memory_when(
        engine, lambda step: any(s.prepared.raw.request_id == "big" for s, _, _ in step.chunks)
    )
    stream = RecordingSink()
    engine.submit(raw_request("go", **sampling), stream)
    for _ in range(3000):  # the stream decodes before the big request arrives
        if stream.sends:
            break
        threading.Event().wait(0.01)
    assert stream.sends, "the stream never started"
    big = RecordingSink()
    engine.submit(dataclasses.replace(raw_request("too big"), request_id="big"), big)
    assert big.done.wait(60) and isinstance(big.error, DeviceMemoryError)
    assert big.error.kind == "busy"
    assert stream.wait().streamed_text == expected
    assert engine.stats.failed == 1 and engine.running == 0


def test_decode_rows_that_do_not_fit_together_run_in_halves(make_engine):
    prompts = ["one", "two two", "three three three"]
    alone = [run(make_engine(max_batch_size=1), p).final.text for p in prompts]
    engine = make_engine()
    out_of_memory_when(engine, lambda step: not step.chunks and len(step.decode) > 1)
    sinks = [RecordingSink() for _ in prompts]
    for prompt, sink in zip(prompts, sinks):
        engine.submit(raw_request(prompt), sink)
    assert [s.wait().final.text for s in sinks] == alone
    assert engine.stats.out_of_memory > 0 and engine.stats.failed == 0


def test_out_of_memory_in_the_vision_tower_fails_only_that_jobs_requests(make_engine):
    engine = make_engine(max_vision_patches=100)  # one image per job
    next_job = engine._next_vision_job

    def failing_job(*args):
        work = next_job(*args)
        if work is not None and work.patches == 80:  # the 140 x 112 image: 10 x 8 patches

            def advance():
                raise torch.OutOfMemoryError("CUDA out of memory (injected)")

            work.job.advance = advance
        return work

    engine._next_vision_job = failing_job
    doomed, fine = RecordingSink(), RecordingSink()
    engine.submit(raw_request(IMAGE_PROMPT, images=[encoded_image(size=(140, 112))]), doomed)
    engine.submit(raw_request(IMAGE_PROMPT, images=[encoded_image(size=(112, 84))]), fine)
    assert doomed.done.wait(60) and isinstance(doomed.error, DeviceMemoryError)
    assert fine.wait().final.num_tokens == 24
    assert engine.stats.out_of_memory == 1 and engine.stats.failed == 1
