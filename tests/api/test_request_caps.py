"""Every client-supplied size is capped with a clear 4xx naming the field and the limit (issue 12)."""

from __future__ import annotations

import httpx
import pytest
from pydantic import ValidationError

from inferd.protocol import limits
from inferd.protocol.openai_chat import ChatCompletionRequest
from inferd.protocol.openai_completions import CompletionRequest
from inferd.protocol.openai_embeddings import EmbeddingRequest
from inferd.protocol.rerank import CohereRerankRequest
from inferd.protocol.tei import RerankRequest
from inferd.protocol.tokenize import DetokenizeRequest, TokenizeRequest
from tests.openapi import validate_openai

USER = {"role": "user", "content": "the cat"}


def _chat(**extra) -> dict:
    return {"model": "tiny-chat", "messages": [USER], "max_tokens": 2} | extra


def _tool(i: int, description: str = "") -> dict:
    return {"type": "function", "function": {"name": f"f{i}", "description": description}}


def _nested(depth: int) -> list:
    """Lists nested ``depth`` deep."""
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


# Deep enough that transformers' chat template code (two frames a level) ran out of stack: a 500.
DEEP = _nested(500)


# (route, body, field the message names, limit the message names)
OVER_CAP = [
    ("/v1/chat/completions", _chat(stop_token_ids=list(range(257))), "stop_token_ids", "256"),
    ("/v1/chat/completions", _chat(logit_bias={str(i): 1 for i in range(301)}), "logit_bias", "300"),
    ("/v1/chat/completions", _chat(stop="y" * 257), "stop", "256"),
    ("/v1/chat/completions", _chat(stop=["ok", "z" * 1000]), "stop", "256"),
    ("/v1/chat/completions", _chat(messages=[USER] * 2049), "messages", "2048"),
    (
        "/v1/chat/completions",
        _chat(messages=[{"role": "user", "content": [{"type": "text", "text": "a"}] * 257}]),
        "messages.0.content",
        "256",
    ),
    (
        "/v1/chat/completions",
        _chat(messages=[{"role": "assistant", "tool_calls": [{}] * 129}]),
        "messages.0.tool_calls",
        "128",
    ),
    ("/v1/chat/completions", _chat(tools=[_tool(i) for i in range(129)]), "tools", "128"),
    ("/v1/chat/completions", _chat(tools=[_tool(0, "d" * 600_000)]), "tools", "524288"),
    (
        "/v1/chat/completions",
        _chat(chat_template_kwargs={f"k{i}": 1 for i in range(65)}),
        "chat_template_kwargs",
        "64",
    ),
    ("/v1/chat/completions", _chat(tools=[{"type": "function", "x": DEEP}]), "tools", "64"),
    (
        "/v1/chat/completions",
        _chat(messages=[{"role": "assistant", "tool_calls": [{"x": DEEP}]}]),
        "messages.0",
        "64",
    ),
    ("/v1/chat/completions", _chat(messages=[USER | {"extra": DEEP}]), "messages.0", "64"),
    ("/v1/chat/completions", _chat(chat_template_kwargs={"x": DEEP}), "chat_template_kwargs", "64"),
    ("/tokenize", {"messages": [USER | {"extra": DEEP}]}, "messages.0", "64"),
    ("/v1/completions", {"model": "tiny-chat", "prompt": ["a"] * 2049}, "prompt", "2048"),
    ("/v1/completions", {"model": "tiny-chat", "prompt": [[5]] * 2049}, "prompt", "2048"),
    ("/tokenize", {"messages": [USER] * 2049}, "messages", "2048"),
    ("/detokenize", {"tokens": [5] * 131_073}, "tokens", "131072"),
    ("/v1/embeddings", {"model": "tiny-embed", "input": ["a"] * 16_385}, "input", "16384"),
    ("/v1/rerank", {"model": "tiny-rerank", "query": "q", "documents": ["a"] * 16_385}, "documents", "16384"),
]


@pytest.mark.parametrize(
    ("path", "body", "field", "limit"),
    OVER_CAP,
    ids=[f"{path} {field} {i}" for i, (path, _, field, _) in enumerate(OVER_CAP)],
)
def test_over_the_cap_is_a_400_naming_field_and_limit(open_server, path, body, field, limit):
    response = httpx.post(open_server + path, json=body, timeout=30)
    assert response.status_code == 400, response.text
    if path in ("/v1/rerank", "/v2/rerank"):
        message = response.json()["message"]
    else:
        validate_openai(response.json(), "ErrorResponse")
        message = response.json()["error"]["message"]
        assert response.json()["error"]["param"] == field
    assert message.startswith(f"{field}: ") and limit in message, message


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/embed", {"inputs": ["a"] * 16_385}, "inputs"),
        ("/rerank", {"query": "q", "texts": ["a"] * 16_385}, "texts"),
    ],
)
def test_tei_routes_cap_lists_with_their_422(open_server, path, body, field):
    response = httpx.post(open_server + path, json=body, timeout=30)
    assert response.status_code == 422, response.text
    assert response.json()["error_type"] == "Validation"
    assert response.json()["error"].startswith(f"{field}: ") and "16384" in response.json()["error"]


@pytest.mark.parametrize(
    "key", ["²", "١", "１", "-1", "+1", " 1", "1.0", "0x1", "", "99999999999", "4294967296"]
)
def test_logit_bias_keys_must_be_ascii_decimal_token_ids(open_server, key):
    # "²" and "١" pass str.isdigit and used to reach int() (or the sampler) and answer 500.
    response = httpx.post(open_server + "/v1/chat/completions", json=_chat(logit_bias={key: 1}))
    assert response.status_code == 400, response.text
    assert "logit_bias keys must be token ids" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/detokenize", {"tokens": [-1]}, "tokens"),
        ("/detokenize", {"tokens": [2**63]}, "tokens"),
        ("/tokenize", {"messages": []}, "messages"),  # was a 500 from the chat template
        ("/v1/chat/completions", _chat(stop_token_ids=[-1]), "stop_token_ids.0"),
        ("/v1/chat/completions", _chat(seed=2**64), "seed"),  # overflows torch's generator
        ("/v1/embeddings", {"model": "tiny-embed", "input": [[1, -1]]}, "input"),
        ("/v1/completions", {"model": "tiny-chat", "prompt": [2**64]}, "prompt"),
    ],
)
def test_ids_and_seeds_out_of_any_range_are_400s(open_server, path, body, field):
    response = httpx.post(open_server + path, json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == field


def test_at_the_caps_requests_still_parse():
    """The caps refuse one past the limit, not the limit itself."""
    n = limits
    ChatCompletionRequest.model_validate(
        _chat(
            messages=[{"role": "user", "content": [{"type": "text", "text": "a"}] * n.MAX_CONTENT_PARTS}]
            * n.MAX_MESSAGES,
            stop=["s" * n.MAX_STOP_STRING_CHARS] * n.MAX_STOP_STRINGS,
            stop_token_ids=list(range(n.MAX_STOP_TOKEN_IDS)),
            logit_bias={str(i): 1 for i in range(n.MAX_LOGIT_BIAS)},
            tools=[_tool(i) for i in range(n.MAX_TOOLS - 1)] + [{"deep": _nested(n.MAX_JSON_DEPTH - 2)}],
            chat_template_kwargs={"x": _nested(n.MAX_JSON_DEPTH - 1)},
            seed=2**63 - 1,
        )
    )
    CompletionRequest.model_validate({"model": "m", "prompt": [[n.MAX_TOKEN_ID]] * n.MAX_COMPLETION_PROMPTS})
    EmbeddingRequest.model_validate({"model": "m", "input": ["a"] * n.MAX_BATCH_INPUTS})
    DetokenizeRequest.model_validate({"tokens": [0] * n.MAX_DETOKENIZE_TOKENS})
    TokenizeRequest.model_validate({"messages": [USER] * n.MAX_MESSAGES})


HUGE = 200_000
WRONG_ITEMS = [
    (CohereRerankRequest, {"query": "q", "documents": [1] * HUGE}),
    (RerankRequest, {"query": "q", "texts": [1] * HUGE}),
    (EmbeddingRequest, {"model": "m", "input": [[-1]] * HUGE}),
    (EmbeddingRequest, {"model": "m", "input": [1.5] * HUGE}),
    (CompletionRequest, {"model": "m", "prompt": [None] * HUGE}),
    (ChatCompletionRequest, _chat(stop_token_ids=["a"] * HUGE)),
    (ChatCompletionRequest, _chat(logit_bias={str(i): "x" for i in range(HUGE)})),
    (ChatCompletionRequest, _chat(messages=[1] * HUGE)),
    (ChatCompletionRequest, _chat(messages=[{"role": "user", "content": [1] * HUGE}])),
    (ChatCompletionRequest, _chat(tools=[1] * HUGE)),
    (DetokenizeRequest, {"tokens": ["a"] * HUGE}),
]


@pytest.mark.parametrize(("model", "body"), WRONG_ITEMS, ids=lambda v: getattr(v, "__name__", ""))
def test_a_long_list_of_bad_items_is_one_error_not_one_per_item(model, body):
    """pydantic validates (and reports) every item before it checks a list's length: a 16 MiB body
    of bad items held the event loop for seconds (a minute for rerank documents) and built millions
    of error objects. The caps run first, so a long list costs one error."""
    with pytest.raises(ValidationError) as caught:
        model.model_validate(body)
    assert caught.value.error_count() == 1, str(caught.value)[:300]
