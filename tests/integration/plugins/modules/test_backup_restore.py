"""Disaster-recovery restore into a new database: backup.restore_backup and the backup_restore module."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from ansible_collections.baileys.resilience.plugins.module_utils import backup, pgconn

from support.authgen import REFERENCE_MIX, generate, load_into


MIX = {k: max(2, v // 40) for k, v in REFERENCE_MIX.items()}


def run_module(env, args, tmp_path, check=False):
    """Run the module in a one-task playbook; the arguments (with the password) go in a 0600 vars file."""
    varfile = tmp_path / "restore-vars.json"
    varfile.write_text(json.dumps({"restore_args": args}))
    os.chmod(varfile, 0o600)
    play = tmp_path / "restore.yml"
    play.write_text("- hosts: localhost\n  gather_facts: false\n  tasks:\n"
                    "    - baileys.resilience.backup_restore: '{{ restore_args }}'\n")
    cmd = ["ansible-playbook", "-i", "localhost,", "-c", "local", "-e", "@%s" % varfile, "-e",
           "ansible_python_interpreter=%s/python" % env["PATH"].split(os.pathsep)[0], str(play)]
    if check:
        cmd.append("--check")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(env, ANSIBLE_STDOUT_CALLBACK="json"),
                          check=False)
    out = json.loads(proc.stdout[proc.stdout.index("{"):])
    return out["plays"][0]["tasks"][0]["hosts"]["localhost"], proc


def test_restore_into_new_database_is_verified_and_idempotent(pg, db, dbconn, tmp_path, ansible_env):
    load_into(dbconn, generate(2, seed=41, form="base64", mix=MIX))
    made = backup.run_backup(db, {}, str(tmp_path / "backups"))
    target = db["login_db"] + "_dr"
    admin_params = pg.params()
    args = dict(admin_params, backup_file=made["backup"], restore_db=target)

    res, proc = run_module(ansible_env, args, tmp_path, check=True)
    assert not res.get("failed"), proc.stdout[-2000:]
    assert res["changed"] and not res["restored"]
    admin = pgconn.connect(admin_params, autocommit=True)
    assert admin.execute("SELECT count(*) FROM pg_database WHERE datname = %s", (target,)).fetchone()[0] == 0

    res, proc = run_module(ansible_env, args, tmp_path)
    assert res["changed"] and res["restored"] and res["counts"] == {"auth": 2, "keys": 2 * sum(MIX.values())}
    assert admin_params["login_password"] not in proc.stdout

    res, _proc = run_module(ansible_env, args, tmp_path)
    assert not res["changed"] and res["counts"]["keys"] == 2 * sum(MIX.values())

    # a database with other contents is never overwritten
    conn = pgconn.connect(dict(admin_params, login_db=target))
    conn.execute("DELETE FROM whatsapp_keys WHERE key_type = 'session'")
    conn.commit()
    conn.close()
    with pytest.raises(backup.BackupError, match="already exists with other contents"):
        backup.restore_backup(made["backup"], admin_params, target)
    admin.execute('DROP DATABASE "%s" WITH (FORCE)' % target)
    admin.close()
