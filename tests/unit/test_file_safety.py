"""Files the server loads are checked and contained: a downloaded model folder or a tampered cache
can neither name code to run nor point at files outside the folder they belong to."""

import json
import re
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from inferd.config import EncoderConfig
from inferd.encoder.models.embedder import SentenceEmbedder, _activation
from inferd.errors import ModelLoadError
from inferd.hub.inspect import pooling_and_dimensions


def copy_of(folder, tmp_path):
    target = tmp_path / folder.name
    shutil.copytree(folder, target)
    return target


@pytest.mark.parametrize(
    "name", ["torch.nn.modules.activation.Tanh", "torch.nn.modules.linear.Identity", "torch.nn.GELU"]
)
def test_dense_activations_sentence_transformers_saves_are_accepted(name):
    assert type(_activation(name)).__name__ == name.rpartition(".")[2]


@pytest.mark.parametrize(
    "name",
    [
        "torch.random.seed",  # a torch function with a side effect, called by a plain import-and-call
        "torch.nn.modules.dropout.Dropout",  # a torch.nn module, but not an activation
        "torch.nn.modules.activation.MultiheadAttention",
        "os.system",
    ],
)
def test_other_dense_activations_are_refused(name):
    seed = torch.initial_seed()
    with pytest.raises(ModelLoadError, match="is not supported"):
        _activation(name)
    assert torch.initial_seed() == seed


def test_a_model_naming_a_foreign_activation_does_not_load(tiny_embedder, tmp_path):
    folder = copy_of(tiny_embedder, tmp_path)
    dense_config = folder / "2_Dense" / "config.json"
    settings = json.loads(dense_config.read_text())
    dense_config.write_text(json.dumps(settings | {"activation_function": "torch.random.seed"}))
    with pytest.raises(ModelLoadError, match=re.escape("'torch.random.seed' is not supported")):
        SentenceEmbedder(folder, EncoderConfig(num_threads=1))


@pytest.mark.parametrize("escape", ["../outside", "/tmp", "2_Dense/../../outside", "link"])
def test_module_paths_outside_the_model_folder_are_refused(tiny_embedder, tmp_path, escape):
    folder = copy_of(tiny_embedder, tmp_path / "models")
    outside = tmp_path / "models" / "outside"
    shutil.copytree(folder / "2_Dense", outside)
    (folder / "link").symlink_to(outside, target_is_directory=True)
    modules = json.loads((folder / "modules.json").read_text())
    next(m for m in modules if m["type"].endswith("Dense"))["path"] = escape
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ModelLoadError, match=re.escape(f"module path {escape!r} lies outside")):
        SentenceEmbedder(folder, EncoderConfig(num_threads=1))
    # inferd show / estimate read the modules' config.json without loading: not out there either.
    assert pooling_and_dimensions(folder) == ("mean", 32)  # the Dense layer (16) outside is not read


def test_a_model_with_its_modules_inside_its_folder_loads(tiny_embedder, tmp_path):
    model = SentenceEmbedder(copy_of(tiny_embedder, tmp_path), EncoderConfig(num_threads=1))
    assert model.info.dimensions == 16 and isinstance(model.dense[0].activation, torch.nn.Tanh)


# inferd rm: models.json names what to delete, so its paths are checked against the download folders.


@pytest.fixture
def cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    return tmp_path / "inferd"


def register(cache, **fields):
    entry = {"name": "victim", "origin": "huggingface", "kind": "chat", "owned": True, "files": []} | fields
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "models.json").write_text(json.dumps({"models": [entry]}))


def rm(cache, name="victim"):
    from typer.testing import CliRunner

    from inferd.cli.main import app

    result = CliRunner().invoke(app, ["rm", name, "--yes"], env={"INFERD_CACHE_DIR": str(cache)})
    assert result.exception is None or isinstance(result.exception, SystemExit)  # no traceback
    return result


def precious(folder):
    folder.mkdir(parents=True)
    (folder / "keep.txt").write_text("mine")
    return folder


def test_rm_refuses_a_modelscope_path_outside_the_cache(cache, tmp_path):
    outside = precious(tmp_path / "home" / "documents")
    register(cache, origin="modelscope", path=str(outside))
    result = rm(cache)
    assert result.exit_code == 1
    assert f"refusing to delete {outside}: it is not inside {cache / 'modelscope'}" in result.stderr
    assert (outside / "keep.txt").read_text() == "mine"
    assert "victim" in (cache / "models.json").read_text()  # nothing changed: the user can look


@pytest.mark.parametrize("where", ["outside", "symlinked snapshot", "escaping file name", "cache root"])
def test_rm_refuses_hub_paths_outside_the_hub_cache(cache, tmp_path, where):
    outside = precious(tmp_path / "elsewhere" / "models--acme--x" / "snapshots" / "abc")
    repo = tmp_path / "hf" / "hub" / "models--acme--x"
    path, files = outside / "keep.txt", ["keep.txt"]
    if where == "symlinked snapshot":
        (repo / "snapshots").mkdir(parents=True)
        (repo / "snapshots" / "abc").symlink_to(outside, target_is_directory=True)
        path = repo / "snapshots" / "abc" / "keep.txt"
    elif where == "escaping file name":
        precious(repo / "snapshots" / "abc")
        path, files = (
            repo / "snapshots" / "abc",
            ["../" * 5 + "elsewhere/models--acme--x/snapshots/abc/keep.txt"],
        )
    elif where == "cache root":  # inside is not enough: the whole cache is never one model's files
        outside = precious(tmp_path / "hf" / "hub")
        path = outside
    register(cache, path=str(path), files=files)
    result = rm(cache)
    assert result.exit_code == 1 and "error: refusing to delete" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in outside.rglob("keep.txt"))


def test_rm_deletes_a_modelscope_folder_inside_the_cache(cache):
    folder = precious(cache / "modelscope" / "acme" / "model")
    register(cache, origin="modelscope", path=str(folder))
    result = rm(cache)
    assert result.exit_code == 0, result.stderr
    assert not folder.exists() and (cache / "modelscope" / "acme").exists()


def test_rm_of_a_registry_with_wrong_types_is_a_clear_error(cache):
    register(cache, path=5)
    result = rm(cache)
    assert result.exit_code == 1 and "is corrupt" in result.stderr


# GGUF conversion into a cache that replicas share.


def slow_conversion(monkeypatch, calls):
    from inferd.hub import gguf

    def convert(gguf_path, out, dtype):
        calls.append(out)
        time.sleep(0.3)  # long enough for the other converter to arrive while this one works
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(gguf, "_convert", convert)


def test_two_converters_of_one_gguf_convert_it_once_and_share_it(tmp_path, monkeypatch):
    from inferd.hub.gguf import converted_gguf

    source = tmp_path / "tiny.Q4_0.gguf"
    source.write_bytes(b"GGUF")
    calls = []
    slow_conversion(monkeypatch, calls)
    barrier = threading.Barrier(2)

    def convert():
        barrier.wait()
        return converted_gguf(source, tmp_path / "cache")  # each call opens its own lock file handle

    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(lambda _: convert(), range(2))
    assert first == second and (first / "config.json").is_file()
    assert len(calls) == 1 and not calls[0].exists()  # converted once, in a folder of its own, renamed
    assert sorted(p.name for p in first.parent.iterdir()) == sorted([first.name, first.name + ".lock"])


def test_a_folder_without_the_completion_marker_is_converted_again(tmp_path, monkeypatch):
    from inferd.hub.gguf import converted_gguf

    source = tmp_path / "tiny.Q4_0.gguf"
    source.write_bytes(b"GGUF")
    calls = []
    slow_conversion(monkeypatch, calls)
    target = converted_gguf(source, tmp_path / "cache")
    (target / "inferd-conversion-complete").unlink()  # as a crash or a partial copy would leave it
    (target / "stale").write_text("half")
    assert converted_gguf(source, tmp_path / "cache") == target and len(calls) == 2
    assert not (target / "stale").exists()
    assert converted_gguf(source, tmp_path / "cache") == target and len(calls) == 2  # complete: reused


def test_a_failed_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    from inferd.hub import gguf

    source = tmp_path / "tiny.Q4_0.gguf"
    source.write_bytes(b"GGUF")

    def broken(gguf_path, out, dtype):
        (out / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(gguf, "_convert", broken)
    with pytest.raises(OSError, match="disk full"):
        gguf.converted_gguf(source, tmp_path / "cache")
    assert [p.suffix for p in (tmp_path / "cache" / "gguf").iterdir()] == [".lock"]


def test_a_killed_converters_leftover_is_removed_by_the_next_conversion(tmp_path, monkeypatch):
    from inferd.hub import gguf

    source = tmp_path / "tiny.Q4_0.gguf"
    source.write_bytes(b"GGUF")
    monkeypatch.setattr(gguf, "_convert", lambda gguf_path, out, dtype: (out / "config.json").write_text("{}"))
    target = gguf.converted_gguf(source, tmp_path / "cache")
    # What a converter killed mid-way (out of memory) leaves: its temp folder, no marker, no rename.
    leftover = target.with_name(f".{target.name}.deadbeef")
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half")
    (target / "inferd-conversion-complete").unlink()  # and this one is to be converted again
    gguf.converted_gguf(source, tmp_path / "cache")
    assert not leftover.exists()
