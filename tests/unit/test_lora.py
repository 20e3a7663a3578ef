"""LoRA adapters in the batching engine (docs/engine.md "LoRA adapters"), in-process on the tiny
checkpoint with random PEFT adapters (conftest `lora_adapters`): greedy tokens equal PEFT's
merged model and its logprobs within LOGPROB_TOLERANCE, for a text adapter and a text+vision one;
a mixed step of three adapters and the base equals each alone; the vision adapter's image
embeddings are its own; loading and unloading while a stream runs; refused paths and limits;
media_cache_hits; the compiled step with adapters."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from sample_images import encoded_image
from test_engine import RecordingSink
from test_engine_priority import Gate, wait_ready
from test_tokenize_task import AnswerSink

from qwen_vl_backend.contract import LoraAdapter, Task
from qwen_vl_backend.engine.adapters import declared_adapters
from qwen_vl_backend.engine.batching import BatchingEngine
from qwen_vl_backend.errors import NotFoundError, RequestError
from qwen_vl_backend.modeling import step_compile
from qwen_vl_backend.modeling.checkpoint import load_checkpoint
from qwen_vl_backend.request.prepare import RawRequest, prepare
from qwen_vl_backend.settings import ModelSettings

# |engine - PEFT merged| on a chosen token's logprob, float32: the two differ in summation
# order only (fused GEMMs, the unmerged low-rank product vs the merged weight); ~6e-6 measured.
LOGPROB_TOLERANCE = 1e-4
MAX_TOKENS = 12
IMAGE = encoded_image(size=(112, 84))
TEXT = ("Describe a cat in a few words.", [])
PICTURE = ([{"type": "image"}, {"type": "text", "text": "What is it?"}], [IMAGE])
SERVED = ("text", "vision", "qv", "mlp")


class Sink(RecordingSink):
    """A test cancels it by setting `cancel`; `wait` leaves a failure for the test to check."""

    cancel = False

    def is_cancelled(self):
        return self.cancel

    def wait(self):
        assert self.done.wait(120), "no final response"
        return self


class TaskSink(AnswerSink):
    def wait(self):
        assert self.done.wait(60), "no answer"
        return self


def raw_request(prompt, lora=None, max_tokens=MAX_TOKENS, stream=False, **sampling) -> RawRequest:
    content, images = prompt
    sampling = {"max_tokens": max_tokens, "temperature": 0, "logprobs": True, **sampling}
    return RawRequest(
        request_id="l",
        messages=json.dumps([{"role": "user", "content": content}]),
        images=list(images),
        stream=stream,
        exclude_input_in_output=True,
        sampling_parameters=json.dumps(sampling),
        lora=lora,
    )


def settings(adapters: dict, names=SERVED, **extra) -> ModelSettings:
    declared = ",".join(f"{name}={adapters[name]}" for name in names)
    extra = {"max_lora_rank": 8, "max_loras": 3, **extra}
    return dataclasses.replace(ModelSettings(), lora_adapters=declared, **extra)


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint_path):
    return load_checkpoint(tiny_checkpoint_path, "cpu", "float32")


@pytest.fixture(scope="module")
def engine(checkpoint, lora_adapters, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_root")
    gate = Gate()  # lets a test hold the engine thread while it queues requests
    engine = BatchingEngine(
        checkpoint,
        settings(lora_adapters, lora_roots=str(root), max_batch_size=8),
        observer=gate,
    )
    engine.root, engine.gate = root, gate
    yield engine
    gate.release()
    assert engine.shutdown(30)


def generate(engine, prompt, lora=None, **sampling):
    sink = Sink()
    engine.submit(raw_request(prompt, lora, **sampling), sink)
    sink.wait()
    assert sink.error is None, sink.error
    return sink.final


def task(engine, name: Task, lora=None, lora_path=None):
    sink = TaskSink()
    engine.submit_task(name, RawRequest(request_id="t", lora=lora, lora_path=lora_path), sink)
    return sink.wait()


@pytest.fixture(scope="module")
def merged(tiny_checkpoint_path, lora_adapters):
    """PEFT's reference: greedy tokens and their logprobs from the merged model, per adapter
    (None: the base) and prompt."""
    from peft import PeftModel

    def reference(prompt, name):
        checkpoint = load_checkpoint(tiny_checkpoint_path, "cpu", "float32")
        model = checkpoint.model
        if name is not None:
            model = PeftModel.from_pretrained(model, lora_adapters[name]).merge_and_unload()
        prepared = prepare(raw_request(prompt), checkpoint, ModelSettings())
        with torch.inference_mode():
            out = model.generate(
                **prepared.inputs,
                max_new_tokens=MAX_TOKENS,
                do_sample=False,
                output_scores=True,
                return_dict_in_generate=True,
            )
        tokens = out.sequences[0, prepared.prompt_tokens :]
        logprobs = [
            torch.log_softmax(scores[0].float(), -1)[token].item()
            for scores, token in zip(out.scores, tokens)
        ]
        return checkpoint.decode(tokens), logprobs

    return reference


def assert_matches(final, reference):
    text, logprobs = reference
    assert final.text == text
    ours = [entry["logprob"] for entry in final.logprobs]
    assert len(ours) == len(logprobs) == final.num_tokens
    assert max(abs(a - b) for a, b in zip(ours, logprobs)) <= LOGPROB_TOLERANCE


def test_the_adapters_are_random_with_non_zero_b(lora_adapters):
    from safetensors.torch import load_file

    weights = load_file(lora_adapters["vision"] / "adapter_model.safetensors")
    b = [t for key, t in weights.items() if "lora_B" in key]
    assert b and all(t.abs().sum() > 0 for t in b)
    assert any("visual.blocks" in key for key in weights)
    assert any("visual.merger" in key for key in weights)


@pytest.mark.parametrize(
    ("name", "prompt"), [("text", TEXT), ("text", PICTURE), ("vision", PICTURE)]
)
def test_greedy_tokens_equal_pefts_merged_model(engine, merged, name, prompt):
    assert_matches(generate(engine, prompt, name), merged(prompt, name))


def test_the_vision_adapter_changes_the_image_embeddings_and_the_answer(engine, merged):
    base = generate(engine, PICTURE)
    adapted = generate(engine, PICTURE, "vision")
    assert adapted.text != base.text
    assert_matches(base, merged(PICTURE, None))
    # the same image is cached twice: once as the base tower saw it, once through the adapter
    entries = list(engine._images._entries.values())
    assert len(entries) >= 2 and not torch.equal(entries[-1], entries[-2])


def test_a_mixed_step_of_three_adapters_and_the_base_equals_each_alone(engine):
    mix = [(None, TEXT), ("text", PICTURE), ("qv", TEXT), ("mlp", PICTURE)]
    alone = [generate(engine, prompt, name).text for name, prompt in mix]
    sinks = [Sink() for _ in mix]
    largest = engine.stats.largest_batch
    engine.stats.largest_batch = 0
    # The engine thread is held in a step of a running base request while the four are
    # prepared (an image takes longer than a text), so its next schedule admits them together.
    holder = Sink()
    engine.gate.hold(rows=1)
    engine.submit(raw_request(TEXT, max_tokens=4 * MAX_TOKENS, ignore_eos=True), holder)
    assert engine.gate.holding.wait(60), "the engine never reached the held step"
    for (name, prompt), sink in zip(mix, sinks):
        engine.submit(raw_request(prompt, name), sink)
    wait_ready(engine, len(mix))
    engine.gate.release()
    together = [sink.wait().final.text for sink in sinks]
    holder.wait()
    assert engine.stats.largest_batch == len(mix) + 1  # all four decoded in one step
    engine.stats.largest_batch = max(largest, len(mix) + 1)
    assert together == alone
    assert len(set(alone)) == len(alone)  # each adapter answers differently


def test_media_cache_hits_count_the_requests_images_the_cache_answered(engine):
    image = encoded_image(size=(84, 112), color=(10, 200, 30))
    prompt = ([{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Two?"}], [image] * 2)
    # the image's second copy shares the vision job its first one queued
    assert generate(engine, prompt, max_tokens=2).media_cache_hits == 1
    assert generate(engine, prompt, max_tokens=2).media_cache_hits == 2
    # a text adapter sees the base embeddings; a vision adapter has its own
    assert generate(engine, prompt, "text", max_tokens=2).media_cache_hits == 2
    assert generate(engine, prompt, "vision", max_tokens=2).media_cache_hits == 1


def test_an_unknown_adapter_is_not_found(engine):
    sink = Sink()
    engine.submit(raw_request(TEXT, "nope"), sink)
    assert isinstance(sink.wait().error, NotFoundError)
    error = sink.error.model_error()
    assert (error.kind, error.param, error.code) == ("not_found", "model", "model_not_found")
    for name in (Task.TOKENIZE, Task.UNLOAD_LORA):
        assert isinstance(task(engine, name, lora="nope").error, NotFoundError)


def test_load_and_unload_while_a_stream_runs(engine, lora_adapters, merged):
    shutil.copytree(lora_adapters["text"], engine.root / "late")
    base_alone = generate(engine, TEXT, max_tokens=40, ignore_eos=True)
    # far more tokens than the loading below takes; it ends only when cancelled
    stream = Sink()
    engine.submit(raw_request(TEXT, max_tokens=4000, ignore_eos=True, stream=True), stream)
    while not stream.sends:
        assert not stream.done.wait(0.01), stream.error
    loaded = task(engine, Task.LOAD_LORA, "late", "late")
    assert loaded.error is None, loaded.error
    assert LoraAdapter.decode_list(loaded.text) == [LoraAdapter("late", 4, False, False)]
    adapted = Sink()
    engine.submit(raw_request(PICTURE, "late"), adapted)
    assert adapted.wait().error is None
    assert_matches(adapted.final, merged(PICTURE, "text"))
    unloaded = task(engine, Task.UNLOAD_LORA, "late")
    assert LoraAdapter.decode_list(unloaded.text)[0].name == "late"
    gone = Sink()
    engine.submit(raw_request(TEXT, "late"), gone)
    assert isinstance(gone.wait().error, NotFoundError)
    assert not stream.done.is_set(), "the stream ended while adapters loaded"
    stream.cancel = True
    stream.wait()
    streamed = "".join(c.text for c in stream.sends)
    # the base stream's tokens were untouched by the loads beside it (as far as each went: the
    # stream may be cancelled before or after its 40th token)
    shorter = min(len(streamed), len(base_alone.text)) - 1  # a held-back byte may differ
    assert shorter > 0 and streamed[:shorter] == base_alone.text[:shorter]
    listed = LoraAdapter.decode_list(task(engine, Task.LIST_LORAS).text)
    assert [a.name for a in listed] == list(SERVED)
    assert sum(a.resident for a in listed) <= 3  # max_loras


def refused(engine, name, path):
    answer = task(engine, Task.LOAD_LORA, name, path)
    assert isinstance(answer.error, RequestError) and not isinstance(answer.error, NotFoundError)
    message = answer.error.message
    assert str(engine.root) not in message and "/tmp" not in message
    assert "safetensors_rust" not in message and "Traceback" not in message
    return message


def test_paths_outside_the_roots_and_oversized_adapters_are_refused(
    engine, lora_adapters, tmp_path
):
    root = engine.root
    outside = lora_adapters["qv"]
    (root / "escape").symlink_to(outside, target_is_directory=True)
    inner = root / "inner"
    inner.mkdir()
    (inner / "adapter_config.json").write_text((outside / "adapter_config.json").read_text())
    (inner / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    for path in ("../" + outside.name, str(outside), "escape", "inner", "missing", "", "\x00"):
        assert "not an adapter directory under the roots" in refused(engine, "x", path)
    shutil.copytree(lora_adapters["wide"], root / "wide")
    assert "rank 16 exceeds this server's max_lora_rank 8" in refused(engine, "x", "wide")
    shutil.copytree(lora_adapters["patch"], root / "patch")
    assert "a module LoRA is not served for here" in refused(engine, "x", "patch")
    big = root / "big"
    big.mkdir()
    (big / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": 8}')
    with open(big / "adapter_model.safetensors", "wb") as file:
        file.truncate(1025 * 2**20)  # sparse: above max_lora_mb without writing it
    assert "this server takes at most 1024 MiB" in refused(engine, "x", "big")
    (big / "adapter_model.safetensors").write_bytes(b"\x08" + os.urandom(64))
    assert (
        refused(engine, "x", "big") == "adapter_model.safetensors could not be read as safetensors"
    )
    shutil.copytree(lora_adapters["mlp"], root / "twice")
    assert "already loaded" in refused(engine, "text", "twice")
    assert "an adapter name is" in refused(engine, "bad name", "twice")


def test_the_compiled_step_with_adapters_gives_the_eager_tokens(
    tiny_checkpoint_path, lora_adapters, monkeypatch
):
    monkeypatch.setattr(step_compile, "BACKEND", "aot_eager")
    checkpoint = load_checkpoint(tiny_checkpoint_path, "cpu", "float32")
    texts = {}
    for mode in ("off", "on"):
        engine = BatchingEngine(
            checkpoint,
            settings(
                lora_adapters,
                ("text", "vision"),
                compile=mode,
                compile_buckets="8",
                max_step_tokens=8,
                cpu_packed_linear=False,
            ),
        )
        try:
            sinks = [Sink() for _ in range(3)]
            for (name, prompt), sink in zip(
                [(None, TEXT), ("text", TEXT), ("vision", PICTURE)], sinks
            ):
                engine.submit(raw_request(prompt, name), sink)
            texts[mode] = [sink.wait().final.text for sink in sinks]
            assert engine._text_forward.buckets == ([8] if mode == "on" else [])
        finally:
            assert engine.shutdown(30)
    assert texts["on"] == texts["off"]


def test_an_adapter_in_use_keeps_its_slot_until_its_stream_ends(checkpoint, lora_adapters):
    engine = BatchingEngine(checkpoint, settings(lora_adapters, ("text", "qv"), max_loras=1))
    long = {"max_tokens": 30, "ignore_eos": True}
    try:
        alone = [generate(engine, TEXT, name, **long).text for name in ("text", "qv")]
        sinks = [Sink(), Sink()]
        for name, sink in zip(("text", "qv"), sinks):
            engine.submit(raw_request(TEXT, name, stream=True, **long), sink)
        streamed = ["".join(c.text for c in [*s.wait().sends, s.final]) for s in sinks]
        assert streamed == alone
        # one slot: qv waited for text's last token, never decoding beside it
        assert engine.stats.largest_batch == 1
    finally:
        assert engine.shutdown(30)


def test_declared_adapters_come_from_the_parameter_multi_lora_json_and_loras(tmp_path):
    (tmp_path / "multi_lora.json").write_text(json.dumps({"b": "elsewhere/b", "a": "ignored"}))
    (tmp_path / "loras" / "c").mkdir(parents=True)
    (tmp_path / "loras" / "c" / "adapter_config.json").write_text("{}")
    (tmp_path / "loras" / "notes").mkdir()  # no adapter in it
    declared = declared_adapters(ModelSettings(lora_adapters="a=x/a, d=/abs/d"), str(tmp_path))
    assert declared == {
        "a": tmp_path / "x" / "a",
        "d": Path("/abs/d"),
        "b": tmp_path / "elsewhere" / "b",
        "c": tmp_path / "loras" / "c",
    }
    for bad in ("a=x,a=y", "a", "=x"):
        with pytest.raises(ValueError, match="lora_adapters"):
            ModelSettings(lora_adapters=bad)
