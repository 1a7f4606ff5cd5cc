"""Validate response bodies against OpenAI's own OpenAPI description.

The schemas come from a trimmed copy kept in the repository (tests/data), made from the full spec by
scripts/trim_openapi.py, so a plain clone runs these tests; its ``x-source`` names the spec's commit.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import jsonschema

SPEC_PATH = Path(__file__).resolve().parent / "data" / "openai-openapi.trimmed.json"


@cache
def _components() -> dict:
    return _nullable_to_null_type(json.loads(SPEC_PATH.read_text(encoding="utf-8"))["components"])


def _nullable_to_null_type(node):
    """The spec mixes OpenAPI 3.0's ``nullable: true`` into 3.1 schemas; JSON Schema ignores it, so
    spell it as the null type it means."""
    if isinstance(node, list):
        return [_nullable_to_null_type(n) for n in node]
    if not isinstance(node, dict):
        return node
    node = {k: _nullable_to_null_type(v) for k, v in node.items()}
    if node.pop("nullable", False):
        node = {"anyOf": [node, {"type": "null"}]}
    return node


def validate_openai(instance: object, schema_name: str) -> None:
    """Raise jsonschema.ValidationError unless ``instance`` is a valid ``schema_name``."""
    schema = {"$ref": f"#/components/schemas/{schema_name}", "components": _components()}
    jsonschema.Draft202012Validator(schema).validate(instance)
