"""The host tool with ``s3.encryption``: a real pg_dump backup sealed before it leaves the host, DR fetch with
an identity, the export from an encrypted backup, the restore test without an identity, and key rotation
(``reencrypt``) - on real moto endpoints."""
from __future__ import annotations

import json
import os

import pytest

from ansible_collections.baileys.resilience.plugins.module_utils import authstate, backup, backupseal, s3

from support import authgen
from support.s3fixtures import create_bucket, list_keys, s3_client

from .test_cli import MIX, run_host, write_config
from .test_cli_s3 import creds_file

pyrage = pytest.importorskip("pyrage")


def keypair(tmp_path, name):
    ident = pyrage.x25519.Identity.generate()
    path = tmp_path / (name + ".key")
    path.write_text("# public key: %s\n%s\n" % (ident.to_public(), ident))
    path.chmod(0o600)
    return str(path), str(ident.to_public())


def objects(url, bucket, region):
    client = s3_client(url, region)
    return {k: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in list_keys(url, bucket, region)}


def tree(root):
    out = {}
    for base, _dirs, files in os.walk(root):
        for n in files:
            if n.startswith(".baileys-resilience") or n.endswith(".manifest.json"):
                continue
            with open(os.path.join(base, n), "rb") as fh:
                out[os.path.relpath(os.path.join(base, n), root)] = fh.read()
    return out


def test_encrypted_backup_replication_fetch_export_verify_and_rotation(host_pkg, db, dbconn, tmp_path, moto, moto2):
    companies = authgen.generate(2, seed=11, form="mixed", mix=MIX)
    authgen.load_into(dbconn, companies)
    company_ids = sorted(companies)
    ops_file, ops_pub = keypair(tmp_path, "ops")
    glass_file, glass_pub = keypair(tmp_path, "glass")
    eu = create_bucket(moto.url, "eu-west-1")
    us = create_bucket(moto2.url, "us-east-1")
    cred = creds_file(tmp_path / "s3.credentials")
    targets = [
        {"name": "eu", "bucket": eu, "region": "eu-west-1", "endpoint_url": moto.url, "prefix": "wa",
         "credentials_file": cred},
        {"name": "us", "bucket": us, "region": "us-east-1", "endpoint_url": moto2.url, "prefix": "wa",
         "credentials_file": cred},
    ]
    backups = tmp_path / "backups"
    s3cfg = {"targets": targets, "fetch_dir": str(tmp_path / "dr"),
             "encryption": {"recipients": [ops_pub, glass_pub], "required": True}}
    config = write_config(tmp_path / "config.yml", db, backup_dir=str(backups), lock_dir=str(tmp_path), s3=s3cfg)

    proc = run_host(host_pkg, ["--config", config, "backup", "--json"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["replication"]["ok"] and result["replication"]["encrypted"]
    local_dump = result["backup"]
    with open(local_dump, "rb") as fh:
        plain = fh.read()
    assert plain.startswith(b"PGDMP")  # local dumps stay as today
    for url, bucket, region in ((moto.url, eu, "eu-west-1"), (moto2.url, us, "us-east-1")):
        objs = objects(url, bucket, region)
        assert len(objs) == 2
        for key, body in objs.items():
            assert body.startswith(b"age-encryption.org/v1\n"), key
            assert b"PGDMP" not in body, key
            for cid in company_ids:
                assert cid.encode() not in body, (key, cid)

    # DR: without an identity the error says the backups are encrypted; with one, byte-identical files
    proc = run_host(host_pkg, ["--config", config, "fetch", "--json"])
    assert proc.returncode != 0 and "age-encrypted" in proc.stdout + proc.stderr
    proc = run_host(host_pkg, ["--config", config, "fetch", "--json", "--identity-file", glass_file])
    assert proc.returncode == 0, proc.stderr[-3000:]
    fetched = json.loads(proc.stdout)
    assert fetched["decrypted"]
    with open(fetched["path"], "rb") as fh:
        assert fh.read() == plain
    with open(fetched["manifest_path"], "rb") as fh, open(local_dump + ".manifest.json", "rb") as orig:
        assert fh.read() == orig.read()

    # auth_export source=backup from the encrypted (sealed) copy == from the plaintext dump
    sealed = os.path.join(str(backups), ".sealed", os.path.basename(local_dump))
    ids = s3.load_identities(identity_file=ops_file)
    outs = {}
    for label, path, identities in (("plain", local_dump, None), ("sealed", sealed, ids)):
        snapshot, states = backup.read_backup_states(path, {}, identities=identities)
        dest = str(tmp_path / ("export-" + label))
        authstate.export_states(states, authstate.ExportOptions(dest, source_label=snapshot["source"]), snapshot)
        outs[label] = tree(dest)
    assert outs["plain"] and outs["plain"] == outs["sealed"]
    with pytest.raises(backup.BackupError, match="age-encrypted: give identity_file or identity"):
        backup.read_backup_states(sealed, {})

    # the restore test without an identity: integrity only, said plainly
    proc = run_host(host_pkg, ["--config", config, "verify", sealed, "--json"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    verified = json.loads(proc.stdout)
    assert verified["decrypted"] is False and "NOT decrypted" in verified["msg"]
    assert backupseal.ciphertext_check(sealed)["ok"]

    # rotation: a new operations key, the break-glass key opens the old objects
    new_file, new_pub = keypair(tmp_path, "ops2")
    s3cfg["encryption"]["recipients"] = [new_pub, glass_pub]
    config = write_config(tmp_path / "config.yml", db, backup_dir=str(backups), lock_dir=str(tmp_path), s3=s3cfg)
    proc = run_host(host_pkg, ["--config", config, "reencrypt", "--identity-file", glass_file, "--json"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rotated = json.loads(proc.stdout)
    assert rotated["reencrypted"] == 2
    proc = run_host(host_pkg, ["--config", config, "reencrypt", "--identity-file", glass_file, "--json"])
    assert proc.returncode == 0 and json.loads(proc.stdout)["reencrypted"] == 0
    proc = run_host(host_pkg, ["--config", config, "fetch", "--json", "--identity-file", ops_file,
                               "--dest", str(tmp_path / "dr-old")])
    assert proc.returncode != 0 and "cannot be decrypted with the identity given" in proc.stdout + proc.stderr
    assert not os.path.exists(str(tmp_path / "dr-old")) or os.listdir(str(tmp_path / "dr-old")) == []
    proc = run_host(host_pkg, ["--config", config, "fetch", "--json", "--identity-file", new_file,
                               "--dest", str(tmp_path / "dr-new")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(json.loads(proc.stdout)["path"], "rb") as fh:
        assert fh.read() == plain
    # the next replication re-seals for the new recipients and the objects stay ciphertext
    proc = run_host(host_pkg, ["--config", config, "replicate", "--json"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    for body in objects(moto.url, eu, "eu-west-1").values():
        assert body.startswith(b"age-encryption.org/v1\n") and b"PGDMP" not in body


def test_mistyped_encryption_option_stops_before_any_upload(host_pkg, db, dbconn, tmp_path, moto):
    authgen.load_into(dbconn, authgen.generate(1, seed=5, form="mixed", mix=MIX))
    _f, pub = keypair(tmp_path, "ops")
    eu = create_bucket(moto.url, "eu-west-1")
    targets = [{"name": "eu", "bucket": eu, "region": "eu-west-1", "endpoint_url": moto.url, "prefix": "wa",
                "credentials_file": creds_file(tmp_path / "s3.credentials")}]
    for enc in ({"recipient": [pub], "required": True}, {"recipients": [pub[:-2]], "required": True}):
        config = write_config(tmp_path / "config.yml", db, backup_dir=str(tmp_path / "backups"),
                              lock_dir=str(tmp_path), s3={"targets": targets, "encryption": enc})
        proc = run_host(host_pkg, ["--config", config, "backup"])
        assert proc.returncode == 2, proc.stderr
        assert "s3.encryption" in proc.stderr or "recipient 1" in proc.stderr
        assert not list_keys(moto.url, eu, "eu-west-1")
        assert not os.path.exists(str(tmp_path / "backups"))


def test_encrypt_local_backup_is_uploaded_as_it_is_and_verified(host_pkg, db, dbconn, tmp_path, moto):
    """s3.encryption.encrypt_local: the backup job keeps only ciphertext, replication uploads it unchanged, the
    restore test decrypts with --identity-file and says plainly when it did not."""
    companies = authgen.generate(2, seed=13, form="mixed", mix=MIX)
    authgen.load_into(dbconn, companies)
    ops_file, ops_pub = keypair(tmp_path, "ops")
    stranger_file, _stranger_pub = keypair(tmp_path, "stranger")
    eu = create_bucket(moto.url, "eu-west-1")
    targets = [{"name": "eu", "bucket": eu, "region": "eu-west-1", "endpoint_url": moto.url, "prefix": "wa",
                "credentials_file": creds_file(tmp_path / "s3.credentials")}]
    backups = tmp_path / "backups"
    s3cfg = {"targets": targets, "encryption": {"recipients": [ops_pub], "encrypt_local": True}}
    config = write_config(tmp_path / "config.yml", db, backup_dir=str(backups), lock_dir=str(tmp_path), s3=s3cfg)

    proc = run_host(host_pkg, ["--config", config, "backup", "--json"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["encrypted"] and result["replication"]["ok"] and result["replication"]["uploaded"] == 2
    with open(result["backup"], "rb") as fh:
        local = fh.read()
    assert local.startswith(b"age-encryption.org/v1\n")
    assert not os.path.exists(os.path.join(str(backups), ".sealed"))
    for base, _dirs, files in os.walk(str(backups)):
        for n in files:
            with open(os.path.join(base, n), "rb") as fh:
                data = fh.read()
            assert b"PGDMP" not in data, n
            for cid in companies:
                assert cid.encode() not in data, (n, cid)
    objs = objects(moto.url, eu, "eu-west-1")
    assert objs["wa/monthly/" + os.path.basename(result["backup"])] == local

    proc = run_host(host_pkg, ["--config", config, "verify", "--json"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    verified = json.loads(proc.stdout)
    assert verified["decrypted"] is False and "NOT decrypted" in verified["msg"]
    proc = run_host(host_pkg, ["--config", config, "verify", "--json", "--identity-file", ops_file])
    assert proc.returncode == 0, proc.stderr[-3000:]
    verified = json.loads(proc.stdout)
    assert verified["decrypted"] is True and verified["ok"] and verified["restored"]
    assert verified["counts"] == result["manifest"]["counts"]
    proc = run_host(host_pkg, ["--config", config, "verify", "--json", "--identity-file", stranger_file])
    assert proc.returncode != 0 and "cannot be decrypted with the identity given" in proc.stdout + proc.stderr

    s3cfg["encryption"] = {"encrypt_local": True}
    config = write_config(tmp_path / "config.yml", db, backup_dir=str(backups), lock_dir=str(tmp_path), s3=s3cfg)
    proc = run_host(host_pkg, ["--config", config, "backup", "--force"])
    assert proc.returncode == 2 and "encrypt_local is true but no recipient" in proc.stderr
