"""Tool calling over HTTP on tiny random models whose chat templates are written here in each family's
format (Hermes/Qwen, Llama-3, Mistral, and one that does not know tools): forced choices give valid
calls every time, streamed as OpenAI streams them, and real clients (openai, LangChain) run unchanged."""

import json

import httpx
import jsonschema
import openai
import pytest

from inferd.config import load_settings
from tests.conftest import free_port, live_server
from tests.models import build_byte_llama
from tests.openapi import validate_openai

# Qwen2.5's layout: tools in the system turn, calls as <tool_call> blocks, results as user turns.
HERMES_TEMPLATE = """
{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}# Tools
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>
Return each call as <tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for m in messages %}
{%- if m.role == 'system' and loop.first %}
{%- elif m.role == 'assistant' %}<|im_start|>assistant
{{ m.content or '' }}{% for c in m.tool_calls or [] %}
<tool_call>
{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% elif m.role == 'tool' %}<|im_start|>user
<tool_response>
{{ m.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

# Llama 3.1's layout: tools in the first user turn, a call is the JSON object, results as ipython.
LLAMA3_TEMPLATE = """
{%- for m in messages %}<|start_header_id|>{{ 'ipython' if m.role == 'tool' else m.role }}<|end_header_id|>

{% if tools and loop.first %}Given the following functions, respond with a JSON for a function call. Respond in \
the format {"name": function name, "parameters": dictionary of argument name and its value}.
{% for t in tools %}{{ t | tojson }}
{% endfor %}{% endif %}
{%- if m.tool_calls %}{% for c in m.tool_calls %}<|python_tag|>{"name": "{{ c.function.name }}", \
"parameters": {{ c.function.arguments | tojson }}}{% endfor %}{% else %}{{ m.content }}{% endif %}<|eot_id|>
{%- endfor %}
{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>

{% endif %}"""

# Mistral v0.3's layout, with its check that call ids are 9 alphanumeric characters.
MISTRAL_TEMPLATE = """
{%- for m in messages %}
{%- if m.role == 'user' %}{% if loop.first and tools %}<tools>{{ tools | tojson }}</tools>{% endif %}[INST]{{ m.content }}[/INST]
{%- elif m.role == 'assistant' and m.tool_calls %}[TOOL_CALLS][{% for c in m.tool_calls %}
{%- if c.id | length != 9 %}{{ raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}\
{% endif %}{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}, "id": "{{ c.id }}"}\
{% if not loop.last %}, {% endif %}{% endfor %}]</s>
{%- elif m.role == 'assistant' %}{{ m.content }}</s>
{%- elif m.role == 'tool' %}[TOOL_RESULTS]{"content": {{ m.content | tojson }}, "call_id": "{{ m.tool_call_id }}"}\
[/TOOL_RESULTS]
{%- else %}{{ m.content }}
{%- endif %}{%- endfor %}"""

# SmolLM2's layout: no tools at all.
PLAIN_TEMPLATE = """
{%- for m in messages %}<|im_start|>{{ m.role }}
{{ m['content'] }}<|im_end|>
{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

MODELS = {
    "hermes": dict(chat_template=HERMES_TEMPLATE, added=("<tool_call>", "</tool_call>")),
    "llama3": dict(
        chat_template=LLAMA3_TEMPLATE,
        specials=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|python_tag|>"),
        eos="<|eot_id|>",
    ),
    "mistral": dict(
        chat_template=MISTRAL_TEMPLATE,
        specials=("</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"),
        eos="</s>",
    ),
    "plain": dict(chat_template=PLAIN_TEMPLATE),
}

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {
            "$defs": {"Small": {"type": "integer", "minimum": 0, "maximum": 999}},
            "type": "object",
            "properties": {"a": {"$ref": "#/$defs/Small"}, "b": {"$ref": "#/$defs/Small"}},
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, ADD]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("tool-models")
    # Byte-level: a prompt with tool definitions is a token per character.
    models = [
        f"{build_byte_llama(root, name, max_position_embeddings=4096, **spec)}={name}"
        for name, spec in MODELS.items()
    ]
    settings = load_settings(
        {"model": models, "port": free_port(), "num_threads": 1, "kv_cache_memory": 16 * 2**20, "max_n": 2}
    )
    with live_server(settings) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused")


def _chat(server, **body) -> httpx.Response:
    return httpx.post(
        server + "/v1/chat/completions", json={"messages": USER, "max_tokens": 200} | body, timeout=60
    )


def _check_calls(calls, names=SCHEMAS) -> None:
    assert calls
    for call in calls:
        assert call["type"] == "function" and call["id"]
        jsonschema.validate(json.loads(call["function"]["arguments"]), names[call["function"]["name"]])


@pytest.mark.parametrize("model", list(MODELS))
def test_required_yields_a_valid_call_every_time(server, model):
    for seed in range(4):
        body = dict(model=model, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, seed=seed)
        response = _chat(server, **body)
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls", choice
        assert len(choice["message"]["tool_calls"]) == 1
        _check_calls(choice["message"]["tool_calls"])
        if model == "mistral":  # its template accepts nothing else back
            assert all(len(c["id"]) == 9 and c["id"].isalnum() for c in choice["message"]["tool_calls"])


def test_parallel_calls_get_their_own_index_and_id(server):
    most = 0
    for model in MODELS:
        for seed in range(3):
            body = dict(model=model, tools=TOOLS, tool_choice="required", seed=seed, max_tokens=300)
            choice = _chat(server, **body).json()["choices"][0]
            calls = choice["message"]["tool_calls"]
            if choice["finish_reason"] == "length":  # a random model may go on calling: the last is cut
                calls = calls[:-1]
            else:
                assert choice["finish_reason"] == "tool_calls"
            _check_calls(calls)
            assert len({c["id"] for c in calls}) == len(calls)
            most = max(most, len(calls))
    assert most > 1


@pytest.mark.parametrize("model", list(MODELS))
def test_a_named_choice_calls_that_function_once(server, model):
    for seed in range(2):
        named = {"type": "function", "function": {"name": "add"}}
        response = _chat(server, model=model, tools=TOOLS, tool_choice=named, seed=seed)
        message = response.json()["choices"][0]["message"]
        assert [c["function"]["name"] for c in message["tool_calls"]] == ["add"]
        assert message["content"] is None
        _check_calls(message["tool_calls"])


@pytest.mark.parametrize("model", list(MODELS))
def test_streamed_calls_reassemble_to_the_non_streamed_ones(server, client, model):
    kwargs = dict(
        model=model, messages=USER, tools=TOOLS, tool_choice="required", seed=11, max_tokens=300, n=2
    )
    whole = client.chat.completions.create(**kwargs)
    calls: dict[tuple[int, int], dict] = {}
    finishes = {}
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            finishes[choice.index] = choice.finish_reason or finishes.get(choice.index)
            for delta in choice.delta.tool_calls or ():
                key = (choice.index, delta.index)
                if key not in calls:  # a call's first delta: index, id, type and name
                    assert delta.id and delta.type == "function" and delta.function.name
                    calls[key] = {"id": delta.id, "name": delta.function.name, "arguments": ""}
                else:
                    assert delta.id is None and delta.function.name is None
                calls[key]["arguments"] += delta.function.arguments or ""
    for choice in whole.choices:
        expected = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]
        got = [(c["name"], c["arguments"]) for (i, _), c in sorted(calls.items()) if i == choice.index]
        assert got == expected and got
        assert finishes[choice.index] == choice.finish_reason


def test_bodies_and_chunks_with_calls_match_openais_schemas(server):
    body = dict(model="mistral", messages=USER, tools=TOOLS, tool_choice="required", seed=3, max_tokens=300)
    validate_openai(_chat(server, **body).json(), "CreateChatCompletionResponse")
    with httpx.stream("POST", server + "/v1/chat/completions", json=body | {"stream": True}) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    for chunk in chunks:
        validate_openai(chunk, "CreateChatCompletionStreamResponse")
    assert any(c["choices"][0]["delta"].get("tool_calls") for c in chunks)


def test_the_openai_stream_helper_reassembles_calls(client):
    kwargs = dict(
        model="hermes", messages=USER, tools=TOOLS, tool_choice="required", parallel_tool_calls=False
    )
    kwargs |= dict(seed=5, max_tokens=200)
    with client.chat.completions.stream(**kwargs) as stream:
        final = stream.get_final_completion()
    calls = final.choices[0].message.tool_calls
    assert calls and final.choices[0].finish_reason == "tool_calls"
    _check_calls([c.model_dump() for c in calls])


def test_auto_lets_the_model_answer_in_text(server):
    response = _chat(server, model="hermes", tools=TOOLS, max_tokens=8, seed=1)
    choice = response.json()["choices"][0]
    assert response.status_code == 200 and "tool_calls" not in choice["message"]
    assert choice["finish_reason"] in ("stop", "length") and isinstance(choice["message"]["content"], str)


def test_none_renders_the_tools_and_parses_no_call(server):
    response = _chat(server, model="hermes", tools=TOOLS, tool_choice="none", max_tokens=8, seed=1)
    assert response.status_code == 200 and "tool_calls" not in response.json()["choices"][0]["message"]


def test_a_response_format_wins_over_auto_and_a_forced_call_wins_over_it(server):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    response_format = {"type": "json_schema", "json_schema": {"name": "r", "schema": schema}}
    body = dict(model="hermes", tools=TOOLS, response_format=response_format, seed=2)
    message = _chat(server, **body).json()["choices"][0]["message"]
    assert "tool_calls" not in message and json.loads(message["content"]) in ({"ok": True}, {"ok": False})
    message = _chat(server, **body, tool_choice="required", parallel_tool_calls=False).json()["choices"][0][
        "message"
    ]
    _check_calls(message["tool_calls"])


def _prompt_text(server, name: str, body: dict) -> str:
    from inferd.api.serving.chat import prepare_chat
    from inferd.protocol.openai_chat import ChatCompletionRequest

    llm = next(m.client for m in server.app.state.models if m.name == name)
    return llm.decode(prepare_chat(ChatCompletionRequest.model_validate(body | {"model": name}), llm).prompt)


HISTORY = [
    *USER,
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "abcdefgh1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "abcdefgh1", "content": "sunny, 21"},
]


@pytest.mark.parametrize("model", ["hermes", "llama3", "mistral"])
def test_templates_that_know_tools_render_earlier_calls_with_object_arguments(server, model):
    text = _prompt_text(server, model, {"messages": HISTORY, "tools": TOOLS})
    assert '"get_weather", "' in text and '{"city": "Paris", "unit": "c"}' in text
    assert '"{\\"city' not in text  # the arguments are an object, not a quoted string
    assert "sunny, 21" in text and '"description": "The weather in a city."' in text


def test_a_template_without_tools_gets_them_described_in_a_system_message(server):
    text = _prompt_text(server, "plain", {"messages": HISTORY, "tools": TOOLS})
    assert text.startswith("<|im_start|>system\nYou may call the following tools")
    assert (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>'
        in text
    )
    assert "<|im_start|>user\n<tool_response>\nsunny, 21\n</tool_response>" in text


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        # Shapes of the union's members that are not quite right: the field, not a member's name.
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {}}}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "allowed_tools", "allowed_tools": {}}}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": 3}, "tool_choice"),
        # A forced call replaces the reply a response format would shape: the format is checked all the same.
        (
            {"tools": TOOLS, "tool_choice": "required", "guided_regex": "[a-"},
            "guided_regex",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "x", "parameters": {"type": "array"}}}]},
            "tools[0].function.parameters",
        ),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": "x", "parameters": {"properties": {"a": {"$ref": "#/x"}}}},
                    }
                ]
            },
            "tools[0].function.parameters",
        ),
    ],
)
def test_bad_tool_requests_are_400s(server, extra, param):
    response = _chat(server, model="hermes", **extra)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_langchain_bind_tools_two_turn_loop(server):
    from typing import Literal

    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: Literal["paris", "rome", "oslo"]) -> str:
        """The weather in a city."""
        return f"sunny in {city}"

    llm = ChatOpenAI(model="hermes", base_url=server + "/v1", api_key="unused", max_tokens=120, seed=3)
    messages = [HumanMessage("What is the weather in Paris?")]
    call = llm.bind_tools([get_weather], tool_choice="required", parallel_tool_calls=False).invoke(messages)
    assert call.tool_calls and call.tool_calls[0]["name"] == "get_weather"
    assert call.tool_calls[0]["args"]["city"] in ("paris", "rome", "oslo")
    messages += [
        call,
        ToolMessage(get_weather.invoke(call.tool_calls[0]["args"]), tool_call_id=call.tool_calls[0]["id"]),
    ]
    answer = llm.bind_tools([get_weather], tool_choice="none").invoke(messages)
    assert isinstance(answer.content, str) and not answer.tool_calls


SMOL_TOOLS = [
    WEATHER,
    {
        "type": "function",
        "function": {
            "name": "search_web",
            "description": "Search the web.",
            "parameters": {
                "type": "object",
                "properties": {
                    "query": {"type": "string", "maxLength": 60},
                    "max_results": {"type": "integer", "minimum": 1, "maximum": 10},
                },
                "required": ["query"],
            },
        },
    },
]
PROMPTS = [
    "What's the weather like in Paris?",
    "Is it raining in Tokyo right now?",
    "Find me recent news about electric cars.",
    "How hot is it in Cairo, in fahrenheit?",
    "Search for the best pizza recipe.",
    "Do I need an umbrella in London today?",
    "Look up who won the 2018 World Cup.",
    "What is the temperature in Oslo in celsius?",
    "Find three articles about black holes.",
    "Is it sunny in Madrid?",
    "Search the web for Python tutorials.",
    "How cold is Moscow this morning?",
    "What's the weather in New York City?",
    "Find the population of Canada.",
    "Will it snow in Denver tonight?",
    "Search for cheap flights to Rome.",
    "Tell me the weather in Sydney.",
    "Look up the height of Mount Everest.",
    "Is it windy in Chicago?",
    "Search for reviews of the latest iPhone.",
]


@pytest.mark.slow
def test_smollm2_required_yields_a_valid_call_for_every_prompt(smollm2):
    import asyncio

    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in SMOL_TOOLS}
    client = openai.AsyncOpenAI(base_url=smollm2 + "/v1", api_key="unused")

    async def ask(prompt: str):
        return await client.chat.completions.create(
            model="smol",
            messages=[{"role": "user", "content": prompt}],
            tools=SMOL_TOOLS,
            tool_choice="required",
            parallel_tool_calls=False,
            max_tokens=96,
            temperature=0.7,
            seed=0,
        )

    async def ask_all():
        first = await ask(PROMPTS[0])  # alone: the rest find the tools' system prompt in the prefix cache
        return [first, *await asyncio.gather(*[ask(p) for p in PROMPTS[1:]])]

    for prompt, completion in zip(PROMPTS, asyncio.run(ask_all())):
        choice = completion.choices[0]
        assert choice.finish_reason == "tool_calls", (prompt, choice)
        [call] = choice.message.tool_calls
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
