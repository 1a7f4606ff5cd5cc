"""Validate response bodies against OpenAI's own OpenAPI description (shared/specs)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import jsonschema

SPEC_PATH = Path(__file__).resolve().parents[2] / "shared" / "specs" / "openai-openapi.json"


@cache
def _components() -> dict:
    return json.loads(SPEC_PATH.read_text())["components"]


def validate_openai(instance: object, schema_name: str) -> None:
    """Raise jsonschema.ValidationError unless ``instance`` is a valid ``schema_name``."""
    schema = {"$ref": f"#/components/schemas/{schema_name}", "components": _components()}
    jsonschema.Draft202012Validator(schema).validate(instance)
