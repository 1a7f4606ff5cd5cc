"""What one API key's requests can learn about another's: nothing through the prefix cache."""

import httpx

from inferd.config import load_settings
from tests.conftest import free_port, live_server

PROMPT = "the cat and the dog " * 12  # several full KV blocks


def _cached(url: str, key: str, prompt: str = PROMPT) -> int:
    response = httpx.post(
        url + "/v1/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "tiny-chat", "prompt": prompt, "max_tokens": 1},
    )
    assert response.status_code == 200, response.text
    return response.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_a_key_never_hits_another_keys_cached_prompt(secured_server):
    prompt = PROMPT + "one"
    assert _cached(secured_server, "sk-ops", prompt) == 0
    assert _cached(secured_server, "sk-logs", prompt) == 0  # sk-ops's blocks are not sk-logs's
    assert _cached(secured_server, "sk-ops", prompt) > 0  # its own are


def test_share_prefix_cache_turns_sharing_back_on(tiny_llama):
    settings = load_settings(
        {
            "model": [f"{tiny_llama}=tiny-chat"],
            "port": free_port(),
            "num_threads": 1,
            "kv_cache_memory": 4 * 2**20,
            "api_key": ["sk-a", "sk-b"],
            "share_prefix_cache": True,
        }
    )
    with live_server(settings) as url:
        assert _cached(url, "sk-a") == 0
        assert _cached(url, "sk-b") > 0
