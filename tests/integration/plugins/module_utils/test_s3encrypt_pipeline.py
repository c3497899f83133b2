"""Encrypted replication with the sealing ahead of the uploads (s3replicate._Preparer), against moto: every
backup is sealed once (on the preparing thread or by the worker that needed it first), the results keep their
order (newest first), every object decrypts to its local file, a dump changed after the scan is reported and
not uploaded while the others are, the second target reuses the sealed copies, and no thread is left behind."""
from __future__ import annotations

import collections
import json
import threading

import pytest

from ansible_collections.baileys.resilience.plugins.module_utils import backupseal, s3

from support.s3fixtures import create_bucket, list_keys, make_backup, s3_client

pyrage = pytest.importorskip("pyrage")
pytestmark = pytest.mark.usefixtures("aws_env")


def settings(**kw):
    base = dict(retry_delay=0.01, retry_max_delay=0.05, botocore_max_attempts=1, multipart_threshold="5MiB",
                multipart_chunksize="5MiB", connect_timeout=5, read_timeout=30, backup_concurrency=2)
    base.update(kw)
    return s3.Settings(**base)


def target(url, bucket, name=None):
    return dict(name=name or bucket, bucket=bucket, region="eu-west-1", endpoint_url=url, prefix="p/")


@pytest.fixture
def counted_seal(monkeypatch):
    calls = []
    real = backupseal.seal

    def seal(backup_dir, backup, encryption):
        calls.append((backup["name"], threading.current_thread().name))
        return real(backup_dir, backup, encryption)

    monkeypatch.setattr(backupseal, "seal", seal)
    return calls


def test_sealed_ahead_once_each_in_order_and_decryptable(moto, backup_dir, counted_seal):
    ident = pyrage.x25519.Identity.generate()
    made = [make_backup(backup_dir, i, size=200_000 + i) for i in range(7)]
    with open(made[3]["path"], "r+b") as fh:  # changed after it was written: its sha256 no longer matches
        fh.write(b"X")
    b1, b2 = create_bucket(moto.url, "eu-west-1"), create_bucket(moto.url, "eu-west-1")
    res = s3.replicate(backup_dir, [target(moto.url, b1), target(moto.url, b2)], settings(),
                       encryption={"recipients": [str(ident.to_public())]})
    assert res["ok"]  # a local backup that is not valid is reported, not a target failure
    assert [e["name"] for e in res["invalid_local"]] == [made[3]["name"]]
    assert "differs from the manifest" in res["invalid_local"][0]["reason"]
    names = collections.Counter(n for n, _t in counted_seal)
    assert sorted(names) == sorted(m["name"] for m in made) and set(names.values()) == {1}
    assert any(t == "s3replicate-prepare" for _n, t in counted_seal)
    newest_first = [m["name"] for m in sorted(made, key=lambda m: m["name"], reverse=True) if m is not made[3]]
    for r in res["targets"]:
        dumps = [k.rsplit("/", 1)[1] for k in r["uploaded"] if k.endswith(".dump")]
        assert dumps == newest_first and not r["failed"]
    client = s3_client(moto.url)
    for bucket in (b1, b2):
        assert len(list_keys(moto.url, bucket)) == 2 * 6
        for m in made:
            if m is made[3]:
                continue
            body = client.get_object(Bucket=bucket, Key="p/daily/" + m["name"])["Body"].read()
            with open(m["path"], "rb") as fh:
                assert pyrage.decrypt(body, [ident]) == fh.read()
            sealed = json.loads(pyrage.decrypt(
                client.get_object(Bucket=bucket, Key="p/daily/" + m["name"] + ".manifest.json")["Body"].read(),
                [ident]))
            assert sealed["sha256"] == m["sha256"]
    assert not [t for t in threading.enumerate() if t.name == "s3replicate-prepare"]
    again = s3.replicate(backup_dir, [target(moto.url, b1)], settings(),
                         encryption={"recipients": [str(ident.to_public())]})
    assert again["uploaded"] == 0 and len(counted_seal) == 7 + 1  # only the changed dump is tried again


def test_plain_replication_hashes_each_dump_once_ahead(moto, backup_dir, monkeypatch):
    calls = []
    real = backupseal.local_problem

    def local_problem(backup, encryption):
        calls.append((backup["name"], threading.current_thread().name))
        return real(backup, encryption)

    monkeypatch.setattr(backupseal, "local_problem", local_problem)
    made = [make_backup(backup_dir, i, size=50_000) for i in range(5)]
    b1, b2 = create_bucket(moto.url, "eu-west-1"), create_bucket(moto.url, "eu-west-1")
    res = s3.replicate(backup_dir, [target(moto.url, b1), target(moto.url, b2)], settings())
    assert res["ok"] and res["uploaded"] == 2 * 2 * len(made)
    assert sorted(n for n, _t in calls) == sorted(m["name"] for m in made)
