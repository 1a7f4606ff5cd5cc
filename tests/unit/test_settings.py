from pathlib import Path

import pytest
from pydantic import ValidationError

from inferd.config import ModelKind, ModelSpec, load_settings
from inferd.config.settings import settings_markdown


def test_model_spec_cli_form():
    spec = ModelSpec.model_validate("BAAI/bge-small=small,kind=rerank,dtype=bfloat16")
    assert (spec.source, spec.alias, spec.kind, spec.dtype) == (
        "BAAI/bge-small",
        "small",
        ModelKind.RERANK,
        "bfloat16",
    )
    assert spec.served_name == "small"
    assert ModelSpec.model_validate("./folder").served_name == "./folder"


@pytest.mark.parametrize("text", ["x,kind=poem", "x,kind", "x,colour=red", ",kind=rerank"])
def test_model_spec_rejects_bad_forms(text):
    with pytest.raises(ValidationError):
        ModelSpec.model_validate(text)


def test_flags_beat_variables_beat_file(tmp_path: Path, monkeypatch):
    config = tmp_path / "inferd.yaml"
    config.write_text(
        "port: 7000\nmax_batch_tokens: 111\nmax_batch_requests: 5\n"
        "model:\n  - source: a\n    alias: b\n    kind: embedding\n"
    )
    monkeypatch.setenv("INFERD_MAX_BATCH_TOKENS", "222")
    settings = load_settings({"max_batch_requests": 9}, config)
    assert settings.port == 7000
    assert settings.max_batch_tokens == 222
    assert settings.max_batch_requests == 9
    assert settings.model[0].served_name == "b"


def test_model_variable_takes_space_separated_specs(monkeypatch):
    monkeypatch.setenv("INFERD_MODEL", "one=x,kind=rerank two")
    settings = load_settings()
    assert [m.served_name for m in settings.model] == ["x", "two"]
    assert settings.model[0].kind is ModelKind.RERANK


def test_duplicate_served_names_are_refused():
    with pytest.raises(ValidationError, match="give one an alias"):
        load_settings({"model": ["a", "b=a"]})


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_settings({}, tmp_path / "nope.yaml")


def test_operations_doc_table_is_generated_from_the_declaration():
    doc = (Path(__file__).parents[2] / "docs" / "OPERATIONS.md").read_text()
    assert settings_markdown() in doc, "regenerate with: inferd settings --markdown"


def test_kv_block_size_defaults_per_device_and_a_setting_wins():
    assert load_settings({}).llm_config().block_size == 8  # CPU: shorter tails after a prefix hit
    assert load_settings({"device": "cuda"}).llm_config().block_size == 16
    assert load_settings({"block_size": 32}).llm_config().block_size == 32


def test_long_prompts_go_in_chunks_between_decodes_on_the_cpu_by_default():
    def cap(**settings):
        return load_settings(settings).llm_config().prefill_tokens_while_decoding

    assert cap(device="cpu") == 512
    assert cap(device="cuda") is None
    assert cap(device="cpu", prefill_tokens_while_decoding=128) == 128
    assert cap(device="cpu", prefill_tokens_while_decoding=0) is None  # no limit
