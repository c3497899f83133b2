"""backupseal.seal in one read of the dump (issue 14's throughput): the dump is hashed as it is encrypted and
the ciphertext as it is written; a dump that does not hash to its manifest yields the problem and no sealed
file, no record, no partial; the record's hashes are those of the files."""
from __future__ import annotations

import hashlib
import json
import os
import re

import pytest

from ansible_collections.baileys.resilience.plugins.module_utils import (
    agecrypt, backup_format, backupseal, s3replicate)

from support.s3fixtures import make_backup

pyrage = pytest.importorskip("pyrage")


@pytest.fixture
def engine():
    return "pyrage"


@pytest.fixture
def key():
    ident = pyrage.x25519.Identity.generate()
    return ident, agecrypt.Encryption([str(ident.to_public())])


def one_backup(backup_dir, size=300_000):
    os.makedirs(backup_dir, mode=0o700, exist_ok=True)
    made = make_backup(backup_dir, 1, size=size)
    backups, invalid = s3replicate.scan_local_backups(backup_dir)
    assert not invalid and len(backups) == 1
    return made, backups[0]


def sealed_files(backup_dir):
    try:
        return sorted(os.listdir(os.path.join(backup_dir, backup_format.SEALED_DIR)))
    except FileNotFoundError:
        return []


def test_the_record_describes_the_files_and_the_copy_decrypts_to_the_dump(tmp_path, engine, key):
    ident, enc = key
    backup_dir = str(tmp_path / "b")
    made, b = one_backup(backup_dir)
    copy, problem = backupseal.seal(backup_dir, b, enc)
    assert problem is None
    dump, manifest, record_path = backup_format.sealed_paths(backup_dir, b["name"])
    with open(record_path) as fh:
        record = json.load(fh)
    with open(dump, "rb") as fh:
        ct = fh.read()
    assert record["sha256"] == copy["sha256"] == hashlib.sha256(ct).hexdigest()
    assert record["size"] == copy["size"] == len(ct)
    assert record["plain_sha256"] == made["sha256"] and record["plain_size"] == made["size"]
    with open(made["path"], "rb") as fh:
        assert pyrage.decrypt(ct, [ident]) == fh.read()
    sealed_manifest = json.loads(pyrage.decrypt(copy["manifest_bytes"], [ident]))
    assert sealed_manifest["encryption"]["sha256"] == hashlib.sha256(ct).hexdigest()
    assert sealed_files(backup_dir) == sorted(os.path.basename(p) for p in (dump, manifest, record_path))
    again, problem = backupseal.seal(backup_dir, b, enc)  # reused, not made again
    assert problem is None and again["sha256"] == copy["sha256"]


@pytest.mark.parametrize("change, words", [
    (lambda data: data[:-1] + bytes([data[-1] ^ 1]), "sha256 [0-9a-f]{64} differs from the manifest's"),
    (lambda data: data + b"more", "size 300004 differs from the manifest's 300000"),
    (lambda data: data[:1000], "size 1000 differs from the manifest's 300000"),
])
def test_a_dump_that_does_not_hash_to_its_manifest_leaves_no_sealed_file(tmp_path, engine, key, change, words):
    _ident, enc = key
    backup_dir = str(tmp_path / "b")
    made, b = one_backup(backup_dir)
    with open(made["path"], "rb") as fh:
        data = fh.read()
    with open(made["path"], "wb") as fh:  # changed after the scan (which only checks the size)
        fh.write(change(data))
    copy, problem = backupseal.seal(backup_dir, b, enc)
    assert copy is None
    assert problem and re.match(words, problem), problem
    assert sealed_files(backup_dir) == []  # no ciphertext, no partial, no record


def test_a_changed_dump_does_not_reuse_nor_keep_an_older_record(tmp_path, engine, key):
    _ident, enc = key
    backup_dir = str(tmp_path / "b")
    made, b = one_backup(backup_dir)
    other = agecrypt.Encryption([str(pyrage.x25519.Identity.generate().to_public())])
    assert backupseal.seal(backup_dir, b, other)[1] is None  # sealed for another recipient set
    with open(made["path"], "r+b") as fh:
        fh.write(b"X")
    copy, problem = backupseal.seal(backup_dir, b, enc)
    assert copy is None and "differs from the manifest" in problem
    assert not any(n.endswith(backup_format.SEAL_RECORD_SUFFIX) or n.endswith(".partial")
                   for n in sealed_files(backup_dir))


def test_an_unreadable_dump_is_a_problem(tmp_path, engine, key):
    _ident, enc = key
    backup_dir = str(tmp_path / "b")
    made, b = one_backup(backup_dir)
    os.unlink(made["path"])
    copy, problem = backupseal.seal(backup_dir, b, enc)
    assert copy is None and problem.startswith("dump unreadable: ")
