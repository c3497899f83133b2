"""Verify of the s3_replication scenario, part 3: disaster recovery from the age-encrypted S3 copies onto a fresh
PostgreSQL 18 server, and the plaintext path (no recipients) kept tested.

Runs ``ansible-playbook playbooks/dr_restore.yml`` on the controller against molecule's inventory, targeting
the app host, with ``dr_restore_target_host`` the empty second server and ``dr_restore_identity_file`` the
operator's identity, brought to the app host for the restore (0600) and removed after it, as docs/runbook.md says;
then counts the rows there. A wrong identity fails naming the recipients' fingerprints and leaves no file.
"""

import json
import os
import shlex
import subprocess
import time

import pytest
from pyrage import x25519
from scenario import (APP, APP_NAME, BACKUP_DIR, CONFIG_DIR, DR_HOST, IDENTITY_FILE, PG_PASSWORD, PLAIN_BUCKET,
                      PROJECT, RECIPIENT, SEED, TARGETS, TOOL, dumps, fingerprint, manifest, psql, put_file, run,
                      s3_client, sha256)

testinfra_hosts = [APP]
RESTORE_DB = "whatsapp"  # dr_restore.yml's default dr_restore_db
HOST_IDENTITY = "/root/baileys-dr-age.key"  # where the operator puts the identity for the restore


def _dr_restore(**extra_vars):
    inventory = os.path.join(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"], "inventory")
    extra = {"baileys_target": APP_NAME, "dr_restore_target_host": DR_HOST, "dr_restore_target_password": PG_PASSWORD}
    extra.update(extra_vars)
    cmd = ["ansible-playbook", "-i", inventory, str(PROJECT / "playbooks" / "dr_restore.yml"), "-e", json.dumps(extra)]
    started = time.monotonic()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=str(PROJECT),
                          env=dict(os.environ, ANSIBLE_FORCE_COLOR="false", ANSIBLE_STDOUT_CALLBACK="default",
                                   ANSIBLE_CALLBACK_RESULT_FORMAT="yaml"), check=False)
    print("$ %s\n%s\n(%.1fs)" % (" ".join(cmd[:4]), proc.stdout, time.monotonic() - started))
    return proc


@pytest.fixture(scope="module")
def identity_on_host(host):
    """The operator brings the identity for the restore (0600) and removes it afterwards."""
    put_file(APP_NAME, HOST_IDENTITY, IDENTITY_FILE.read_text())
    f = host.file(HOST_IDENTITY)
    assert f.mode == 0o600 and f.user == "root"
    yield HOST_IDENTITY
    run(host, "shred -u %s" % HOST_IDENTITY)
    assert not host.file(HOST_IDENTITY).exists


@pytest.fixture(scope="module")
def dr_run(host, identity_on_host):
    assert psql(host, DR_HOST, "postgres", "SELECT count(*) FROM pg_database WHERE datname = '%s'" % RESTORE_DB) \
        == [["0"]], "the DR server is not fresh"
    proc = _dr_restore(dr_restore_identity_file=identity_on_host)
    assert proc.returncode == 0, proc.stdout
    return proc


def test_wrong_identity_fails_naming_the_fingerprints(host):
    """A fetch with an identity the backups were not encrypted to: a clear error naming the recipients'
    fingerprints (and the identity's), no file left, the identity itself never printed."""
    stranger = x25519.Identity.generate()
    path = "/root/baileys-wrong-age.key"
    dest = BACKUP_DIR + "/dr-wrong"
    put_file(APP_NAME, path, "%s\n" % stranger)
    try:
        result = host.run("%s fetch --dest %s --identity-file %s" % (TOOL, dest, path))
    finally:
        run(host, "shred -u %s" % path)
    out = result.stdout + result.stderr
    assert result.rc != 0, out
    assert fingerprint(RECIPIENT) in out, out
    assert fingerprint(str(stranger.to_public())) in out, out
    assert str(stranger) not in out
    left = host.run("find %s -type f 2>/dev/null" % dest).stdout.strip()
    assert left == "", left


def test_dr_restore_counts_match_manifest(host, dr_run):
    newest = dumps(host)[-1]
    m = manifest(host, "%s/%s" % (BACKUP_DIR, newest))
    rows = psql(host, DR_HOST, RESTORE_DB,
                "SELECT (SELECT count(*) FROM whatsapp_auth), (SELECT count(*) FROM whatsapp_keys), "
                "(SELECT count(DISTINCT company_id) FROM whatsapp_keys)")
    assert rows == [["1", "1650", "1"]], rows
    assert {"auth": int(rows[0][0]), "keys": int(rows[0][1])} == m["counts"] == SEED["counts"]
    assert "recovery_seconds" in dr_run.stdout and newest in dr_run.stdout, dr_run.stdout


def test_dr_restore_decrypted_the_same_bytes(host, dr_run):
    """The decrypting fetch writes byte for byte the backup that was sealed: dump and manifest (0600)."""
    newest = dumps(host)[-1]
    fetched = "%s/dr/%s" % (BACKUP_DIR, newest)
    f = host.file(fetched)
    assert f.is_file and f.mode == 0o600
    assert sha256(host, fetched) == sha256(host, "%s/%s" % (BACKUP_DIR, newest))
    assert sha256(host, fetched + ".manifest.json") == sha256(host, "%s/%s.manifest.json" % (BACKUP_DIR, newest))
    assert str(IDENTITY_FILE.read_text().split()[-1]) not in dr_run.stdout


def test_dr_restore_second_run_changes_nothing(host, dr_run, identity_on_host):
    proc = _dr_restore(dr_restore_identity_file=identity_on_host)
    assert proc.returncode == 0, proc.stdout
    assert "already restored" in proc.stdout, proc.stdout


def test_plaintext_path_without_recipients(host):
    """One replicate and one fetch with the same config but no recipients, to a bucket of its own: plaintext
    objects (the control for the marker check of part 2), fetched back byte-identical."""
    s3_client(TARGETS[0]["region"]).create_bucket(
        Bucket=PLAIN_BUCKET, CreateBucketConfiguration={"LocationConstraint": TARGETS[0]["region"]})
    cfg_dir = "/tmp/baileys-plain"
    fragment = "%s/config.d/s3_replication.yml" % CONFIG_DIR
    # the installed config and fragments, the s3 fragment rewritten: one target, its own bucket, no recipients
    script = (
        "import sys, yaml; d = yaml.safe_load(open(sys.argv[1])); s = d['s3']; "
        "s['targets'] = [dict(s['targets'][0], name='plain', bucket=sys.argv[2])]; s['encryption'] = {}; "
        "yaml.safe_dump(d, open(sys.argv[3], 'w'))")
    python = "/opt/baileys-resilience/venv/bin/python"
    run(host, "rm -rf {d} && umask 077 && mkdir -p {d} && cp -a {c}/config.yml {c}/config.d {d}/ && "
              "{py} -c {s} {f} {b} {d}/config.d/s3_replication.yml".format(
                  d=cfg_dir, c=CONFIG_DIR, py=python, s=shlex.quote(script), f=fragment, b=PLAIN_BUCKET))
    try:
        rep = host.run("%s replicate --config %s/config.yml" % (TOOL, cfg_dir))
        assert rep.rc == 0, rep.stdout + rep.stderr
        fetch = host.run("%s fetch --config %s/config.yml --dest %s/fetched" % (TOOL, cfg_dir, cfg_dir))
        assert fetch.rc == 0, fetch.stdout + fetch.stderr
        newest = dumps(host)[-1]
        assert sha256(host, "%s/fetched/%s" % (cfg_dir, newest)) == sha256(host, "%s/%s" % (BACKUP_DIR, newest))
        client = s3_client(TARGETS[0]["region"])
        key = "%s%s/%s" % (TARGETS[0]["prefix"], manifest(host, "%s/%s" % (BACKUP_DIR, newest)).get("kind", "daily"),
                           newest)
        body = client.get_object(Bucket=PLAIN_BUCKET, Key=key)["Body"].read()
        assert body.startswith(b"PGDMP"), body[:20]  # plaintext, as before encryption existed
    finally:
        run(host, "rm -rf %s" % cfg_dir)
