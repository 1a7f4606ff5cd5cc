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
