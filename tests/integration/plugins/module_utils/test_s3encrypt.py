"""Backups encrypted before they leave the host (issue 14) against moto standalone servers.

With recipients set: no object in any bucket holds a plaintext marker (a company id, the ``PGDMP``
magic), every object starts with the age header; a wrong identity is a clear error naming the
recipient fingerprints and leaves no file; a mistyped option or an unparseable recipient stops the
run before anything is uploaded; the DR fetch gives byte-identical files to the plaintext path;
rotation re-encrypts to a new recipient and the old identity no longer opens the objects.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat

import pytest

from ansible_collections.baileys.resilience.plugins.module_utils import agecrypt, backupseal, s3

from support.s3fixtures import create_bucket, list_keys, make_backup, s3_client

pyrage = pytest.importorskip("pyrage")

MiB = 1024 * 1024
COMPANY_MARKER = b"company-7f3a9c1e-marker"
pytestmark = pytest.mark.usefixtures("aws_env")


def settings(**kw):
    base = dict(retry_delay=0.01, retry_max_delay=0.05, botocore_max_attempts=1, multipart_threshold="5MiB",
                multipart_chunksize="5MiB", connect_timeout=5, read_timeout=30)
    base.update(kw)
    return s3.Settings(**base)


def target(url, bucket, region="us-east-1", name=None, prefix="enc/"):
    return dict(name=name or bucket, bucket=bucket, region=region, endpoint_url=url, prefix=prefix)


def keypair():
    ident = pyrage.x25519.Identity.generate()
    return str(ident), str(ident.to_public())


def marker_backup(backup_dir, when, size=40_000, kind="daily"):
    """A fake backup whose dump starts with the pg_dump magic and holds a company id."""
    b = make_backup(backup_dir, when, size=size, kind=kind)
    with open(b["path"], "rb") as fh:
        body = fh.read()
    data = b"PGDMP" + COMPANY_MARKER + body[len(COMPANY_MARKER) + 5:]
    with open(b["path"], "wb") as fh:
        fh.write(data)
    manifest = dict(b["manifest"], sha256=hashlib.sha256(data).hexdigest(), companies=1,
                    note=COMPANY_MARKER.decode())
    with open(b["manifest_path"], "wb") as fh:
        fh.write(json.dumps(manifest, indent=1, sort_keys=True).encode())
    b.update(manifest=manifest, sha256=manifest["sha256"])
    return b


def all_objects(url, bucket):
    client = s3_client(url)
    return {k: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in list_keys(url, bucket)}


@pytest.fixture
def keys(tmp_path):
    ops_secret, ops_public = keypair()
    glass_secret, glass_public = keypair()
    ident_file = tmp_path / "ops.key"
    ident_file.write_text("# created: test\n# public key: %s\n%s\n" % (ops_public, ops_secret))
    ident_file.chmod(0o600)
    return {"ops": (ops_secret, ops_public), "glass": (glass_secret, glass_public), "ops_file": str(ident_file)}


@pytest.fixture
def encrypted(moto, backup_dir, keys):
    """Two dailies and a multipart monthly, replicated encrypted to two recipients."""
    backups = [marker_backup(backup_dir, 1), marker_backup(backup_dir, 2),
               marker_backup(backup_dir, 30, size=11 * MiB, kind="monthly")]
    bucket = create_bucket(moto.url, "eu-west-1")
    tgt = target(moto.url, bucket, "eu-west-1")
    enc = {"recipients": [keys["ops"][1], keys["glass"][1]], "required": True}
    res = s3.replicate(backup_dir, [tgt], settings(), encryption=enc)
    assert res["ok"], res
    assert res["encrypted"] and len(res["recipients"]) == 2
    return backups, tgt, bucket, enc


def test_every_object_is_ciphertext_without_markers(encrypted, moto):
    backups, _tgt, bucket, _enc = encrypted
    objects = all_objects(moto.url, bucket)
    assert len(objects) == 2 * len(backups)
    for key, body in objects.items():
        assert body.startswith(agecrypt.HEADER), key
        assert b"PGDMP" not in body and COMPANY_MARKER not in body, key
        assert b"whatsapp_keys" not in body, key
    assert any(k.startswith("enc/monthly/") for k in objects)


def test_replication_is_idempotent_and_reuses_the_sealed_copy(encrypted, backup_dir):
    backups, tgt, _bucket, enc = encrypted
    res = s3.replicate(backup_dir, [tgt], settings(), encryption=enc)
    assert res["ok"] and not res["changed"] and res["uploaded"] == 0
    assert res["targets"][0]["verified_present"] == 2 * len(backups)
    sealed_dir = os.path.join(backup_dir, ".sealed")
    assert stat.S_IMODE(os.stat(sealed_dir).st_mode) == 0o700
    for n in os.listdir(sealed_dir):
        assert stat.S_IMODE(os.stat(os.path.join(sealed_dir, n)).st_mode) == 0o600


def test_dr_fetch_with_identity_is_byte_identical_to_the_plain_path(encrypted, moto, backup_dir, tmp_path, keys):
    backups, tgt, _bucket, _enc = encrypted
    plain_bucket = create_bucket(moto.url, "eu-west-1")
    ptgt = target(moto.url, plain_bucket, "eu-west-1")
    assert s3.replicate(backup_dir, [ptgt], settings())["ok"]
    plain = s3.fetch(str(tmp_path / "plain"), [ptgt], settings())
    for identities in (s3.load_identities(identity_file=keys["ops_file"]),
                       s3.load_identities(identity=keys["glass"][0])):
        dest = tmp_path / ("enc-%s" % identities[0][1].replace(":", ""))
        res = s3.fetch(str(dest), [tgt], settings(), identities=identities)
        assert res["decrypted"] and res["name"] == plain["name"] == backups[2]["name"]
        for a, b in ((res["path"], plain["path"]), (res["manifest_path"], plain["manifest_path"])):
            with open(a, "rb") as fa, open(b, "rb") as fb:
                assert fa.read() == fb.read()
            assert stat.S_IMODE(os.stat(a).st_mode) == 0o600
    # an older daily by name
    res = s3.fetch(str(tmp_path / "daily"), [tgt], settings(), backup_name=backups[0]["name"],
                   identities=s3.load_identities(identity_file=keys["ops_file"]))
    with open(res["path"], "rb") as fa, open(backups[0]["path"], "rb") as fb:
        assert fa.read() == fb.read()


def test_wrong_identity_is_a_clear_error_and_leaves_nothing(encrypted, tmp_path):
    _backups, tgt, _bucket, enc = encrypted
    stranger = s3.load_identities(identity=keypair()[0])
    dest = tmp_path / "dest"
    with pytest.raises(s3.FetchError) as err:
        s3.fetch(str(dest), [tgt], settings(), identities=stranger)
    text = str(err.value)
    assert "cannot be decrypted with the identity given" in text
    for fp in s3.Encryption.from_options(enc).fingerprints:
        assert fp in text
    assert not dest.exists() or os.listdir(dest) == []


def test_no_identity_says_the_backup_is_encrypted(encrypted, tmp_path):
    _backups, tgt, _bucket, _enc = encrypted
    with pytest.raises(s3.FetchError, match="age-encrypted .*give identity_file or identity"):
        s3.fetch(str(tmp_path / "dest"), [tgt], settings())


def test_dump_decryption_failure_leaves_no_partial(encrypted, moto, tmp_path, keys):
    """The manifest opens but the dump was encrypted to someone else: no file left behind."""
    backups, tgt, bucket, _enc = encrypted
    client = s3_client(moto.url)
    other = pyrage.encrypt(b"PGDMP not for you" * 1000, [pyrage.x25519.Recipient.from_str(keypair()[1])])
    key = "enc/monthly/" + backups[2]["name"]
    head = client.head_object(Bucket=bucket, Key=key)
    client.put_object(Bucket=bucket, Key=key, Body=other, Metadata=head["Metadata"])
    dest = tmp_path / "dest"
    res = s3.fetch(str(dest), [tgt], settings(), identities=s3.load_identities(identity_file=keys["ops_file"]))
    assert res["name"] == backups[1]["name"]  # the next candidate
    assert sorted(os.listdir(dest)) == sorted([backups[1]["name"], backups[1]["name"] + ".manifest.json"])
    assert any(e["outcome"] in ("invalid", "wrong_identity", "undecryptable") for e in res["tried"])


@pytest.mark.parametrize("enc, match", [
    ({"recipients": ["age1qqqq"], "required": True}, "recipient 1 'age1qqqq' is not an age X25519 public key"),
    ({"recipient": ["x"]}, "unknown option"),
    ({"recipients": [], "required": True}, "no recipient is configured"),
    ({"recipients": ["AGE-SECRET-KEY-1QQQQ"]}, "SECRET key"),
])
def test_bad_settings_stop_before_anything_is_uploaded(moto, backup_dir, enc, match):
    marker_backup(backup_dir, 1)
    bucket = create_bucket(moto.url, "eu-west-1")
    with pytest.raises(s3.AgeError, match=match) as err:
        s3.replicate(backup_dir, [target(moto.url, bucket, "eu-west-1")], settings(), encryption=enc)
    assert "QQQQ" not in str(err.value) or "SECRET" not in str(err.value)
    assert not list_keys(moto.url, bucket)
    assert not os.path.exists(os.path.join(backup_dir, ".sealed"))


def test_a_bad_checksum_recipient_is_refused(keys):
    good = keys["ops"][1]
    bad = good[:-1] + ("q" if good[-1] != "q" else "p")
    with pytest.raises(s3.AgeError, match="recipient 2 .* does not parse"):
        s3.Encryption.from_options({"recipients": [good, bad]})


def test_plaintext_is_refused_at_the_upload(moto, backup_dir, keys, monkeypatch):
    """Fail closed: a sealed file that is not ciphertext is not sent."""
    marker_backup(backup_dir, 1)
    bucket = create_bucket(moto.url, "eu-west-1")

    def broken_encryptor(src, dest, enc, expect=None):  # writes the plaintext and says it encrypted it
        data = src.read()
        with open(dest, "wb") as fh:
            fh.write(data)
        sha = hashlib.sha256(data).hexdigest()
        return {"plain_sha256": sha, "plain_size": len(data), "sha256": sha, "size": len(data)}

    monkeypatch.setattr(agecrypt, "encrypt_file", broken_encryptor)
    res = s3.replicate(backup_dir, [target(moto.url, bucket, "eu-west-1")], settings(),
                       encryption={"recipients": [keys["ops"][1]]})
    assert not res["ok"]
    assert "not age ciphertext" in s3.failure_message(res)
    assert not list_keys(moto.url, bucket)


def test_rotation_reencrypts_to_the_new_recipient(encrypted, moto, tmp_path, keys):
    backups, tgt, bucket, _enc = encrypted
    new_secret, new_public = keypair()
    old = s3.load_identities(identity_file=keys["ops_file"])
    res = s3.reencrypt([tgt], {"recipients": [new_public]}, old, settings())
    assert res["ok"] and res["reencrypted"] == len(backups), res
    for key, body in all_objects(moto.url, bucket).items():
        assert body.startswith(agecrypt.HEADER) and b"PGDMP" not in body, key
    with pytest.raises(s3.FetchError, match="cannot be decrypted with the identity given"):
        s3.fetch(str(tmp_path / "old"), [tgt], settings(), identities=old)
    res2 = s3.fetch(str(tmp_path / "new"), [tgt], settings(), backup_name=backups[2]["name"],
                    identities=s3.load_identities(identity=new_secret))
    with open(res2["path"], "rb") as fa, open(backups[2]["path"], "rb") as fb:
        assert fa.read() == fb.read()
    again = s3.reencrypt([tgt], {"recipients": [new_public]}, old, settings())
    assert again["ok"] and not again["changed"] and again["targets"][0]["current"] == len(backups)


def test_rotation_encrypts_plaintext_objects(moto, backup_dir, tmp_path, keys):
    b = marker_backup(backup_dir, 1)
    bucket = create_bucket(moto.url, "eu-west-1")
    tgt = target(moto.url, bucket, "eu-west-1")
    assert s3.replicate(backup_dir, [tgt], settings())["ok"]
    res = s3.reencrypt([tgt], {"recipients": [keys["ops"][1]]}, s3.load_identities(identity=keys["ops"][0]),
                       settings())
    assert res["ok"] and res["reencrypted"] == 1
    for body in all_objects(moto.url, bucket).values():
        assert body.startswith(agecrypt.HEADER) and COMPANY_MARKER not in body
    got = s3.fetch(str(tmp_path / "d"), [tgt], settings(), identities=s3.load_identities(identity=keys["ops"][0]))
    with open(got["path"], "rb") as fa, open(b["path"], "rb") as fb:
        assert fa.read() == fb.read()


def test_sealed_local_copy_decrypts_and_verifies(encrypted, backup_dir, keys):
    backups, _tgt, _bucket, _enc = encrypted
    sealed_dump = os.path.join(backup_dir, ".sealed", backups[0]["name"])
    assert backupseal.is_encrypted_backup(sealed_dump)
    check = backupseal.ciphertext_check(sealed_dump)
    assert check["ok"] and check["decrypted"] is False and "NOT decrypted" in check["msg"]
    with backupseal.decrypted_backup(sealed_dump, s3.load_identities(identity=keys["glass"][0])) as path:
        with open(path, "rb") as fa, open(backups[0]["path"], "rb") as fb:
            assert fa.read() == fb.read()
        tmpdir = os.path.dirname(path)
        assert stat.S_IMODE(os.stat(tmpdir).st_mode) == 0o700
    assert not os.path.exists(tmpdir)


def test_pruned_sealed_copies_follow_retention(encrypted, backup_dir):
    backups, tgt, _bucket, enc = encrypted
    os.unlink(backups[0]["path"])
    os.unlink(backups[0]["manifest_path"])
    assert s3.replicate(backup_dir, [tgt], settings(), encryption=enc)["ok"]
    left = os.listdir(os.path.join(backup_dir, ".sealed"))
    assert not [n for n in left if n.startswith(backups[0]["name"])]
