import json

import pytest

from inferd.config import ModelKind
from inferd.errors import ModelLoadError
from inferd.hub.resolve import detect_kind, resolve_model


def folder(tmp_path, name, config):
    path = tmp_path / name
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize(
    ("config", "kind"),
    [
        (
            {"architectures": ["BertForSequenceClassification"], "id2label": {"0": "LABEL_0"}},
            ModelKind.RERANK,
        ),
        (
            {"architectures": ["BertForSequenceClassification"], "id2label": {"0": "a", "1": "b"}},
            ModelKind.EMBEDDING,
        ),
        ({"architectures": ["LlamaForCausalLM"]}, ModelKind.CHAT),
        ({"architectures": ["BertModel"]}, ModelKind.EMBEDDING),
        ({"model_type": "bert"}, ModelKind.EMBEDDING),
    ],
)
def test_kind_from_config(tmp_path, config, kind):
    assert detect_kind(folder(tmp_path, "m", config)) is kind


def test_kind_of_gguf_file_and_override(tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    assert detect_kind(gguf) is ModelKind.CHAT
    path = folder(tmp_path, "m", {"architectures": ["BertModel"]})
    assert resolve_model(str(path), ModelKind.RERANK).kind is ModelKind.RERANK


def test_bundled_names_resolve_to_installed_packages(bundled_minilm):
    resolved = resolve_model("all-minilm-l6-v2")
    assert resolved.path == bundled_minilm
    assert resolved.kind is ModelKind.EMBEDDING
    smol = resolve_model("smollm2-135m-instruct")
    assert smol.path.suffix == ".gguf"
    assert smol.kind is ModelKind.CHAT


def test_unknown_source_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="neither a bundled name"):
        resolve_model(str(tmp_path / "missing" / "deeper" / "x"))
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        resolve_model(str(tmp_path))
