"""The failover role's playbooks on this machine (real PostgreSQL, ansible-playbook, service manager `none`).

What the runbook and the playbook headers claim, each run as an operator would, with the "service" writing
between runs: a second rollback touches nothing, reseed moves the directory aside, the return mirrors the files,
refuses (changing nothing) when another writer used the store, and a second return does nothing; --check --diff
changes nothing and shows no secret. The service itself (PM2, a writer, SIGKILL mid-run) is molecule's
emergency_rollback scenario.
"""
from __future__ import annotations

import json
import os
import stat
import subprocess

from support import ROOT
from support.authgen import REFERENCE_MIX, generate, load_into


MIX = {k: max(2, v // 40) for k, v in REFERENCE_MIX.items()}
ENV_SECRET = "env-s3cr<e>t|?"


def run(env, book, extra, work, *args):
    varfile = work / ("vars-%d.json" % len(os.listdir(work)))
    varfile.write_text(json.dumps(extra))
    os.chmod(varfile, 0o600)
    proc = subprocess.run(
        ["ansible-playbook", "-i", os.path.join(ROOT, "inventories", "demo", "hosts.yml"),
         os.path.join(ROOT, "playbooks", book), "-e", "@%s" % varfile, *args],
        capture_output=True, text=True, env=dict(env, ANSIBLE_STDOUT_CALLBACK="json"), cwd=ROOT, check=False)
    out = json.loads(proc.stdout[proc.stdout.index("{"):])
    results = {}
    for play in out["plays"]:
        for t in play["tasks"]:
            # "baileys.resilience.failover : Rollback | report" -> "Rollback | report"
            results[t["task"]["name"].split(" : ", 1)[-1]] = t["hosts"].get("localhost", {})
    return proc.returncode, results, out["stats"]["localhost"], proc.stdout


def tree(path):
    out = {}
    for root, _dirs, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            with open(full, "rb") as fh:
                out[os.path.relpath(full, path)] = fh.read()
    return out


def store(conn, company):
    rows = dict(((t, i), v) for t, i, v in conn.execute(
        "SELECT key_type, key_id, value::text FROM whatsapp_keys WHERE company_id = %s", (company,)).fetchall())
    conn.commit()
    return rows


def test_rollback_and_return_as_an_operator_runs_them(ansible_env, db, dbconn, tmp_path):
    load_into(dbconn, generate(2, seed=51, form="base64", mix=MIX))
    app = tmp_path / "app"
    app.mkdir()
    env_file = app / "app.env"
    env_file.write_text("USE_REPOSITORY_PATTERN=true\nPGPASSWORD=%s\n" % ENV_SECRET)
    os.chmod(env_file, 0o600)
    sessions = app / "sessions"
    state_file = app / ".baileys-resilience-failover.json"
    work = tmp_path / "work"
    work.mkdir()
    v = {
        "failover_sessions_dir": str(sessions), "failover_env_file": str(env_file),
        "failover_db_host": db["login_host"], "failover_db_port": db["login_port"],
        "failover_db_user": db["login_user"], "failover_db_password": db["login_password"],
        "failover_db_name": db["login_db"], "failover_service_manager": "none",
        "failover_health_type": "command", "failover_health_command": "true",
        "failover_backup_dir": str(tmp_path / "no-backups"),
    }

    # --check --diff: nothing written, no secret shown
    rc, res, stats, out = run(ansible_env, "emergency_rollback.yml", v, work, "--check", "--diff")
    assert rc == 0, out
    assert not sessions.exists() and not state_file.exists()
    assert "USE_REPOSITORY_PATTERN=true" in env_file.read_text()
    assert db["login_password"] not in out and ENV_SECRET not in out

    rc, res, stats, out = run(ansible_env, "emergency_rollback.yml", v, work, "--diff")
    assert rc == 0, out
    assert db["login_password"] not in out and ENV_SECRET not in out
    report = res["Rollback | report"]["failover_rollback_report"]
    assert report["source"] == "database" and int(report["companies"]) == 2
    state = json.loads(state_file.read_text())
    assert state["mode"] == "files" and state["source"]["kind"] == "database"
    assert set(state["companies"]) == {"company-001", "company-002"}
    assert stat.S_IMODE(os.stat(state_file).st_mode) == 0o600
    assert "USE_REPOSITORY_PATTERN=false" in env_file.read_text()

    # the service writes on files: a session changes, a pre-key is consumed, a new one is added
    c1 = sessions / "company-001"
    session = sorted(c1.glob("session-*.json"))[0]
    session.write_text('{"changed": "on files"}')
    consumed = sorted(c1.glob("pre-key-*.json"))[0]
    consumed.unlink()
    (c1 / "pre-key-424242.json").write_text('{"private": "AQ==", "public": "Ag=="}')
    files_before = tree(sessions)

    # a second rollback (the database up, and again with it unreachable) touches nothing
    for extra in ({}, {"failover_db_port": 1}):
        rc, res, stats, out = run(ansible_env, "emergency_rollback.yml", dict(v, **extra), work)
        assert rc == 0, out
        assert stats["changed"] == 0, out
        assert res["Rollback | report that nothing was needed (published as failover_rollback_report)"][
            "ansible_facts"]["failover_rollback_report"]["already"]
        assert tree(sessions) == files_before

    # another writer uses the store while the service runs on files: the return refuses and changes nothing
    dbconn.execute("UPDATE whatsapp_keys SET value = '{\"other\": 1}', updated_at = now() "
                   "WHERE company_id = 'company-002' AND key_type = 'session'")
    dbconn.commit()
    before = store(dbconn, "company-001"), store(dbconn, "company-002")
    rc, res, stats, out = run(ansible_env, "return_to_postgres.yml", v, work)
    assert rc != 0 and "the store changed after the handover" in out, out
    assert (store(dbconn, "company-001"), store(dbconn, "company-002")) == before
    assert "USE_REPOSITORY_PATTERN=false" in env_file.read_text()  # not switched back

    # the operator says the files win: the store mirrors the files (the consumed pre-key is gone)
    rc, res, stats, out = run(ansible_env, "return_to_postgres.yml", dict(v, failover_return_store_changed="files"),
                              work)
    assert rc == 0, out
    after = store(dbconn, "company-001")
    assert after[("session", session.name[len("session-"):-5])] == '{"changed": "on files"}'
    assert ("pre-key", consumed.name[len("pre-key-"):-5]) not in after
    assert ("pre-key", "424242") in after
    assert all(v != '{"other": 1}' for v in store(dbconn, "company-002").values())
    assert json.loads(state_file.read_text())["mode"] == "postgres"
    assert "USE_REPOSITORY_PATTERN=true" in env_file.read_text()
    report = res["Return | report"]["failover_return_report"]
    assert int(report["deleted"]) == 1 and int(report["inserted"]) == 1

    # a second return does nothing
    rc, res, stats, out = run(ansible_env, "return_to_postgres.yml", v, work)
    assert rc == 0 and stats["changed"] == 0, out

    # on files again, then an explicit reseed: the directory is moved aside (0700, kept), never deleted
    rc, res, stats, out = run(ansible_env, "emergency_rollback.yml", v, work)
    assert rc == 0, out
    (c1 / "pre-key-515151.json").write_text('{"private": "AQ==", "public": "Ag=="}')
    rc, res, stats, out = run(ansible_env, "emergency_rollback.yml", dict(v, failover_reseed=True), work)
    assert rc == 0, out
    aside = [p for p in app.iterdir() if p.name.startswith("sessions.aside-")]
    assert len(aside) == 1 and stat.S_IMODE(os.stat(aside[0]).st_mode) == 0o700
    assert (aside[0] / "company-001" / "pre-key-515151.json").exists()
    assert not (c1 / "pre-key-515151.json").exists()  # reseeded from the store


def test_rollback_from_a_local_backup_encrypted_on_the_host(ansible_env, db, dbconn, tmp_path):
    """encrypt_local: with the database down the newest local backup is age ciphertext; without an identity the
    rollback stops and says so, with failover_backup_identity it exports the same files as from the database."""
    import sys

    import pyrage

    from ansible_collections.baileys.resilience.plugins.module_utils import authstate, backup

    load_into(dbconn, generate(2, seed=53, form="base64", mix=MIX))
    ident = pyrage.x25519.Identity.generate()
    backups = tmp_path / "backups"
    made = backup.run_backup(db, {}, str(backups),
                             encryption={"recipients": [str(ident.to_public())], "encrypt_local": True})
    expected = tmp_path / "expected"
    authstate.export_from_database(db, {}, authstate.ExportOptions(str(expected)))
    app = tmp_path / "app"
    app.mkdir()
    env_file = app / "app.env"
    env_file.write_text("USE_REPOSITORY_PATTERN=true\n")
    os.chmod(env_file, 0o600)
    sessions = app / "sessions"
    work = tmp_path / "work"
    work.mkdir()
    v = {
        "failover_sessions_dir": str(sessions), "failover_env_file": str(env_file),
        "failover_db_host": db["login_host"], "failover_db_port": 1, "failover_db_user": db["login_user"],
        "failover_db_password": db["login_password"], "failover_db_name": db["login_db"],
        "failover_service_manager": "none", "failover_health_type": "command", "failover_health_command": "true",
        "failover_backup_dir": str(backups), "failover_cli_python": sys.executable,
    }
    rc, res, stats, out = run(ansible_env, "emergency_rollback.yml", v, work)
    assert rc != 0 and "is age-encrypted" in out and "failover_backup_identity" in out, out[-3000:]
    assert not sessions.exists() and "USE_REPOSITORY_PATTERN=true" in env_file.read_text()

    rc, res, stats, out = run(ansible_env, "emergency_rollback.yml", dict(v, failover_backup_identity=str(ident)),
                              work)
    assert rc == 0, out[-3000:]
    assert str(ident) not in out
    report = res["Rollback | report"]["failover_rollback_report"]
    assert report["source"] == "backup" and report["backup_file"] == made["backup"] and int(report["companies"]) == 2

    def keys_of(path):  # the files the service reads (each company's export manifest names its source)
        return {k: v for k, v in tree(path).items() if not k.endswith(".baileys-resilience-manifest.json")}
    assert keys_of(sessions) and keys_of(sessions) == keys_of(expected)
    state = json.loads((app / ".baileys-resilience-failover.json").read_text())
    assert state["mode"] == "files" and state["source"]["sha256"] == made["manifest"]["sha256"]
