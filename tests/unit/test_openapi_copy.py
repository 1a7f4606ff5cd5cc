"""The tests' copy of OpenAI's OpenAPI schemas is complete, self-contained and made by the script."""

from __future__ import annotations

import ast
import importlib.util
import json
from pathlib import Path

import pytest

from tests.openapi import SPEC_PATH

REPO_ROOT = Path(__file__).resolve().parents[2]
TESTS = REPO_ROOT / "tests"
# The full spec sits beside the repository only in this project's CI; a plain clone skips the check.
# The full spec, where this project's CI keeps it in a folder beside the clone; a user's clone has
# none, and the drift check then skips.
FULL_SPEC = next(iter(sorted(REPO_ROOT.parent.glob("*/specs/openai-openapi.json"))), None)


def _load_trim_script():
    spec = importlib.util.spec_from_file_location("trim_openapi", REPO_ROOT / "scripts" / "trim_openapi.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


trim_openapi = _load_trim_script()


def _schema_names_used_by_tests() -> dict[str, str]:
    """Schema name → a test file that passes it to validate_openai(), read from the tests' sources."""
    used = {}
    for path in sorted(TESTS.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "validate_openai":
                name = node.args[1] if len(node.args) > 1 else None
                where = f"{path.relative_to(REPO_ROOT)}:{node.lineno}"
                # A computed name could hide a schema the copy lacks.
                assert isinstance(name, ast.Constant) and isinstance(name.value, str), where
                used[name.value] = where
    return used


def _copy() -> dict:
    return json.loads(SPEC_PATH.read_text(encoding="utf-8"))


def test_every_schema_the_tests_validate_against_is_in_the_copy():
    used = _schema_names_used_by_tests()
    assert len(used) >= 6  # the scan found the calls: it did not silently match nothing
    schemas = _copy()["components"]["schemas"]
    missing = {name: where for name, where in used.items() if name not in schemas}
    assert not missing, f"add these to ROOT_SCHEMAS in scripts/trim_openapi.py and rerun it: {missing}"


def test_the_copy_is_self_contained_small_and_says_where_it_comes_from():
    copy = _copy()
    schemas = copy["components"]["schemas"]
    dangling = trim_openapi.referenced_names(schemas) - schemas.keys()
    assert not dangling
    assert copy["x-source"]["commit"] == "f85dbe223d40e1a31cba812ab2d755c7e98a92a3"
    assert copy["x-source"]["version"] == "2.3.0" and copy["x-source"]["licence"] == "MIT"
    assert SPEC_PATH.stat().st_size < 300_000


def test_trimming_drops_annotations_but_keeps_properties_named_like_them():
    schema = {
        "type": "object",
        "description": "dropped",
        "x-oaiMeta": {"dropped": True},
        "properties": {"description": {"type": "string", "example": "dropped"}},
        "anyOf": [{"title": "dropped", "$ref": "#/components/schemas/Other"}],
        "enum": [{"description": "a literal value, kept"}],
    }
    assert trim_openapi.strip_annotations(schema) == {
        "type": "object",
        "properties": {"description": {"type": "string"}},
        "anyOf": [{"$ref": "#/components/schemas/Other"}],
        "enum": [{"description": "a literal value, kept"}],
    }


@pytest.mark.skipif(FULL_SPEC is None, reason="the full OpenAI spec is not beside this clone")
def test_the_committed_copy_is_what_the_script_makes_from_the_full_spec():
    spec = json.loads(FULL_SPEC.read_text(encoding="utf-8"))
    expected = trim_openapi.render(trim_openapi.prepare_trimmed_spec(spec))
    assert SPEC_PATH.read_text(encoding="utf-8") == expected, "rerun scripts/trim_openapi.py"
