"""Tool-call parsing per model family on fixed texts, whole and streamed in every chunking; the
grammars that enforce tool_choice, sampled at random, always parse into valid calls."""

import itertools
import json
import random

import jsonschema
import pytest

from inferd.api.serving.tool_parser import ToolCallParser
from inferd.api.serving.tools import (
    GENERIC,
    HERMES,
    LLAMA3,
    MISTRAL,
    detect_format,
    prepare_tool_guide,
    prepare_tool_messages,
    prepare_tool_plan,
)
from inferd.errors import InvalidRequestError


def parse(fmt, chunks: list[str]) -> tuple[str, list[tuple[str, str, str]]]:
    """(content, [(id, name, arguments)]) from streaming ``chunks``, checking OpenAI's delta
    rules on the way: a call's first delta has its id and name, later ones only arguments."""
    ids = (f"id{i}" for i in itertools.count())
    parser = ToolCallParser(fmt, new_id=lambda: next(ids))
    content, calls = "", {}
    for out in [*(parser.feed(c) for c in chunks), parser.finish()]:
        content += out.content
        for delta in out.calls:
            if delta.id is not None:
                assert delta.index == len(calls) and delta.name
                calls[delta.index] = [delta.id, delta.name, delta.arguments]
            else:
                assert delta.name is None and delta.index in calls
                calls[delta.index][2] += delta.arguments
    return content, [tuple(c) for c in calls.values()]


def chunkings(text: str):
    """Whole; cut once at every position; one character at a time; a few random cuts."""
    yield [text]
    for i in range(1, len(text)):
        yield [text[:i], text[i:]]
    yield list(text)
    rng = random.Random(len(text))
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(2, 12))))
        yield [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


WEATHER = '{"city": "Paris", "unit": "c"}'
NESTED = '{"a": 1, "b": {"x": "}\\" ]{"}, "c": [1, [2]]}'

CASES = [
    (
        HERMES,
        'Let me check.\n\n<tool_call>\n{"name": "get_weather", "arguments": '
        + WEATHER
        + '}\n</tool_call>\n<tool_call>\n{"name": "add", "arguments": '
        + NESTED
        + "}\n</tool_call>",
        "Let me check.",
        [("id0", "get_weather", WEATHER), ("id1", "add", NESTED)],
    ),
    (
        HERMES,
        "Paris is the capital. 1 < 2 and <b> is bold.\n",
        "Paris is the capital. 1 < 2 and <b> is bold.\n",
        [],
    ),
    (HERMES, "It ends in <tool_ca", "It ends in <tool_ca", []),
    (
        HERMES,
        '<tool_call>\n{"name": "say", "arguments": {"text": "he said \\"hi\\" – ünï"}}\n</tool_call>',
        "",
        [("id0", "say", '{"text": "he said \\"hi\\" – ünï"}')],
    ),
    # Not in the order the formats use, or arguments as a string: parsed whole when complete.
    (
        HERMES,
        '<tool_call>{"arguments": {"a": 1}, "name": "add"}</tool_call>',
        "",
        [("id0", "add", '{"a": 1}')],
    ),
    (
        HERMES,
        '<tool_call>{"name": "add", "arguments": "{\\"a\\": 1}"}</tool_call>',
        "",
        [("id0", "add", '{"a": 1}')],
    ),
    (HERMES, '<tool_call>{"name": "now"}</tool_call>', "", [("id0", "now", "{}")]),
    # Cut off by max_tokens: the call keeps what it has.
    (HERMES, 'Sure <tool_call>\n{"name": "add", "arguments": {"a": 1', "Sure", [("id0", "add", '{"a": 1')]),
    (HERMES, '<tool_call>\n{"x": 1}', '{"x": 1}', []),
    (HERMES, '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_ca', "", [("id0", "now", "{}")]),
    (LLAMA3, '{"name": "get_weather", "parameters": ' + WEATHER + "}", "", [("id0", "get_weather", WEATHER)]),
    (
        LLAMA3,
        ' \n<|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "parameters": ' + NESTED + "}",
        "",
        [("id0", "a", "{}"), ("id1", "b", NESTED)],
    ),
    (LLAMA3, 'The answer is {"name": "x"}.', 'The answer is {"name": "x"}.', []),
    (LLAMA3, '{"answer": 42}', '{"answer": 42}', []),
    (
        MISTRAL,
        '[TOOL_CALLS] [{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": ' + NESTED + "}]",
        "",
        [("id0", "a", '{"x": 1}'), ("id1", "b", NESTED)],
    ),
    (
        MISTRAL,
        'Sure. [TOOL_CALLS][{"name": "a", "arguments": {"q": "[x]"}}]',
        "Sure.",
        [("id0", "a", '{"q": "[x]"}')],
    ),
    (MISTRAL, "A list [1, 2] and [TOOL_", "A list [1, 2] and [TOOL_", []),
    (GENERIC, '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>', "", [("id0", "now", "{}")]),
]


@pytest.mark.parametrize(("fmt", "text", "content", "calls"), CASES, ids=lambda v: getattr(v, "name", None))
def test_every_chunking_gives_the_same_content_and_calls(fmt, text, content, calls):
    for chunks in chunkings(text):
        assert parse(fmt, chunks) == (content, calls), chunks


def test_arguments_stream_as_they_arrive():
    parser = ToolCallParser(HERMES, new_id=lambda: "c")
    first = parser.feed('<tool_call>\n{"name": "add", "arguments": {"a": ')
    assert [(d.id, d.name, d.arguments) for d in first.calls] == [("c", "add", '{"a": ')]
    assert [d.arguments for d in parser.feed("12").calls] == ["12"]
    assert [d.arguments for d in parser.feed("}}\n</tool_call>").calls] == ["}"]


@pytest.mark.parametrize(
    ("template", "fmt"),
    [
        ("{{ '[TOOL_CALLS]' }} {% if tools %}<tool_call>{% endif %}", MISTRAL),
        ("{% for t in tools %}<tools>{{ t | tojson }}</tools>{% endfor %}<tool_call>", HERMES),
        ("{{- '<|python_tag|>' }}", LLAMA3),
        ('Respond in the format {"name": function name, "parameters": dictionary}', LLAMA3),
        ("{% for m in messages %}{{ m.content }}{% endfor %}", GENERIC),
        ({"default": "plain", "tool_use": "<tool_call>"}, HERMES),
        (None, GENERIC),
    ],
)
def test_the_family_is_read_from_the_chat_template(template, fmt):
    assert detect_format(template) is fmt


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["c", "f"]}},
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "parameters": {
                "$defs": {"Small": {"type": "integer", "minimum": 0, "maximum": 99}},
                "type": "object",
                "properties": {"a": {"$ref": "#/$defs/Small"}, "b": {"$ref": "#/$defs/Small"}},
                "required": ["a", "b"],
                "additionalProperties": False,
            },
        },
    },
    {"type": "function", "function": {"name": "now", "description": "The time."}},
]


@pytest.mark.parametrize(
    ("tools", "choice", "param"),
    [
        ([{"type": "custom", "custom": {"name": "x"}}], "auto", "tools[0].type"),
        ([{"type": "function"}], "auto", "tools[0].function"),
        ([{"type": "function", "function": {"name": "has space"}}], "auto", "tools[0].function.name"),
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}],
            "auto",
            "tools[0].function.parameters",
        ),
        (
            [
                {
                    "type": "function",
                    "function": {
                        "name": "f",
                        "parameters": {"type": "object", "properties": {"a": {"type": "strin"}}},
                    },
                }
            ],
            "auto",
            "tools[0].function.parameters",
        ),
        ([*TOOLS, TOOLS[0]], "auto", "tools[3].function.name"),
        (None, "required", "tool_choice"),
    ],
)
def test_bad_tools_are_400s_naming_the_field(tools, choice, param):
    with pytest.raises(InvalidRequestError) as caught:
        prepare_tool_plan(tools, choice, True, "<tool_call>")
    assert caught.value.param == param


def test_a_schema_llguidance_rejects_names_the_tool():
    bad = {
        "type": "function",
        "function": {
            "name": "odd",
            "parameters": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}},
        },
    }
    with pytest.raises(InvalidRequestError) as caught:
        prepare_tool_plan([*TOOLS, bad], "auto", True, "")
    assert "'odd'" in caught.value.message and caught.value.param == "tools[3].function.parameters"


def test_objects_that_list_their_properties_take_no_others_unless_the_schema_says():
    parameters = {
        "properties": {
            "a": {"type": "object", "properties": {"b": {"type": "string"}}},
            "m": {"type": "object"},
        },
        "$defs": {"D": {"type": "object", "properties": {}, "additionalProperties": {"type": "integer"}}},
    }
    plan = prepare_tool_plan(
        [{"type": "function", "function": {"name": "f", "parameters": parameters}}], "auto", True, ""
    )
    closed = plan.tools[0].parameters
    assert closed["type"] == "object" and closed["additionalProperties"] is False
    assert closed["properties"]["a"]["additionalProperties"] is False
    assert "additionalProperties" not in closed["properties"]["m"]  # a free-form map stays one
    assert closed["$defs"]["D"]["additionalProperties"] == {"type": "integer"}


def test_templates_that_know_tools_get_arguments_as_objects_and_others_get_text():
    history = [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "now", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "noon"},
        {"role": "tool", "tool_call_id": "c2", "content": "rain"},
    ]
    messages, tools = prepare_tool_messages(history, prepare_tool_plan(TOOLS, "auto", True, "<tool_call>"))
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == {}
    assert [t["function"]["name"] for t in tools] == ["get_weather", "add", "now"]
    messages, tools = prepare_tool_messages(history, prepare_tool_plan(TOOLS, "auto", True, "plain"))
    assert tools is None and [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert '"name": "get_weather"' in messages[0]["content"] and "<tool_call>" in messages[0]["content"]
    assert messages[2]["content"] == '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>'
    assert messages[3]["content"].count("<tool_response>") == 2


# --- the grammars, sampled at random ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """Byte-level tokenizers: one where the markers are tokens, one where they are text."""
    import llguidance.hf
    from transformers import AutoTokenizer

    from tests.models import build_byte_llama

    root = tmp_path_factory.mktemp("byte")
    added = ("<tool_call>", "</tool_call>", "<|python_tag|>", "[TOOL_CALLS]")
    tokenizers = {}
    for as_tokens in (True, False):
        path = build_byte_llama(root, f"byte-{as_tokens}", "{{ messages }}", added=added if as_tokens else ())
        tokenizer = AutoTokenizer.from_pretrained(path)
        tokenizers[as_tokens] = (tokenizer, llguidance.hf.from_tokenizer(tokenizer))
    return tokenizers


def sample(tokenizers, grammar: str, rng: random.Random, prefix: str = "", max_tokens: int = 400) -> str:
    """A random walk through what the grammar allows: what a model with random weights writes."""
    from llguidance import LLMatcher

    tokenizer, ll_tokenizer = tokenizers
    matcher = LLMatcher(ll_tokenizer, grammar, log_level=0)
    ids = tokenizer.encode(prefix, add_special_tokens=False)
    assert matcher.consume_tokens(ids), matcher.get_error()
    for _ in range(max_tokens):
        allowed = [t for t, bit in enumerate(matcher.compute_logit_bias()) if bit]
        token = rng.choice(allowed)
        if token == ll_tokenizer.eos_token:
            return tokenizer.decode(ids)
        assert matcher.consume_token(token), matcher.get_error()
        ids.append(token)
    raise AssertionError(f"no end after {max_tokens} tokens: {tokenizer.decode(ids)!r}")


SCHEMAS = {t["function"]["name"]: t["function"].get("parameters", {"type": "object"}) for t in TOOLS}


@pytest.mark.parametrize("template", ["<tool_call>", "<|python_tag|>", "[TOOL_CALLS]", "plain"])
@pytest.mark.parametrize("as_tokens", [True, False], ids=["markers-are-tokens", "markers-are-text"])
@pytest.mark.parametrize(
    ("choice", "parallel"),
    [("required", True), ("required", False), ("named", True)],
    ids=["required", "one", "named"],
)
def test_forced_grammars_always_yield_valid_calls(tokenizers, template, as_tokens, choice, parallel):
    from types import SimpleNamespace

    tool_choice = SimpleNamespace(function=SimpleNamespace(name="add")) if choice == "named" else choice
    plan = prepare_tool_plan(TOOLS, tool_choice, parallel, template)
    vocab = tokenizers[as_tokens][0].get_added_vocab()
    guide = prepare_tool_guide(
        plan, {m: vocab[m] for m in (plan.format.marker, plan.format.close) if m in vocab}
    )
    rng = random.Random(7)
    for _ in range(8):
        content, calls = parse(plan.format, [sample(tokenizers[as_tokens], guide.grammar, rng)])
        assert content == "" and calls
        assert len(calls) == 1 or (parallel and choice == "required")
        for _, name, arguments in calls:
            assert choice != "named" or name == "add"
            jsonschema.validate(json.loads(arguments), SCHEMAS[name])


@pytest.mark.parametrize("template", ["<tool_call>", "[TOOL_CALLS]", "plain"])
@pytest.mark.parametrize("as_tokens", [True, False], ids=["markers-are-tokens", "markers-are-text"])
def test_auto_leaves_text_free_and_constrains_a_call_once_it_starts(tokenizers, template, as_tokens):
    plan = prepare_tool_plan(TOOLS, "auto", False, template)
    vocab = tokenizers[as_tokens][0].get_added_vocab()
    guide = prepare_tool_guide(
        plan, {m: vocab[m] for m in (plan.format.marker, plan.format.close) if m in vocab}
    )
    rng = random.Random(3)
    for _ in range(6):
        prefix = "I will look it up. " + plan.format.marker
        text = sample(tokenizers[as_tokens], guide.grammar, rng, prefix=prefix)
        content, calls = parse(plan.format, [text])
        assert content == "I will look it up." and len(calls) == 1
        jsonschema.validate(json.loads(calls[0][2]), SCHEMAS[calls[0][1]])
