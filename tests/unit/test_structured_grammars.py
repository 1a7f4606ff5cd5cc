"""Structured-output grammars (api/serving/structured.py) against reference implementations: what
llguidance lets a model write under each constraint is checked with jsonschema, Python's re and
plain membership, on a byte-level vocabulary that can spell any text."""

from __future__ import annotations

import json
import random
import re

import jsonschema
import numpy as np
import pytest
from llguidance import LLMatcher, LLTokenizer

from inferd.api.serving.structured import (
    check_grammar,
    close_objects,
    json_schema_grammar,
    one_constraint,
    prepare_grammar,
)
from inferd.errors import InvalidRequestError
from inferd.protocol.openai_chat import ChatCompletionRequest
from inferd.protocol.openai_completions import CompletionRequest
from inferd.protocol.openai_sampling import ANY_OBJECT, Constraint


@pytest.fixture(scope="module")
def tokenizer() -> LLTokenizer:
    """One token per byte (GPT-2's byte alphabet, no merges) and an EOS token."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken("<eos>", special=True)])
    return LLTokenizer(backend.to_str(), eos_token=backend.token_to_id("<eos>"))


def accepts(tokenizer: LLTokenizer, grammar: str, text: str) -> bool:
    matcher = LLMatcher(tokenizer, grammar, log_level=0)
    return matcher.consume_tokens(tokenizer.tokenize_str(text)) and matcher.is_accepting()


def walk(tokenizer: LLTokenizer, grammar: str, rnd: random.Random, limit: int = 3000) -> str:
    """A random text the grammar allows: each token drawn from its mask, half the time among the
    tokens that close a string, array or object (else a random model's strings never end), and
    EOS half the time it is allowed."""
    closers = set(tokenizer.tokenize_str('"]}'))
    matcher = LLMatcher(tokenizer, grammar, log_level=0)
    ids: list[int] = []
    for _ in range(limit):
        mask = np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8)
        allowed = np.flatnonzero(np.unpackbits(mask, bitorder="little")[: tokenizer.vocab_size]).tolist()
        if tokenizer.eos_token in allowed and (len(allowed) == 1 or rnd.random() < 0.5):
            assert matcher.is_accepting()
            return tokenizer.decode_bytes(ids).decode()  # strict UTF-8: every character complete
        closing = [t for t in allowed if t in closers]
        token = rnd.choice(closing if closing and rnd.random() < 0.5 else allowed)
        assert matcher.consume_token(token), matcher.get_error()
        ids.append(token)
    raise AssertionError("the walk did not end")


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 10},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3},
        "score": {"type": "number", "minimum": -1, "maximum": 1},
        "active": {"type": "boolean"},
        "nickname": {"anyOf": [{"type": "string", "maxLength": 6}, {"type": "null"}]},
    },
    "required": ["name", "age", "role", "address", "tags"],
    "additionalProperties": False,
}
TREE = {
    "$defs": {
        "node": {
            "type": "object",
            "properties": {
                "label": {"const": "n"},
                "children": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2},
            },
            "required": ["label", "children"],
            "additionalProperties": False,
        }
    },
    "$ref": "#/$defs/node",
}
COLOURS = {"type": "array", "items": {"enum": ["red", "green", 3, None]}, "minItems": 1, "maxItems": 4}


@pytest.mark.parametrize(
    "schema", [PERSON, TREE, COLOURS, ANY_OBJECT], ids=["person", "tree", "enum-array", "any-object"]
)
def test_every_text_a_schema_grammar_allows_validates_against_the_schema(tokenizer, schema):
    grammar = json_schema_grammar(schema, strict=True)
    rnd = random.Random(7)
    for _ in range(25):
        text = walk(tokenizer, grammar, rnd)
        jsonschema.validate(json.loads(text), schema, cls=jsonschema.Draft202012Validator)
        assert text == text.strip()  # the output is the JSON alone
        assert max(map(len, re.findall(r"[ \t\r\n]+", text)), default=0) <= 32


def test_the_grammar_accepts_exactly_the_documents_jsonschema_accepts(tokenizer):
    grammar = json_schema_grammar(PERSON, strict=True)
    address = {"city": "Paris", "zip": "75001"}
    base = {"name": "Ann", "age": 30, "role": "user", "address": address, "tags": ["a", "b"]}
    candidates = [
        base,
        base | {"score": 0.5, "active": True, "nickname": None},
        base | {"nickname": "Annie"},
        {k: v for k, v in base.items() if k != "age"},  # a required property missing
        base | {"role": "root"},  # not in the enum
        base | {"age": 151},
        base | {"age": 3.5},
        base | {"name": "x" * 13},
        base | {"tags": ["a", "b", "c", "d"]},
        base | {"address": {"city": "Paris", "zip": "7500"}},  # the pattern
        base | {"address": {"zip": "75001"}},
        base | {"address": address | {"street": "Rue"}},  # additionalProperties: false
        base | {"extra": 1},
        base | {"nickname": 5},
        base | {"score": 2},
    ]
    validator = jsonschema.Draft202012Validator(PERSON)
    for doc in candidates:
        for text in (json.dumps(doc), json.dumps(doc, indent=2)):
            assert accepts(tokenizer, grammar, text) == validator.is_valid(doc), text
    assert not accepts(tokenizer, grammar, " " + json.dumps(base))  # nothing before the JSON
    assert not accepts(tokenizer, grammar, json.dumps(base) + "\n")  # nor after it


def test_json_whitespace_is_bounded_by_default_and_follows_the_request(tokenizer):
    doc = '{"a":%s1}'
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    default = json_schema_grammar(schema)
    assert accepts(tokenizer, default, doc % (" " * 32)) and accepts(tokenizer, default, doc % "\n\t ")
    assert not accepts(tokenizer, default, doc % (" " * 33))
    compact = json_schema_grammar(schema, is_compact=True)
    assert accepts(tokenizer, compact, doc % "") and not accepts(tokenizer, compact, doc % " ")
    pattern = json_schema_grammar(schema, whitespace_pattern=" ?")
    assert accepts(tokenizer, pattern, doc % " ") and not accepts(tokenizer, pattern, doc % "  ")
    own = json_schema_grammar(schema | {"x-guidance": {"whitespace_flexible": False}})
    assert not accepts(tokenizer, own, doc % " ")  # the schema's own options beat the defaults


def test_strict_refuses_a_keyword_it_cannot_enforce_and_names_it():
    schema = {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}
    strict = Constraint("response_format", "json_schema", schema, strict=True)
    with pytest.raises(InvalidRequestError) as info:
        check_grammar(strict, prepare_grammar(strict))
    assert info.value.param == "response_format"
    assert "uniqueItems" in info.value.message and "strict" in info.value.message
    lenient = Constraint("response_format", "json_schema", schema)
    check_grammar(lenient, prepare_grammar(lenient))  # ignored: the output may repeat items
    # The schema's own x-guidance cannot loosen strict.
    own = schema | {"x-guidance": {"lenient": True}}
    with pytest.raises(InvalidRequestError, match="uniqueItems"):
        check_grammar(strict, json_schema_grammar(own, strict=True))
    unknown_format = {"type": "string", "format": "colour"}
    with pytest.raises(InvalidRequestError, match="colour"):
        check_grammar(strict, json_schema_grammar(unknown_format, strict=True))
    check_grammar(lenient, json_schema_grammar(unknown_format))


def test_an_invalid_schema_is_refused_strict_or_not():
    for strict in (True, False):
        constraint = Constraint("guided_json", "json_schema", {"type": "strin"}, strict=strict)
        with pytest.raises(InvalidRequestError) as info:
            check_grammar(constraint, prepare_grammar(constraint))
        assert info.value.param == "guided_json" and "strin" in info.value.message
        assert "strict" not in info.value.message  # leniency would not help
    dangling = Constraint("guided_json", "json_schema", {"$ref": "#/$defs/missing"})
    with pytest.raises(InvalidRequestError, match="missing"):
        check_grammar(dangling, prepare_grammar(dangling))


@pytest.mark.parametrize(
    "regex", [r"[a-z]{2,4}-[0-9]{2}", r"(yes|no)( maybe)?", r"-?[0-9]+(\.[0-9]+)?", r"\w+@\w+\.com"]
)
def test_a_regex_grammar_matches_what_python_re_fullmatches(tokenizer, regex):
    grammar = prepare_grammar(Constraint("guided_regex", "regex", regex))
    candidates = ["ab-12", "abcde-12", "a-1", "yes", "no maybe", "yes maybe ", "12", "-3.25", "3.", "x@y.com"]
    candidates += ["", "ab-1x", "Ab-12", "no", "a@b.org"]
    for text in candidates:
        assert accepts(tokenizer, grammar, text) == bool(re.fullmatch(regex, text)), text


def test_bad_regexes_are_refused_with_the_client_s_own_terms():
    for regex in ("[a-", "(?=a)b", "a{2,1}"):
        constraint = Constraint("structured_outputs.regex", "regex", regex)
        with pytest.raises(InvalidRequestError) as info:
            check_grammar(constraint, prepare_grammar(constraint))
        assert info.value.param == "structured_outputs.regex"
        assert info.value.message.startswith("structured_outputs.regex: invalid regular expression: ")
        assert "at 1(" not in info.value.message  # no position in a grammar the client never wrote


def test_regexes_that_repeat_too_often_are_refused_before_compiling():
    """Counted repetitions multiply through nesting; a JSON schema's patterns count too. Unbounded
    repeats and cheap ones pass."""
    for regex in ("a{100000}", "(ab){1001}", "(a{100}){11}", "x|(?:y{3}){400}"):
        constraint = Constraint("guided_regex", "regex", regex)
        with pytest.raises(InvalidRequestError) as info:
            prepare_grammar(constraint)
        assert info.value.param == "guided_regex" and "the limit is 1,000" in info.value.message
    for regex in ("a{1000}", "(a{10}){100}", "[0-9]+", "a*b{5}"):
        prepare_grammar(Constraint("guided_regex", "regex", regex))
    schema = {"type": "object", "properties": {"id": {"type": "string", "pattern": "^(x{50}){50}$"}}}
    with pytest.raises(InvalidRequestError) as info:
        prepare_grammar(Constraint("response_format.json_schema", "json_schema", schema))
    assert info.value.param == "response_format.json_schema"
    nested = {"type": "array", "items": {"patternProperties": {"^k{2000}$": {"type": "string"}}}}
    with pytest.raises(InvalidRequestError):
        prepare_grammar(Constraint("response_format.json_schema", "json_schema", nested))


def test_a_choice_grammar_allows_exactly_the_choices(tokenizer):
    choices = ['say "hi"', "back\\slash", "日本語", "a", "ab", "", "new\nline"]
    grammar = prepare_grammar(Constraint("guided_choice", "choice", choices))
    for text in choices:
        assert accepts(tokenizer, grammar, text), text
    for text in ["b", "abc", "say hi", "back\\\\slash", "日本", "A"]:
        assert not accepts(tokenizer, grammar, text), text


GBNF = 'root ::= item ("," item)*\nitem ::= "yes" | "no" | [0-9]+\n'
LARK = 'start: item ("," item)*\nitem: "yes" | "no" | /[0-9]+/\n'


def test_gbnf_and_lark_grammars_are_told_apart_and_mean_the_same(tokenizer):
    reference = r"(yes|no|[0-9]+)(,(yes|no|[0-9]+))*"
    grammars = [prepare_grammar(Constraint("guided_grammar", "grammar", g)) for g in (GBNF, LARK)]
    for text in ["yes", "yes,no,12", "7", "", "yes,", "maybe", "1,2,3", "no,,no", "YES"]:
        expected = bool(re.fullmatch(reference, text))
        assert [accepts(tokenizer, g, text) for g in grammars] == [expected, expected], text


def test_bad_grammars_are_refused_naming_the_field():
    for grammar in ['root ::= ("a" ', "root ::= " + "(" * 5000 + '"a"' + ")" * 5000, "start: undefined_rule"]:
        constraint = Constraint("guided_grammar", "grammar", grammar)
        with pytest.raises(InvalidRequestError) as info:
            check_grammar(constraint, prepare_grammar(constraint))
        assert info.value.param == "guided_grammar"
        assert info.value.message.startswith("guided_grammar: invalid grammar: ")


def test_closing_objects_walks_schema_positions_only(tokenizer):
    schema = {
        "type": "object",
        "properties": {
            # A property called "properties" is a name, not a schema keyword.
            "properties": {"type": "object", "properties": {"x": {"type": "integer"}}},
            "open": {"type": "object", "properties": {}, "additionalProperties": True},
            "list": {"type": "array", "items": [{"type": "object", "properties": {"y": {"type": "null"}}}]},
            "ref": {"$ref": "#/$defs/leaf"},
        },
        "$defs": {"leaf": {"anyOf": [{"type": "object", "properties": {"z": {"type": "string"}}}]}},
    }
    closed = close_objects(schema)
    assert "additionalProperties" not in schema  # a copy: the request's own schema stays as it was
    assert closed["additionalProperties"] is False
    props = closed["properties"]
    assert "additionalProperties" not in props  # the map of names was left alone
    assert props["properties"]["additionalProperties"] is False
    assert props["open"]["additionalProperties"] is True
    assert props["list"]["items"][0]["additionalProperties"] is False
    assert closed["$defs"]["leaf"]["anyOf"][0]["additionalProperties"] is False
    grammar = json_schema_grammar(schema, is_closed=True)
    assert accepts(tokenizer, grammar, '{"properties":{"x":1}}')
    assert not accepts(tokenizer, grammar, '{"properties":{"x":1,"w":2}}')
    assert accepts(tokenizer, json_schema_grammar(schema), '{"properties":{"x":1,"w":2}}')


MESSAGES = [{"role": "user", "content": "hi"}]


def test_the_request_s_one_constraint_is_found_and_two_are_refused():
    def chat(**fields):
        return ChatCompletionRequest(model="m", messages=MESSAGES, **fields)

    assert one_constraint(chat()) is None
    assert one_constraint(chat(response_format={"type": "text"})) is None
    found = one_constraint(chat(response_format={"type": "json_object"}))
    assert found == Constraint("response_format", "json_schema", ANY_OBJECT)
    schema = {"type": "object"}
    found = one_constraint(
        chat(
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": schema, "strict": True},
            }
        )
    )
    assert found == Constraint("response_format", "json_schema", schema, strict=True)
    found = one_constraint(CompletionRequest(model="m", prompt="p", guided_json=json.dumps(schema)))
    assert found == Constraint("guided_json", "json_schema", schema)
    options = {
        "disable_any_whitespace": True,
        "disable_additional_properties": True,
        "whitespace_pattern": " ",
    }
    found = one_constraint(chat(structured_outputs={"json_object": True} | options))
    assert (found.param, found.is_compact, found.is_closed, found.whitespace_pattern) == (
        "structured_outputs.json_object",
        True,
        True,
        " ",
    )
    for fields in (
        {"response_format": {"type": "json_object"}, "guided_regex": "a"},
        {"guided_choice": ["a"], "guided_grammar": "start: /a/"},
        {"structured_outputs": {"regex": "a", "choice": ["a"]}},
    ):
        with pytest.raises(InvalidRequestError, match="one structured-output constraint") as info:
            one_constraint(chat(**fields))
        names = [c.param for c in chat(**fields).constraints()]
        assert all(name in info.value.message for name in names) and info.value.param in names
