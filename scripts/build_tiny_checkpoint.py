#!/usr/bin/env python3
"""Build a tiny random-weight Qwen2.5-VL checkpoint for tests and hub-less machines.

It is the real architecture (`Qwen2_5_VLForConditionalGeneration`) and the real processor
classes with a small byte-level BPE tokenizer, Qwen's special tokens and Qwen's chat template,
so every code path the 7B checkpoint takes runs here too, in milliseconds on a CPU. Its
outputs are random text. The build is deterministic and cached: a second run is a no-op.

    python scripts/build_tiny_checkpoint.py [--preset tiny|bench|overhead] [--out DIR] [--force]

`--preset bench` builds the same architecture, tokenizer and processor at a size where compute
dominates serving overhead on a CPU (a ~60M-parameter text model and a small real vision tower),
for bench/chat_bench.py; it goes to .cache/bench-qwen2.5-vl unless --out says otherwise.
`--preset overhead` is the opposite (2 layers, hidden 128): almost no compute, so a step's cost
is the serving overhead (bench/chat_bench.py --overhead); it goes to .cache/overhead-qwen2.5-vl.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

# Bump when the recipe changes so cached copies are rebuilt.
RECIPE_VERSION = "3"
MARKER_FILE = "RANDOM_WEIGHTS"
CACHE = Path(__file__).resolve().parent.parent / ".cache"
DEFAULT_OUT = CACHE / "tiny-qwen2.5-vl"

# Model sizes per preset. `tiny` is what the tests use; `bench` is big enough that a decode step
# is dominated by matmuls (not Python and serving overhead) on a 2-core CPU, so batching shows;
# `overhead` is small enough that serving overhead is nearly all of a step.
# mrope sections (temporal, height, width) must sum to head_dim / 2 = hidden / heads / 2.
PRESETS = {
    "tiny": dict(
        out=DEFAULT_OUT,
        text=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            mrope_section=[2, 3, 3],
        ),
        vision=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, fullatt_block_indexes=[1]
        ),
        greedy_whole_characters=False,
    ),
    "bench": dict(
        out=CACHE / "bench-qwen2.5-vl",
        # ~60M text parameters (7.3M per layer; the ~500-token vocabulary adds little), head_dim 64.
        text=dict(
            hidden_size=768,
            intermediate_size=2560,
            num_hidden_layers=8,
            num_attention_heads=12,
            num_key_value_heads=2,
            mrope_section=[8, 12, 12],
        ),
        vision=dict(
            depth=4,
            hidden_size=256,
            intermediate_size=512,
            num_heads=4,
            fullatt_block_indexes=[1, 3],
        ),
        # Zero the output-projection rows of the special tokens (EOS included) and of the byte
        # tokens that are not whole UTF-8 characters: their logit is then exactly 0, while the
        # largest of the other ~300 random logits is far above it. So greedy decoding never
        # stops early (every request runs to max_tokens: servers compare equal work) and every
        # token streams as one text chunk (no half characters held back), so inter-token
        # latency is measured per token on every server.
        greedy_whole_characters=True,
    ),
    "overhead": dict(
        out=CACHE / "overhead-qwen2.5-vl",
        # Almost no compute (~0.3M text parameters besides the embeddings): a decode step's cost is
        # then nearly all host work (scheduling, sampling, detokenizing, sends), as on a GPU where
        # a 7B step takes a few ms. head_dim 64 because vLLM's CPU attention refuses smaller ones.
        text=dict(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            mrope_section=[8, 12, 12],
        ),
        vision=dict(
            depth=2, hidden_size=64, intermediate_size=128, num_heads=1, fullatt_block_indexes=[1]
        ),
        greedy_whole_characters=True,  # as bench: never stops early, one token per chunk
    ),
}

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2.5-VL-Instruct's chat template, so prompts are built exactly as for the real model.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Mixed English/Chinese text so the BPE merges include multi-byte characters split across
# tokens: streaming must hold back half characters, and this makes tests exercise that.
TRAINING_TEXT = [
    "You are a helpful assistant. Describe this image in detail.",
    "What is in this picture? A cat is sitting on the window sill.",
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "你是一个有帮助的助手。这张图片里有什么？图片显示了一只猫坐在窗台上。",
    "请描述这张图片。天空是蓝色的，草地是绿色的。",
    "Hello, world! How can I help you today?",
]


def build_tokenizer(vocab_size: int = 1024):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(TRAINING_TEXT * 20, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )


def build_model_config(tokenizer, preset: str = "tiny"):
    from transformers import Qwen2_5_VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab_size = len(tokenizer)
    sizes = dict(PRESETS[preset]["text"])
    mrope_section = sizes.pop("mrope_section")
    text_config = dict(
        vocab_size=vocab_size,
        **sizes,
        max_position_embeddings=32768,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 1000000.0,
            "mrope_section": mrope_section,
        },
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    vision_config = dict(
        **PRESETS[preset]["vision"],
        out_hidden_size=sizes["hidden_size"],
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
    )
    return Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def build_model(config, seed: int):
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    # The default init (std 0.02) makes greedy decoding repeat one token for every prompt,
    # which would let output-comparison tests pass vacuously; std 0.2 makes outputs depend
    # on the prompt.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return model


def build_processor(tokenizer):
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    image_processor = Qwen2VLImageProcessor(
        patch_size=14,
        merge_size=2,
        temporal_patch_size=2,
        min_pixels=4 * 28 * 28,
        max_pixels=16384 * 28 * 28,
    )
    return Qwen2_5_VLProcessor(
        image_processor=image_processor,
        video_processor=Qwen2VLVideoProcessor(),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )


def build(out: Path, seed: int = 0, preset: str = "tiny") -> Path:
    from transformers import GenerationConfig

    tokenizer = build_tokenizer()
    config = build_model_config(tokenizer, preset)
    model = build_model(config, seed)
    if PRESETS[preset]["greedy_whole_characters"]:
        import torch

        special = set(tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS))
        never = [
            i
            for i in range(len(tokenizer))
            if i in special or not tokenizer.decode([i]) or "\ufffd" in tokenizer.decode([i])
        ]
        with torch.no_grad():
            model.lm_head.weight[never] = 0.0
    model.generation_config = GenerationConfig(
        bos_token_id=config.text_config.bos_token_id,
        eos_token_id=[
            tokenizer.convert_tokens_to_ids("<|im_end|>"),
            tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        ],
        pad_token_id=config.text_config.pad_token_id,
        do_sample=False,
    )
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=out.parent))
    staging.chmod(0o755)
    try:
        model.save_pretrained(staging)
        build_processor(tokenizer).save_pretrained(staging)
        (staging / MARKER_FILE).write_text(
            "This checkpoint has random weights (built by scripts/build_tiny_checkpoint.py).\n"
            "It exercises the serving stack; its answers are meaningless.\n"
        )
        recipe = {"recipe": RECIPE_VERSION, "seed": seed}
        if preset != "tiny":  # tiny's recipe.json stays byte-identical to before presets existed
            recipe["preset"] = preset
        (staging / "recipe.json").write_text(json.dumps(recipe))
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def is_current(out: Path, preset: str = "tiny") -> bool:
    try:
        recipe = json.loads((out / "recipe.json").read_text())
        return recipe["recipe"] == RECIPE_VERSION and recipe.get("preset", "tiny") == preset
    except (OSError, ValueError, KeyError):
        return False


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="tiny",
        help="model size: tiny (tests, the default), bench (compute-bound benchmarks) or "
        "overhead (overhead-bound benchmarks)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="checkpoint directory (default: .cache/tiny-qwen2.5-vl, .cache/bench-qwen2.5-vl "
        "or .cache/overhead-qwen2.5-vl by preset)",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = (args.out or PRESETS[args.preset]["out"]).resolve()
    if is_current(out, args.preset) and not args.force:
        print(out)
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    build(out, args.seed, args.preset)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
