"""A LoRA adapter through the whole stack: loaded at run time through the proxy's admin
endpoint (the proxy fans it out, the model checks its root and reads it), listed by
/v1/models with its parent, answering chat completions with its own weights, and unloaded."""

import pytest
import requests
from stacks import ADMIN_KEY

SERVED = "qwen2.5-vl-7b-instruct"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
ADAPTER = "e2e-invoices"
QUESTION = [{"role": "user", "content": "Read the invoice total."}]


@pytest.fixture(scope="module")
def adapter_dir(stack, tiny_checkpoint_path):
    """A random PEFT adapter on the tiny checkpoint's text layers (seeded, B non-zero), saved
    by PEFT under the stack's LoRA root."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tiny_checkpoint_path, dtype=torch.float32
    )
    torch.manual_seed(7)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    get_peft_model(model, config).save_pretrained(stack.lora_root / "invoices")
    return "invoices"  # relative to the root


def answer(base_url, model):
    body = {"model": model, "messages": QUESTION, "max_tokens": 8, "temperature": 0}
    return requests.post(f"{base_url}/v1/chat/completions", json=body, timeout=60)


def test_an_adapter_loaded_at_run_time_serves_its_own_weights(base_url, adapter_dir):
    load = {"lora_name": ADAPTER, "lora_path": adapter_dir}
    refused = requests.post(f"{base_url}/v1/load_lora_adapter", json=load, timeout=60)
    assert refused.status_code in (401, 403)  # a client without the admin key
    loaded = requests.post(f"{base_url}/v1/load_lora_adapter", json=load, headers=ADMIN, timeout=60)
    assert loaded.status_code == 200, loaded.text
    try:
        cards = {
            c["id"]: c for c in requests.get(f"{base_url}/v1/models", timeout=10).json()["data"]
        }
        assert cards[ADAPTER]["parent"] == SERVED
        base, adapted = answer(base_url, SERVED), answer(base_url, ADAPTER)
        assert base.status_code == adapted.status_code == 200, adapted.text
        assert adapted.json()["model"] == ADAPTER
        base_text = base.json()["choices"][0]["message"]["content"]
        assert adapted.json()["choices"][0]["message"]["content"] != base_text
        assert adapted.json()["usage"]["prompt_tokens"] == base.json()["usage"]["prompt_tokens"]
    finally:
        unloaded = requests.post(
            f"{base_url}/v1/unload_lora_adapter",
            json={"lora_name": ADAPTER},
            headers=ADMIN,
            timeout=60,
        )
    assert unloaded.status_code == 200, unloaded.text
    gone = answer(base_url, ADAPTER)
    assert gone.status_code == 404
    assert gone.json()["error"]["code"] == "model_not_found"


def test_a_path_outside_the_root_is_refused_without_naming_it(base_url):
    load = {"lora_name": "escape", "lora_path": "/etc"}
    refused = requests.post(
        f"{base_url}/v1/load_lora_adapter", json=load, headers=ADMIN, timeout=60
    )
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert "/etc" not in error["message"] and "Traceback" not in error["message"]
