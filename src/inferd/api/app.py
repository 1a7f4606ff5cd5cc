"""The app factory; its lifespan owns the engines."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from inferd import __version__
from inferd.api.errors import install_error_handlers
from inferd.api.model_table import ModelTable, load_model_table
from inferd.api.routes import embeddings, generation, health, models, rerank, tei
from inferd.config import ServerSettings

log = logging.getLogger("inferd.api")

ModelLoader = Callable[[ServerSettings, asyncio.AbstractEventLoop], ModelTable]


def create_app(settings: ServerSettings, load_models: ModelLoader = load_model_table) -> FastAPI:
    """An app serving ``settings.model``; ``load_models`` is swappable so API tests can use fakes."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Loading runs in a thread: torch releases the GIL and the loop stays responsive.
        table = await asyncio.to_thread(load_models, settings, asyncio.get_running_loop())
        app.state.models = table
        log.info("ready: %s", ", ".join(m.name for m in table))
        try:
            yield
        finally:
            app.state.models = None
            await asyncio.to_thread(table.close)

    app = FastAPI(
        title="inferd",
        version=__version__,
        summary="Chat, embeddings and rerank behind OpenAI-, TEI- and Cohere-compatible APIs.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.models = None
    install_error_handlers(app)
    for module in (generation, embeddings, tei, rerank, models, health):
        app.include_router(module.router)
    return app
