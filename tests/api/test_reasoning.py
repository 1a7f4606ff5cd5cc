"""Reasoning split from the answer: the parser on fixed texts in every chunking, and over HTTP on tiny
random models with a Qwen3-style template (thinking on or off by enable_thinking) and a
DeepSeek-R1-style one (the prompt opens the block): streamed and not, with a response format or a
forced tool call applying only after the reasoning ends."""

import json
import random

import httpx
import jsonschema
import openai
import pytest

from inferd.api.serving.reasoning import ReasoningParser, ReplyStart, reply_start, think_tokens
from inferd.config import load_settings
from tests.conftest import free_port, live_server
from tests.models import build_byte_llama


def split(start: ReplyStart, chunks: list[str]) -> tuple[str, str]:
    parser = ReasoningParser(start)
    reasoning = content = ""
    for out in [*(parser.feed(c) for c in chunks), parser.finish()]:
        reasoning, content = reasoning + out.reasoning, content + out.content
    return reasoning, content


def chunkings(text: str):
    yield [text]
    yield list(text)
    for i in range(1, len(text)):
        yield [text[:i], text[i:]]
    rng = random.Random(1)
    for _ in range(10):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, 5)))
        yield [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


@pytest.mark.parametrize(
    ("start", "text", "reasoning", "content"),
    [
        (
            ReplyStart.THINKING,
            "Let me think. 2 < 3.\n</think>\n\nThe answer is 3.",
            "Let me think. 2 < 3.\n",
            "The answer is 3.",
        ),
        (ReplyStart.THINKING, "Still thinking </thi", "Still thinking </thi", ""),
        (ReplyStart.EITHER, '\n<think>\nhmm\n</think>\n\n{"a": 1}', "\nhmm\n", '{"a": 1}'),
        (ReplyStart.EITHER, "  Hello <think> there", "", "  Hello <think> there"),
        (ReplyStart.EITHER, "<thin", "", "<thin"),
        (ReplyStart.ANSWER, "<think>x</think>y", "", "<think>x</think>y"),
    ],
)
def test_every_chunking_splits_the_same(start, text, reasoning, content):
    for chunks in chunkings(text):
        assert split(start, chunks) == (reasoning, content), chunks


# Qwen3's layout: thinking unless enable_thinking is false, which renders an empty block.
QWEN3_TEMPLATE = """
{%- if tools %}<|im_start|>system
# Tools
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>
Call a tool as <tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% endif %}
{%- for m in messages %}<|im_start|>{{ m.role }}
{% if m.role == 'assistant' %}{{ m.content.split('</think>')[-1].lstrip() }}{% else %}{{ m.content }}{% endif %}\
<|im_end|>
{% endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking is defined and enable_thinking is false %}<think>

</think>

{% endif %}{% endif %}"""

# DeepSeek-R1's newer layout: the generation prompt opens the block.
R1_TEMPLATE = """
{%- for m in messages %}<|im_start|>{{ m.role }}
{{ m.content.split('</think>')[-1] }}<|im_end|>
{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant
<think>
{% endif %}"""

THINK = ("<think>", "</think>")
SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 99}, "sure": {"type": "boolean"}},
    "required": ["answer", "sure"],
    "additionalProperties": False,
}
USER = [{"role": "user", "content": "What is 2 + 3?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("reasoning-models")
    qwen3 = build_byte_llama(root, "qwen3", QWEN3_TEMPLATE, added=("<tool_call>", "</tool_call>", *THINK))
    r1 = build_byte_llama(root, "r1", R1_TEMPLATE, added=THINK)
    settings = load_settings(
        {
            "model": [f"{qwen3}=qwen3", f"{r1}=r1"],
            "port": free_port(),
            "num_threads": 1,
            "kv_cache_memory": 16 * 2**20,
            "max_n": 2,
        }
    )
    with live_server(settings) as url:
        yield url


def _llm(server, name):
    return next(m.client for m in server.app.state.models if m.name == name)


def _end_of_thinking_bias(server, name: str) -> dict:
    """A random model writes </think> once in hundreds of tokens: make it likely, so reasoning ends."""
    return {str(_llm(server, name).tokenizer.convert_tokens_to_ids("</think>")): 4}


def _chat(server, model: str, **body) -> dict:
    body = {"model": model, "messages": USER, "max_tokens": 64, "seed": 1} | body
    response = httpx.post(server + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]


def _raw_text(server, model: str, **body) -> str:
    """The reply's text as the model wrote it: the same prompt and sampling through /v1/completions."""
    ids = _llm(server, model).render_chat(USER)
    body = {"model": model, "prompt": ids, "max_tokens": 64, "seed": 1} | body
    return httpx.post(server + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]


def test_reasoning_models_are_told_apart_and_where_their_reply_starts(server):
    qwen3, r1 = _llm(server, "qwen3"), _llm(server, "r1")
    tokens = think_tokens(qwen3.tokenizer)
    assert tokens is not None and think_tokens(r1.tokenizer) is not None
    prompts = {
        ReplyStart.EITHER: {},
        ReplyStart.ANSWER: {"enable_thinking": False},
    }
    for start, kwargs in prompts.items():
        ids = qwen3.render_chat(USER, template_kwargs=kwargs)
        assert reply_start(tokens, ids, qwen3.decode) is start
    assert reply_start(think_tokens(r1.tokenizer), r1.render_chat(USER), r1.decode) is ReplyStart.THINKING


def test_reasoning_goes_to_its_own_fields_and_the_answer_to_content(server):
    found = False
    for seed in range(3):
        sampling = {"seed": seed, "logit_bias": _end_of_thinking_bias(server, "r1")}
        message, raw = _chat(server, "r1", **sampling)["message"], _raw_text(server, "r1", **sampling)
        assert message["reasoning_content"] == message["reasoning"]
        reasoning, content = message["reasoning"] or "", message["content"]
        assert raw.startswith(reasoning + "</think>") and "</think>" not in reasoning
        assert raw.endswith(content) and raw[len(reasoning) : len(raw) - len(content)].strip() == "</think>"
        found = found or bool(reasoning and content)
    assert found


def test_a_streamed_reply_splits_as_the_whole_one_does(server):
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused")
    kwargs = dict(
        model="r1", messages=USER, max_tokens=64, seed=2, n=2, logit_bias=_end_of_thinking_bias(server, "r1")
    )
    whole = client.chat.completions.create(**kwargs)
    reasoning, content = ["", ""], ["", ""]
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            delta = choice.delta.model_dump()
            assert delta.get("reasoning") == delta.get("reasoning_content")
            reasoning[choice.index] += delta.get("reasoning_content") or ""
            content[choice.index] += delta.get("content") or ""
    for choice in whole.choices:
        message = choice.message.model_dump()
        assert reasoning[choice.index] == (message["reasoning_content"] or "")
        assert content[choice.index] == message["content"]


def test_enable_thinking_false_means_no_reasoning(server):
    message = _chat(server, "qwen3", chat_template_kwargs={"enable_thinking": False}, max_tokens=16)[
        "message"
    ]
    assert message["reasoning_content"] is None and len(message["content"]) > 0


@pytest.mark.parametrize("kwargs", [{}, {"enable_thinking": False}], ids=["thinking", "not-thinking"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_response_format_applies_after_the_reasoning(server, kwargs, stream):
    response_format = {"type": "json_schema", "json_schema": {"name": "sum", "schema": SCHEMA}}
    body = dict(
        model="qwen3",
        messages=USER,
        max_tokens=200,
        response_format=response_format,
        extra_body={"chat_template_kwargs": kwargs},
        logit_bias=_end_of_thinking_bias(server, "qwen3"),
    )
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused")
    for seed in range(3):
        if stream:
            reasoning = content = ""
            for chunk in client.chat.completions.create(**body, seed=seed, stream=True):
                delta = chunk.choices[0].delta.model_dump() if chunk.choices else {}
                reasoning += delta.get("reasoning_content") or ""
                content += delta.get("content") or ""
        else:
            message = client.chat.completions.create(**body, seed=seed).choices[0].message.model_dump()
            reasoning, content = message["reasoning_content"] or "", message["content"]
        jsonschema.validate(json.loads(content), SCHEMA)
        assert bool(reasoning) == (not kwargs), reasoning  # free text, only when thinking


def test_a_reply_cannot_end_before_its_reasoning_does_when_a_format_applies(server):
    """The model wants to stop at once, inside the reasoning the prompt opened: it used to, and the
    reply was "stop" with no JSON at all; EOS now waits for </think>, and the JSON follows."""
    tokenizer = _llm(server, "r1").tokenizer
    bias = {str(tokenizer.convert_tokens_to_ids(t)): b for t, b in (("<|im_end|>", 100), ("</think>", 50))}
    response_format = {"type": "json_schema", "json_schema": {"name": "sum", "schema": SCHEMA}}
    choice = _chat(server, "r1", response_format=response_format, logit_bias=bias, max_tokens=100)
    assert choice["finish_reason"] == "stop", choice
    jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMA)


def test_a_forced_tool_call_comes_after_the_reasoning(server):
    tool = {"type": "function", "function": {"name": "add", "parameters": SCHEMA}}
    for seed in range(3):
        choice = _chat(
            server,
            "qwen3",
            tools=[tool],
            tool_choice="required",
            parallel_tool_calls=False,
            max_tokens=200,
            seed=seed,
            logit_bias=_end_of_thinking_bias(server, "qwen3"),
        )
        message = choice["message"]
        assert choice["finish_reason"] == "tool_calls" and message["reasoning_content"]
        jsonschema.validate(json.loads(message["tool_calls"][0]["function"]["arguments"]), SCHEMA)


@pytest.mark.parametrize(
    "kwargs",
    [{"chat_template": "{{ 1 }}"}, {"enable_thinking": {"nested": True}}, {"date_string": "x" * 65}],
)
def test_template_kwargs_are_an_allow_list_of_plain_values(server, kwargs):
    response = httpx.post(
        server + "/v1/chat/completions",
        json={"model": "qwen3", "messages": USER, "max_tokens": 2, "chat_template_kwargs": kwargs},
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == "chat_template_kwargs"
