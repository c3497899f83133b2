"""s3_fetch's core (disaster recovery) against moto standalone servers, with failover and corrupted objects."""
from __future__ import annotations

import hashlib
import json
import os
import stat

import pytest

from ansible_collections.baileys.resilience.plugins.module_utils import s3

from support.s3fixtures import (
    Rule,
    corrupt_object,
    create_bucket,
    dead_endpoint,
    make_backup,
    make_backups,
    s3_client,
)


MiB = 1024 * 1024
pytestmark = pytest.mark.usefixtures("aws_env")


def settings(**kw):
    base = dict(retry_delay=0.01, retry_max_delay=0.05, botocore_max_attempts=1, multipart_threshold="5MiB",
                multipart_chunksize="5MiB", connect_timeout=5, read_timeout=30)
    base.update(kw)
    return s3.Settings(**base)


def target(url, bucket, region="us-east-1", name=None, prefix="dr/"):
    return dict(name=name or bucket, bucket=bucket, region=region, endpoint_url=url, prefix=prefix)


@pytest.fixture
def two_regions(moto, moto2, backup_dir):
    """Three backups (the newest multipart) replicated to eu (moto) and us (moto2)."""
    backups = make_backups(backup_dir, 2, size=40_000)
    backups.append(make_backup(backup_dir, 5, size=11 * MiB))
    eu = create_bucket(moto.url, "eu-west-1")
    us = create_bucket(moto2.url, "us-east-1")
    targets = [target(moto.url, eu, "eu-west-1", "eu"), target(moto2.url, us, "us-east-1", "us")]
    res = s3.replicate(backup_dir, targets, settings())
    assert res["ok"], res
    return backups, targets


def assert_fetched(res, backup, dest):
    path = os.path.join(dest, backup["name"])
    assert res["path"] == path and res["manifest_path"] == path + ".manifest.json"
    with open(path, "rb") as fh:
        assert hashlib.sha256(fh.read()).hexdigest() == backup["sha256"]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(res["manifest_path"]).st_mode) == 0o600
    with open(res["manifest_path"], "rb") as fh, open(backup["manifest_path"], "rb") as orig:
        assert fh.read() == orig.read()
    assert res["manifest"] == backup["manifest"]
    assert sorted(os.listdir(dest)) == [backup["name"], backup["name"] + ".manifest.json"]  # no temp left


def test_fetches_the_newest_backup_and_is_idempotent(two_regions, tmp_path):
    backups, targets = two_regions
    dest = str(tmp_path / "restore")
    res = s3.fetch(dest, targets, settings())
    assert res["changed"] and res["target"] == "eu" and res["key"] == "dr/daily/" + backups[-1]["name"]
    assert res["downloaded_bytes"] == backups[-1]["size"] and res["seconds"] > 0
    assert [(e["target"], e["outcome"]) for e in res["tried"]] == [("eu", "fetched")]
    assert res["warnings"] == []
    assert_fetched(res, backups[-1], dest)
    assert stat.S_IMODE(os.stat(dest).st_mode) == 0o700

    again = s3.fetch(dest, targets, settings())
    assert not again["changed"] and again["downloaded_bytes"] == 0
    assert [(e["target"], e["outcome"]) for e in again["tried"]] == [("eu", "present")]

    older = s3.fetch(dest, targets, settings(), backup_name=backups[0]["name"])
    assert older["changed"] and older["name"] == backups[0]["name"]


def test_corrupted_newest_falls_back_to_the_same_backup_on_the_next_target(two_regions, moto, tmp_path):
    backups, targets = two_regions
    bad_key = "dr/daily/" + backups[-1]["name"]
    corrupt_object(moto.url, targets[0]["bucket"], bad_key, "eu-west-1")
    dest = str(tmp_path / "restore")
    res = s3.fetch(dest, targets, settings())
    assert res["target"] == "us" and res["key"] == bad_key
    assert [(e["target"], e["key"], e["outcome"]) for e in res["tried"]] == [
        ("eu", bad_key, "corrupt"), ("us", bad_key, "fetched")]
    assert any("corrupted object s3://%s/%s" % (targets[0]["bucket"], bad_key) in w for w in res["warnings"])
    assert_fetched(res, backups[-1], dest)


def test_target_order_tries_older_backups_on_the_same_target_first(two_regions, moto, tmp_path):
    backups, targets = two_regions
    corrupt_object(moto.url, targets[0]["bucket"], "dr/daily/" + backups[-1]["name"], "eu-west-1")
    dest = str(tmp_path / "restore")
    res = s3.fetch(dest, targets, settings(), selection="target_order")
    assert res["target"] == "eu" and res["name"] == backups[-2]["name"]
    assert [e["outcome"] for e in res["tried"]] == ["corrupt", "fetched"]
    assert_fetched(res, backups[-2], dest)


def test_unreachable_first_target_is_skipped_with_a_warning(two_regions, tmp_path):
    backups, targets = two_regions
    down = target(dead_endpoint(), targets[0]["bucket"], "eu-west-1", "down")
    dest = str(tmp_path / "restore")
    res = s3.fetch(dest, [down, targets[1]], settings())
    assert res["target"] == "us"
    assert res["tried"][0]["target"] == "down" and res["tried"][0]["outcome"] == "unreachable"
    assert any(w.startswith("target down ") and "skipped" in w for w in res["warnings"])
    assert_fetched(res, backups[-1], dest)


def test_throttling_and_a_broken_download_are_retried_and_resumed(two_regions, moto, fault_proxy, tmp_path):
    backups, targets = two_regions
    proxy = fault_proxy(moto, Rule("slowdown", count=2),
                        Rule("reset_response", method="GET", path=r"\.dump$", count=1))
    flaky = dict(targets[0], endpoint_url=proxy.url)
    dest = str(tmp_path / "restore")
    res = s3.fetch(dest, [flaky], settings())
    assert res["target"] == "eu"
    assert len(proxy.actions("slowdown")) == 2 and len(proxy.actions("reset_response")) == 1
    dump_gets = [a for a in proxy.actions() if a[0] == "GET" and a[1].endswith(backups[-1]["name"])]
    assert len(dump_gets) == 2  # the broken one, then one resumed request
    ranges = [h.get("range") for m, p, h in proxy.requests if m == "GET" and p.endswith(backups[-1]["name"])]
    assert ranges[0] is None and ranges[1].startswith("bytes=") and int(ranges[1][6:-1]) > 0, ranges
    assert_fetched(res, backups[-1], dest)


def test_check_mode_downloads_nothing(two_regions, tmp_path):
    backups, targets = two_regions
    dest = str(tmp_path / "restore")
    res = s3.fetch(dest, targets, settings(check_mode=True))
    assert res["changed"] and res["downloaded_bytes"] == 0
    assert res["key"] == "dr/daily/" + backups[-1]["name"] and res["target"] == "eu"
    assert [e["outcome"] for e in res["tried"]] == ["would_fetch"]
    assert not os.path.exists(dest)


def test_every_copy_corrupted_fails_and_leaves_nothing(moto, moto2, backup_dir, tmp_path):
    b = make_backup(backup_dir, 1, size=30_000)
    eu = create_bucket(moto.url, "eu-west-1")
    us = create_bucket(moto2.url, "us-east-1")
    targets = [target(moto.url, eu, "eu-west-1", "eu"), target(moto2.url, us, "us-east-1", "us")]
    assert s3.replicate(backup_dir, targets, settings())["ok"]
    corrupt_object(moto.url, eu, "dr/daily/" + b["name"], "eu-west-1")
    corrupt_object(moto2.url, us, "dr/daily/" + b["name"])
    dest = tmp_path / "restore"
    with pytest.raises(s3.FetchError, match="no backup could be fetched") as info:
        s3.fetch(str(dest), targets, settings())
    assert [e["outcome"] for e in info.value.result["tried"]] == ["corrupt", "corrupt"]
    assert os.listdir(dest) == []


def test_manifest_without_dump_or_with_wrong_metadata_is_skipped(moto, backup_dir, tmp_path):
    old = make_backup(backup_dir, 1, size=1000)
    bucket = create_bucket(moto.url, "us-east-1")
    t = [target(moto.url, bucket)]
    assert s3.replicate(backup_dir, t, settings())["ok"]
    client = s3_client(moto.url)
    # a newer manifest whose dump never arrived, and one whose dump has another sha256 in its metadata
    for hour, dump_meta in ((9, None), (8, "f" * 64)):
        b = make_backup(str(tmp_path), hour, size=1000)
        with open(b["manifest_path"], "rb") as fh:
            client.put_object(Bucket=bucket, Key="dr/daily/" + b["name"] + ".manifest.json", Body=fh.read())
        if dump_meta:
            with open(b["path"], "rb") as fh:
                client.put_object(Bucket=bucket, Key="dr/daily/" + b["name"], Body=fh.read(),
                                  Metadata={"sha256": dump_meta})
    # and a manifest that is not JSON
    client.put_object(Bucket=bucket, Key="dr/daily/baileys-auth-20260201T000000Z.dump.manifest.json",
                      Body=b"{nope")
    dest = str(tmp_path / "restore")
    res = s3.fetch(dest, t, settings())
    assert res["name"] == old["name"]
    assert [e["outcome"] for e in res["tried"]] == ["invalid", "invalid", "fetched"]
    assert "manifest without dump" in res["tried"][0]["error"]
    assert "sha256 metadata" in res["tried"][1]["error"]
    assert any("unparsable" in w for w in res["warnings"])
    assert_fetched(res, old, dest)
    with open(res["manifest_path"]) as fh:
        assert json.load(fh)["file"] == old["name"]
