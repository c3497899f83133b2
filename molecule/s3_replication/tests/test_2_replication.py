"""Verify of the s3_replication scenario, part 2: the cron backup replicates at once to both buckets, age-encrypted."""

import hashlib
import json

import pytest
from scenario import (AGE_HEADER, APP, BACKUP_CRON, BACKUP_DIR, RECIPIENT, S3_CRON, SEALED_DIR, SEED, TARGETS, dumps,
                      fingerprint, log_records, manifest, run, run_backup_job, run_like_cron, s3_client, sha256)

testinfra_hosts = [APP]


@pytest.fixture(scope="module")
def cron_backup(host):
    """Empty the backup directory, then run the daily backup job exactly as cron would (backup + replicate)."""
    result = run_backup_job(host, BACKUP_DIR, BACKUP_CRON)
    log = host.file("/var/log/baileys-resilience/backup.log").content_string
    assert result.rc == 0, log
    names = dumps(host)
    assert len(names) == 1, names
    path = "%s/%s" % (BACKUP_DIR, names[0])
    return {"name": names[0], "path": path, "manifest": manifest(host, path), "log": log}


def test_backup_job_replicated(host, cron_backup):
    records = log_records(host, "backup.log")
    steps = [r["step"] for r in records]
    assert "replicate" in steps, cron_backup["log"]
    finish = [r for r in records if r["step"] == "finish"]
    assert finish and finish[-1]["status"] == "ok" and finish[-1]["exit_code"] == 0, cron_backup["log"]
    assert "replicated (4 uploaded, all targets verified)" in cron_backup["log"], cron_backup["log"]


def test_backup_counts(host, cron_backup):
    m = cron_backup["manifest"]
    assert m["counts"] == SEED["counts"] == {"auth": 1, "keys": 1650}
    assert m["companies"] == 1


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t["name"])
def test_objects_on_both_buckets_are_the_sealed_copies(host, cron_backup, target):
    """What went to S3 is the age-sealed copy (.sealed/), verified by its ciphertext sha256; the plaintext dump
    stays local (0600) and still matches its manifest."""
    client = s3_client(target["region"])
    m = cron_backup["manifest"]
    kind = m.get("kind", "daily")
    dump_key = "%s%s/%s" % (target["prefix"], kind, cron_backup["name"])
    listed = {o["Key"]: o["Size"] for o in client.list_objects_v2(Bucket=target["bucket"]).get("Contents", [])}
    assert set(listed) == {dump_key, dump_key + ".manifest.json"}, listed
    sealed = "%s/%s" % (SEALED_DIR, cron_backup["name"])
    for key, local in ((dump_key, sealed), (dump_key + ".manifest.json", sealed + ".manifest.json")):
        head = client.head_object(Bucket=target["bucket"], Key=key)
        local_sha = sha256(host, local)
        assert head["Metadata"].get("sha256") == local_sha, (key, head["Metadata"])
        assert head["ContentLength"] == host.file(local).size
        body = client.get_object(Bucket=target["bucket"], Key=key)["Body"].read()
        assert hashlib.sha256(body).hexdigest() == local_sha, key
    record = json.loads(host.file(sealed + ".seal.json").content_string)
    assert fingerprint(RECIPIENT) in json.dumps(record), record
    assert host.file(sealed).mode == 0o600
    assert sha256(host, cron_backup["path"]) == m["sha256"]


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t["name"])
def test_every_object_in_every_bucket_is_age_ciphertext(cron_backup, target):
    """No object of the targets' buckets (every version) holds a plaintext marker: the seed's company id, the
    custom-format dump's PGDMP magic, the manifest's field names; each starts with the age header."""
    client = s3_client(target["region"])
    versions = client.list_object_versions(Bucket=target["bucket"])
    objects = [(v["Key"], v["VersionId"]) for v in versions.get("Versions", [])]
    assert len(objects) >= 2, versions
    markers = [c.encode() for c in SEED["by_company"]] + [b"PGDMP", b'"counts"']
    for key, version in objects:
        body = client.get_object(Bucket=target["bucket"], Key=key, VersionId=version)["Body"].read()
        assert body.startswith(AGE_HEADER), (key, body[:40])
        for marker in markers:
            assert marker not in body, (key, marker)


def test_catch_up_job_finds_everything_replicated(host, cron_backup):
    run(host, "rm -f /var/log/baileys-resilience/replicate.log")
    result, command = run_like_cron(host, S3_CRON, "baileys-resilience replicate")
    log = host.file("/var/log/baileys-resilience/replicate.log").content_string
    assert result.rc == 0, (command, log)
    finish = [r for r in log_records(host, "replicate.log") if r["step"] == "finish"]
    assert finish and finish[-1]["status"] == "ok", log
