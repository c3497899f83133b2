"""The export/import modules run through Ansible (ansible-playbook), not only as Python functions."""
from __future__ import annotations

import json
import os
import subprocess

from support import ROOT
from support.authgen import REFERENCE_MIX, generate, load_into


MIX = {k: max(2, v // 40) for k, v in REFERENCE_MIX.items()}


def playbook(env, name, extra_vars, tmp_path, *args):
    """Run a playbook with vars from a 0600 file (the password never reaches argv); return task results."""
    varfile = tmp_path / ("vars-%d.json" % len(os.listdir(tmp_path)))
    varfile.write_text(json.dumps(extra_vars))
    os.chmod(varfile, 0o600)
    run_env = dict(env, ANSIBLE_STDOUT_CALLBACK="json")
    proc = subprocess.run(
        ["ansible-playbook", "-i", os.path.join(ROOT, "inventories", "demo", "hosts.yml"),
         os.path.join(ROOT, "playbooks", name), "-e", "@%s" % varfile, *args],
        capture_output=True, text=True, env=run_env, cwd=ROOT,
        check=False,
    )
    out = json.loads(proc.stdout[proc.stdout.index("{"):])
    tasks = {t["task"]["name"]: t["hosts"]["localhost"] for t in out["plays"][0]["tasks"]}
    return proc.returncode, tasks, proc.stdout


def db_vars(params):
    return {
        "baileys_db_host": params["login_host"], "baileys_db_port": params["login_port"],
        "baileys_db_user": params["login_user"], "baileys_db_password": params["login_password"],
        "baileys_db_name": params["login_db"],
    }


def test_export_and_import_playbooks(ansible_env, db, dbconn, tmp_path):
    N = 3  # noqa: N806 - three companies: the import reads them in worker processes, inside the module too
    load_into(dbconn, generate(N, seed=21, form="base64", mix=MIX))
    sessions = tmp_path / "sessions"
    work = tmp_path / "work"
    work.mkdir()
    v = dict(db_vars(db), baileys_sessions_dir=str(sessions), baileys_company_dir="session-{company_id}")

    # check mode: reports the change, writes nothing
    rc, tasks, out = playbook(ansible_env, "export_auth_state.yml", v, work, "--check", "--diff")
    assert rc == 0, out
    res = tasks["Export from PostgreSQL"]
    assert res["changed"] and res["totals"]["written"] == N * (sum(MIX.values()) + 1)
    assert not sessions.exists()
    assert db["login_password"] not in out  # no_log on the password

    rc, tasks, out = playbook(ansible_env, "export_auth_state.yml", v, work)
    assert rc == 0, out
    assert tasks["Export from PostgreSQL"]["changed"]
    assert "%d companies, %d keys" % (N, N * sum(MIX.values())) in tasks["Report"]["msg"]
    assert sorted(os.listdir(sessions)) == ["session-company-%03d" % (i + 1) for i in range(N)]

    rc, tasks, out = playbook(ansible_env, "export_auth_state.yml", v, work)
    assert rc == 0 and not tasks["Export from PostgreSQL"]["changed"], out

    # import back: nothing to change, then a change made in file mode
    rc, tasks, out = playbook(ansible_env, "import_auth_state.yml", v, work)
    assert rc == 0 and not tasks["Import into PostgreSQL"]["changed"], out
    (sessions / "session-company-001" / "pre-key-999999.json").write_text(
        '{"private": {"type": "Buffer", "data": "AQ=="}, "public": {"type": "Buffer", "data": "Ag=="}}')
    rc, tasks, out = playbook(ansible_env, "import_auth_state.yml", v, work, "--check")
    assert rc == 0 and tasks["Import into PostgreSQL"]["changed"], out
    assert dbconn.execute("SELECT count(*) FROM whatsapp_keys WHERE key_id = '999999'").fetchone()[0] == 0
    dbconn.commit()
    rc, tasks, out = playbook(ansible_env, "import_auth_state.yml", v, work)
    assert rc == 0 and tasks["Import into PostgreSQL"]["totals"]["inserted"] == 1, out
    assert "1 inserted" in tasks["Report"]["msg"] and "%d keys" % (N * sum(MIX.values()) + 1) in tasks["Report"]["msg"]
    assert dbconn.execute("SELECT count(*) FROM whatsapp_keys WHERE key_id = '999999'").fetchone()[0] == 1

    # disaster recovery into an empty store: the rows are COPied straight in, by the module
    dbconn.execute("DELETE FROM whatsapp_keys")
    dbconn.execute("DELETE FROM whatsapp_auth")
    dbconn.commit()
    rc, tasks, out = playbook(ansible_env, "import_auth_state.yml", v, work)
    assert rc == 0, out
    assert tasks["Import into PostgreSQL"]["totals"]["inserted"] == N * sum(MIX.values()) + 1, out
    assert dbconn.execute("SELECT count(*) FROM whatsapp_auth").fetchone()[0] == N
    dbconn.commit()


def test_module_failure_is_clear(ansible_env, db, tmp_path):
    sessions = tmp_path / "sessions" / "acme"
    sessions.mkdir(parents=True)
    (sessions / "creds.json").write_text("{broken")
    work = tmp_path / "work"
    work.mkdir()
    v = dict(db_vars(db), baileys_sessions_dir=str(tmp_path / "sessions"))
    rc, tasks, out = playbook(ansible_env, "import_auth_state.yml", v, work)
    assert rc != 0
    res = tasks["Import into PostgreSQL"]
    assert res["failed"] and "refusing to import" in res["msg"] and "creds.json: bad JSON" in res["msg"]

    rc, tasks, out = playbook(ansible_env, "export_auth_state.yml", {"baileys_db_port": 1}, work)
    assert rc != 0 and "baileys_sessions_dir" in tasks["Check the required variables"]["msg"]
