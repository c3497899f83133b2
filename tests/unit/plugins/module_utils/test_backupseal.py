"""backupseal and backup_format for backups encrypted on the host (encrypt_local), with fake dumps (no server):
the encryption block, what replication uploads (local_copy, prepare, local_problem, current), reading with and
without an identity, and flat memory."""
from __future__ import annotations

import base64
import glob
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import textwrap

import pytest

from ansible_collections.baileys.resilience.plugins.module_utils import (
    agecrypt, backup_format, backupfiles, backupseal, s3replicate)

pyrage = pytest.importorskip("pyrage")

NAME = "baileys-auth-20260305T030000Z.dump"


def keypair():
    ident = pyrage.x25519.Identity.generate()
    return str(ident), str(ident.to_public())


def plain_manifest(data):
    return {"format": 1, "file": NAME, "kind": "monthly", "created_at": "2026-03-05T03:00:00Z",
            "sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "counts": {"auth": 1, "keys": 3},
            "companies": 1, "duration": 0.125, "validated": {"restore_list": True, "row_counts": True}}


def make_encrypted(backup_dir, enc, data=None):
    """What backup.py does with encrypt_local, on a fake dump: ``(path, manifest, plaintext)``."""
    data = data if data is not None else b"PGDMP" + os.urandom(50_000) + b"company-4242"
    path = os.path.join(backup_dir, NAME)
    with open(path + ".partial", "wb") as fh:
        fh.write(data)
    manifest = plain_manifest(data)
    manifest["encryption"] = backupseal.encrypt_local_dump(path + ".partial", path + ".age.partial", manifest, enc)
    os.rename(path + ".age.partial", path)
    os.unlink(path + ".partial")
    with open(path + ".manifest.json", "wb") as fh:
        fh.write(backup_format.manifest_bytes(manifest))
    return path, manifest, data


@pytest.fixture
def keys():
    return keypair(), keypair()


@pytest.fixture
def enc(keys):
    return agecrypt.Encryption([keys[0][1], keys[1][1]], encrypt_local=True)


def scanned(backup_dir):
    backups, invalid = s3replicate.scan_local_backups(backup_dir)
    assert invalid == []
    return backups[0]


def test_the_manifest_records_both_hashes_and_checks_without_an_identity(tmp_path, enc, keys):
    path, manifest, data = make_encrypted(str(tmp_path), enc)
    with open(path, "rb") as fh:
        ct = fh.read()
    assert ct.startswith(agecrypt.HEADER) and b"PGDMP" not in ct and b"company-4242" not in ct
    assert sorted(os.listdir(tmp_path)) == [NAME, NAME + ".manifest.json"]
    block = manifest["encryption"]
    assert block["recipients"] == enc.fingerprints and block["format"] == "age-v1"
    assert (block["sha256"], block["size"]) == (hashlib.sha256(ct).hexdigest(), len(ct))
    assert (manifest["sha256"], manifest["size"]) == (hashlib.sha256(data).hexdigest(), len(data))
    assert backup_format.local_encryption_problem(manifest) is None
    assert backup_format.manifest_problem(manifest, NAME) is None
    assert backup_format.backup_problem(path, manifest, verify_checksum=True) is None
    assert backup_format.backup_problems(path, manifest, verify_checksum=True) == []
    assert "age ciphertext" in backup_format.checksum_problem(path, manifest)
    [entry] = backupfiles.list_backups(str(tmp_path), verify_checksum=True)
    assert entry["valid"]
    # the sealed manifest (the S3 manifest object) opens to the plaintext dump's manifest
    sealed = pyrage.decrypt(base64.b64decode(block["sealed_manifest"]), [pyrage.x25519.Identity.from_str(keys[1][0])])
    opened, raw, parsed = backup_format.open_sealed_manifest(sealed)
    assert parsed == plain_manifest(data) and raw == backup_format.manifest_bytes(plain_manifest(data))
    assert opened["encryption"]["sha256"] == block["sha256"]


@pytest.mark.parametrize("change, match", [
    (lambda m: m.update(counts={"auth": 1, "keys": 4}), "differ from the ones recorded"),
    (lambda m: m["encryption"].pop("sealed_manifest"), "no sealed_manifest"),
    (lambda m: m["encryption"].update(recipients=[]), "names no recipient"),
    (lambda m: m["encryption"].update(format="age-v2"), "encryption format"),
    (lambda m: m["encryption"].update(plain_manifest_sha256="x"), "no valid plain_manifest_sha256"),
])
def test_a_broken_encryption_block_is_not_a_valid_backup(tmp_path, enc, change, match):
    path, manifest, _data = make_encrypted(str(tmp_path), enc)
    change(manifest)
    assert match in backup_format.manifest_problem(manifest, NAME)
    assert match in backup_format.backup_problem(path, manifest)
    with open(path + ".manifest.json", "wb") as fh:
        fh.write(backup_format.manifest_bytes(manifest))
    [entry] = backupfiles.list_backups(str(tmp_path))
    assert not entry["valid"] and match in entry["reason"]


def test_replication_uploads_the_local_ciphertext(tmp_path, enc, keys):
    path, manifest, _data = make_encrypted(str(tmp_path), enc)
    b = scanned(str(tmp_path))
    copy = backupseal.local_copy(b)
    assert copy["path"] == path and copy["local"] and copy["recipients"] == enc.fingerprints
    assert (copy["size"], copy["sha256"]) == (manifest["encryption"]["size"], manifest["encryption"]["sha256"])
    assert copy["manifest_bytes"] == base64.b64decode(manifest["encryption"]["sealed_manifest"])
    assert backupseal.prepare(str(tmp_path), b, enc) == (copy, None)
    # the same copy whatever the current recipients: it cannot be encrypted again here
    other = agecrypt.Encryption([keypair()[1]])
    assert backupseal.current(str(tmp_path), b, other) == copy
    assert backupseal.local_problem(b, enc) is None
    assert "replication without encryption recipients does not upload it" in backupseal.local_problem(
        b, agecrypt.Encryption())
    assert not os.path.exists(os.path.join(str(tmp_path), ".sealed"))
    # a damaged ciphertext of the same size: found by prepare (hashing), not by current (no hashing)
    with open(path, "r+b") as fh:
        fh.seek(1000)
        fh.write(b"\0\0\0\0")
    assert backupseal.current(str(tmp_path), b, enc) == copy
    copy2, problem = backupseal.prepare(str(tmp_path), b, enc)
    assert copy2 is None and "sha256" in problem and "ciphertext" in problem
    assert "sha256" in backupseal.local_problem(b, enc)
    # a sealed manifest that does not match its hash is not uploaded
    bad = dict(b, manifest=json.loads(json.dumps(b["manifest"])))
    bad["manifest"]["encryption"]["sealed_manifest_sha256"] = "0" * 64
    assert backupseal.current(str(tmp_path), bad, enc) is None
    assert "does not match" in backupseal.prepare(str(tmp_path), bad, enc)[1]


def test_plaintext_changed_after_validation_is_not_encrypted(tmp_path, enc):
    data = b"PGDMP" + os.urandom(10_000)
    src = tmp_path / "x.partial"
    src.write_bytes(data)
    manifest = plain_manifest(data[:-1] + b"!")
    with pytest.raises(agecrypt.AgeError, match="changed after it was validated"):
        backupseal.encrypt_local_dump(str(src), str(tmp_path / "x.age.partial"), manifest, enc)
    assert sorted(os.listdir(tmp_path)) == ["x.partial"]


def test_reading_with_and_without_an_identity(tmp_path, enc, keys):
    path, manifest, data = make_encrypted(str(tmp_path), enc)
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "baileys-decrypted-*")))
    ids = agecrypt.load_identities(identity=keys[0][0])
    with backupseal.decrypted_backup(path, ids) as plain:
        with open(plain, "rb") as fh:
            assert fh.read() == data
        with open(plain + ".manifest.json", "rb") as fh:
            assert fh.read() == backup_format.manifest_bytes(plain_manifest(data))
    with backupseal.opened_backup(path, ids) as plain:
        assert plain != path
    with pytest.raises(agecrypt.AgeError, match="age-encrypted: give identity_file or identity to read it"):
        with backupseal.opened_backup(path, None):
            pass
    stranger = agecrypt.load_identities(identity=keypair()[0])
    with pytest.raises(agecrypt.WrongIdentity) as err:
        with backupseal.decrypted_backup(path, stranger):
            pass
    assert all(fp in str(err.value) for fp in enc.fingerprints)
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "baileys-decrypted-*"))) == before

    check = backupseal.ciphertext_check(path)
    assert check["ok"] and check["decrypted"] is False and "NOT decrypted and NOT restored" in check["msg"]
    assert check["recipients"] == enc.fingerprints
    # a plaintext manifest that says nothing of the ciphertext beside it
    with open(path + ".manifest.json", "wb") as fh:
        fh.write(backup_format.manifest_bytes(plain_manifest(data)))
    check = backupseal.ciphertext_check(path)
    assert not check["ok"] and "without an encryption block" in check["msg"]
    with pytest.raises(agecrypt.AgeError, match="without an encryption block"):
        with backupseal.decrypted_backup(path, ids):
            pass


def test_memory_stays_flat_when_a_large_dump_is_encrypted(tmp_path):
    """150 MiB encrypted by encrypt_local_dump in a child process: its peak RSS grows by far less than the file."""
    src = tmp_path / "big.partial"
    digest = hashlib.sha256()
    with open(src, "wb") as fh:
        block = os.urandom(1 << 20)
        for _block in range(150):
            fh.write(block)
            digest.update(block)
    manifest = plain_manifest(b"")
    manifest.update(sha256=digest.hexdigest(), size=150 << 20)
    script = textwrap.dedent("""
        import json, resource, sys
        from ansible_collections.baileys.resilience.plugins.module_utils import agecrypt, backupseal
        import pyrage
        enc = agecrypt.Encryption([str(pyrage.x25519.Identity.generate().to_public())], encrypt_local=True)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        backupseal.encrypt_local_dump(sys.argv[1], sys.argv[1] + ".age", json.loads(sys.argv[2]), enc)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
    """)
    out = subprocess.run([sys.executable, "-c", script, str(src), json.dumps(manifest)], check=True,
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    grown_kib = int(out.stdout.strip().splitlines()[-1])
    assert grown_kib < 40 * 1024, "peak RSS grew by %d KiB for a 150 MiB dump" % grown_kib
    assert os.path.getsize(str(src) + ".age") > 150 << 20
