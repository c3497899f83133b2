"""playbooks/verify_backup.yml and playbooks/health.yml end to end: ansible-playbook against localhost, the real
PostgreSQL, and a backup made by the pg_backup module (run by Ansible, as the role's cron line's code path)."""
from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess

from ansible_collections.baileys.resilience.plugins.module_utils import backup
from support import ROOT
from support.authgen import REFERENCE_MIX, generate, load_into

MIX = {k: max(2, v // 40) for k, v in REFERENCE_MIX.items()}
INVENTORY = os.path.join(ROOT, "inventories", "demo", "hosts.yml")

MAKE_BACKUP = """\
- name: A backup, by the pg_backup module
  hosts: localhost
  gather_facts: false
  tasks:
    - name: Back up
      baileys.resilience.pg_backup:
        login_host: "{{ baileys_db_host }}"
        login_port: "{{ baileys_db_port }}"
        login_user: "{{ baileys_db_user }}"
        login_password: "{{ baileys_db_password }}"
        login_db: "{{ baileys_db_name }}"
        backup_dir: "{{ baileys_backup_dir }}"
        pg_bin_dir: "{{ baileys_pg_bin_dir }}"
      register: made
"""


def run(env, book, extra, work, *args):
    """ansible-playbook with vars from a 0600 file (no secret in argv); (rc, {task name: result}, stdout)."""
    varfile = work / ("vars-%d.json" % len(os.listdir(work)))
    varfile.write_text(json.dumps(extra))
    os.chmod(varfile, 0o600)
    path = book if os.path.isabs(str(book)) else os.path.join(ROOT, "playbooks", book)
    proc = subprocess.run(["ansible-playbook", "-i", INVENTORY, str(path), "-e", "@%s" % varfile, *args],
                          capture_output=True, text=True, env=dict(env, ANSIBLE_STDOUT_CALLBACK="json"), cwd=ROOT,
                          check=False)
    out = json.loads(proc.stdout[proc.stdout.index("{"):])
    tasks = {t["task"]["name"]: t["hosts"].get("localhost", {}) for play in out["plays"] for t in play["tasks"]}
    return proc.returncode, tasks, proc.stdout + proc.stderr


def db_vars(params, pg):
    return {"baileys_db_host": params["login_host"], "baileys_db_port": params["login_port"],
            "baileys_db_user": params["login_user"], "baileys_db_password": params["login_password"],
            "baileys_db_name": params["login_db"], "baileys_pg_bin_dir": pg.bindir}


def counts(conn):
    auth = conn.execute("SELECT count(*) FROM whatsapp_auth").fetchone()[0]
    keys = conn.execute("SELECT count(*) FROM whatsapp_keys").fetchone()[0]
    conn.commit()
    return auth, keys


def test_verify_backup_playbook_restores_a_real_backup(ansible_env, pg, db, dbconn, tmp_path):
    load_into(dbconn, generate(3, seed=61, form="base64", mix=MIX))
    n_auth, n_keys = counts(dbconn)
    work = tmp_path / "work"
    work.mkdir()
    backups = tmp_path / "backups"
    backups.mkdir(mode=0o700)
    v = dict(db_vars(db, pg), baileys_backup_dir=str(backups))
    book = tmp_path / "make_backup.yml"
    book.write_text(MAKE_BACKUP)
    rc, tasks, out = run(ansible_env, book, v, work)
    assert rc == 0 and tasks["Back up"]["changed"], out
    dump = tasks["Back up"]["backup"]
    assert os.path.dirname(dump) == str(backups)
    # the playbook connects to the maintenance database (postgres) to create its throwaway database
    vv = dict(v, baileys_db_admin_db="postgres")

    # check mode: the newest valid backup is found and checked, nothing restored
    rc, tasks, out = run(ansible_env, "verify_backup.yml", vv, work, "--check")
    assert rc == 0, out
    assert tasks["Restore test"]["backup_file"] == dump, out

    # for real: restored into a throwaway database, counts and content compared with the manifest, dropped
    rc, tasks, out = run(ansible_env, "verify_backup.yml", vv, work)
    assert rc == 0, out
    res = tasks["Restore test"]
    assert res["backup_file"] == dump
    assert res["counts"] == {"auth": n_auth, "keys": n_keys} == res["expected"], res
    assert "restore test passed" in tasks["Report"]["msg"]
    left = dbconn.execute("SELECT datname FROM pg_database WHERE datname NOT IN ('postgres', 'template0', "
                          "'template1') AND datname <> current_database() AND datname NOT LIKE 't%%'").fetchall()
    dbconn.commit()
    assert left == [], "the throwaway database was not dropped: %s" % left

    # the same backup named explicitly
    rc, tasks, out = run(ansible_env, "verify_backup.yml", dict(vv, baileys_backup_file=dump), work)
    assert rc == 0 and tasks["Restore test"]["counts"]["keys"] == n_keys, out

    # a damaged copy (one byte flipped, its manifest beside it) is refused, naming the file
    damaged_dir = tmp_path / "damaged"
    shutil.copytree(backups, damaged_dir)
    damaged = damaged_dir / os.path.basename(dump)
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    rc, tasks, out = run(ansible_env, "verify_backup.yml", dict(vv, baileys_backup_file=str(damaged)), work)
    assert rc != 0 and tasks["Restore test"]["failed"], out
    assert "sha256" in tasks["Restore test"]["msg"] or "checksum" in tasks["Restore test"]["msg"], tasks


def test_health_playbook_ok_then_warning(ansible_env, pg, db, dbconn, tmp_path):
    load_into(dbconn, generate(2, seed=62, form="base64", mix=MIX))
    n_auth, n_keys = counts(dbconn)
    work = tmp_path / "work"
    work.mkdir()
    fresh = tmp_path / "fresh"
    made = backup.run_backup(db, {}, str(fresh), pg_bin_dir=pg.bindir)
    v = dict(db_vars(db, pg), baileys_backup_dir=str(fresh))

    rc, tasks, out = run(ansible_env, "health.yml", v, work, "--check")
    assert rc == 0 and tasks["Collect health"]["status"] == "ok", out

    rc, tasks, out = run(ansible_env, "health.yml", dict(v, baileys_health_fail_on="warning"), work)
    assert rc == 0, out
    res = tasks["Collect health"]
    assert res["status"] == "ok", res["checks"]
    assert res["totals"]["companies"] == n_auth and res["totals"]["keys"] == n_keys, res["totals"]
    assert os.path.basename(res["backup"]["newest_valid"]["file"]) == os.path.basename(made["backup"]), res["backup"]
    assert res["backup"]["status"] == "ok"
    report = tasks["Report"]["msg"]
    assert report["status"] == "ok" and set(report) >= {"checks", "totals", "latency_ms", "backup"}

    # the newest backup is 30 hours old (warning after 26, critical after 50): a warning, which fails the play
    # only when baileys_health_fail_on says so
    old = tmp_path / "old"
    when = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None) - datetime.timedelta(hours=30)
    backup.run_backup(db, {}, str(old), pg_bin_dir=pg.bindir, now=when)
    v_old = dict(v, baileys_backup_dir=str(old))
    rc, tasks, out = run(ansible_env, "health.yml", v_old, work)
    assert rc == 0, out
    res = tasks["Collect health"]
    assert res["status"] == "warning", res["checks"]
    assert res["backup"]["status"] == "warning" and "30.0 h old" in res["backup"]["detail"], res["backup"]
    assert [c["name"] for c in res["checks"] if c["status"] != "ok"] == ["backup"], res["checks"]
    rc, tasks, out = run(ansible_env, "health.yml", dict(v_old, baileys_health_fail_on="warning"), work)
    assert rc != 0 and tasks["Collect health"]["failed"], out
    assert tasks["Collect health"]["status"] == "warning"

    # the database unreachable: critical, the play fails by default (fail_on critical)
    rc, tasks, out = run(ansible_env, "health.yml", dict(v, baileys_db_port=1), work)
    assert rc != 0 and tasks["Collect health"]["status"] == "critical", out
