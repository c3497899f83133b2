"""The host tool's S3 jobs: backup chained to replication, catch-up replicate, fetch (real moto endpoint)."""
from __future__ import annotations

import hashlib
import json
import os

from support import authgen
from support.s3fixtures import TEST_ACCESS_KEY, TEST_SECRET_KEY, create_bucket, dead_endpoint, list_keys

from .test_cli import MIX, log_lines, run_host, write_config


def creds_file(path):
    path.write_text("[default]\naws_access_key_id = %s\naws_secret_access_key = %s\n"
                    % (TEST_ACCESS_KEY, TEST_SECRET_KEY))
    os.chmod(path, 0o600)
    return str(path)


def test_backup_is_replicated_then_catch_up_is_a_noop_and_fetch_verifies(host_pkg, db, dbconn, tmp_path, moto,
                                                                         moto2):
    authgen.load_into(dbconn, authgen.generate(1, seed=5, form="mixed", mix=MIX))
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
    config = write_config(tmp_path / "config.yml", db, backup_dir=str(backups), lock_dir=str(tmp_path),
                          s3={"targets": targets, "fetch_dir": str(tmp_path / "dr")})

    proc = run_host(host_pkg, ["--config", config, "backup", "--json"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["replication"]["ok"] and result["replication"]["uploaded"] == 4
    steps = [line["step"] for line in log_lines(proc.stderr)]
    assert steps.index("backup") < steps.index("replicate")
    name = os.path.basename(result["backup"])
    kind = result["manifest"]["kind"]  # the first backup of a month is the monthly one
    assert kind in ("daily", "monthly")
    for url, bucket, region in ((moto.url, eu, "eu-west-1"), (moto2.url, us, "us-east-1")):
        keys = list_keys(url, bucket, region)
        assert set(keys) == {"wa/%s/%s" % (kind, name), "wa/%s/%s.manifest.json" % (kind, name)}
    assert TEST_SECRET_KEY not in proc.stdout + proc.stderr

    proc = run_host(host_pkg, ["--config", config, "replicate", "--json"])
    assert proc.returncode == 0 and json.loads(proc.stdout)["uploaded"] == 0

    proc = run_host(host_pkg, ["--config", config, "fetch", "--json"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    fetched = json.loads(proc.stdout)
    assert fetched["target"] == "eu" and os.path.basename(fetched["path"]) == name
    with open(fetched["path"], "rb") as fh:
        assert hashlib.sha256(fh.read()).hexdigest() == result["manifest"]["sha256"]


def test_replication_failure_fails_the_backup_job_naming_the_target(host_pkg, db, dbconn, tmp_path, moto):
    authgen.load_into(dbconn, authgen.generate(1, seed=6, form="base64", mix=MIX))
    eu = create_bucket(moto.url, "eu-west-1")
    cred = creds_file(tmp_path / "s3.credentials")
    targets = [
        {"name": "eu", "bucket": eu, "region": "eu-west-1", "endpoint_url": moto.url, "credentials_file": cred},
        {"name": "down", "bucket": "gone", "region": "us-east-1", "endpoint_url": dead_endpoint(),
         "credentials_file": cred},
    ]
    config = write_config(tmp_path / "config.yml", db, backup_dir=str(tmp_path / "b"), lock_dir=str(tmp_path),
                          s3={"targets": targets, "settings": {"retries": 2, "retry_delay": 0.05,
                                                               "connect_timeout": 2}})
    proc = run_host(host_pkg, ["--config", config, "backup"])
    assert proc.returncode == 1
    assert "down" in proc.stdout and "replicate" in proc.stderr
    # the backup itself is kept (it is valid) and the reachable target got it
    assert len([n for n in os.listdir(tmp_path / "b") if n.endswith(".dump")]) == 1
    assert len(list_keys(moto.url, eu, "eu-west-1")) == 2
