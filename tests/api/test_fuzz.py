"""Property-based fuzzing: no body makes the server answer 5xx, and every answer has its shape (issue 12).

schemathesis fuzzes every route of the app's own OpenAPI document; hypothesis fuzzes the generation,
embedding and rerank bodies with hostile values a schema does not suggest (numbers as odd strings,
out-of-vocabulary and huge token ids, empty and long lists, wrong types). Both run against the real
app on tiny models, so the engines see whatever gets past validation. Example counts are bounded so
the file takes well under a minute.
"""

from __future__ import annotations

import json

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ConfigDict
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

from inferd.api.app import create_app
from inferd.api.errors import Family, family_of
from inferd.config import load_settings
from inferd.protocol.errors import CohereErrorResponse, OpenAIErrorResponse, TEIErrorResponse

SERVED = ["tiny-chat", "tiny-embed", "tiny-rerank"]


class OllamaErrorResponse(BaseModel):
    """Ollama's error body: one message string."""

    model_config = ConfigDict(extra="forbid")
    error: str


_ERROR_BODY = {
    Family.OPENAI: OpenAIErrorResponse,
    Family.TEI: TEIErrorResponse,
    Family.COHERE: CohereErrorResponse,
    Family.OLLAMA: OllamaErrorResponse,
}
FUZZ = settings(deadline=None, suppress_health_check=list(HealthCheck), database=None)


def check_answer(path: str, response: httpx.Response | schemathesis.Response) -> None:
    """Never a 5xx; a 4xx carries its route family's error body; a 200 has a documented content type,
    and a stream ends with [DONE], never with a server error."""
    status, body = response.status_code, response.content
    assert status < 500, f"{status} on {path}: {body[:500]!r}"
    if status >= 400:
        _ERROR_BODY[family_of(path)].model_validate_json(body)
        return
    content_type = response.headers["content-type"]
    if isinstance(content_type, list):  # schemathesis keeps every value of a header
        content_type = content_type[0]
    content_type = content_type.split(";")[0]
    assert content_type in _documented_content_types(path), f"{content_type} on {path}"
    if content_type == "text/event-stream":
        events = [line.removeprefix(b"data: ") for line in body.split(b"\n") if line.startswith(b"data: ")]
        # schemathesis stops reading a stream after 20 events: only a whole one must end in [DONE].
        if not getattr(response, "stream_cut_short", False):
            assert events[-1] == b"[DONE]", body[-500:]
        for event in map(json.loads, (e for e in events if e != b"[DONE]")):
            assert "error" not in event or event["error"]["type"] != "server_error", event


# schemathesis: every route of the app's own document.


def _openapi_document() -> dict:
    """The app's own document (it does not depend on the models served, so none is loaded here), with
    each request's ``model`` drawn from the served names so that bodies get past the model lookup."""
    document = create_app(load_settings({"model": ["unused"]})).openapi()
    for component in document["components"]["schemas"].values():
        if "model" in component.get("properties", {}) and component["title"].endswith("Request"):
            component["properties"]["model"] = {"enum": [*SERVED, "no-such-model"]}
    return document


DOCUMENT = _openapi_document()


def _documented_content_types(path: str) -> set[str]:
    operations = DOCUMENT["paths"].get(path, {})
    return {kind for op in operations.values() for kind in op["responses"].get("200", {}).get("content", {})}


schema = schemathesis.openapi.from_dict(
    DOCUMENT,
    config=schemathesis.Config.from_dict(
        {
            "generation": {"mode": "all"},
            # The coverage phase (every documented boundary) costs more than the rest of this file
            # together; the request caps have their own tests (test_request_caps.py).
            "phases": {"coverage": {"enabled": False}, "stateful": {"enabled": False}},
        }
    ),
)


@schema.parametrize()
@settings(FUZZ, max_examples=25)
def test_every_route_survives_schema_fuzzing(case, open_server):
    response = case.call(base_url=open_server)
    check_answer(case.path, response)
    case.validate_response(response, checks=[response_schema_conformance, content_type_conformance])


# hypothesis: hostile values in the bodies the engines see.

_numbers_as_strings = st.sampled_from(
    ["1e400", "-1e400", "NaN", "Infinity", "²", "١٢", "１２", "0x10", " 5", "+5", "-0", "1_000", "9" * 40, ""]
)
_hostile = st.one_of(
    st.integers(-(2**70), 2**70),
    st.sampled_from([-1, 0, 2**31, 2**63, 2**64, -(2**63) - 1, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    _numbers_as_strings,
    st.text(max_size=20),
    st.booleans(),
    st.none(),
    st.lists(st.integers(-3, 3), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
_text = st.text(max_size=40) | st.sampled_from(["the cat", "paris is the capital of", "w1 w2 w3 " * 5])
_token_ids = st.lists(st.integers(0, 120), min_size=1, max_size=6)
_odd_token_ids = st.lists(
    st.one_of(
        st.integers(0, 199), st.integers(200, 2**31 - 1), st.integers(-3, -1), st.integers(2**31, 2**64)
    ),
    max_size=6,
)


@st.composite
def _bodies(draw, fields: dict, optional: dict):
    """A body of plausible values with zero to two fields replaced by something hostile.

    ``fields`` and ``optional`` map a name to (plausible values, that field's own odd values)."""
    body = draw(
        st.fixed_dictionaries(
            {name: valid for name, (valid, _) in fields.items()},
            optional={name: valid for name, (valid, _) in optional.items()},
        )
    )
    every = fields | optional
    for name in draw(st.lists(st.sampled_from(sorted(every)), max_size=2)):
        body[name] = draw(st.one_of(every[name][1], _hostile))
    return body


def _model(own: str):
    return st.just(own), st.sampled_from([*SERVED, "no-such-model", ""])


_SAMPLING = {
    "n": (st.integers(1, 2), st.integers(-1, 40)),
    "temperature": (st.floats(0, 2), st.floats(-1, 3)),
    "top_p": (st.floats(0.01, 1), st.floats(-1, 2)),
    "top_k": (st.integers(-1, 300), st.integers(-5, 2**40)),
    "min_p": (st.floats(0, 1), st.floats(-1, 2)),
    "seed": (st.integers(-(2**63), 2**63 - 1), st.integers(-(2**80), 2**80)),
    "presence_penalty": (st.floats(-2, 2), st.floats(-5, 5)),
    "frequency_penalty": (st.floats(-2, 2), st.floats(-5, 5)),
    "repetition_penalty": (st.floats(0.1, 2), st.floats(-1, 5)),
    "logit_bias": (
        st.dictionaries(st.integers(0, 199).map(str), st.floats(-100, 100), max_size=4),
        st.dictionaries(
            st.one_of(st.integers(-5, 2**40).map(str), _numbers_as_strings), st.floats(-200, 200), max_size=4
        ),
    ),
    "stop": (st.one_of(_text, st.lists(_text, min_size=1, max_size=4)), st.lists(_text, max_size=8)),
    "stop_token_ids": (st.lists(st.integers(3, 199), max_size=4), _odd_token_ids),
    "min_tokens": (st.integers(0, 8), st.integers(-5, 2**40)),
    "ignore_eos": (st.booleans(), _hostile),
    "stream": (st.booleans(), _hostile),
    "stream_options": (st.fixed_dictionaries({"include_usage": st.booleans()}), _hostile),
    "skip_special_tokens": (st.booleans(), _hostile),
    "include_stop_str_in_output": (st.booleans(), _hostile),
}
_part = st.fixed_dictionaries({"type": st.just("text"), "text": _text})
_odd_part = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image_url", "input_audio", ""])}, optional={"text": _hostile}
)
_message = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "user", "assistant"]),
        "content": _text | st.lists(_part, max_size=3),
    },
)
_odd_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["tool", "developer", "wizard", ""])},
    optional={
        "content": st.one_of(_hostile, st.lists(_odd_part, max_size=3)),
        "name": _hostile,
        "tool_calls": st.lists(st.dictionaries(st.text(max_size=5), _hostile, max_size=2), max_size=2),
    },
)
_tools = st.lists(
    st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries({"name": _text})}),
    max_size=2,
)
CHAT = _bodies(
    {
        "model": _model("tiny-chat"),
        "messages": (
            st.lists(_message, min_size=1, max_size=3),
            st.lists(_odd_message | _message, max_size=3),
        ),
    },
    {
        **_SAMPLING,
        "max_tokens": (st.integers(1, 8), st.integers(-5, 2**40)),
        "max_completion_tokens": (st.integers(1, 8), st.integers(-5, 2**40)),
        "logprobs": (st.booleans(), _hostile),
        "top_logprobs": (st.integers(0, 20), st.integers(-5, 50)),
        "tools": (_tools, st.lists(st.dictionaries(st.text(max_size=5), _hostile, max_size=2), max_size=3)),
        "add_generation_prompt": (st.booleans(), _hostile),
        "chat_template_kwargs": (st.just({}), st.dictionaries(st.text(max_size=8), _hostile, max_size=2)),
    },
)
_prompt = st.one_of(
    _text, st.lists(_text, min_size=1, max_size=3), _token_ids, st.lists(_token_ids, max_size=3)
)
_odd_prompt = st.one_of(
    _odd_token_ids, st.lists(_odd_token_ids, max_size=3), st.lists(_text | _token_ids, max_size=3)
)
COMPLETION = _bodies(
    {
        "model": _model("tiny-chat"),
        "prompt": (_prompt, _odd_prompt),
        "max_tokens": (st.integers(1, 8), st.integers(-5, 2**40)),
    },
    {
        **_SAMPLING,
        "echo": (st.booleans(), _hostile),
        "logprobs": (st.integers(0, 5), st.integers(-5, 50)),
        "suffix": (st.none(), _text),
        "best_of": (st.none(), st.integers(-1, 5)),
    },
)
_inputs = st.one_of(
    _text, st.lists(_text, min_size=1, max_size=16), _token_ids, st.lists(_token_ids, min_size=1, max_size=3)
)
_odd_inputs = st.one_of(_odd_prompt, st.lists(_text, min_size=17, max_size=20), st.just([]), st.just(""))
_ENCODE = {
    "normalize": (st.booleans(), _hostile),
    "truncate": (st.booleans(), _hostile),
    "dimensions": (st.integers(1, 32), st.integers(-5, 2**40)),
    "prompt_name": (st.none(), _text),
}
EMBEDDING = _bodies(
    {"model": _model("tiny-embed"), "input": (_inputs, _odd_inputs)},
    {
        **_ENCODE,
        "encoding_format": (st.sampled_from(["float", "base64"]), _text),
        "truncation_direction": (st.sampled_from(["right", "left", "Left"]), _text),
        "prompt": (_text, st.text(min_size=200, max_size=400)),
        "embedding_type": (st.sampled_from(["float", "int8", "uint8", "binary", "ubinary"]), _text),
    },
)
TEI_EMBED = _bodies({"inputs": (_inputs, _odd_inputs)}, _ENCODE)
_documents = st.lists(_text | st.fixed_dictionaries({"text": _text}), min_size=1, max_size=16)
_odd_documents = st.lists(_hostile | st.fixed_dictionaries({"text": _hostile}), max_size=20)
RERANK = _bodies(
    {"model": _model("tiny-rerank"), "query": (_text, _hostile), "documents": (_documents, _odd_documents)},
    {
        "top_n": (st.integers(1, 20), st.integers(-5, 2**40)),
        "return_documents": (st.booleans(), _hostile),
        "max_tokens_per_doc": (st.integers(1, 600), st.integers(-5, 2**40)),
        "raw_scores": (st.booleans(), _hostile),
    },
)
TEI_RERANK = _bodies(
    {"query": (_text, _hostile), "texts": (st.lists(_text, min_size=1, max_size=16), _odd_documents)},
    {
        "truncate": (st.booleans(), _hostile),
        "truncation_direction": (st.sampled_from(["right", "left"]), _text),
        "raw_scores": (st.booleans(), _hostile),
        "return_text": (st.booleans(), _hostile),
    },
)


def _chat(**extra) -> dict:
    return {
        "model": "tiny-chat",
        "messages": [{"role": "user", "content": "the cat"}],
        "max_tokens": 3,
    } | extra


# Bodies that once got a 5xx (or a server error inside a stream), sent on every run besides the
# generated ones.
KNOWN = {
    "/v1/chat/completions": [
        _chat(logit_bias={"²": 1}),
        _chat(logit_bias={"١": 5}),
        _chat(logit_bias={"99999999": 1}, stream=True),
        _chat(stop_token_ids=[99999999], min_tokens=2),
        _chat(seed=2**64),
        _chat(stream=True, stream_options={"include_usage": True}),
    ],
    "/v1/completions": [{"model": "tiny-chat", "prompt": [2**63], "max_tokens": 2}],
    "/v1/embeddings": [{"model": "tiny-embed", "input": [[1, 2**64]]}],
}

ROUTES = [
    ("/v1/chat/completions", CHAT),
    ("/v1/completions", COMPLETION),
    ("/v1/embeddings", EMBEDDING),
    ("/embed", TEI_EMBED),
    ("/v1/rerank", RERANK),
    ("/v2/rerank", RERANK),
    ("/rerank", TEI_RERANK),
]


@pytest.fixture(scope="module")
def http(open_server):
    with httpx.Client(base_url=open_server, timeout=60) as client:
        yield client


@pytest.mark.parametrize(("path", "bodies"), ROUTES, ids=[path for path, _ in ROUTES])
def test_hostile_bodies_never_get_a_server_error(http, path, bodies):
    @given(body=bodies)
    @settings(FUZZ, max_examples=40)
    def post(body):
        # NaN and Infinity as JSON literals too: Python's json module (and so the server) reads them.
        response = http.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
        check_answer(path, response)

    for body in KNOWN.get(path, []):
        post = example(body=body)(post)
    post()


def test_tei_embed_cut_unnormalised_batch_is_no_500(http):
    """Found by this file: a column slice of the embeddings reached orjson, which refused it (500)."""
    response = http.post("/embed", json={"inputs": ["the cat", "a dog"], "dimensions": 8, "normalize": False})
    check_answer("/embed", response)
