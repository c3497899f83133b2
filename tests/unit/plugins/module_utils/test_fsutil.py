"""fsutil edge cases on a real filesystem (tmp_path)."""
from __future__ import annotations

import errno
import os

import pytest

from ansible_collections.baileys.resilience.plugins.module_utils import fsutil


@pytest.fixture(params=["renameat2", "fallback"])
def noreplace(request, monkeypatch):
    if request.param == "fallback":
        monkeypatch.setattr(fsutil, "_renameat2", None)
    elif fsutil._renameat2 is None:
        pytest.skip("this C library has no renameat2")
    return request.param


def test_rename_noreplace_moves_a_directory(tmp_path, noreplace):
    (tmp_path / "staging").mkdir()
    (tmp_path / "staging" / "f").write_text("x")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fsutil.rename_noreplace("staging", "final", fd)
    finally:
        os.close(fd)
    assert sorted(os.listdir(tmp_path)) == ["final"]
    assert (tmp_path / "final" / "f").read_text() == "x"


@pytest.mark.parametrize("existing", ["empty_dir", "file"])
def test_rename_noreplace_never_replaces(tmp_path, noreplace, existing):
    (tmp_path / "staging").mkdir()
    if existing == "empty_dir":
        (tmp_path / "final").mkdir()  # a plain rename(2) would silently replace it
    else:
        (tmp_path / "final").write_text("theirs")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(OSError) as err:
            fsutil.rename_noreplace("staging", "final", fd)
    finally:
        os.close(fd)
    assert err.value.errno == errno.EEXIST
    assert (tmp_path / "staging").is_dir()
    assert (tmp_path / "final").exists()


def test_batch_writer_in_place_writes_final_names(tmp_path):
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        writer = fsutil.BatchWriter(fd, 0o600, in_place=True)
        writer.stage("a.json", b"{}")
        writer.stage("b.json", b"[]")
        assert sorted(os.listdir(tmp_path)) == ["a.json", "b.json"]
        assert writer.commit() == ["a.json", "b.json"]
    finally:
        os.close(fd)
    assert (tmp_path / "a.json").read_bytes() == b"{}"
    assert oct(os.stat(tmp_path / "b.json").st_mode & 0o777) == "0o600"
    with pytest.raises(FileExistsError):  # never over an existing file
        fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fsutil.BatchWriter(fd, in_place=True).stage("a.json", b"x")
        finally:
            os.close(fd)
