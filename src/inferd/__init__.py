"""inferd: chat LLMs, text embeddings and rerankers behind the APIs their clients already speak."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("inferd")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+local"
