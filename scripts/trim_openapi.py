"""Write the trimmed copy of OpenAI's OpenAPI description that the tests validate responses against.

The tests check inferd's OpenAI routes against OpenAI's own schemas, but the full description is
3 MB and lives outside the repository, so a user's clone could not run them. This script keeps only
the component schemas the tests name (``ROOT_SCHEMAS``) and everything they reference through
``$ref``, with annotations (descriptions, titles, examples, ``x-*`` vendor keys) removed, and writes
them with sorted keys so that the same input always gives the same bytes.

Source: https://github.com/openai/openai-openapi, file ``openapi.json`` at commit
f85dbe223d40e1a31cba812ab2d755c7e98a92a3 (spec version 2.3.0), MIT-licensed. The output records
the same provenance in its top-level ``x-source`` object.

Regenerate (from the repository root) after adding a schema to ``ROOT_SCHEMAS``::

    python scripts/trim_openapi.py /path/to/openai-openapi.json

For a newer spec, pass its commit with ``--commit`` so that ``x-source`` stays true.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

OUTPUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "openai-openapi.trimmed.json"
REPOSITORY = "https://github.com/openai/openai-openapi"
SOURCE_COMMIT = "f85dbe223d40e1a31cba812ab2d755c7e98a92a3"
REF_PREFIX = "#/components/schemas/"

# The schemas tests/ passes to validate_openai(); tests/unit/test_openapi_copy.py fails when a test
# names one missing here.
ROOT_SCHEMAS = (
    "CreateChatCompletionResponse",
    "CreateChatCompletionStreamResponse",
    "CreateCompletionResponse",
    "CreateEmbeddingResponse",
    "ErrorResponse",
    "ListModelsResponse",
)

# JSON Schema keywords whose value is a subschema or a list of them.
_SUBSCHEMA_KEYWORDS = frozenset(
    {"additionalProperties", "allOf", "anyOf", "contains", "else", "if", "items", "not", "oneOf"}
    | {"prefixItems", "propertyNames", "then", "unevaluatedItems", "unevaluatedProperties"}
)
# Keywords whose value maps names (which may well be "description") to subschemas.
_SCHEMA_MAP_KEYWORDS = frozenset(
    {"$defs", "definitions", "dependentSchemas", "patternProperties", "properties"}
)
# Annotations only: a validator ignores them, and they make up most of the spec's size.
_ANNOTATIONS = frozenset({"$comment", "description", "example", "examples", "title"})


def strip_annotations(schema: object) -> object:
    """``schema`` without annotations, walking only schema positions so that a property or enum
    value called "description" survives."""
    if isinstance(schema, list):
        return [strip_annotations(item) for item in schema]
    if not isinstance(schema, dict):
        return schema  # a boolean schema or a keyword's literal value
    kept = {}
    for key, value in schema.items():
        if key in _ANNOTATIONS or key.startswith("x-"):
            continue
        if key in _SCHEMA_MAP_KEYWORDS:
            kept[key] = {name: strip_annotations(sub) for name, sub in value.items()}
        elif key in _SUBSCHEMA_KEYWORDS:
            kept[key] = strip_annotations(value)
        else:
            kept[key] = value  # type, enum, const, default, required, discriminator, ...
    return kept


def referenced_names(node: object) -> set[str]:
    """Names of the component schemas that ``node`` points at (``$ref`` and discriminator mappings)."""
    found: set[str] = set()
    if isinstance(node, list):
        for item in node:
            found |= referenced_names(item)
    elif isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                found.add(_schema_name(value))
            elif key == "mapping" and isinstance(value, dict):
                found |= {_schema_name(ref) for ref in value.values()}
            else:
                found |= referenced_names(value)
    return found


def _schema_name(ref: str) -> str:
    if not ref.startswith(REF_PREFIX):
        raise ValueError(f"unsupported $ref {ref!r}: only {REF_PREFIX}* is copied")
    return ref.removeprefix(REF_PREFIX)


def trim_schemas(schemas: dict, roots: tuple[str, ...]) -> dict:
    """``roots`` and every schema they reach, transitively, with annotations removed."""
    trimmed: dict = {}
    pending = list(roots)
    while pending:
        name = pending.pop()
        if name in trimmed:
            continue
        if name not in schemas:
            raise KeyError(f"the spec has no schema {name!r}")
        trimmed[name] = strip_annotations(schemas[name])
        pending.extend(referenced_names(trimmed[name]) - trimmed.keys())
    return trimmed


def prepare_trimmed_spec(
    spec: dict, commit: str = SOURCE_COMMIT, roots: tuple[str, ...] = ROOT_SCHEMAS
) -> dict:
    """The trimmed document, provenance included; a pure function of its arguments."""
    info = spec["info"]
    command = "python scripts/trim_openapi.py openai-openapi.json"
    if commit != SOURCE_COMMIT:
        command += f" --commit {commit}"
    return {
        "x-source": {
            "repository": REPOSITORY,
            "file": "openapi.json",
            "commit": commit,
            "version": info["version"],
            "licence": info.get("license", {}).get("identifier", "MIT"),
            "command": command,
            "note": "Only the schemas inferd's tests use and what they reference; annotations removed.",
        },
        "openapi": spec["openapi"],
        "info": {"title": info["title"], "version": info["version"]},
        "components": {"schemas": trim_schemas(spec["components"]["schemas"], roots)},
    }


def render(document: dict) -> str:
    """Stable text: sorted keys, fixed indentation, one trailing newline."""
    return json.dumps(document, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", type=Path, help="the full openapi.json of openai/openai-openapi")
    parser.add_argument("--commit", default=SOURCE_COMMIT, help="the openai-openapi commit it comes from")
    parser.add_argument("--output", type=Path, default=OUTPUT, help="where to write the trimmed copy")
    args = parser.parse_args(argv)
    spec = json.loads(args.spec.read_text(encoding="utf-8"))
    text = render(prepare_trimmed_spec(spec, args.commit))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text, encoding="utf-8")
    print(f"wrote {args.output} ({len(text)} bytes)")


if __name__ == "__main__":
    main()
