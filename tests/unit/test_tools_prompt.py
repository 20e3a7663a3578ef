"""Tools in the prompt: Qwen's tool format rendered by the shipped template, in every turn."""

import json

import pytest
from sample_images import encoded_image
from transformers import AutoProcessor

from qwen_vl_backend.errors import RequestError
from qwen_vl_backend.request.chat import parse_messages
from qwen_vl_backend.request.tools import parse_tools, render_prompt, tools_template

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
TOOL_CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Weather there?"}]},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    {"role": "tool", "tool_call_id": "call_1", "content": "22C"},
]
EXPECTED = (
    "<|im_start|>system\nBe brief.\n\n# Tools\n\nYou may call one or more functions to assist "
    "with the user query.\n\nYou are provided with function signatures within <tools></tools> "
    "XML tags:\n<tools>\n" + json.dumps(WEATHER) + "\n</tools>\n\nFor each function call, "
    "return a json object with function name and arguments within <tool_call></tool_call> XML "
    'tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call><|im_end|>\n"
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Weather there?<|im_end|>\n"
    '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": '
    '"Paris"}}\n</tool_call><|im_end|>\n'
    "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\n22C\n"
    "</tool_response><|im_end|>\n<|im_start|>assistant\n"
)


@pytest.fixture(scope="module")
def processor(tiny_checkpoint_path):
    return AutoProcessor.from_pretrained(tiny_checkpoint_path)


def test_a_tool_conversation_renders_in_qwens_format(processor):
    messages = parse_messages(json.dumps(TOOL_CONVERSATION), [encoded_image("PNG", size=(8, 6))])
    prompt = render_prompt(processor, messages, parse_tools(json.dumps([WEATHER])))
    assert prompt == EXPECTED


@pytest.mark.parametrize(
    "conversation",
    [
        [{"role": "user", "content": "hi"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what?"}]},
            {"role": "assistant", "content": "a cat"},
            {"role": "user", "content": "sure?"},
        ],
    ],
)
def test_without_tools_the_template_renders_as_the_checkpoints(processor, conversation):
    own = processor.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    shipped = processor.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=True, chat_template=tools_template()
    )
    assert shipped == own
    assert render_prompt(processor, conversation, None) == own


def test_tool_results_without_tools_still_render_as_tool_responses(processor):
    conversation = (
        TOOL_CONVERSATION[:1] + [{"role": "user", "content": "x"}] + TOOL_CONVERSATION[2:]
    )
    messages = parse_messages(json.dumps(conversation), [])
    assert "<tool_response>\nsunny\n</tool_response>" in render_prompt(processor, messages, None)


@pytest.mark.parametrize(
    ("text", "param"),
    [
        ("{", "tools"),
        ('{"type": "function"}', "tools"),
        ('[{"type": "function"}]', "tools[0]"),
        ('[{"type": "function", "function": {"name": 3}}]', "tools[0]"),
    ],
)
def test_bad_tools_name_the_offending_param(text, param):
    with pytest.raises(RequestError) as raised:
        parse_tools(text)
    assert raised.value.param == param


def test_bad_tool_calls_name_the_offending_message():
    messages = [{"role": "assistant", "content": None, "tool_calls": [{"function": {}}]}]
    with pytest.raises(RequestError) as raised:
        parse_messages(json.dumps(messages), [])
    assert raised.value.param == "messages[0].tool_calls[0].function"
