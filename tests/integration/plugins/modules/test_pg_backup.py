"""pg_backup and backup_verify run through Ansible (ansible-playbook), not only as Python functions."""
from __future__ import annotations

import json
import os
import subprocess

from ansible_collections.baileys.resilience.plugins.module_utils import backup

from support import ROOT
from support.authgen import REFERENCE_MIX, generate, load_into


MIX = {k: max(2, v // 50) for k, v in REFERENCE_MIX.items()}

PLAYBOOK = """\
- name: Backup and restore test
  hosts: localhost
  gather_facts: false
  connection: local
  vars:
    conn: &conn
      login_host: "{{ db_host }}"
      login_port: "{{ db_port }}"
      login_user: "{{ db_user }}"
      login_password: "{{ db_password }}"
  tasks:
    - name: Backup (check mode)
      baileys.resilience.pg_backup:
        <<: *conn
        login_db: "{{ db_name }}"
        backup_dir: "{{ backup_dir }}"
      check_mode: true

    - name: Backup
      baileys.resilience.pg_backup:
        <<: *conn
        login_db: "{{ db_name }}"
        backup_dir: "{{ backup_dir }}"
        keep_daily: 3

    - name: Backup again the same day
      baileys.resilience.pg_backup:
        <<: *conn
        login_db: "{{ db_name }}"
        backup_dir: "{{ backup_dir }}"

    - name: Verify (check mode)
      baileys.resilience.backup_verify:
        backup_dir: "{{ backup_dir }}"
      check_mode: true

    - name: Verify
      baileys.resilience.backup_verify:
        <<: *conn
        login_db: postgres
        backup_dir: "{{ backup_dir }}"

    - name: Backup with a wrong password
      baileys.resilience.pg_backup:
        <<: *conn
        login_password: "{{ db_password }}-wrong"
        login_db: "{{ db_name }}"
        backup_dir: "{{ backup_dir }}"
      ignore_errors: true

    - name: Verify a missing backup
      baileys.resilience.backup_verify:
        <<: *conn
        backup_file: "{{ backup_dir }}/nothing.dump"
      ignore_errors: true
"""


def run_playbook(env, tmp_path, extra_vars, *args):
    varfile = tmp_path / "vars.json"
    varfile.write_text(json.dumps(extra_vars))
    os.chmod(varfile, 0o600)
    book = tmp_path / "backup.yml"
    book.write_text(PLAYBOOK)
    proc = subprocess.run(
        ["ansible-playbook", "-i", os.path.join(ROOT, "inventories", "demo", "hosts.yml"), str(book),
         "-e", "@%s" % varfile, *args],
        capture_output=True, text=True, env=dict(env, ANSIBLE_STDOUT_CALLBACK="json"), cwd=ROOT,
        check=False,
    )
    out = json.loads(proc.stdout[proc.stdout.index("{"):])
    tasks = {t["task"]["name"]: t["hosts"]["localhost"] for t in out["plays"][0]["tasks"]}
    return proc.returncode, tasks, proc.stdout + proc.stderr


def test_modules_through_ansible(ansible_env, db, dbconn, tmp_path):
    load_into(dbconn, generate(1, seed=9, mix=MIX))
    bdir = tmp_path / "backups"
    v = {"db_host": db["login_host"], "db_port": db["login_port"], "db_user": db["login_user"],
         "db_password": db["login_password"], "db_name": db["login_db"], "backup_dir": str(bdir)}
    rc, tasks, out = run_playbook(ansible_env, tmp_path, v)
    assert rc == 0, out
    assert db["login_password"] not in out  # no_log, and no secret in any message

    check = tasks["Backup (check mode)"]
    assert check["changed"] and check["manifest"] is None and check["backup"].startswith(str(bdir) + "/")
    assert check["deleted"] == []

    made = tasks["Backup"]
    assert made["changed"] and not made["up_to_date"], made
    manifest = made["manifest"]
    assert manifest["counts"] == {"auth": 1, "keys": sum(MIX.values())}
    assert manifest["validated"] == {"restore_list": True, "row_counts": True}
    [entry] = backup.list_backups(str(bdir), verify_checksum=True)
    assert entry["valid"] and entry["path"] == made["backup"] and entry["manifest"] == manifest

    again = tasks["Backup again the same day"]
    assert not again["changed"] and again["up_to_date"] and again["backup"] == made["backup"]

    quick = tasks["Verify (check mode)"]
    assert not quick["changed"] and quick["ok"] and not quick["restored"] and quick["restore_seconds"] is None
    assert quick["backup_file"] == made["backup"]

    verified = tasks["Verify"]
    assert verified["ok"] and verified["restored"] and verified["dropped"] and not verified["changed"]
    assert verified["counts"] == manifest["counts"] and verified["restore_seconds"] > 0
    assert verified["backup"] == made["backup"]

    wrong = tasks["Backup with a wrong password"]
    assert wrong["failed"] and "cannot connect" in wrong["msg"]
    missing = tasks["Verify a missing backup"]
    assert missing["failed"] and "no manifest" in missing["msg"] and missing["ok"] is False
    assert len(os.listdir(bdir)) == 2
