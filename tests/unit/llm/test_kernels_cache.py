"""The native kernels' cache: a library is loaded only from a folder no one else can write, and only
when its bytes are those recorded at build time; anything else is rebuilt, never loaded."""

import ctypes
import hashlib
import logging
import os
import shutil
from pathlib import Path

import pytest

from inferd.llm.runner import kernels

pytestmark = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler"
)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One real build (library and its recorded sha256), copied by each test into its own cache."""
    root = tmp_path_factory.mktemp("built")
    assert kernels.jit_ops(str(root)) is not None
    (library,) = (root / "kernels").glob("*.so")
    return library


@pytest.fixture
def loads(monkeypatch):
    """(path, sha256 of its bytes) of every library native_ops hands to the dynamic loader."""
    loaded, real = [], ctypes.CDLL

    def load(path):
        loaded.append((path, sha256(Path(path))))
        return real(path)

    monkeypatch.setattr(kernels.ctypes, "CDLL", load)
    yield loaded


@pytest.fixture
def compiles(monkeypatch):
    calls = []
    real = kernels._compile

    def compile_(compiler, library):
        calls.append(library)
        return real(compiler, library)

    monkeypatch.setattr(kernels, "_compile", compile_)
    return calls


def cache_with(built, root, mode=0o700):
    folder = root / "kernels"
    folder.mkdir(parents=True)
    folder.chmod(mode)
    for path in (built, built.with_name(built.name + ".sha256")):
        if path.exists():  # the hash, recorded since the cache is checked
            shutil.copy(path, folder / path.name)
    return folder / built.name


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_good_cached_library_is_reused(built, tmp_path, loads, compiles):
    library = cache_with(built, tmp_path)
    assert kernels.jit_ops(str(tmp_path)) is not None
    assert compiles == [] and loads == [(str(library), sha256(built))]


def test_a_new_cache_folder_is_private_and_records_the_library_hash(tmp_path, loads):
    assert kernels.jit_ops(str(tmp_path / "new")) is not None
    folder = tmp_path / "new" / "kernels"
    assert folder.stat().st_mode & 0o777 == 0o700
    (library,) = folder.glob("*.so")
    assert (folder / (library.name + ".sha256")).read_text().strip() == sha256(library)
    assert {p.name for p in folder.iterdir()} == {library.name, library.name + ".sha256"}


def test_a_tampered_library_is_rebuilt_not_loaded(built, tmp_path, loads, compiles, caplog):
    library = cache_with(built, tmp_path)
    library.write_bytes(library.read_bytes() + b"\0")  # changed after the build
    tampered = sha256(library)
    with caplog.at_level(logging.WARNING, logger="inferd.llm.kernels"):
        assert kernels.jit_ops(str(tmp_path)) is not None
    assert "sha256 mismatch" in caplog.text and compiles == [library]
    assert loads == [(str(library), sha256(library))] and sha256(library) != tampered


def test_a_tampered_library_that_cannot_be_rebuilt_means_no_kernel(built, tmp_path, loads, monkeypatch):
    library = cache_with(built, tmp_path)
    library.write_bytes(library.read_bytes() + b"\0")
    monkeypatch.setattr(kernels, "_compile", lambda compiler, library: False)
    assert kernels.jit_ops(str(tmp_path)) is None and loads == []


@pytest.mark.parametrize("mode", [0o777, 0o770])
def test_a_folder_others_can_write_is_not_loaded_from(built, tmp_path, loads, caplog, mode):
    library = cache_with(built, tmp_path, mode)  # a library with its matching hash, planted there
    with caplog.at_level(logging.WARNING, logger="inferd.llm.kernels"):
        assert kernels.jit_ops(str(tmp_path)) is not None  # built in a private folder instead
    assert f"may write to it (mode {mode:o})" in caplog.text
    ((path, _),) = loads
    assert not path.startswith(str(tmp_path)) and not os.path.exists(path)  # its temporary folder is gone
    assert {p.name for p in library.parent.iterdir()} == {library.name, library.name + ".sha256"}  # untouched


def test_a_folder_of_another_user_is_not_loaded_from(built, tmp_path, loads, caplog, monkeypatch):
    cache_with(built, tmp_path)
    monkeypatch.setattr(kernels.os, "geteuid", lambda: os.getuid() + 1)
    with caplog.at_level(logging.WARNING, logger="inferd.llm.kernels"):
        assert kernels.jit_ops(str(tmp_path)) is not None
    assert f"belongs to uid {os.getuid()}, not to this process's uid {os.getuid() + 1}" in caplog.text
    assert not loads[0][0].startswith(str(tmp_path))
