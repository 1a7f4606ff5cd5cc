"""Structured output over real HTTP: OpenAI's response_format, vLLM's structured_outputs and guided_*.

The model is a tiny Llama with random weights and a byte-level vocabulary: whatever it writes is
valid only because the grammar allows nothing else. Outputs are checked with the reference
implementations (jsonschema, Python's re, membership), bodies against OpenAI's own schemas.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from inferd.config import load_settings
from inferd.protocol.limits import (
    MAX_CHOICE_CHARS,
    MAX_CHOICES,
    MAX_GRAMMAR_CHARS,
    MAX_REGEX_CHARS,
    MAX_SCHEMA_CHARS,
)
from tests.conftest import free_port, live_server
from tests.models import build_byte_llama
from tests.openapi import validate_openai

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def model(model_root):
    return build_byte_llama(model_root, "structured-chat", CHATML)


@pytest.fixture(scope="module")
def server(model):
    settings = load_settings(
        {
            "model": [f"{model}=byte-chat"],
            "port": free_port(),
            "num_threads": 1,
            "kv_cache_memory": 16 * 2**20,
            "max_n": 2,
            "block_size": 8,
        }
    )
    with live_server(settings) as url:
        yield url


def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(url + path, json={"model": "byte-chat"} | body, timeout=60)


def chat(url: str, body: dict) -> dict:
    """A chat completion's body, or for a stream the body its chunks add up to (each choice's text
    and finish_reason, the usage); what came over the wire is checked against OpenAI's schemas."""
    if not body.get("stream"):
        response = post(url, "/v1/chat/completions", body)
        assert response.status_code == 200, response.text
        validate_openai(response.json(), "CreateChatCompletionResponse")
        return response.json()
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    request = {"model": "byte-chat"} | body
    with httpx.stream("POST", url + "/v1/chat/completions", json=request, timeout=60) as response:
        assert response.status_code == 200
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line]
    assert events.pop() == "[DONE]"
    usage = None
    for event in map(json.loads, events):
        validate_openai(event, "CreateChatCompletionStreamResponse")
        usage = event.get("usage") or usage
        for choice in event["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + (choice["delta"].get("content") or "")
            reasons[choice["index"]] = choice["finish_reason"] or reasons.get(choice["index"])
    choices = [{"message": {"content": texts[i]}, "finish_reason": reasons[i]} for i in sorted(texts)]
    return {"choices": choices, "usage": usage}


def contents(body: dict) -> list[str]:
    """Every choice's text; each must have ended because its grammar did (not max_tokens)."""
    assert [c["finish_reason"] for c in body["choices"]] == ["stop"] * len(body["choices"])
    return [c["message"]["content"] for c in body["choices"]]


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 6},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["name", "age", "role", "address", "tags"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_json_schema_output_validates_for_every_choice_with_and_without_cache_hits(server, stream):
    request = {
        "messages": [{"role": "user", "content": f"A person, please, as JSON ({stream=}); " * 4}],
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": PERSON, "strict": True},
        },
        "n": 2,
        "max_tokens": 300,
        "seed": 11,
        "stream": stream,
        "stream_options": {"include_usage": True} if stream else None,
    }
    first, second = chat(server, request), chat(server, request)
    for body in (first, second):
        for text in contents(body):
            jsonschema.validate(json.loads(text), PERSON)
    cached = [b["usage"]["prompt_tokens_details"]["cached_tokens"] for b in (first, second)]
    # The second time, all but the last (partial) block of the prompt comes from the cache.
    assert cached[1] > cached[0] and cached[1] >= second["usage"]["prompt_tokens"] - 8


def token_id(model, text: str) -> str:
    """A logit_bias key: the id of the byte token that spells ``text``."""
    from tokenizers import Tokenizer

    return str(Tokenizer.from_file(str(model / "tokenizer.json")).token_to_id(text))


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_json_mode_output_is_one_json_object(server, model, stream):
    # Random weights write endless strings; a bias towards closing them keeps the test short. The
    # grammar decides where a closing token may go.
    bias = {token_id(model, '"'): 4, token_id(model, "}"): 4}
    request = {"messages": [{"role": "user", "content": "JSON!"}], "logit_bias": bias, "max_tokens": 200}
    request |= {"response_format": {"type": "json_object"}, "n": 2, "seed": 5, "stream": stream}
    for text in contents(chat(server, request)):
        assert isinstance(json.loads(text), dict) and text == text.strip()


def completions(url: str, body: dict) -> list[str]:
    """Every choice's text of a text completion, streamed or not."""
    if not body.get("stream"):
        response = post(url, "/v1/completions", body)
        assert response.status_code == 200, response.text
        validate_openai(response.json(), "CreateCompletionResponse")
        choices = response.json()["choices"]
        assert [c["finish_reason"] for c in choices] == ["stop"] * len(choices)
        return [c["text"] for c in choices]
    texts: dict[int, str] = {}
    request = {"model": "byte-chat"} | body
    with httpx.stream("POST", url + "/v1/completions", json=request, timeout=60) as response:
        assert response.status_code == 200
        lines = [line.removeprefix("data: ") for line in response.iter_lines() if line]
    assert lines.pop() == "[DONE]"
    events = [json.loads(line) for line in lines]
    for choice in (c for event in events for c in event["choices"]):
        texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
        assert choice["finish_reason"] in (None, "stop")
    return [texts[i] for i in sorted(texts)]


REGEX = r"[a-z]{3}-[0-9]{2}( ok)?"
CHOICES = ["yes", "no", 'say "maybe"']
LARK = 'start: item ("," item){0,3}\nitem: "cat" | "dog" | /[0-9]{1,3}/'
GBNF = 'root ::= item ("," item)?\nitem ::= "cat" | "dog" | [0-9] [0-9]?'
GRAMMAR_LANGUAGE = r"(cat|dog|[0-9]{1,3})(,(cat|dog|[0-9]{1,3})){0,3}"

CONSTRAINTS = {
    "guided_regex": ({"guided_regex": REGEX}, lambda text: re.fullmatch(REGEX, text)),
    "structured_outputs.regex": (
        {"structured_outputs": {"regex": REGEX}},
        lambda text: re.fullmatch(REGEX, text),
    ),
    "guided_choice": ({"guided_choice": CHOICES}, lambda text: text in CHOICES),
    "structured_outputs.choice": ({"structured_outputs": {"choice": CHOICES}}, lambda text: text in CHOICES),
    "guided_grammar (Lark)": ({"guided_grammar": LARK}, lambda text: re.fullmatch(GRAMMAR_LANGUAGE, text)),
    "structured_outputs.grammar (GBNF)": (
        {"structured_outputs": {"grammar": GBNF}},
        lambda text: re.fullmatch(r"(cat|dog|[0-9]{1,2})(,(cat|dog|[0-9]{1,2}))?", text),
    ),
}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("name", CONSTRAINTS)
def test_regex_choice_and_grammar_on_chat_and_completions(server, name, stream):
    fields, is_valid = CONSTRAINTS[name]
    request = fields | {"n": 2, "max_tokens": 40, "seed": 3, "stream": stream}
    texts = contents(chat(server, request | {"messages": [{"role": "user", "content": "Go"}]}))
    texts += completions(server, request | {"prompt": "Go"})
    assert len(texts) == 4
    for text in texts:
        assert is_valid(text), text


def test_the_grammar_outranks_any_logit_bias(server, model):
    # A +100 bias on a letter the pattern never allows, and on EOS before the pattern is complete.
    bias = {token_id(model, "x"): 100, token_id(model, "<|im_end|>"): 100}
    request = {
        "messages": [{"role": "user", "content": "Digits"}],
        "guided_regex": "[0-9]{4}",
        "logit_bias": bias,
    }
    for text in contents(chat(server, request | {"n": 2, "max_tokens": 10, "seed": 1})):
        assert re.fullmatch("[0-9]{4}", text)


def test_vllm_json_options_shape_the_json(server, model):
    schema = {
        "type": "object",
        "properties": {"a": {"enum": [1, 2]}, "b": {"type": "boolean"}},
        "required": ["a"],
    }
    bias = {token_id(model, "}"): 3}
    request = {"messages": [{"role": "user", "content": "JSON"}], "n": 2, "max_tokens": 200, "seed": 2}
    compact = {"json": schema, "disable_any_whitespace": True, "disable_additional_properties": True}
    for text in contents(chat(server, request | {"structured_outputs": compact, "logit_bias": bias})):
        assert not re.search(r"\s", text)
        assert set(json.loads(text)) <= {"a", "b"}  # no property the schema does not list
        jsonschema.validate(json.loads(text), schema)
    closed = schema | {"additionalProperties": False}  # no keys of the model's own, which may hold spaces
    spaced = request | {"guided_json": json.dumps(closed), "guided_whitespace_pattern": "  "}
    spaced |= {"guided_decoding_backend": "xgrammar", "logit_bias": bias}  # the backend is ignored
    for text in contents(chat(server, spaced)):
        jsonschema.validate(json.loads(text), closed)
        assert all(run == "  " for run in re.findall(r"\s+", text))


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_constraint_may_spell_the_text_of_a_special_token(server, stream):
    """Text a grammar forces that is a special token's (<|im_end|>) is written in ordinary tokens:
    llguidance alone allowed only the special token there, then refused it (a 500)."""
    request = {"guided_regex": r"<\|im_end\|>!", "max_tokens": 20, "stream": stream}
    assert contents(chat(server, request | {"messages": [{"role": "user", "content": "Go"}]})) == [
        "<|im_end|>!"
    ]
    assert completions(server, request | {"prompt": "Go"}) == ["<|im_end|>!"]


def test_a_grammar_past_llguidance_limits_fails_as_the_clients_error(server):
    """A grammar that outgrows llguidance's limits on the first generated token: a 400 naming the
    field, streamed or not (it was a 500 server_error), and the engine serves on. (A regex repeated
    this often is refused before any work: test_structured_grammars.)"""
    request = {
        "messages": [{"role": "user", "content": "Go"}],
        "guided_grammar": "start: (\"a\")~300000",
        "max_tokens": 4,
    }
    response = post(server, "/v1/chat/completions", request)
    assert response.status_code == 400, response.text
    validate_openai(response.json(), "ErrorResponse")
    error = response.json()["error"]
    assert error["param"] == "guided_grammar" and "cannot follow the grammar" in error["message"], error
    with httpx.stream(
        "POST",
        server + "/v1/chat/completions",
        json={"model": "byte-chat", "stream": True} | request,
        timeout=60,
    ) as streamed:
        events = [line.removeprefix("data: ") for line in streamed.iter_lines() if line]
    assert streamed.status_code == 200 and events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "guided_grammar", error
    assert contents(chat(server, {"messages": [{"role": "user", "content": "Go"}], "guided_choice": ["ok"]}))


def test_logprobs_under_a_grammar_list_only_allowed_alternatives(server):
    """Asked for more alternatives than the grammar allows: the bodies still match OpenAI's schemas
    (the masked ones came as -inf: nulls in the completions' top_logprobs)."""
    fields = {"guided_choice": ["yes", "no"], "max_tokens": 5}
    body = chat(
        server,
        fields | {"messages": [{"role": "user", "content": "ok?"}], "logprobs": True, "top_logprobs": 5},
    )
    first = body["choices"][0]["logprobs"]["content"][0]
    assert {t["token"] for t in first["top_logprobs"]} == {"y", "n"}
    response = post(server, "/v1/completions", fields | {"prompt": "ok?", "logprobs": 5})
    validate_openai(response.json(), "CreateCompletionResponse")
    assert set(response.json()["choices"][0]["logprobs"]["top_logprobs"][0]) == {"y", "n"}


def test_text_response_format_leaves_the_output_free(server):
    request = {"messages": [{"role": "user", "content": "Hi"}], "response_format": {"type": "text"}}
    body = chat(server, request | {"max_tokens": 8, "seed": 1})
    assert body["choices"][0]["finish_reason"] in ("stop", "length")


class Address(BaseModel):
    city: Literal["Paris", "Rome", "Oslo"]
    floor: int = Field(ge=0, le=20)


class Person(BaseModel):
    name: Annotated[str, Field(max_length=6)]
    role: Literal["admin", "user"]
    address: Address
    tags: list[Literal["a", "b"]] = Field(max_length=3)


def test_the_openai_client_parses_the_reply_into_its_pydantic_model(server):
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused")
    for seed in range(3):
        completion = client.chat.completions.parse(
            model="byte-chat",
            messages=[{"role": "user", "content": "Who?"}],
            response_format=Person,
            max_tokens=300,
            seed=seed,
        )
        assert isinstance(completion.choices[0].message.parsed, Person)


def test_langchain_with_structured_output_returns_the_model(server):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=server + "/v1", api_key="unused", model="byte-chat", max_tokens=300, seed=4)
    assert isinstance(llm.with_structured_output(Person, method="json_schema").invoke("Who?"), Person)


def _nested(depth: int) -> dict:
    schema: dict = {"type": "object"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def _json_schema(schema: dict, strict: bool | None = None) -> dict:
    return {
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "x", "schema": schema, "strict": strict},
        }
    }


BAD = {
    "invalid schema": (_json_schema({"type": "strin"}), "response_format", "strin"),
    "unsupported under strict": (
        _json_schema({"type": "array", "uniqueItems": True}, strict=True),
        "response_format",
        "uniqueItems",
    ),
    "unknown format under strict": (
        _json_schema({"type": "string", "format": "colour"}, strict=True),
        "response_format",
        "colour",
    ),
    "dangling $ref": ({"guided_json": {"$ref": "#/$defs/nope"}}, "guided_json", "nope"),
    "schema that is no JSON": ({"guided_json": "{"}, "guided_json", "valid JSON"),
    "schema that is no object": ({"structured_outputs": {"json": [1]}}, "structured_outputs.json", "object"),
    "bad regex": ({"guided_regex": "[a-"}, "guided_regex", "unclosed character class"),
    "regex with a lookahead": (
        {"structured_outputs": {"regex": "(?=a)b"}},
        "structured_outputs.regex",
        "look",
    ),
    "bad GBNF": ({"guided_grammar": 'root ::= ("a" '}, "guided_grammar", "invalid grammar"),
    "bad Lark": (
        {"structured_outputs": {"grammar": "start: nothing"}},
        "structured_outputs.grammar",
        "nothing",
    ),
    "two constraints": (
        {"response_format": {"type": "json_object"}, "guided_regex": "a"},
        "guided_regex",
        "response_format, guided_regex",
    ),
    "two structured_outputs": (
        {"structured_outputs": {"regex": "a", "choice": ["a"]}},
        "structured_outputs.choice",
        "structured_outputs.regex, structured_outputs.choice",
    ),
    "no structured_outputs": ({"structured_outputs": {}}, "structured_outputs", "needs one of"),
    "unknown response_format": ({"response_format": {"type": "xml"}}, "response_format", "'xml'"),
    "json_schema without a name": (
        {"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
        "response_format",
        "name",
    ),
    "structural_tag": (
        {"structured_outputs": {"structural_tag": "{}"}},
        "structured_outputs",
        "structural_tag",
    ),
    "schema too large": (
        _json_schema({"type": "object", "description": "x" * MAX_SCHEMA_CHARS}),
        "response_format",
        str(MAX_SCHEMA_CHARS),
    ),
    "schema nested too deep": ({"guided_json": _nested(70)}, "guided_json", "nest"),
    "regex too long": ({"guided_regex": "a" * (MAX_REGEX_CHARS + 1)}, "guided_regex", str(MAX_REGEX_CHARS)),
    "grammar too long": (
        {"guided_grammar": "start: " + "a" * MAX_GRAMMAR_CHARS},
        "guided_grammar",
        str(MAX_GRAMMAR_CHARS),
    ),
    "too many choices": ({"guided_choice": ["a"] * (MAX_CHOICES + 1)}, "guided_choice", str(MAX_CHOICES)),
    "choice too long": (
        {"guided_choice": ["a" * (MAX_CHOICE_CHARS + 1)]},
        "guided_choice",
        str(MAX_CHOICE_CHARS),
    ),
    "no choices": ({"guided_choice": []}, "guided_choice", "at least 1"),
    # Valid grammars that allow no output at all: once a 500 on the first generated token.
    "schema that only refers to itself": (_json_schema({"$ref": "#"}), "response_format", "allows no output"),
    "Lark rule that only refers to itself": (
        {"guided_grammar": "start: a\na: a"},
        "guided_grammar",
        "allows no output",
    ),
}


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("name", BAD)
def test_bad_constraints_are_400s_naming_the_field(server, name, path):
    fields, param, fragment = BAD[name]
    prompt = {"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "hi"}
    response = post(server, path, prompt | fields | {"max_tokens": 4})
    assert response.status_code == 400, response.text
    validate_openai(response.json(), "ErrorResponse")
    error = response.json()["error"]
    assert error["param"].startswith(param) and fragment in error["message"], error


class City(BaseModel):
    name: str = Field(max_length=30)
    country: str = Field(max_length=30)
    is_capital: bool
    # Bounded: greedy SmolLM2 writes a float's digits on and on ("12122222…"), which JSON allows.
    population_millions: int = Field(ge=0, le=100)


@pytest.mark.slow
def test_smollm2_json_schema_through_the_openai_client(smollm2):
    client = openai.OpenAI(base_url=smollm2 + "/v1", api_key="unused")
    completion = client.chat.completions.parse(
        model="smol",
        messages=[{"role": "user", "content": "Describe Paris as JSON."}],
        response_format=City,
        max_tokens=60,
        temperature=0,
    )
    assert completion.choices[0].finish_reason == "stop"
    assert isinstance(completion.choices[0].message.parsed, City)


@pytest.mark.slow
def test_smollm2_json_mode_streamed_and_a_choice(smollm2):
    question = [{"role": "user", "content": "Give me a JSON object with your favourite colour."}]
    request = {"model": "smol", "messages": question, "max_tokens": 40, "temperature": 0}
    body = chat(smollm2, request | {"response_format": {"type": "json_object"}, "stream": True})
    assert isinstance(json.loads(contents(body)[0]), dict)
    sentiment = [{"role": "user", "content": "Is 'I love this film' positive or negative?"}]
    body = chat(smollm2, request | {"messages": sentiment, "guided_choice": ["positive", "negative"]})
    assert contents(body)[0] in ("positive", "negative")
