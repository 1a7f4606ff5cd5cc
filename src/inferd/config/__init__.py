"""Settings and frozen engine configs: the only package that reads the environment."""

from inferd.config.engine import EncoderConfig, LLMConfig
from inferd.config.model_spec import ModelKind, ModelSpec
from inferd.config.settings import ServerSettings, load_settings

__all__ = ["EncoderConfig", "LLMConfig", "ModelKind", "ModelSpec", "ServerSettings", "load_settings"]
