"""The HTTP layer: FastAPI app, routes, and the translation between wire formats and engines."""
