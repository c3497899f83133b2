"""s3_replicate and s3_fetch run through Ansible (ansible-playbook), against moto standalone servers."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

from support import ROOT
from support.s3fixtures import (
    TEST_ACCESS_KEY,
    TEST_SECRET_KEY,
    create_bucket,
    dead_endpoint,
    list_keys,
    make_backup,
    make_backups,
)


PLAYBOOK = """\
- name: S3 replication and DR fetch
  hosts: localhost
  gather_facts: false
  connection: local
  tasks:
    - name: Replicate (check mode)
      baileys.resilience.s3_replicate:
        backup_dir: "{{ backup_dir }}"
        targets: "{{ targets }}"
        retry_delay: 0.01
        botocore_max_attempts: 1
        multipart_threshold: 5MiB
        multipart_chunksize: 5MiB
      check_mode: true

    - name: Replicate
      baileys.resilience.s3_replicate:
        backup_dir: "{{ backup_dir }}"
        targets: "{{ targets }}"
        retry_delay: 0.01
        multipart_threshold: 5MiB
        multipart_chunksize: 5MiB

    - name: Replicate again
      baileys.resilience.s3_replicate:
        backup_dir: "{{ backup_dir }}"
        targets: "{{ targets }}"

    - name: Replicate with one target down
      baileys.resilience.s3_replicate:
        backup_dir: "{{ backup_dir }}"
        targets: "{{ targets + [down] }}"
        retries: 2
        retry_delay: 0.01
        botocore_max_attempts: 1
      ignore_errors: true

    - name: Fetch (check mode)
      baileys.resilience.s3_fetch:
        dest_dir: "{{ dest_dir }}"
        targets: "{{ [down] + targets }}"
        retries: 2
        retry_delay: 0.01
        botocore_max_attempts: 1
      check_mode: true

    - name: Fetch
      baileys.resilience.s3_fetch:
        dest_dir: "{{ dest_dir }}"
        targets: "{{ [down] + targets }}"
        retries: 2
        retry_delay: 0.01
        botocore_max_attempts: 1

    - name: Fetch a backup that does not exist
      baileys.resilience.s3_fetch:
        dest_dir: "{{ dest_dir }}"
        targets: "{{ targets }}"
        backup_name: baileys-auth-20300101T000000Z.dump
      ignore_errors: true
"""


def run_playbook(env, tmp_path, extra_vars, *args):
    varfile = tmp_path / "vars.json"
    varfile.write_text(json.dumps(extra_vars))
    os.chmod(varfile, 0o600)
    book = tmp_path / "s3.yml"
    book.write_text(PLAYBOOK)
    proc = subprocess.run(
        ["ansible-playbook", "-i", "localhost,", str(book), "-e", "@%s" % varfile, *args],
        capture_output=True, text=True, cwd=ROOT,
        env=dict(env, ANSIBLE_STDOUT_CALLBACK="json", AWS_EC2_METADATA_DISABLED="true",
                 AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none")),
        check=False,
    )
    out = json.loads(proc.stdout[proc.stdout.index("{"):])
    tasks = {t["task"]["name"]: t["hosts"]["localhost"] for t in out["plays"][0]["tasks"]}
    return proc.returncode, tasks, proc.stdout + proc.stderr


def test_modules_through_ansible(ansible_env, moto, moto2, backup_dir, tmp_path):
    env = {k: v for k, v in ansible_env.items() if not k.startswith("AWS_")}
    backups = make_backups(backup_dir, 2, size=30_000)
    backups.append(make_backup(backup_dir, 7, size=6 * 1024 * 1024))
    eu = create_bucket(moto.url, "eu-west-1")
    us = create_bucket(moto2.url, "us-east-1")
    creds = {"access_key": TEST_ACCESS_KEY, "secret_key": TEST_SECRET_KEY}  # as module options, from a vars file
    targets = [dict(name="eu", bucket=eu, region="eu-west-1", endpoint_url=moto.url, prefix="wa", **creds),
               dict(name="us", bucket=us, region="us-east-1", endpoint_url=moto2.url, prefix="wa",
                    sse="AES256", **creds)]
    down = dict(name="down", bucket="gone", region="eu-west-1", endpoint_url=dead_endpoint(), **creds)
    dest = tmp_path / "restore"
    rc, tasks, out = run_playbook(env, tmp_path, {
        "ansible_python_interpreter": sys.executable, "backup_dir": backup_dir, "targets": targets, "down": down,
        "dest_dir": str(dest)})
    assert rc == 0, out
    assert TEST_SECRET_KEY not in out  # no_log

    check = tasks["Replicate (check mode)"]
    assert check["changed"] and check["uploaded"] == 0
    assert [len(t["would_upload"]) for t in check["targets"]] == [6, 6]

    made = tasks["Replicate"]
    assert made["changed"] and made["uploaded"] == 12 and made["failures"] == [] and not made.get("failed")
    assert set(list_keys(moto.url, eu, "eu-west-1")) == {"wa/daily/" + b["name"] + s for b in backups
                                                         for s in ("", ".manifest.json")}
    assert len(list_keys(moto2.url, us)) == 6

    again = tasks["Replicate again"]
    assert not again["changed"] and again["uploaded"] == 0
    assert [t["verified_present"] for t in again["targets"]] == [6, 6]

    partial = tasks["Replicate with one target down"]
    assert partial["failed"] and not partial["changed"]
    assert partial["msg"].startswith("S3 replication incomplete") and "down" in partial["msg"]
    assert "baileys-auth-20260101T070000Z.dump" in partial["msg"]
    assert {f["target"] for f in partial["failures"]} == {"down"} and len(partial["failures"]) == 6
    assert [t["status"] for t in partial["targets"]] == ["ok", "ok", "unreachable"]

    would = tasks["Fetch (check mode)"]
    assert would["changed"] and would["target"] == "eu" and would["key"] == "wa/daily/" + backups[-1]["name"]
    assert [e["outcome"] for e in would["tried"]] == ["unreachable", "would_fetch"]
    assert any("target down" in w for w in would["warnings_list"])

    fetched = tasks["Fetch"]
    assert fetched["changed"] and fetched["target"] == "eu"
    assert fetched["path"] == str(dest / backups[-1]["name"])
    with open(fetched["path"], "rb") as fh:
        assert hashlib.sha256(fh.read()).hexdigest() == backups[-1]["sha256"]
    assert oct(os.stat(fetched["path"]).st_mode & 0o777) == "0o600"
    assert fetched["manifest"] == backups[-1]["manifest"]

    missing = tasks["Fetch a backup that does not exist"]
    assert missing["failed"] and "no backup baileys-auth-20300101T000000Z.dump could be fetched" in missing["msg"]
