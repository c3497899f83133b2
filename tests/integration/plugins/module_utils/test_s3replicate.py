"""s3_replicate's core against real HTTP S3 endpoints (moto standalone servers), with injected faults."""
from __future__ import annotations

import base64
import hashlib
import os
import time

import pytest

from ansible_collections.baileys.resilience.plugins.module_utils import s3

from support.s3fixtures import (
    Rule,
    corrupt_object,
    create_bucket,
    dead_endpoint,
    list_keys,
    make_backup,
    make_backups,
    remote_sha256,
    s3_client,
)


MiB = 1024 * 1024
pytestmark = pytest.mark.usefixtures("aws_env")


def settings(**kw):
    base = dict(retry_delay=0.01, retry_max_delay=0.05, botocore_max_attempts=1, multipart_threshold="5MiB",
                multipart_chunksize="5MiB", connect_timeout=5, read_timeout=30)
    base.update(kw)
    return s3.Settings(**base)


def target(url, bucket, region="us-east-1", name=None, prefix="backups/", **kw):
    t = dict(name=name or bucket, bucket=bucket, region=region, endpoint_url=url, prefix=prefix)
    t.update(kw)
    return t


def expected_keys(backups, prefix="backups/"):
    keys = {}
    for b in backups:
        kind = b["manifest"].get("kind", "daily")
        keys[prefix + kind + "/" + b["name"]] = b["size"]
        keys[prefix + kind + "/" + b["name"] + ".manifest.json"] = os.path.getsize(b["manifest_path"])
    return keys


def assert_verified(url, bucket, region, backups, prefix="backups/"):
    """Every dump and manifest is there, its bytes hash to its sha256 metadata, which matches the local file."""
    client = s3_client(url, region)
    for b in backups:
        base = prefix + b["manifest"].get("kind", "daily") + "/" + b["name"]
        for key, path in ((base, b["path"]), (base + ".manifest.json", b["manifest_path"])):
            with open(path, "rb") as fh:
                local = hashlib.sha256(fh.read()).hexdigest()
            head = client.head_object(Bucket=bucket, Key=key)
            assert head["Metadata"]["sha256"] == local, key
            assert remote_sha256(url, bucket, key, region) == local, key


def test_replicates_to_two_regions_and_a_second_endpoint(moto, moto2, backup_dir, fault_proxy):
    backups = make_backups(backup_dir, 3, size=70_000)
    backups.append(make_backup(backup_dir, 10, size=12 * MiB))  # multipart: 3 parts of 5 MiB
    eu = create_bucket(moto.url, "eu-west-1")
    us = create_bucket(moto.url, "us-east-1")
    other = create_bucket(moto2.url, "eu-central-1")
    proxy = fault_proxy(moto)  # no faults: only watches the requests of the eu target
    targets = [target(proxy.url, eu, "eu-west-1", "eu"),
               target(moto.url, us, "us-east-1", "us", storage_class="STANDARD_IA", sse="AES256"),
               target(moto2.url, other, "eu-central-1", "other", prefix="deep/er", sse="aws:kms",
                      kms_key_id="arn:aws:kms:eu-central-1:123456789012:key/1234abcd")]

    res = s3.replicate(backup_dir, targets, settings())
    assert res["ok"] and res["changed"] and res["failures"] == [], res
    assert res["uploaded"] == 3 * 8
    assert [t["status"] for t in res["targets"]] == ["ok", "ok", "ok"]
    assert sorted(res["backups"]) == sorted(b["name"] for b in backups)
    assert list_keys(moto.url, eu, "eu-west-1") == expected_keys(backups)
    assert list_keys(moto.url, us) == expected_keys(backups)
    assert list_keys(moto2.url, other, "eu-central-1") == expected_keys(backups, "deep/er/")
    for url, bucket, region, prefix in ((moto.url, eu, "eu-west-1", "backups/"),
                                        (moto.url, us, "us-east-1", "backups/"),
                                        (moto2.url, other, "eu-central-1", "deep/er/")):
        assert_verified(url, bucket, region, backups, prefix)

    client = s3_client(moto.url, "us-east-1")
    big = client.head_object(Bucket=us, Key="backups/daily/" + backups[-1]["name"])
    assert big["ETag"].strip('"').endswith("-3")  # multipart
    assert big["StorageClass"] == "STANDARD_IA" and big["ServerSideEncryption"] == "AES256"
    small = client.head_object(Bucket=us, Key="backups/daily/" + backups[0]["name"], ChecksumMode="ENABLED")
    assert small["ChecksumSHA256"] == base64.b64encode(bytes.fromhex(backups[0]["sha256"])).decode()
    assert "-" not in small["ETag"]
    kms = s3_client(moto2.url, "eu-central-1").head_object(Bucket=other, Key="deep/er/daily/" + backups[0]["name"])
    assert kms["ServerSideEncryption"] == "aws:kms" and kms["SSEKMSKeyId"].endswith("key/1234abcd")

    # each manifest PUT comes after its dump was written and HEAD-verified
    log = [(m, p.split("?")[0]) for m, p, _a in proxy.actions()]
    for b in backups:
        dump_path = "/%s/backups/daily/%s" % (eu, b["name"])
        man_put = log.index(("PUT", dump_path + ".manifest.json"))
        dump_head = max(i for i, e in enumerate(log[:man_put]) if e == ("HEAD", dump_path))
        dump_write = max(i for i, e in enumerate(log[:dump_head]) if e in (("PUT", dump_path), ("POST", dump_path)))
        assert dump_write < dump_head < man_put

    # no-op: nothing uploaded, no write request at all
    before = len(proxy.actions())
    again = s3.replicate(backup_dir, targets, settings())
    assert again["ok"] and not again["changed"] and again["uploaded"] == 0, again
    assert [t["verified_present"] for t in again["targets"]] == [8, 8, 8]
    assert not [a for a in proxy.actions()[before:] if a[0] in ("PUT", "POST", "DELETE")]


def test_check_mode_reports_and_uploads_nothing(moto, backup_dir):
    backups = make_backups(backup_dir, 3, size=5000)
    bucket = create_bucket(moto.url, "eu-west-1")
    t = [target(moto.url, bucket, "eu-west-1")]
    res = s3.replicate(backup_dir, t, settings(check_mode=True))
    assert res["ok"] and res["changed"] and res["uploaded"] == 0
    assert sorted(res["targets"][0]["would_upload"]) == sorted(expected_keys(backups))
    assert list_keys(moto.url, bucket, "eu-west-1") == {}

    # one backup already there: check mode lists only the rest
    s3.replicate(backup_dir, t, settings(), name_prefix="baileys-auth")
    make_backup(backup_dir, 50, size=5000)
    res = s3.replicate(backup_dir, t, settings(check_mode=True))
    assert res["targets"][0]["would_upload"] == ["backups/daily/baileys-auth-20260103T020000Z.dump",
                                                 "backups/daily/baileys-auth-20260103T020000Z.dump.manifest.json"]
    assert len(list_keys(moto.url, bucket, "eu-west-1")) == 6
    res = s3.replicate(backup_dir, t, settings())
    assert res["changed"] and res["uploaded"] == 2
    res = s3.replicate(backup_dir, t, settings(check_mode=True))
    assert not res["changed"] and res["targets"][0]["would_upload"] == []


def test_invalid_local_backups_are_never_uploaded(moto, backup_dir):
    good = make_backup(backup_dir, 1, size=3000)
    unvalidated = make_backup(backup_dir, 2, size=3000, validated=False)
    bad_sha = make_backup(backup_dir, 3, size=3000)
    with open(bad_sha["path"], "r+b") as fh:  # same size, different bytes
        fh.write(b"garbage!")
    no_manifest = make_backup(backup_dir, 4, size=3000)
    os.unlink(no_manifest["manifest_path"])
    wrong_size = make_backup(backup_dir, 5, size=3000)
    with open(wrong_size["path"], "ab") as fh:
        fh.write(b"x")
    orphan = make_backup(backup_dir, 6, size=3000)
    os.unlink(orphan["path"])
    partial = make_backup(backup_dir, 7, size=3000)
    os.rename(partial["path"], partial["path"] + ".partial")
    os.unlink(partial["manifest_path"])  # pg_backup writes the manifest only for a final dump
    other_prefix = make_backup(backup_dir, 8, size=3000, prefix="other")

    bucket = create_bucket(moto.url, "us-east-1")
    res = s3.replicate(backup_dir, [target(moto.url, bucket)], settings())
    assert res["ok"], res
    assert list_keys(moto.url, bucket) == expected_keys([good])
    reasons = {e["name"]: e["reason"] for e in res["invalid_local"]}
    assert set(reasons) == {unvalidated["name"], bad_sha["name"], no_manifest["name"], wrong_size["name"],
                            orphan["name"]}
    assert "validation" in reasons[unvalidated["name"]]
    assert "sha256" in reasons[bad_sha["name"]]
    assert reasons[no_manifest["name"]] == "no manifest"
    assert "size 3001" in reasons[wrong_size["name"]]
    assert "without its dump" in reasons[orphan["name"]]
    assert any(bad_sha["name"] in w for w in res["warnings"])
    assert other_prefix["name"] not in res["backups"]
    assert res["backups"] == [good["name"]]


def test_slowdown_and_connection_resets_are_retried(moto, backup_dir, fault_proxy):
    backups = make_backups(backup_dir, 2, size=20_000)
    backups.append(make_backup(backup_dir, 9, size=11 * MiB))
    bucket = create_bucket(moto.url, "eu-west-1")
    proxy = fault_proxy(moto, Rule("slowdown", count=3), Rule("reset", method="PUT", count=2),
                        Rule("error500", method="HEAD", count=1), Rule("reset_body", method="PUT", path="partNumber=2",
                                                                       count=1))
    res = s3.replicate(backup_dir, [target(proxy.url, bucket, "eu-west-1")], settings(botocore_max_attempts=2))
    assert res["ok"], res
    assert len(proxy.actions("slowdown")) == 3 and len(proxy.actions("reset")) == 2
    assert len(proxy.actions("error500")) == 1 and len(proxy.actions("reset_body")) == 1
    assert res["targets"][0]["retries"] >= 1
    assert list_keys(moto.url, bucket, "eu-west-1") == expected_keys(backups)
    assert_verified(moto.url, bucket, "eu-west-1", backups)


def test_persistent_throttling_fails_naming_target_and_object_others_complete(moto, moto2, backup_dir,
                                                                              fault_proxy):
    backups = make_backups(backup_dir, 3, size=10_000)
    newest = backups[-1]
    a = create_bucket(moto.url, "eu-west-1")
    b = create_bucket(moto2.url, "us-east-1")
    proxy = fault_proxy(moto, Rule("slowdown", method="PUT", path=r"/%s$" % newest["name"].replace(".", r"\.")))
    targets = [target(proxy.url, a, "eu-west-1", "eu"), target(moto2.url, b, "us-east-1", "us")]
    res = s3.replicate(backup_dir, targets, settings(retries=3))
    assert not res["ok"]
    dump_key = "backups/daily/" + newest["name"]
    failures = {(f["target"], f["key"]): f["error"] for f in res["failures"]}
    assert set(failures) == {("eu", dump_key), ("eu", dump_key + ".manifest.json")}
    assert "SlowDown" in failures[("eu", dump_key)]
    assert "dump is not verified" in failures[("eu", dump_key + ".manifest.json")]
    assert len(proxy.actions("slowdown")) == 3  # our 3 attempts, botocore's own retries off here
    eu_result, us_result = res["targets"]
    assert eu_result["status"] == "failed" and dump_key not in eu_result["uploaded"]
    assert us_result["status"] == "ok" and len(us_result["uploaded"]) == 6
    # the other backups did reach the throttled target; the failed one left nothing, not even its manifest
    assert list_keys(moto.url, a, "eu-west-1") == expected_keys(backups[:-1])
    assert list_keys(moto2.url, b) == expected_keys(backups)
    msg = s3.failure_message(res)
    assert "eu" in msg and dump_key in msg and "us:" not in msg


def test_unreachable_target_is_reported_and_the_others_complete(moto, backup_dir):
    backups = make_backups(backup_dir, 2, size=1000)
    bucket = create_bucket(moto.url, "us-east-1")
    targets = [target(dead_endpoint(), "nowhere", name="down"), target(moto.url, bucket, name="up")]
    started = time.monotonic()
    res = s3.replicate(backup_dir, targets, settings())
    assert time.monotonic() - started < 20
    assert not res["ok"] and res["changed"]
    down, up = res["targets"]
    assert down["status"] == "unreachable" and down["uploaded"] == []
    assert {f["key"] for f in down["failed"]} == set(expected_keys(backups))
    assert all(f["target"] == "down" for f in res["failures"])
    assert up["status"] == "ok" and list_keys(moto.url, bucket) == expected_keys(backups)
    assert any("down" in w and "unreachable" in w for w in res["warnings"])


def test_unreachable_target_fails_the_run_even_with_nothing_to_copy(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    res = s3.replicate(str(empty), [target(dead_endpoint(), "nowhere", name="down")], settings(retries=2))
    assert not res["ok"] and res["failures"][0]["key"] == "(target)"
    assert "down" in s3.failure_message(res) and any("no valid backup" in w for w in res["warnings"])


def test_interrupted_multipart_upload_is_never_reported_and_a_rerun_completes(moto, backup_dir, fault_proxy):
    small = make_backup(backup_dir, 1, size=2000)
    big = make_backup(backup_dir, 2, size=13 * MiB)
    bucket = create_bucket(moto.url, "eu-west-1")
    # every UploadPart of part 2 is killed half way through its body
    proxy = fault_proxy(moto, Rule("reset_body", method="PUT", path=r"partNumber=2(&|$)"))
    t = [target(proxy.url, bucket, "eu-west-1", "eu")]
    res = s3.replicate(backup_dir, t, settings(retries=2, botocore_max_attempts=2))
    assert not res["ok"]
    key = "backups/daily/" + big["name"]
    assert {f["key"] for f in res["failures"]} == {key, key + ".manifest.json"}
    assert key not in res["targets"][0]["uploaded"] and key + ".manifest.json" not in res["targets"][0]["uploaded"]
    assert len(proxy.actions("reset_body")) == 4  # 2 botocore attempts x 2 of ours
    assert list_keys(moto.url, bucket, "eu-west-1") == expected_keys([small])
    # the aborted upload left no multipart upload behind
    assert s3_client(moto.url, "eu-west-1").list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []

    proxy.clear()
    again = s3.replicate(backup_dir, t, settings())
    assert again["ok"] and again["changed"]
    assert again["targets"][0]["uploaded"] == [key, key + ".manifest.json"]
    assert_verified(moto.url, bucket, "eu-west-1", [small, big])


def test_stale_remote_objects_are_replaced(moto, backup_dir):
    b = make_backup(backup_dir, 1, size=4000)
    bucket = create_bucket(moto.url, "us-east-1")
    client = s3_client(moto.url)
    key = "backups/daily/" + b["name"]
    client.put_object(Bucket=bucket, Key=key, Body=b"x" * 4000, Metadata={"sha256": "0" * 64})  # wrong sha
    client.put_object(Bucket=bucket, Key=key + ".manifest.json", Body=b"{}")  # wrong size
    res = s3.replicate(backup_dir, [target(moto.url, bucket)], settings())
    assert res["ok"] and res["targets"][0]["uploaded"] == [key, key + ".manifest.json"]
    assert_verified(moto.url, bucket, "us-east-1", [b])


def test_corrupted_remote_object_is_found_and_repaired_by_verify_existing(moto, backup_dir, fault_proxy):
    backups = make_backups(backup_dir, 2, size=50_000)
    bucket = create_bucket(moto.url, "us-east-1")
    t = [target(moto.url, bucket)]
    assert s3.replicate(backup_dir, t, settings())["ok"]
    key = "backups/daily/" + backups[0]["name"]
    corrupt_object(moto.url, bucket, key)
    assert remote_sha256(moto.url, bucket, key) != backups[0]["sha256"]
    # a HEAD cannot see it (metadata and size unchanged): documented
    assert not s3.replicate(backup_dir, t, settings())["changed"]
    res = s3.replicate(backup_dir, t, settings(verify_existing=True))
    assert res["ok"] and res["changed"] and res["targets"][0]["repaired"] == [key]
    assert res["targets"][0]["uploaded"] == [key]
    assert_verified(moto.url, bucket, "us-east-1", backups)


def test_verify_download_reads_back_every_upload(moto, backup_dir, fault_proxy):
    backups = make_backups(backup_dir, 2, size=9000)
    bucket = create_bucket(moto.url, "us-east-1")
    proxy = fault_proxy(moto)
    res = s3.replicate(backup_dir, [target(proxy.url, bucket)], settings(verify_download=True))
    assert res["ok"]
    gets = sorted(p.split("?")[0] for m, p, _a in proxy.actions() if m == "GET" and "list-type" not in p)
    assert gets == sorted("/%s/%s" % (bucket, k) for k in expected_keys(backups))


def test_credentials_options_file_and_missing(moto, backup_dir, fault_proxy, monkeypatch, tmp_path):
    make_backups(backup_dir, 1, size=100)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    bucket = create_bucket(moto.url, "us-east-1")
    proxy = fault_proxy(moto)

    res = s3.replicate(backup_dir, [target(proxy.url, bucket, prefix="a", access_key="AKIAEXPLICIT000001",
                                           secret_key="explicit-secret")], settings())
    assert res["ok"], res
    assert proxy.access_keys == {"AKIAEXPLICIT000001"}

    creds = tmp_path / "credentials"
    creds.write_text("[backup]\naws_access_key_id = AKIAFROMFILE0000001\naws_secret_access_key = file-secret\n")
    os.chmod(creds, 0o600)
    proxy.access_keys.clear()
    res = s3.replicate(backup_dir, [target(proxy.url, bucket, prefix="b", credentials_file=str(creds),
                                           profile="backup")], settings())
    assert res["ok"] and not res["warnings"], res
    assert proxy.access_keys == {"AKIAFROMFILE0000001"}

    os.chmod(creds, 0o644)
    res = s3.replicate(backup_dir, [target(proxy.url, bucket, prefix="b", credentials_file=str(creds),
                                           profile="backup")], settings())
    assert any("0644" in w and "0600" in w for w in res["warnings"])

    res = s3.replicate(backup_dir, [target(proxy.url, bucket, prefix="c", name="nocreds")], settings())
    assert not res["ok"]
    assert all("no AWS credentials" in f["error"] for f in res["failures"]) and len(res["failures"]) == 2
    for text in (repr(res), s3.failure_message(res)):
        assert "explicit-secret" not in text and "file-secret" not in text


def test_contradictory_target_options_are_refused(backup_dir):
    with pytest.raises(s3.S3Error, match="access_key and secret_key go together"):
        s3.replicate(backup_dir, [{"bucket": "b", "access_key": "x"}], settings())
    with pytest.raises(s3.S3Error, match="kms_key_id needs sse"):
        s3.replicate(backup_dir, [{"bucket": "b", "kms_key_id": "k"}], settings())
    with pytest.raises(s3.S3Error, match="unique"):
        s3.replicate(backup_dir, [{"bucket": "b"}, {"bucket": "b"}], settings())
    with pytest.raises(s3.S3Error, match="at least 5 MiB"):
        settings(multipart_chunksize="1MiB")
