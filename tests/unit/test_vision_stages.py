"""The staged vision tower equals the model's own forward, stage by stage (tiny checkpoint)."""

import pytest
import torch
from sample_images import encoded_image

from qwen_vl_backend.contract import ModelLimits
from qwen_vl_backend.modeling.checkpoint import load_checkpoint
from qwen_vl_backend.modeling.vision_stages import VisionJob
from qwen_vl_backend.request.chat import decode_image_elements


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint_path):
    return load_checkpoint(tiny_checkpoint_path, "cpu", "float32")


def test_staged_encoding_equals_the_models_forward(checkpoint):
    images = decode_image_elements(
        [encoded_image(size=(112, 84)), encoded_image("PNG", size=(140, 56))], ModelLimits()
    )
    inputs = checkpoint.processor.image_processor(images=images, return_tensors="pt")
    model = checkpoint.model
    with torch.inference_mode():
        expected = model.model.get_image_features(
            inputs["pixel_values"], inputs["image_grid_thw"]
        ).pooler_output
        job = VisionJob(model.model.visual, inputs["pixel_values"], inputs["image_grid_thw"])
        assert job.stages == len(model.model.visual.blocks) + 2
        for _ in range(job.stages - 1):
            job.advance()
            assert not job.done
        job.advance()
    assert job.done and len(job.embeddings) == 2
    for ours, theirs in zip(job.embeddings, expected):
        assert torch.equal(ours, theirs)
