"""``encrypt_local`` through ansible-playbook: pg_backup's ``encryption`` option keeps the backup only as age
ciphertext; backup_verify without an identity checks the ciphertext and says it did not decrypt, with one it
restores; auth_export source=backup and backup_restore read it with an identity; the identity is never logged; a
wrong one fails naming the recipients."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ansible_collections.baileys.resilience.plugins.module_utils import agecrypt, pgconn

from support import ROOT
from support.authgen import REFERENCE_MIX, generate, load_into

pyrage = pytest.importorskip("pyrage")

MIX = {k: max(2, v // 50) for k, v in REFERENCE_MIX.items()}

PLAYBOOK = """\
- name: encrypt_local through the modules
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
    - name: encrypt_local without recipients
      baileys.resilience.pg_backup:
        <<: *conn
        login_db: "{{ db_name }}"
        backup_dir: "{{ backup_dir }}"
        encryption:
          encrypt_local: true
      ignore_errors: true

    - name: Backup
      baileys.resilience.pg_backup:
        <<: *conn
        login_db: "{{ db_name }}"
        backup_dir: "{{ backup_dir }}"
        encryption:
          recipients: "{{ recipients }}"
          encrypt_local: true

    - name: Verify without an identity
      baileys.resilience.backup_verify:
        <<: *conn
        login_db: postgres
        backup_dir: "{{ backup_dir }}"

    - name: Verify with the identity
      baileys.resilience.backup_verify:
        <<: *conn
        login_db: postgres
        backup_dir: "{{ backup_dir }}"
        identity: "{{ identity }}"

    - name: Export with a wrong identity
      baileys.resilience.auth_export:
        source: backup
        backup_file: "{{ backup_file }}"
        dest: "{{ wrong_dest }}"
        identity: "{{ stranger }}"
      ignore_errors: true

    - name: Export with the identity
      baileys.resilience.auth_export:
        source: backup
        backup_file: "{{ backup_file }}"
        dest: "{{ export_dest }}"
        identity: "{{ identity }}"

    - name: Restore without an identity
      baileys.resilience.backup_restore:
        <<: *conn
        login_db: postgres
        backup_file: "{{ backup_file }}"
        restore_db: "{{ restore_db }}"
      ignore_errors: true

    - name: Restore with the identity
      baileys.resilience.backup_restore:
        <<: *conn
        login_db: postgres
        backup_file: "{{ backup_file }}"
        restore_db: "{{ restore_db }}"
        identity: "{{ identity }}"
"""


def test_encrypt_local_through_ansible(ansible_env, pg, db, dbconn, tmp_path):
    load_into(dbconn, generate(2, seed=31, mix=MIX))
    ident = pyrage.x25519.Identity.generate()
    recipient = str(ident.to_public())
    bdir = tmp_path / "backups"
    name = "baileys-auth-%s.dump"
    restore_db = db["login_db"] + "_enc"
    v = {"db_host": db["login_host"], "db_port": db["login_port"], "db_user": db["login_user"],
         "db_password": db["login_password"], "db_name": db["login_db"], "backup_dir": str(bdir),
         "recipients": [recipient], "identity": str(ident), "stranger": str(pyrage.x25519.Identity.generate()),
         "export_dest": str(tmp_path / "export"), "wrong_dest": str(tmp_path / "wrong"), "restore_db": restore_db,
         "ansible_python_interpreter": sys.executable,
         # the backup's name is only known once it is made: every later task reads the newest file
         "backup_file": "{{ lookup('ansible.builtin.fileglob', backup_dir ~ '/" + name % "*" + "') }}"}
    varfile = tmp_path / "vars.json"
    varfile.write_text(json.dumps(v))
    os.chmod(varfile, 0o600)
    book = tmp_path / "enc.yml"
    book.write_text(PLAYBOOK)
    proc = subprocess.run(
        ["ansible-playbook", "-i", "localhost,", str(book), "-e", "@%s" % varfile], capture_output=True, text=True,
        env=dict(ansible_env, ANSIBLE_STDOUT_CALLBACK="json"), cwd=ROOT, check=False)
    out = proc.stdout + proc.stderr
    try:
        assert proc.returncode == 0, out[-4000:]
        assert str(ident) not in out and db["login_password"] not in out  # no_log
        tasks = {t["task"]["name"]: t["hosts"]["localhost"]
                 for t in json.loads(proc.stdout[proc.stdout.index("{"):])["plays"][0]["tasks"]}

        refused = tasks["encrypt_local without recipients"]
        assert refused["failed"] and "encrypt_local is true but no recipient" in refused["msg"]

        made = tasks["Backup"]
        assert made["changed"] and made["encrypted"]
        with open(made["backup"], "rb") as fh:
            assert fh.read(len(agecrypt.HEADER)) == agecrypt.HEADER
        assert made["manifest"]["encryption"]["recipients"] == [agecrypt.fingerprint(recipient)]

        plain = tasks["Verify without an identity"]
        assert plain["ok"] and plain["decrypted"] is False and "NOT decrypted" in plain["msg"]
        assert plain["backup_file"] == made["backup"]
        assert any("NOT decrypted" in w for w in plain.get("warnings", []))
        verified = tasks["Verify with the identity"]
        assert verified["ok"] and verified["decrypted"] and verified["restored"] and verified["dropped"]
        assert verified["counts"] == made["manifest"]["counts"]

        wrong = tasks["Export with a wrong identity"]
        assert wrong["failed"] and "cannot be decrypted with the identity given" in wrong["msg"]
        assert agecrypt.fingerprint(recipient) in wrong["msg"]
        assert not os.path.exists(tmp_path / "wrong")
        exported = tasks["Export with the identity"]
        assert exported["changed"] and exported["totals"]["companies"] == 2

        no_id = tasks["Restore without an identity"]
        assert no_id["failed"] and "age-encrypted: give identity_file or identity to restore it" in no_id["msg"]
        restored = tasks["Restore with the identity"]
        assert restored["changed"] and restored["decrypted"] and restored["backup"] == made["backup"]
        assert restored["counts"] == made["manifest"]["counts"]
    finally:
        admin = pgconn.connect(pg.params(), autocommit=True)
        admin.execute('DROP DATABASE IF EXISTS "%s" WITH (FORCE)' % restore_db)
        admin.close()
