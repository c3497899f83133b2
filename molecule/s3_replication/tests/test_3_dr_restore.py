"""Verify of the s3_replication scenario, part 3: disaster recovery from S3 onto a fresh PostgreSQL 18 server.

Runs ``ansible-playbook playbooks/dr_restore.yml`` on the controller against molecule's inventory, targeting
the app host, with ``dr_restore_target_host`` the empty second server; then counts the rows there.
"""

import json
import os
import subprocess
import time

import pytest
from scenario import APP, APP_NAME, BACKUP_DIR, DR_HOST, PG_PASSWORD, PROJECT, SEED, dumps, manifest, psql

testinfra_hosts = [APP]
RESTORE_DB = "whatsapp"  # dr_restore.yml's default dr_restore_db


def _dr_restore():
    inventory = os.path.join(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"], "inventory")
    extra = {"baileys_target": APP_NAME, "dr_restore_target_host": DR_HOST, "dr_restore_target_password": PG_PASSWORD}
    cmd = ["ansible-playbook", "-i", inventory, str(PROJECT / "playbooks" / "dr_restore.yml"), "-e", json.dumps(extra)]
    started = time.monotonic()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=str(PROJECT),
                          env=dict(os.environ, ANSIBLE_FORCE_COLOR="false", ANSIBLE_STDOUT_CALLBACK="default",
                                   ANSIBLE_CALLBACK_RESULT_FORMAT="yaml"), check=False)
    print("$ %s\n%s\n(%.1fs)" % (" ".join(cmd[:4]), proc.stdout, time.monotonic() - started))
    return proc


@pytest.fixture(scope="module")
def dr_run(host):
    assert psql(host, DR_HOST, "postgres", "SELECT count(*) FROM pg_database WHERE datname = '%s'" % RESTORE_DB) \
        == [["0"]], "the DR server is not fresh"
    proc = _dr_restore()
    assert proc.returncode == 0, proc.stdout
    return proc


def test_dr_restore_counts_match_manifest(host, dr_run):
    newest = dumps(host)[-1]
    m = manifest(host, "%s/%s" % (BACKUP_DIR, newest))
    rows = psql(host, DR_HOST, RESTORE_DB,
                "SELECT (SELECT count(*) FROM whatsapp_auth), (SELECT count(*) FROM whatsapp_keys), "
                "(SELECT count(DISTINCT company_id) FROM whatsapp_keys)")
    assert rows == [["1", "1650", "1"]], rows
    assert {"auth": int(rows[0][0]), "keys": int(rows[0][1])} == m["counts"] == SEED["counts"]
    assert "recovery_seconds" in dr_run.stdout and newest in dr_run.stdout, dr_run.stdout


def test_dr_restore_fetched_verified_copy(host, dr_run):
    newest = dumps(host)[-1]
    f = host.file("%s/dr/%s" % (BACKUP_DIR, newest))
    assert f.is_file and f.mode == 0o600
    assert host.file("%s/dr/%s.manifest.json" % (BACKUP_DIR, newest)).is_file


def test_dr_restore_second_run_changes_nothing(host, dr_run):
    proc = _dr_restore()
    assert proc.returncode == 0, proc.stdout
    assert "already restored" in proc.stdout, proc.stdout
