"""``encrypt_local: true`` (issue 14) against the real PostgreSQL of the fixtures and moto: the backup job keeps the
local backup only as age ciphertext after validating the plaintext as always; replication uploads that ciphertext
as it is; the restore test, the export from a backup and the restore decrypt it with an identity; without one the
ciphertext's integrity is checked and said plainly; a wrong identity is a clear error that leaves nothing."""
from __future__ import annotations

import base64
import glob
import hashlib
import json
import os
import stat
import tempfile

import pytest

from ansible_collections.baileys.resilience.plugins.module_utils import (
    agecrypt, authstate, backup, backup_format, backupseal, health, pgconn, pgtools, s3)

from support.authgen import generate, load_into
from support.s3fixtures import create_bucket, list_keys, s3_client

from .test_backup import MIX, at, fake_bin, names, verify_dbs

pyrage = pytest.importorskip("pyrage")

AGE = b"age-encryption.org/v1\n"


def keypair():
    ident = pyrage.x25519.Identity.generate()
    return str(ident), str(ident.to_public())


@pytest.fixture
def keys():
    return {"ops": keypair(), "glass": keypair()}


@pytest.fixture
def company_ids(db, dbconn):
    companies = generate(2, seed=23, mix=MIX)
    load_into(dbconn, companies)
    return sorted(companies)


@pytest.fixture
def loaded(db, company_ids):
    return db


def enc_of(keys, **kw):
    return dict({"recipients": [keys["ops"][1], keys["glass"][1]], "encrypt_local": True}, **kw)


def every_file(root):
    for base, _dirs, files in os.walk(root):
        for n in files:
            yield os.path.join(base, n)


def assert_no_plaintext(root, company_ids):
    for path in every_file(root):
        with open(path, "rb") as fh:
            data = fh.read()
        assert b"PGDMP" not in data, path
        assert b"whatsapp_keys" not in data or path.endswith(".manifest.json"), path  # table names are in the manifest
        for cid in company_ids:
            assert cid.encode() not in data, (path, cid)


def decrypt_to(path, dest_dir, secret):
    """The plaintext backup beside its plaintext manifest, decrypted by hand (the 'plaintext path')."""
    os.makedirs(dest_dir, exist_ok=True)
    manifest = backup.read_manifest(path + ".manifest.json")
    dest = os.path.join(dest_dir, os.path.basename(path))
    with open(path, "rb") as fh:
        plain = pyrage.decrypt(fh.read(), [pyrage.x25519.Identity.from_str(secret)])
    with open(dest, "wb") as fh:
        fh.write(plain)
    with open(dest + ".manifest.json", "wb") as fh:
        fh.write(backup_format.manifest_bytes(backup_format.plain_manifest(manifest)))
    return dest, plain


def tree(root):
    out = {}
    for path in every_file(root):
        if os.path.basename(path).startswith(".baileys-resilience"):
            continue
        with open(path, "rb") as fh:
            out[os.path.relpath(path, root)] = fh.read()
    return out


def decrypted_dirs():
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "baileys-decrypted-*")))


# --------------------------------------------------------------------------- the backup job


def test_encrypted_backup_keeps_no_plaintext_and_records_both_hashes(loaded, company_ids, tmp_path, keys):
    bdir = str(tmp_path / "backups")
    enc = agecrypt.Encryption.from_options(enc_of(keys))
    res = backup.run_backup(loaded, {}, bdir, now=at(2026, 3, 5, 3), encryption=enc_of(keys))
    assert res["changed"] and res["encrypted"] and "age-encrypted to" in res["msg"]
    path = res["backup"]
    assert names(bdir) == [os.path.basename(path), os.path.basename(path) + ".manifest.json"]
    for n in names(bdir):
        assert stat.S_IMODE(os.stat(os.path.join(bdir, n)).st_mode) == 0o600
    with open(path, "rb") as fh:
        ct = fh.read()
    assert ct.startswith(AGE)
    assert_no_plaintext(bdir, company_ids)

    with open(path + ".manifest.json", "rb") as fh:
        raw = fh.read()
    m = json.loads(raw)
    assert list(m)[-1] == "encryption"
    e = m["encryption"]
    assert e["format"] == "age-v1" and e["recipients"] == enc.fingerprints
    assert e["sha256"] == hashlib.sha256(ct).hexdigest() and e["size"] == len(ct)
    _dest, plain = decrypt_to(path, str(tmp_path / "plain"), keys["glass"][0])
    assert plain.startswith(b"PGDMP")
    assert m["sha256"] == hashlib.sha256(plain).hexdigest() and m["size"] == len(plain)
    assert m["validated"] == {"restore_list": True, "row_counts": True}
    plain_raw = backup_format.manifest_bytes(backup_format.plain_manifest(m))
    assert e["plain_manifest_sha256"] == hashlib.sha256(plain_raw).hexdigest()
    # the sealed manifest (the S3 manifest object) is made once, with the dump
    sealed = pyrage.decrypt(base64.b64decode(e["sealed_manifest"]),
                            [pyrage.x25519.Identity.from_str(keys["ops"][0])])
    opened, original, parsed = backup_format.open_sealed_manifest(sealed)
    assert original == plain_raw and parsed == backup_format.plain_manifest(m)
    assert opened["encryption"]["sha256"] == e["sha256"]
    # the rows in the decrypted dump are the snapshot's
    bin_dir = pgtools.find_bin_dir()
    assert pgtools.count_table_rows(bin_dir, _dest, "whatsapp_keys", "public") == m["counts"]["keys"]

    # listed, valid (ciphertext checked against the encryption block), found as the newest, reported healthy
    [entry] = backup.list_backups(bdir, verify_checksum=True)
    assert entry["valid"], entry["reason"]
    assert backup.newest_valid_backup(bdir)["path"] == path
    status = health.backup_status(bdir, verify_checksum=True, now=at(2026, 3, 5, 4))
    assert status["valid_count"] == 1 and status["status"] == "ok", status
    # the same day again: a no-op
    again = backup.run_backup(loaded, {}, bdir, now=at(2026, 3, 5, 21), encryption=enc_of(keys))
    assert again["skipped"] and not again["changed"]
    # a plaintext reader without an identity is told why
    with pytest.raises(backup.BackupError, match="age-encrypted .*encrypt_local.*give identity_file or identity"):
        backup.check_backup_file(path)
    with pytest.raises(backup.BackupError, match="age-encrypted: give identity_file or identity"):
        backup.read_backup_states(path, {})

    # tampering with the ciphertext shows without an identity
    with open(path, "r+b") as fh:
        fh.seek(len(ct) // 2)
        fh.write(bytes([ct[len(ct) // 2] ^ 0xFF]))
    [entry] = backup.list_backups(bdir, verify_checksum=True)
    assert not entry["valid"] and "sha256" in entry["reason"] and "ciphertext" in entry["reason"]
    check = backupseal.ciphertext_check(path)
    assert not check["ok"] and not check["decrypted"]


def test_check_mode_and_settings(loaded, tmp_path, keys):
    bdir = str(tmp_path / "backups")
    res = backup.run_backup(loaded, {}, bdir, check_mode=True, now=at(2026, 3, 5, 3),
                            encryption=enc_of(keys))
    assert res["encrypted"] and "age-encrypted to age:" in res["msg"] and not os.path.exists(bdir)
    with pytest.raises(backup.BackupError, match="encrypt_local is true but no recipient"):
        backup.run_backup(loaded, {}, bdir, encryption={"encrypt_local": True})
    with pytest.raises(backup.BackupError, match="unknown option"):
        backup.run_backup(loaded, {}, bdir, encryption=dict(enc_of(keys), encrypt_locally=True))
    assert not os.path.exists(bdir)
    # recipients without encrypt_local: the local backup stays as today
    plain = backup.run_backup(loaded, {}, bdir, encryption={"recipients": [keys["ops"][1]]})
    assert not plain["encrypted"] and "encryption" not in plain["manifest"]
    with open(plain["backup"], "rb") as fh:
        assert fh.read(5) == b"PGDMP"


def test_an_invalid_dump_is_never_encrypted_or_kept(loaded, company_ids, tmp_path, keys, monkeypatch):
    bdir = str(tmp_path / "backups")
    broken = fake_bin(tmp_path, "broken", """\
        if [ "$1" = "--version" ]; then exec @REAL@/pg_dump --version; fi
        "@REAL@/pg_dump" "$@" | head -c 3000; exit 0
    """)
    calls = []
    real = agecrypt.encrypt_file_hashed
    monkeypatch.setattr(agecrypt, "encrypt_file_hashed", lambda *a: calls.append(a) or real(*a))
    with pytest.raises(backup.BackupError, match="failed validation|empty or implausible"):
        backup.run_backup(loaded, {}, bdir, pg_bin_dir=broken, now=at(2026, 3, 5, 3),
                          encryption=enc_of(keys))
    assert calls == [] and names(bdir) == []

    # validated, then the encryption fails: nothing is kept, neither the plaintext nor a partial ciphertext
    def failing(src, partial, encryption):
        with open(partial, "wb") as fh:
            fh.write(AGE + b"half")
        raise agecrypt.AgeError("disk full (simulated)")
    monkeypatch.setattr(agecrypt, "encrypt_file_hashed", failing)
    with pytest.raises(backup.BackupError, match="validated but could not be encrypted .*disk full"):
        backup.run_backup(loaded, {}, bdir, now=at(2026, 3, 5, 3), encryption=enc_of(keys))
    assert names(bdir) == []

    # what a killed encrypting run leaves is removed by the next run
    monkeypatch.setattr(agecrypt, "encrypt_file_hashed", real)
    for suffix in (".partial", ".age.partial"):
        with open(os.path.join(bdir, "baileys-auth-20260304T030000Z.dump" + suffix), "wb") as fh:
            fh.write(b"PGDMP leftover")
    res = backup.run_backup(loaded, {}, bdir, now=at(2026, 3, 5, 3), encryption=enc_of(keys))
    assert sorted(res["partials_removed"]) == ["baileys-auth-20260304T030000Z.dump.age.partial",
                                               "baileys-auth-20260304T030000Z.dump.partial"]
    assert_no_plaintext(bdir, company_ids)


def test_retention_removes_encrypted_backups(loaded, tmp_path, keys):
    bdir = str(tmp_path / "backups")
    made = [backup.run_backup(loaded, {}, bdir, keep_daily=2, keep_monthly=0, now=at(2026, 3, d, 3),
                              encryption=enc_of(keys)) for d in (5, 6, 7)]
    assert made[2]["deleted"] == [os.path.basename(made[0]["backup"])]
    assert [b["created_at"][:10] for b in backup.list_backups(bdir) if b["valid"]] == ["2026-03-07", "2026-03-06"]
    assert len(names(bdir)) == 4


# --------------------------------------------------------------------------- replication


def settings():
    return s3.Settings(retry_delay=0.01, retry_max_delay=0.05, botocore_max_attempts=1, connect_timeout=5,
                       read_timeout=30)


def test_replication_uploads_the_local_ciphertext_as_it_is(loaded, tmp_path, keys, moto, aws_env):
    bdir = str(tmp_path / "backups")
    made = backup.run_backup(loaded, {}, bdir, now=at(2026, 3, 5, 3), encryption=enc_of(keys))
    path = made["backup"]
    bucket = create_bucket(moto.url, "eu-west-1")
    tgt = dict(name="eu", bucket=bucket, region="eu-west-1", endpoint_url=moto.url, prefix="enc/")
    enc = enc_of(keys)

    # check mode: would upload, nothing reported invalid
    dry = s3.replicate(bdir, [tgt], s3.Settings(check_mode=True), encryption=enc)
    assert dry["ok"] and not dry["invalid_local"] and len(dry["targets"][0]["would_upload"]) == 2

    res = s3.replicate(bdir, [tgt], settings(), encryption=enc)
    assert res["ok"] and res["uploaded"] == 2 and not res["invalid_local"], res
    assert not os.path.exists(os.path.join(bdir, ".sealed"))  # no second encryption, no sealed copy
    client = s3_client(moto.url, "eu-west-1")
    key = "enc/monthly/" + os.path.basename(path)
    with open(path, "rb") as fh:
        assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == fh.read()
    manifest = backup.read_manifest(path + ".manifest.json")
    obj = client.get_object(Bucket=bucket, Key=key + ".manifest.json")
    assert obj["Body"].read() == base64.b64decode(manifest["encryption"]["sealed_manifest"])
    assert obj["Metadata"]["age-recipients"] == ",".join(manifest["encryption"]["recipients"])
    for k in list_keys(moto.url, bucket, "eu-west-1"):
        assert client.get_object(Bucket=bucket, Key=k)["Body"].read().startswith(AGE), k
    # idempotent
    again = s3.replicate(bdir, [tgt], settings(), encryption=enc)
    assert again["ok"] and again["uploaded"] == 0 and again["targets"][0]["verified_present"] == 2
    # after a rotation the local ciphertext is still what is uploaded (no identity on the host to re-encrypt)
    rotated = s3.replicate(bdir, [tgt], settings(), encryption={"recipients": [keypair()[1]]})
    assert rotated["ok"] and rotated["uploaded"] == 0

    # the DR fetch gives the files of the plaintext path, byte for byte
    got = s3.fetch(str(tmp_path / "dr"), [tgt], settings(), identities=s3.load_identities(identity=keys["ops"][0]))
    assert got["decrypted"]
    dest, plain = decrypt_to(path, str(tmp_path / "plain"), keys["ops"][0])
    for a, b in ((got["path"], dest), (got["manifest_path"], dest + ".manifest.json")):
        with open(a, "rb") as fa, open(b, "rb") as fb:
            assert fa.read() == fb.read()

    # without recipients such a backup is refused, named, and nothing is uploaded
    plain_bucket = create_bucket(moto.url, "eu-west-1")
    ptgt = dict(tgt, name="plain", bucket=plain_bucket)
    refused = s3.replicate(bdir, [ptgt], settings())
    assert "encrypted on this host (encrypt_local" in refused["invalid_local"][0]["reason"]
    assert any("not valid and was not replicated" in w for w in refused["warnings"])
    assert not list_keys(moto.url, plain_bucket, "eu-west-1")

    # a damaged local ciphertext is not uploaded
    os.unlink(path)
    with open(path, "wb") as fh:
        fh.write(AGE + b"\0" * (manifest["encryption"]["size"] - len(AGE)))
    os.chmod(path, 0o600)
    other = create_bucket(moto.url, "eu-west-1")
    bad = s3.replicate(bdir, [dict(tgt, name="other", bucket=other)], settings(), encryption=enc)
    assert "sha256" in bad["invalid_local"][0]["reason"] and bad["uploaded"] == 0
    assert not list_keys(moto.url, other, "eu-west-1")


# --------------------------------------------------------------------------- readers with and without an identity


def test_restore_test_export_and_restore_with_an_identity(pg, loaded, tmp_path, keys):
    bdir = str(tmp_path / "backups")
    made = backup.run_backup(loaded, {}, bdir, now=at(2026, 3, 5, 3), encryption=enc_of(keys))
    path = made["backup"]
    ids = s3.load_identities(identity=keys["glass"][0])
    before = decrypted_dirs()

    # the restore test decrypts into a private directory, restores, and removes the plaintext
    with backupseal.decrypted_backup(path, ids) as plain:
        tmpdir = os.path.dirname(plain)
        assert stat.S_IMODE(os.stat(tmpdir).st_mode) == 0o700
        ok = backup.verify_backup(plain, pg.params(), {})
    assert ok["ok"] and ok["restored"] and ok["counts"] == made["manifest"]["counts"]
    assert not os.path.exists(tmpdir) and verify_dbs(pg) == []
    # without an identity: integrity only, said plainly
    check = backupseal.ciphertext_check(path)
    assert check["ok"] and check["decrypted"] is False and check["encrypted"]
    assert "NOT decrypted and NOT restored" in check["msg"]
    assert check["sha256"] == made["manifest"]["encryption"]["sha256"]

    # auth_export source=backup: the same files as from the plaintext backup
    dest, _plain = decrypt_to(path, str(tmp_path / "plain"), keys["ops"][0])
    outs = {}
    for label, src, identities in (("plain", dest, None), ("encrypted", path, ids)):
        snapshot, states = backup.read_backup_states(src, {}, identities=identities)
        out = str(tmp_path / ("export-" + label))
        authstate.export_states(states, authstate.ExportOptions(out, source_label=snapshot["source"]), snapshot)
        outs[label] = tree(out)
    assert outs["plain"] and outs["plain"] == outs["encrypted"]

    # the disaster-recovery restore
    target = loaded["login_db"] + "_enc_dr"
    with backupseal.opened_backup(path, ids, "restore") as plain:
        restored = backup.restore_backup(plain, pg.params(), target)
    assert restored["changed"] and restored["counts"] == made["manifest"]["counts"]
    admin = pgconn.connect(pg.params(), autocommit=True)
    admin.execute(pgconn.sql.SQL("DROP DATABASE {} WITH (FORCE)").format(pgconn.sql.Identifier(target)))
    admin.close()
    with pytest.raises(agecrypt.AgeError, match="age-encrypted: give identity_file or identity to restore it"):
        with backupseal.opened_backup(path, None, "restore"):
            pass
    assert decrypted_dirs() == before


def test_a_wrong_identity_is_a_clear_error_and_leaves_nothing(loaded, tmp_path, keys):
    bdir = str(tmp_path / "backups")
    made = backup.run_backup(loaded, {}, bdir, now=at(2026, 3, 5, 3), encryption=enc_of(keys))
    stranger = s3.load_identities(identity=keypair()[0])
    fingerprints = agecrypt.Encryption.from_options(enc_of(keys)).fingerprints
    before = decrypted_dirs()
    with pytest.raises(agecrypt.WrongIdentity) as err:
        with backupseal.decrypted_backup(made["backup"], stranger):
            pass
    assert "cannot be decrypted with the identity given (%s)" % stranger[0][1] in str(err.value)
    for fp in fingerprints:
        assert fp in str(err.value)
    with pytest.raises(backup.BackupError, match="cannot be decrypted with the identity given"):
        backup.read_backup_states(made["backup"], {}, identities=stranger)
    assert decrypted_dirs() == before
    name = os.path.basename(made["backup"])
    assert names(bdir) == [name, name + ".manifest.json"]
