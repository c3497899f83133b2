"""An emergency rollback whose source is S3: the database down (the failover role points at a closed port), the
local backups absent or invalid, the newest verified backup fetched from the moto S3 server.

The backup is made by the backup code (as the cron job) while the database is up and replicated to S3 by the
replication code; an export from the database taken at the same moment (export_auth_state.yml) is the reference:
the session files the rollback writes from the S3 backup must be identical to it (the per-company manifests differ
only by their source and snapshot time, their per-file entries are compared without mtimes).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from ansible_collections.baileys.resilience.plugins.module_utils import backup, s3replicate
from ansible_collections.baileys.resilience.plugins.module_utils import baileys_codec as codec
from support import ROOT
from support.authgen import REFERENCE_MIX, generate, load_into
from support.s3fixtures import TEST_ACCESS_KEY, TEST_SECRET_KEY, create_bucket, free_port

MIX = {k: max(2, v // 40) for k, v in REFERENCE_MIX.items()}
INVENTORY = os.path.join(ROOT, "inventories", "demo", "hosts.yml")


def run(env, book, extra, work, *args):
    varfile = work / ("vars-%d.json" % len(os.listdir(work)))
    varfile.write_text(json.dumps(extra))
    os.chmod(varfile, 0o600)
    proc = subprocess.run(["ansible-playbook", "-i", INVENTORY, os.path.join(ROOT, "playbooks", book),
                           "-e", "@%s" % varfile, *args],
                          capture_output=True, text=True, env=dict(env, ANSIBLE_STDOUT_CALLBACK="json"), cwd=ROOT,
                          check=False)
    out = json.loads(proc.stdout[proc.stdout.index("{"):])
    results = {}
    for play in out["plays"]:
        for t in play["tasks"]:
            results[t["task"]["name"].split(" : ", 1)[-1]] = t["hosts"].get("localhost", {})
    return proc.returncode, results, proc.stdout + proc.stderr


def tree(root):
    """{relative path: bytes} of every session file but the per-company manifests."""
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            if name != codec.MANIFEST_FILE:
                path = os.path.join(dirpath, name)
                with open(path, "rb") as fh:
                    out[os.path.relpath(path, root)] = fh.read()
    return out


def manifest_files(root):
    out = {}
    for company in sorted(os.listdir(root)):
        with open(os.path.join(root, company, codec.MANIFEST_FILE)) as fh:
            m = json.load(fh)
        out[company] = (m["counts"], {f: {k: v for k, v in e.items() if k != "mtime_ns"}
                                      for f, e in m["files"].items()})
    return out


@pytest.mark.parametrize("local", ["absent", "invalid"])
def test_rollback_takes_the_s3_backup_when_the_database_and_local_backups_fail(
        ansible_env, pg, db, dbconn, moto, tmp_path, local):
    load_into(dbconn, generate(3, seed=71, form="mixed", mix=MIX))
    work = tmp_path / "work"
    work.mkdir()

    # the reference: an export from the database, then the backup of the same state, replicated to S3
    reference = tmp_path / "reference"
    rc, res, out = run(ansible_env, "export_auth_state.yml", {
        "baileys_db_host": db["login_host"], "baileys_db_port": db["login_port"], "baileys_db_user": db["login_user"],
        "baileys_db_password": db["login_password"], "baileys_db_name": db["login_db"],
        "baileys_sessions_dir": str(reference)}, work)
    assert rc == 0, out
    made_dir = tmp_path / "made"
    made = backup.run_backup(db, {}, str(made_dir), pg_bin_dir=pg.bindir)
    region = "eu-west-1"
    bucket = create_bucket(moto.url, region)
    # as in inventories/production: failover_s3_targets are the s3_replication role's targets, with its
    # role-only key configure_bucket
    target = {"name": "eu", "bucket": bucket, "region": region, "endpoint_url": moto.url, "prefix": "prod/",
              "access_key": TEST_ACCESS_KEY, "secret_key": TEST_SECRET_KEY}
    rep = s3replicate.replicate(str(made_dir), [target])
    assert rep["ok"] and rep["uploaded"] >= 1, rep

    # the local backup directory: absent, or holding only a damaged copy of the backup
    local_dir = tmp_path / "local-backups"
    if local == "invalid":
        shutil.copytree(made_dir, local_dir)
        dump = local_dir / os.path.basename(made["backup"])
        data = bytearray(dump.read_bytes())
        data[len(data) // 2] ^= 0xFF
        dump.write_bytes(bytes(data))

    app = tmp_path / "app"
    app.mkdir()
    env_file = app / "app.env"
    env_file.write_text("USE_REPOSITORY_PATTERN=true\nPGPASSWORD=env-secret\n")
    os.chmod(env_file, 0o600)
    sessions = app / "sessions"
    download = tmp_path / "dr"
    v = {
        "failover_sessions_dir": str(sessions), "failover_env_file": str(env_file),
        # the database is down: nothing listens on this port
        "failover_db_host": "127.0.0.1", "failover_db_port": free_port(), "failover_db_user": db["login_user"],
        "failover_db_password": db["login_password"], "failover_db_name": db["login_db"],
        "failover_db_connect_params": {"connect_timeout": 3},
        "failover_backup_dir": str(local_dir), "failover_pg_bin_dir": pg.bindir,
        "failover_s3_targets": [dict(target, configure_bucket=True)], "failover_s3_download_dir": str(download),
        "failover_service_manager": "none", "failover_health_type": "command", "failover_health_command": "true",
    }
    env = dict(ansible_env, AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=str(tmp_path / "no-aws-config"),
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "no-aws-credentials"))

    # --check: says it would take the S3 backup, writes nothing under the sessions directory
    rc, res, out = run(env, "emergency_rollback.yml", v, work, "--check", "--diff")
    assert rc == 0, out
    assert not sessions.exists() and "USE_REPOSITORY_PATTERN=true" in env_file.read_text()

    rc, res, out = run(env, "emergency_rollback.yml", v, work)
    assert rc == 0, out
    report = res["Rollback | report"]["failover_rollback_report"]
    assert report["source"] == "s3", report
    assert "no valid local backup" in report["reason"] and "eu" in report["reason"], report
    name = os.path.basename(made["backup"])
    assert report["backup_file"] == str(download / name), report
    if local == "invalid":
        local_res = res["Source | look for the newest valid local backup"]
        assert not local_res.get("backup_file"), local_res
    assert int(report["companies"]) == 3

    # the files from the S3 backup are the export from the database, byte for byte
    assert sorted(os.listdir(sessions)) == sorted(os.listdir(reference))
    a, b = tree(reference), tree(sessions)
    assert len(a) == 3 * (sum(MIX.values()) + 1)
    assert sorted(a) == sorted(b) and [k for k in a if a[k] != b[k]] == []
    assert manifest_files(reference) == manifest_files(sessions)
    state = json.loads((app / ".baileys-resilience-failover.json").read_text())
    assert state["mode"] == "files" and state["source"]["kind"] == "s3", state
    assert state["source"]["sha256"] == made["manifest"]["sha256"], state["source"]
    assert "USE_REPOSITORY_PATTERN=false" in env_file.read_text()
