"""Losing nothing, Jepsen-style: the stand-in's writer journals every acknowledged write, the checker replays
the journal against the final state (tests/support/journal_check.py).  Real PostgreSQL, real Node with real Baileys.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from ansible_collections.baileys.resilience.plugins.module_utils import authstate, pgconn

from support import ROOT, journal_check
from support.authgen import generate, load_into
from support.pgserver import free_port


pytestmark = pytest.mark.compat

STANDIN = os.path.join(ROOT, "tests", "standin")
CHECKER = os.path.join(ROOT, "tests", "support", "journal_check.py")
COMPANY = "company-001"
COMPANY_DIR = "session-{company_id}"
# 300 keys, 120 of them pre-keys (ids 1..120): the writer consumes some of them
MIX = {"pre-key": 120, "session": 60, "sender-key": 30, "sender-key-memory": 10, "app-state-sync-key": 5,
       "app-state-sync-version": 5, "lid-mapping": 30, "device-list": 20, "tctoken": 10, "identity-key": 10}
SEEDED_PRE_KEYS = {str(i) for i in range(1, MIX["pre-key"] + 1)}
RATE = 50


@pytest.fixture(scope="module")
def node():
    node = shutil.which("node")
    if not node:
        pytest.skip("writer: 'node' is not on PATH (Node.js 20 or later)")
    if not os.path.exists(os.path.join(STANDIN, "node_modules", "@whiskeysockets", "baileys", "package.json")):
        pytest.skip("writer: tests/standin/node_modules is missing (make npm-deps)")
    return node


def write_env(path, **values):
    with open(path, "w") as fh:
        for key, value in values.items():
            fh.write("%s=%s\n" % (key, value))
    return str(path)


def pg_env(db):
    return {"PGHOST": db["login_host"], "PGPORT": db["login_port"], "PGUSER": db["login_user"],
            "PGPASSWORD": db["login_password"], "PGDATABASE": db["login_db"]}


def health(port):
    try:
        with urllib.request.urlopen("http://127.0.0.1:%d/health" % port, timeout=2) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return json.loads(exc.read())


def run_writer(node, env_file, port, seconds, log, during=None):
    """Start the stand-in, let the writer run ``seconds`` (or ``during(port)``), SIGTERM it; its last /health."""
    with open(log, "a") as out:
        proc = subprocess.Popen([node, os.path.join(STANDIN, "server.mjs")], cwd=STANDIN, stdout=out,
                                stderr=subprocess.STDOUT, env=dict(os.environ, ENV_FILE=env_file))
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, "the stand-in exited (%s):\n%s" % (proc.returncode, open(log).read()[-3000:])
            assert time.monotonic() < deadline, "the writer did not start:\n%s" % open(log).read()[-3000:]
            try:
                state = health(port)
            except OSError:
                state = {}
            if state.get("status") == "error":
                pytest.fail("the stand-in did not load: %s" % state)
            if state.get("writer", {}).get("on"):
                break
            if state.get("status") == "ok" and state.get("writer", {}).get("last_error"):
                pytest.fail("the writer did not start: %s" % state["writer"])
            time.sleep(0.05)
        if during is None:
            time.sleep(seconds)
        else:
            during(port)
        state = health(port)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0, open(log).read()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stopped = [json.loads(line) for line in open(log) if '"writer_stopped"' in line]
    assert stopped and stopped[-1]["how"] == "clean", open(log).read()[-3000:]
    if during is None:
        assert state["writer"]["errors"] == 0, state["writer"]
    return state


def journal_lines(path):
    with open(path) as fh:
        return [json.loads(line) for line in fh]


def assert_journal_sane(lines, modes=None):
    seqs = [e["seq"] for e in lines]
    assert len(set(seqs)) == len(seqs), "seq repeats"
    assert seqs == sorted(seqs) and seqs[0] == 1, "seq does not grow from 1"
    kinds = {(e["op"], e["type"]) for e in lines}
    assert {("set", "session"), ("set", "pre-key"), ("del", "pre-key"), ("set", "creds")} <= kinds, kinds
    consumed = {e["id"] for e in lines if e["op"] == "del" and e["type"] == "pre-key"}
    assert consumed & SEEDED_PRE_KEYS, "no pre-key from before the writer was consumed"
    added = [int(e["id"]) for e in lines if e["op"] == "set" and e["type"] == "pre-key"]
    assert len(set(added)) == len(added) and min(added) >= 9_000_000, "writer pre-key ids repeat or collide"
    assert {e["id"] for e in lines if e["type"] == "creds"} <= {"accountSyncCounter", "lastAccountSyncTimestamp"}
    for e in lines:
        assert set(e) == {"seq", "t", "pid", "mode", "company", "op", "type", "id", "value"}, e
        assert e["company"] == COMPANY and (e["value"] is None) == (e["op"] == "del"), e
    if modes:
        assert {e["mode"] for e in lines} == set(modes)


def assert_clean(summary, min_ops=50):
    assert (summary["lost"], summary["resurrected"], summary["wrong"]) == (0, 0, 0), summary["examples"]
    assert summary["ops"] > min_ops and summary["duplicate_seq"] == 0, summary


def checker_cli(*args, env=None):
    proc = subprocess.run([sys.executable, CHECKER, *args], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, **(env or {})), check=False)
    return proc.returncode, proc.stdout, proc.stderr


def seed(dbconn):
    load_into(dbconn, generate(1, seed=71, form="base64", mix=MIX))


def conninfo(db):
    return "host=%s port=%s dbname=%s user=%s" % (db["login_host"], db["login_port"], db["login_db"],
                                                  db["login_user"])


# --------------------------------------------------------------------------- postgres mode


def test_postgres_mode_loses_nothing_across_a_restart_and_the_checker_sees_tampering(node, db, dbconn, tmp_path):
    seed(dbconn)
    port = free_port()
    journal = str(tmp_path / "journal.jsonl")
    log = str(tmp_path / "standin.log")
    env_file = write_env(tmp_path / "app.env", USE_REPOSITORY_PATTERN="true", PORT=port, WRITER="on",
                         WRITER_RATE=RATE, WRITER_JOURNAL=journal, **pg_env(db))

    first = run_writer(node, env_file, port, 3, log)
    assert first["mode"] == "postgres" and first["writer"]["ops"] > 50, first
    before = journal_lines(journal)
    # a writer killed in the middle of a line: the next one cuts the torn line off and goes on with the seq
    with open(journal, "a") as fh:
        fh.write('{"seq": 999999, "t": 1, "pid"')
    assert journal_check.read_journal(journal).torn_tail
    run_writer(node, env_file, port, 1.5, log)
    lines = journal_lines(journal)
    assert lines[:len(before)] == before and lines[len(before)]["seq"] == before[-1]["seq"] + 1
    assert len({e["pid"] for e in lines}) == 2
    assert_journal_sane(lines, modes=["postgres"])

    summary = journal_check.run(journal, pg=db)
    assert_clean(summary)
    assert summary["ops"] == len(lines) and not summary["torn_tail"]

    # the CLI, with libpq's environment for the password
    rc, out, err = checker_cli(journal, "--pg", conninfo(db), env={"PGPASSWORD": db["login_password"]})
    assert rc == 0, err
    assert json.loads(out)["ops"] == len(lines)
    assert "journal check: ops %d, keys %d, lost 0, resurrected 0, wrong 0" % (
        len(lines), summary["keys_checked"]) in err

    # the same store as a JSON-lines dump, as COPY ... TO writes it (text format: backslashes doubled)
    dump = tmp_path / "store.jsonl"
    with dbconn.cursor() as cur, open(dump, "wb") as fh:
        with cur.copy("COPY (SELECT json_build_object('company_id', company_id, 'key_type', key_type, 'key_id', "
                      "key_id, 'value', value) FROM whatsapp_keys UNION ALL SELECT json_build_object("
                      "'company_id', company_id, 'creds', creds) FROM whatsapp_auth) TO STDOUT") as copy:
            for chunk in copy:
                fh.write(chunk)
    dbconn.commit()
    assert b"\\\\" in dump.read_bytes()  # the creds hold quotes: the dump has escaped backslashes
    assert_clean(journal_check.run(journal, store_jsonl=str(dump)))

    # tamper: lose an acknowledged key, bring a consumed pre-key back, change a value and a creds field
    final = journal_check.read_journal(journal).final
    by_seq = sorted(final.items(), key=lambda kv: kv[1]["seq"])
    sets = [k for k, e in by_seq if e["op"] == "set" and k[1] != "creds"]
    lost, wrong = sets[0], sets[-1]
    resurrected = next(k for k, e in by_seq if e["op"] == "del" and k[1] == "pre-key")
    creds_key = next(k for k, e in by_seq if k[1] == "creds")
    with dbconn.cursor() as cur:
        cur.execute("DELETE FROM whatsapp_keys WHERE company_id = %s AND key_type = %s AND key_id = %s", lost)
        cur.execute("INSERT INTO whatsapp_keys (company_id, key_type, key_id, value) VALUES (%s, %s, %s, %s)",
                    resurrected + ('{"private": {"type": "Buffer", "data": "AA=="}}',))
        cur.execute("UPDATE whatsapp_keys SET value = jsonb_set(value, '{tampered}', 'true') WHERE company_id = %s "
                    "AND key_type = %s AND key_id = %s", wrong)
        cur.execute("UPDATE whatsapp_auth SET creds = jsonb_set(creds, %s, '-1') WHERE company_id = %s",
                    ([creds_key[2]], COMPANY))
    dbconn.commit()

    summary = journal_check.run(journal, pg=db)
    assert (summary["lost"], summary["resurrected"], summary["wrong"]) == (1, 1, 2), summary
    ex = summary["examples"]
    assert (ex["lost"][0]["type"], ex["lost"][0]["id"]) == lost[1:]
    assert (ex["resurrected"][0]["type"], ex["resurrected"][0]["id"]) == resurrected[1:]
    assert {(w["type"], w["id"]) for w in ex["wrong"]} == {wrong[1:], creds_key[1:]}
    rc, out, err = checker_cli(journal, "--pg", conninfo(db), env={"PGPASSWORD": db["login_password"]})
    assert rc == 1 and json.loads(out)["lost"] == 1, err
    assert "lost 1, resurrected 1, wrong 2" in err

    # acknowledged inside the recovery point: counted apart, the check passes
    times = [final[k]["t"] for k in (lost, wrong, resurrected, creds_key)]
    window = "%d,%d" % (min(times), max(times))
    summary = journal_check.run(journal, pg=db, rpo_window=window)
    assert (summary["lost"], summary["resurrected"], summary["wrong"]) == (0, 0, 0), summary["examples"]
    w = summary["rpo_window"]
    assert (w["lost"], w["resurrected"], w["wrong"]) == (1, 1, 2), w
    rc, out, err = checker_cli(journal, "--pg", conninfo(db), "--rpo-window", window,
                               env={"PGPASSWORD": db["login_password"]})
    assert rc == 0, err
    assert "rpo window: lost 1, resurrected 1, wrong 2" in err


# --------------------------------------------------------------------------- file mode


def test_file_mode_loses_nothing_across_a_restart(node, db, dbconn, tmp_path):
    seed(dbconn)
    sessions = tmp_path / "sessions"
    res = authstate.export_from_database(db, {}, authstate.ExportOptions(str(sessions), company_dir=COMPANY_DIR))
    assert res["totals"]["keys"] == sum(MIX.values())
    port = free_port()
    journal = str(tmp_path / "journal.jsonl")
    log = str(tmp_path / "standin.log")
    env_file = write_env(tmp_path / "app.env", USE_REPOSITORY_PATTERN="false", SESSIONS_DIR=sessions,
                         COMPANY_DIR=COMPANY_DIR, PORT=port, WRITER="on", WRITER_RATE=RATE, WRITER_JOURNAL=journal)
    first = run_writer(node, env_file, port, 3, log)
    assert first["mode"] == "files"
    run_writer(node, env_file, port, 1.5, log)
    lines = journal_lines(journal)
    assert len({e["pid"] for e in lines}) == 2
    assert_journal_sane(lines, modes=["files"])

    assert_clean(journal_check.run(journal, directory=str(sessions), company_dir=COMPANY_DIR))
    rc, out, err = checker_cli(journal, "--dir", str(sessions), "--company-dir", COMPANY_DIR)
    assert rc == 0 and "lost 0, resurrected 0, wrong 0" in err, err

    # a key file the service wrote is gone, a consumed one is back
    final = journal_check.read_journal(journal).final
    gone = next(k for k, e in final.items() if e["op"] == "set" and k[1] == "pre-key")
    back = next(k for k, e in final.items() if e["op"] == "del" and k[1] == "pre-key")
    directory = sessions / COMPANY_DIR.replace("{company_id}", COMPANY)
    os.unlink(directory / ("pre-key-%s.json" % gone[2]))
    (directory / ("pre-key-%s.json" % back[2])).write_text('{"private": {"type": "Buffer", "data": "AA=="}}')
    rc, out, err = checker_cli(journal, "--dir", str(sessions), "--company-dir", COMPANY_DIR)
    summary = json.loads(out)
    assert rc == 1 and (summary["lost"], summary["resurrected"], summary["wrong"]) == (1, 1, 0), err


def test_database_outage_is_survived_and_no_failed_write_is_journaled(node, pg, db, dbconn, tmp_path):
    seed(dbconn)
    port = free_port()
    journal = str(tmp_path / "journal.jsonl")
    env_file = write_env(tmp_path / "app.env", USE_REPOSITORY_PATTERN="true", PORT=port, WRITER="on",
                         WRITER_RATE=RATE, WRITER_JOURNAL=journal, **pg_env(db))
    seen = {}

    def outage(port):
        time.sleep(1)
        admin = pgconn.connect(pg.params(), autocommit=True)
        try:
            admin.execute('ALTER DATABASE "%s" ALLOW_CONNECTIONS false' % db["login_db"])
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s "
                          "AND application_name = 'baileys-standin-writer'", (db["login_db"],))
            time.sleep(1)
            seen["down"] = health(port)
            time.sleep(0.5)
            seen["still_down"] = health(port)
        finally:
            admin.execute('ALTER DATABASE "%s" ALLOW_CONNECTIONS true' % db["login_db"])
            admin.close()
        time.sleep(1.5)

    state = run_writer(node, env_file, port, None, str(tmp_path / "standin.log"), during=outage)
    down, still_down = seen["down"]["writer"], seen["still_down"]["writer"]
    assert seen["down"]["status"] == "ok" and down["errors"] > 0 and down["last_error"], down
    assert still_down["ops"] - down["ops"] <= 1, "writes acknowledged while the database was down"
    assert state["writer"]["ops"] > still_down["ops"] + 20, "the writer did not resume: %s" % state["writer"]
    lines = journal_lines(journal)
    assert len(lines) >= state["writer"]["ops"]
    assert_clean(journal_check.run(journal, pg=db))


# --------------------------------------------------------------------------- both, one journal


def test_rollback_to_files_and_back_loses_nothing(node, db, dbconn, tmp_path):
    """postgres -> export -> files -> import (mirror) -> postgres, one journal across the three processes."""
    seed(dbconn)
    sessions = tmp_path / "sessions"
    journal = str(tmp_path / "journal.jsonl")
    log = str(tmp_path / "standin.log")
    port = free_port()
    common = dict(SESSIONS_DIR=sessions, COMPANY_DIR=COMPANY_DIR, PORT=port, WRITER="on", WRITER_RATE=RATE,
                  WRITER_JOURNAL=journal, **pg_env(db))
    on_pg = write_env(tmp_path / "pg.env", USE_REPOSITORY_PATTERN="true", **common)
    on_files = write_env(tmp_path / "files.env", USE_REPOSITORY_PATTERN="false", **common)

    run_writer(node, on_pg, port, 1.5, log)
    authstate.export_from_database(db, {}, authstate.ExportOptions(str(sessions), company_dir=COMPANY_DIR))
    run_writer(node, on_files, port, 1.5, log)
    assert_clean(journal_check.run(journal, directory=str(sessions), company_dir=COMPANY_DIR))
    authstate.import_auth_state(db, {}, str(sessions), company_dir=COMPANY_DIR, prune=True)
    run_writer(node, on_pg, port, 1.5, log)

    lines = journal_lines(journal)
    assert [e["mode"] for e in lines].count("files") > 10
    assert_journal_sane(lines, modes=["postgres", "files"])
    assert len({e["pid"] for e in lines}) == 3
    summary = journal_check.run(journal, pg=db)
    assert_clean(summary, min_ops=100)


# --------------------------------------------------------------------------- bad input


def test_checker_refuses_bad_input(tmp_path):
    good = {"seq": 1, "t": 1, "pid": 1, "mode": "files", "company": "c", "op": "set", "type": "pre-key", "id": "1",
            "value": {"private": None}}
    journal = tmp_path / "journal.jsonl"
    sessions = tmp_path / "sessions"
    sessions.mkdir()
    cases = [
        ("not json\n", "not JSON"),
        (json.dumps(dict(good, op="put")) + "\n", "neither 'set' nor 'del'"),
        (json.dumps(dict(good, type="bogus")) + "\n", "unknown key type"),
        (json.dumps({k: v for k, v in good.items() if k != "seq"}) + "\n", "missing seq"),
    ]
    for text, message in cases:
        journal.write_text(text)
        rc, _out, err = checker_cli(str(journal), "--dir", str(sessions))
        assert rc == 2 and message in err, (text, err)
    journal.write_text(json.dumps(good) + "\n")
    for args, message in ((["--dir", str(tmp_path / "absent")], "is not a directory"),
                          (["--dir", str(sessions), "--rpo-window", "5,1"], "T0 is after T1"),
                          (["--dir", str(sessions), "--company-dir", "x"], "{company_id} exactly once"),
                          (["--store-jsonl", str(journal)], "a row needs a string company_id")):
        rc, _out, err = checker_cli(str(journal), *args)
        assert rc == 2 and message in err, (args, err)
    # the key is absent: lost; a torn last line is not an acknowledged op
    journal.write_text(json.dumps(good) + "\n" + '{"seq": 2, "t"')
    rc, out, err = checker_cli(str(journal), "--dir", str(sessions))
    summary = json.loads(out)
    assert rc == 1 and summary["lost"] == 1 and summary["ops"] == 1 and summary["torn_tail"], err
