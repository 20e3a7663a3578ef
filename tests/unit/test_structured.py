"""Grammar-constrained decoding (`structured`): the parameter, the compiled-grammar cache, and
the engine's masks with the tiny random-weight checkpoint, whose outputs must still be valid."""

import dataclasses
import json
import threading

import jsonschema
import pytest
from test_engine import ChoiceSink, RecordingSink, raw_request

from qwen_vl_backend.contract import ModelLimits
from qwen_vl_backend.engine.batching import BatchingEngine
from qwen_vl_backend.engine.grammar import GrammarCompiler, GrammarFailure
from qwen_vl_backend.errors import RequestError
from qwen_vl_backend.modeling.checkpoint import load_checkpoint
from qwen_vl_backend.request.params import StructuredOutput, parse_sampling_parameters
from qwen_vl_backend.settings import ModelSettings

SETTINGS = ModelSettings()

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
    {
        "name": "add",
        "parameters": {
            "type": "object",
            "properties": {
                "a": {"type": "integer", "minimum": 0, "maximum": 99},
                "b": {"type": "integer", "minimum": 0, "maximum": 99},
            },
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
]
SCHEMA = {"type": "json_schema", "schema": PERSON}
SAMPLINGS = [{}, {"temperature": 1.0, "seed": 1}, {"temperature": 1.0, "seed": 2}]


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint_path):
    return load_checkpoint(tiny_checkpoint_path, "cpu", "float32")


@pytest.fixture(scope="module")
def engine(checkpoint):
    engine = BatchingEngine(checkpoint, SETTINGS)
    yield engine
    assert engine.shutdown(30)


def generate(engine, structured, content="Answer in JSON.", **sampling):
    sink = RecordingSink()
    engine.submit(raw_request(content, structured=structured, **sampling), sink)
    return sink.wait().final


def tool_calls(text: str) -> list[dict]:
    """The tool-call blocks of `text`, which must be exactly Qwen's shape and nothing else."""
    opening, closing = "<tool_call>\n", "\n</tool_call>"
    assert text.startswith(opening) and text.endswith(closing), text
    calls = []
    for block in text[len(opening) : -len(closing)].split(closing + "\n" + opening):
        call = json.loads(block)
        assert list(call) == ["name", "arguments"]
        assert block.startswith('{"name": ' + json.dumps(call["name"]) + ', "arguments": {')
        calls.append(call)
    return calls


def check_call(call: dict) -> None:
    tool = next(t for t in TOOLS if t["name"] == call["name"])
    jsonschema.validate(call["arguments"], tool["parameters"])


# ---- the parameter --------------------------------------------------------------------------


def parse_structured(structured):
    return parse_sampling_parameters(json.dumps({"structured": structured})).structured


def test_structured_shapes_are_parsed():
    parse = parse_structured
    assert parse({"type": "json_object"}) == StructuredOutput("json_object")
    schema = parse({"type": "json_schema", "schema": {"type": "object", "b": 1, "a": 2}})
    assert schema.schema == '{"type":"object","b":1,"a":2}'  # compact, the client's key order
    assert not schema.strict
    assert parse({"type": "json_schema", "schema": {}, "strict": True}).strict
    tools = parse({"type": "tool_calls", "tools": TOOLS[:1], "parallel": True})
    assert tools.parallel and [name for name, _ in tools.tools] == ["get_weather"]
    assert parse({"type": "tool_calls", "tools": [{"name": "f"}]}).tools == (("f", "{}"),)
    assert parse_sampling_parameters("{}").structured is None


HOSTILE = [
    ("not an object", '"json"', "sampling_parameters.structured"),
    ("unknown type", {"type": "yaml"}, "sampling_parameters.structured.type"),
    ("no type", {"schema": {}}, "sampling_parameters.structured.type"),
    ("schema not an object", {"type": "json_schema", "schema": "x"}, ".schema"),
    ("strict not a boolean", {"type": "json_schema", "schema": {}, "strict": 1}, ".strict"),
    ("no tools", {"type": "tool_calls", "tools": []}, ".tools"),
    ("tools not a list", {"type": "tool_calls", "tools": {"name": "f"}}, ".tools"),
    ("tool not an object", {"type": "tool_calls", "tools": ["f"]}, ".tools[0]"),
    ("nameless tool", {"type": "tool_calls", "tools": [{"parameters": {}}]}, ".tools[0].name"),
    (
        "duplicate names",
        {"type": "tool_calls", "tools": [{"name": "f"}, {"name": "g"}, {"name": "f"}]},
        ".tools[2].name",
    ),
    (
        "parameters not an object",
        {"type": "tool_calls", "tools": [{"name": "f", "parameters": []}]},
        ".tools[0].parameters",
    ),
    (
        "huge schema",
        {"type": "json_schema", "schema": {"enum": ["x" * 1000] * 40}},
        "sampling_parameters.structured.schema",
    ),
    (
        "too deep",
        {"type": "json_schema", "schema": json.loads('{"not":' * 40 + "{}" + "}" * 40)},
        "sampling_parameters.structured.schema",
    ),
    (
        "bad JSON Schema type",
        {"type": "json_schema", "schema": {"type": "foo"}},
        "sampling_parameters.structured.schema",
    ),
    (
        "bad regex pattern",
        {"type": "json_schema", "schema": {"type": "string", "pattern": "(["}},
        "sampling_parameters.structured.schema",
    ),
    (
        "dangling $ref",
        {"type": "json_schema", "schema": {"properties": {"a": {"$ref": "#/nope"}}}},
        "sampling_parameters.structured.schema",
    ),
    (
        "unsupported keyword under strict",
        {"type": "json_schema", "schema": {"type": "object", "if": {}}, "strict": True},
        "sampling_parameters.structured.schema",
    ),
    (
        "the second tool's bad pattern",
        {
            "type": "tool_calls",
            "tools": [
                TOOLS[0],
                {"name": "f", "parameters": {"properties": {"x": {"pattern": "("}}}},
            ],
        },
        "sampling_parameters.structured.tools[1].parameters",
    ),
    (
        "a schema nothing satisfies",
        {"type": "json_schema", "schema": {"type": "integer", "minimum": 5, "maximum": 1}},
        "sampling_parameters.structured.schema",
    ),
]


@pytest.mark.parametrize(
    ("structured", "param"), [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE]
)
def test_hostile_structured_is_a_fast_request_error(engine, structured, param):
    if isinstance(structured, str):
        structured = json.loads(structured)
    sink = RecordingSink()
    steps = engine.stats.decode_steps
    engine.submit(raw_request("x", structured=structured), sink)
    assert sink.done.wait(10)
    assert isinstance(sink.error, RequestError), sink.error
    assert sink.error.param.startswith("sampling_parameters.structured")
    assert sink.error.param.endswith(param), sink.error.param
    # refused where it was prepared: it never took a slot or a step (no timing asserted: the
    # first case also pays for building the grammar tokenizer)
    assert sink.sends == [] and engine.stats.decode_steps == steps


def test_an_unsupported_keyword_is_ignored_unless_strict(engine):
    lenient = {"type": "object", "properties": {"a": {"type": "integer", "maximum": 9}}}
    lenient["if"] = {"required": ["a"]}
    text = generate(engine, {"type": "json_schema", "schema": lenient}, max_tokens=100).text
    assert isinstance(json.loads(text), dict)


def test_whitespace_is_fixed_whatever_the_schema_asks(checkpoint):
    """One space after ',' and ':' and none elsewhere, even against the schema's x-guidance."""
    schema = {
        "type": "object",
        "properties": {
            "a": {"type": "integer"},
            "b": {"type": "array", "items": {"type": "integer"}},
        },
        "required": ["a", "b"],
        "additionalProperties": False,
        "x-guidance": {"whitespace_flexible": True, "item_separator": ",", "key_separator": ":"},
    }
    compiler = GrammarCompiler(
        checkpoint.tokenizer, 506, checkpoint.eos_token_ids, ModelLimits(), 2**26
    )
    compiled = compiler.compile(parse_structured({"type": "json_schema", "schema": schema}))

    def accepts(text):
        matcher = compiled.matcher()
        tokens = checkpoint.tokenizer.encode(text, add_special_tokens=False)
        return matcher.consume_tokens(tokens) and matcher.is_accepting()

    assert accepts('{"a": 1, "b": [2, 3]}')
    for loose in [
        '{"a":1,"b":[2,3]}',
        '{ "a": 1, "b": [2, 3]}',
        '{"a": 1,  "b": []}',
        '{"a": 1, "b": []}\n',
    ]:
        assert not accepts(loose), loose


def test_deeply_nested_sampling_parameters_are_a_request_error():
    with pytest.raises(RequestError):
        parse_sampling_parameters('{"structured": ' + "[" * 100000 + "]" * 100000 + "}")


# ---- generation with the random-weight model ---------------------------------------------


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_json_schema_output_validates(engine, sampling):
    result = generate(engine, SCHEMA, max_tokens=200, **sampling)
    jsonschema.validate(json.loads(result.text), PERSON)
    assert result.finish_reason == "stop" and result.num_tokens < 200


# Any object is unbounded (a random model rarely closes a free string): samplings that end.
@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.7, "seed": 7}])
def test_json_object_output_is_an_object(engine, sampling):
    result = generate(engine, {"type": "json_object"}, max_tokens=200, **sampling)
    assert isinstance(json.loads(result.text), dict)
    assert result.finish_reason == "stop"


@pytest.mark.parametrize("sampling", SAMPLINGS + [{"temperature": 2.0, "seed": 3}])
def test_a_forced_tool_call_names_a_tool_and_matches_its_parameters(engine, sampling):
    structured = {"type": "tool_calls", "tools": TOOLS}
    result = generate(engine, structured, "Call a tool.", max_tokens=200, **sampling)
    calls = tool_calls(result.text)
    assert len(calls) == 1 and result.finish_reason == "stop"
    check_call(calls[0])


def test_parallel_tool_calls(engine):
    """Each output is one or more valid calls; at temperature 2 the tiny model writes "\n" (a
    second call) instead of EOS after a call now and then (EOS is ~25x likelier at 1)."""
    structured = {"type": "tool_calls", "tools": TOOLS, "parallel": True}
    counts = []
    for seed in range(8):
        result = generate(
            engine, structured, "Call tools.", max_tokens=400, temperature=2.0, seed=seed
        )
        calls = tool_calls(result.text)
        assert result.finish_reason == "stop"
        for call in calls:
            check_call(call)
        counts.append(len(calls))
    assert max(counts) >= 2, counts


def test_masked_tokens_never_appear_and_greedy_takes_the_masked_argmax(engine):
    result = generate(engine, SCHEMA, max_tokens=200, logprobs=True, top_logprobs=5)
    jsonschema.validate(json.loads(result.text), PERSON)
    for entry in result.logprobs:
        top = entry["top_logprobs"]
        assert top and all(t["logprob"] > -9999 for t in top)
        assert entry["token"] == top[0]["token"]
    # the output must start with the forced '{"name": ', so only its prefixes are listed first
    assert all('{"name": '.startswith(t["token"]) for t in result.logprobs[0]["top_logprobs"])


def test_n_choices_each_follow_the_schema(engine):
    sink = ChoiceSink()
    engine.submit(
        raw_request("Two people.", n=2, structured=SCHEMA, temperature=1.0, seed=5, max_tokens=200),
        sink,
    )
    sink.wait()
    texts = [sink.finals[i].text for i in range(2)]
    for text in texts:
        jsonschema.validate(json.loads(text), PERSON)
    assert texts[0] != texts[1]


def test_constrained_and_free_rows_decode_as_they_would_alone(checkpoint):
    """A constrained row shares steps with free ones (greedy and seeded, both kinds): every
    request gets the tokens it gets alone."""
    requests = [
        ("Describe a cat.", {}),
        ("Describe a cat.", {"structured": SCHEMA}),
        ("noise", {"temperature": 1.0, "seed": 4, "repetition_penalty": 1.3}),
        ("seeded", {"temperature": 0.9, "top_p": 0.9, "seed": 7, "structured": SCHEMA}),
        (
            "tool",
            {"temperature": 1.0, "seed": 1, "structured": {"type": "tool_calls", "tools": TOOLS}},
        ),
    ]
    alone_engine = BatchingEngine(checkpoint, dataclasses.replace(SETTINGS, max_batch_size=1))
    try:
        alone = []
        for content, sampling in requests:
            sink = RecordingSink()
            alone_engine.submit(raw_request(content, max_tokens=60, **sampling), sink)
            alone.append(sink.wait().final.text)
    finally:
        assert alone_engine.shutdown(30)
    engine = BatchingEngine(checkpoint, SETTINGS)
    try:
        sinks = [RecordingSink() for _ in requests]
        for (content, sampling), sink in zip(requests, sinks):
            engine.submit(raw_request(content, max_tokens=60, **sampling), sink)
        together = [sink.wait().final.text for sink in sinks]
        assert engine.stats.largest_batch >= 3, "the requests never shared a decode step"
    finally:
        assert engine.shutdown(30)
    assert together == alone
    jsonschema.validate(json.loads(alone[1]), PERSON)


def test_a_failing_matcher_fails_its_own_request_only(checkpoint):
    """The victim's mask is skipped, so the model picks a token its grammar refuses: that
    request fails with GrammarFailure, the constrained and free requests beside it finish."""
    engine = BatchingEngine(checkpoint, SETTINGS)
    victims = set()
    compile_grammar, apply_masks = engine.grammars.compile, engine._masks.apply

    def compile(structured):
        compiled = compile_grammar(structured)
        if '"victim"' not in (structured.schema or ""):
            return compiled
        victim = dataclasses.replace(compiled)
        victim.matcher = lambda: victims.add(id(m := compiled.template.deep_copy())) or m
        return victim

    def apply(logits, rows, matchers):
        keep = [i for i, m in enumerate(matchers) if id(m) not in victims]
        failed = apply_masks(logits, [rows[i] for i in keep], [matchers[i] for i in keep])
        return [keep[i] for i in failed]

    engine.grammars.compile, engine._masks.apply = compile, apply
    victim_schema = {"type": "object", "properties": {"victim": {"type": "integer"}}}
    try:
        sinks = [RecordingSink() for _ in range(3)]
        engine.submit(
            raw_request("x", structured={"type": "json_schema", "schema": victim_schema}), sinks[0]
        )
        engine.submit(raw_request("y", structured=SCHEMA, max_tokens=200), sinks[1])
        engine.submit(raw_request("z"), sinks[2])
        for sink in sinks:
            assert sink.done.wait(60)
        assert isinstance(sinks[0].error, GrammarFailure)
        jsonschema.validate(json.loads(sinks[1].wait().final.text), PERSON)
        assert sinks[2].wait().final.num_tokens == 24
        assert engine.stats.failed == 1
        assert generate(engine, SCHEMA, max_tokens=200).finish_reason == "stop"
    finally:
        assert engine.shutdown(30)


# ---- compiling and caching --------------------------------------------------------------


def test_a_grammar_is_compiled_once_and_counted(checkpoint):
    engine = BatchingEngine(checkpoint, SETTINGS)
    try:
        first = generate(engine, SCHEMA, max_tokens=200).text
        assert generate(engine, SCHEMA, max_tokens=200).text == first
        assert engine.stats.grammar_compiles == 1 and engine.stats.constrained_requests == 2
        generate(engine, {"type": "json_object"}, max_tokens=200)
        assert engine.stats.grammar_compiles == 2
    finally:
        assert engine.shutdown(30)


def structured_person(i: int) -> StructuredOutput:
    schema = dict(PERSON, title=f"person {i}")
    return parse_sampling_parameters(
        json.dumps({"structured": {"type": "json_schema", "schema": schema}})
    ).structured


def test_the_cache_is_bounded_by_its_byte_estimate(checkpoint):
    probe = GrammarCompiler(
        checkpoint.tokenizer, 506, checkpoint.eos_token_ids, ModelLimits(), 2**30
    )
    cost = probe.compile(structured_person(0)).cost
    compiler = GrammarCompiler(
        checkpoint.tokenizer, 506, checkpoint.eos_token_ids, ModelLimits(), int(2.5 * cost)
    )
    for i in range(5):
        compiler.compile(structured_person(i))
    assert compiler.compiles == 5 and compiler.cached_bytes <= 2.5 * cost
    compiler.compile(structured_person(4))  # the most recent ones are kept
    compiler.compile(structured_person(3))
    assert compiler.compiles == 5 and compiler.hits == 2
    compiler.compile(structured_person(0))  # the oldest was evicted
    assert compiler.compiles == 6


def test_concurrent_requests_for_one_grammar_compile_it_once(checkpoint):
    compiler = GrammarCompiler(
        checkpoint.tokenizer, 506, checkpoint.eos_token_ids, ModelLimits(), 2**26
    )
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(compiler.compile(structured_person(9))))
        for _ in range(6)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(results) == 6 and len({id(r) for r in results}) == 1
    assert compiler.compiles == 1
