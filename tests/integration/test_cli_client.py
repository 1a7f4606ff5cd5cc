"""`inferd run / ps / stop` as a user runs them: the real console script, in a pseudo-terminal where a
person would type, against a live server of tiny chat models (behind an API key)."""

import copy
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pexpect
import pytest
from rich.filesize import decimal

from inferd.cli.client import until
from inferd.config import load_settings
from tests.conftest import free_port, live_server, wait_for
from tests.models import build_byte_llama

INFERD = str(Path(sys.executable).with_name("inferd"))
KEY = "sk-cli"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# DeepSeek-R1's layout: the generation prompt opens the reasoning block, so a reply starts as reasoning.
R1_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content.split('</think>')[-1] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)


@pytest.fixture(scope="module")
def server(tiny_llama, long_llama, tmp_path_factory):
    r1 = build_byte_llama(tmp_path_factory.mktemp("cli-r1"), "r1", R1_TEMPLATE, added=("<think>", "</think>"))
    settings = load_settings(
        {
            "model": [f"{tiny_llama}=tiny-chat", f"{long_llama}=long-chat", f"{r1}=r1"],
            "port": free_port(),
            "num_threads": 1,
            "kv_cache_memory": 8 * 2**20,
            "api_key": [KEY],
            "keep_alive": "10m",
        }
    )
    with live_server(settings) as url:
        yield url


@pytest.fixture(scope="module")
def api(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY)


@pytest.fixture
def rendered(monkeypatch):
    """The messages of every chat the server renders (the server runs in this process)."""
    from inferd.llm.client import LLMClient

    seen: list[list[dict]] = []
    original = LLMClient.render_chat

    def recording(self, messages, **kwargs):
        seen.append(copy.deepcopy(messages))
        return original(self, messages, **kwargs)

    monkeypatch.setattr(LLMClient, "render_chat", recording)
    return seen


def reference(api, messages: list[dict], max_tokens: int, model: str = "tiny-chat") -> str:
    """The non-streamed greedy answer: what the CLI's streamed reply must equal."""
    response = api.chat.completions.create(
        model=model, messages=messages, temperature=0, max_tokens=max_tokens
    )
    return response.choices[0].message.content


def environment(server: str | None, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERD_")}
    env |= {"TERM": "dumb", "COLUMNS": "200"}  # dumb: readline writes no escape sequences
    if server is not None:
        env |= {"INFERD_URL": server, "INFERD_API_KEY": KEY}
    return env | extra


def inferd(
    env: dict, *args: str, stdin: str | None = None, timeout: float = 30
) -> subprocess.CompletedProcess:
    kwargs = {"input": stdin} if stdin is not None else {"stdin": subprocess.DEVNULL}
    return subprocess.run([INFERD, *args], capture_output=True, text=True, env=env, timeout=timeout, **kwargs)


def spawn(env: dict, *args: str) -> pexpect.spawn:
    return pexpect.spawn(INFERD, list(args), env=env, encoding="utf-8", timeout=30, dimensions=(24, 400))


def say(child: pexpect.spawn, text: str) -> str:
    """Type a message at the prompt; the reply printed before the next prompt."""
    child.sendline(text)
    child.expect_exact(text)  # the terminal's echo
    child.expect_exact(">>> ")
    return ANSI.sub("", child.before).strip()


def command(child: pexpect.spawn, text: str, answer: str) -> None:
    child.sendline(text)
    child.expect_exact(answer)
    child.expect_exact(">>> ")


def test_interactive_chat_streams_the_greedy_answer_and_keeps_the_conversation(server, api, rendered):
    child = spawn(environment(server), "run", "tiny-chat")
    child.expect_exact(">>> ")
    command(child, "/set temperature 0", "Set parameter 'temperature' to '0'")
    command(child, "/set max_tokens 12", "Set parameter 'max_tokens' to '12'")
    first_message = {"role": "user", "content": "the cat is in the house"}
    first = say(child, first_message["content"])
    assert rendered[-1] == [first_message]
    first_reference = reference(api, [first_message], 12)
    assert first and first == first_reference.strip()

    second = say(child, "and the dog")
    conversation = [
        first_message,
        {"role": "assistant", "content": first_reference},  # the streamed reply, kept exactly
        {"role": "user", "content": "and the dog"},
    ]
    assert rendered[-1] == conversation
    assert second == reference(api, conversation, 12).strip()

    child.sendline('"""')
    child.expect_exact("... ")
    child.sendline("a first line")
    child.expect_exact("... ")
    child.sendline('and a second"""')
    child.expect_exact(">>> ")
    assert rendered[-1][-1] == {"role": "user", "content": "a first line\nand a second"}
    assert len(rendered[-1]) == 5  # one message, after the two turns before it

    command(child, "/clear", "Cleared session context")
    say(child, "the dog")
    assert rendered[-1] == [{"role": "user", "content": "the dog"}]
    command(child, "/nope", "Unknown command '/nope'. Type /? for help")
    child.sendline("/bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_c_stops_a_streaming_reply_and_drops_the_turn_and_ctrl_d_exits(server, rendered):
    """long-chat has a 16K-token context: a greedy reply streams for far longer than the test waits."""
    child = spawn(environment(server), "run", "long-chat", "--temperature", "0")
    child.expect_exact(">>> ")
    child.sendline("the cat")
    child.expect_exact("the cat")
    child.expect(r"\w+ \w+ \w+")  # the reply is streaming
    assert _admin_entry(server, "long-chat")["in_flight"] == 1
    child.sendintr()
    child.expect_exact(">>> ", timeout=10)
    wait_for(lambda: _admin_entry(server, "long-chat")["in_flight"] == 0)  # the server aborted it
    child.sendintr()  # at the prompt: a hint, not an exit
    child.expect_exact("Use Ctrl + d or /bye to exit.")
    child.expect_exact(">>> ")
    command(child, "/set max_tokens 2", "Set parameter 'max_tokens' to '2'")
    say(child, "a dog")
    assert rendered[-1] == [{"role": "user", "content": "a dog"}]  # the interrupted turn is not kept
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_one_shot_prompt_from_arguments_or_stdin(server, api, rendered):
    env = environment(server)
    expected = reference(api, [{"role": "user", "content": "the cat"}], 8).strip()
    assert expected
    for args, stdin in (((["the", "cat"]), None), ([], "the cat\n")):
        result = inferd(
            env, "run", "tiny-chat", *args, "--temperature", "0", "--max-tokens", "8", stdin=stdin
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == expected
    result = inferd(env, "run", "tiny-chat", "summarise", "this", "--max-tokens", "1", stdin="the cat\nsat\n")
    assert result.returncode == 0, result.stderr
    assert rendered[-1] == [{"role": "user", "content": "the cat\nsat\n\nsummarise this"}]
    empty = inferd(env, "run", "tiny-chat", stdin="  \n")
    assert (empty.returncode, empty.stderr.strip()) == (1, "error: nothing to send: the prompt is empty")


def test_reasoning_is_dim_on_a_terminal_and_on_stderr_when_stdout_is_not_one(server):
    args = ("run", "r1", "What is 2 + 3?", "--temperature", "0", "--max-tokens", "6")
    body = {
        "model": "r1",
        "messages": [{"role": "user", "content": "What is 2 + 3?"}],
        "temperature": 0,
        "max_tokens": 6,
    }
    response = httpx.post(
        server + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
    )
    message = response.json()["choices"][0]["message"]
    assert message["reasoning_content"] and not message["content"]
    result = inferd(environment(server), *args)
    assert result.returncode == 0, result.stderr
    reasoning = message["reasoning_content"].lstrip()  # shown from its first word
    assert (result.stdout, result.stderr) == ("", reasoning if reasoning.endswith("\n") else reasoning + "\n")
    child = spawn(environment(server), *args)
    child.expect(pexpect.EOF)
    assert "\x1b[2m" in child.before  # dim
    child.close()
    assert child.exitstatus == 0


def test_errors_are_one_clear_line(server):
    nobody = f"http://127.0.0.1:{free_port()}"
    result = inferd(environment(None, INFERD_URL=nobody), "run", "tiny-chat", "hi")
    assert result.returncode == 1
    assert (
        result.stderr == f"error: no inferd server at {nobody}; start one with `inferd serve` or pass --url\n"
    )
    no_key = inferd(environment(None, INFERD_URL=server), "run", "tiny-chat", "hi")
    assert (no_key.returncode, no_key.stderr) == (
        1,
        "error: the server wants an API key: set INFERD_API_KEY\n",
    )
    wrong = inferd(environment(server, INFERD_API_KEY="sk-wrong"), "ps")
    assert (wrong.returncode, wrong.stderr) == (
        1,
        "error: the server refused this API key (INFERD_API_KEY or --api-key)\n",
    )
    unknown = inferd(environment(server), "run", "no-such-model", "hi")
    assert (unknown.returncode, unknown.stderr) == (1, "error: the model 'no-such-model' does not exist\n")
    too_long = inferd(environment(server), "run", "tiny-chat", "hi", "--max-tokens", "100000")
    assert (
        too_long.returncode == 1
        and too_long.stderr.startswith("error: ")
        and "Traceback" not in too_long.stderr
    )


def test_ps_lists_loaded_models_and_stop_unloads_one(server):
    env = environment(server)
    before = time.time()
    table = inferd(env, "ps")
    after = time.time()
    assert table.returncode == 0, table.stderr
    raw = json.loads(inferd(env, "ps", "--json").stdout)
    entry = next(e for e in raw["data"] if e["id"] == "tiny-chat")
    row = next(line.split("  ") for line in table.stdout.splitlines() if line.startswith("tiny-chat "))
    cells = [cell.strip() for cell in row if cell.strip()]
    assert cells[:4] == ["tiny-chat", "chat", decimal(entry["resident_bytes"]), "no"]
    assert cells[4] in {until(entry["state"], entry["expires_at"], t) for t in (before, after)}
    assert cells[5] == "0"
    assert table.stdout.split()[:6] == ["NAME", "KIND", "SIZE", "PINNED", "UNTIL", "IN"]
    try:
        stopped = inferd(env, "stop", "tiny-chat")
        assert (stopped.returncode, stopped.stdout) == (0, "unloaded tiny-chat\n")
        assert _admin_entry(server, "tiny-chat")["state"] == "unloaded"
        assert "tiny-chat" not in inferd(env, "ps").stdout
        assert "long-chat" in inferd(env, "ps").stdout
    finally:
        httpx.post(
            server + "/admin/models/load",
            json={"model": "tiny-chat"},
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=60,
        )
    missing = inferd(env, "stop", "no-such-model")
    assert (
        missing.returncode == 1 and missing.stderr.startswith("error: ") and "no-such-model" in missing.stderr
    )


def test_embedded_server_answers_as_a_served_one(server, api, tiny_llama):
    """The same model, served in the CLI's own process on a port of its own (with the key it sends)."""
    expected = reference(api, [{"role": "user", "content": "the cat"}], 8).strip()
    env = environment(
        None, INFERD_NUM_THREADS="1", INFERD_KV_CACHE_MEMORY=str(4 * 2**20), INFERD_API_KEY="sk-own"
    )
    args = (
        "run",
        "--embedded",
        f"{tiny_llama}=tiny",
        "the",
        "cat",
        "--temperature",
        "0",
        "--max-tokens",
        "8",
    )
    result = inferd(env, *args, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected


def test_until_reads_like_ollama_ps():
    assert until("loaded", None, 0) == "Forever"
    assert until("loading", None, 0) == "Loading"
    assert until("loaded", 300.5, 0) == "5 minutes from now"
    assert until("loaded", 61, 0) == "1 minute from now"
    assert until("loaded", 2 * 86400 + 5, 0) == "2 days from now"
    assert until("loaded", 0.5, 0) == "Now"


def _admin_entry(server: str, name: str) -> dict:
    response = httpx.get(server + "/admin/models", headers={"Authorization": f"Bearer {KEY}"})
    return next(e for e in response.json()["data"] if e["id"] == name)
