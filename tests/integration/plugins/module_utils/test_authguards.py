"""The return's mirroring import and its guards, the failover state file, and bad names (issue 10).

Real PostgreSQL (the ``db`` fixture); the files are written by a real export.
"""
from __future__ import annotations

import json
import os
import stat

import pytest

from ansible_collections.baileys.resilience.plugins.module_utils import authstate, failover_state

from support import ROOT
from support.authgen import REFERENCE_MIX, generate, load_into


SMALL_MIX = {k: max(2, v // 40) for k, v in REFERENCE_MIX.items()}


def export(params, dest):
    return authstate.export_from_database(params, {}, authstate.ExportOptions(str(dest)))


def mirror(params, src, check_mode=False, **guards):
    return authstate.import_auth_state(params, {}, str(src), prune=True, check_mode=check_mode,
                                       guards=authstate.ImportGuards(**guards))


def count(conn, sql, args=()):
    n = conn.execute(sql, args).fetchone()[0]
    conn.commit()
    return n


def store_snapshot(conn):
    rows = conn.execute("SELECT company_id, key_type, key_id, value::text FROM whatsapp_keys "
                        "ORDER BY 1, 2, 3").fetchall()
    creds = conn.execute("SELECT company_id, creds::text FROM whatsapp_auth ORDER BY 1").fetchall()
    conn.commit()
    return rows, creds


@pytest.fixture
def handed_over(db, dbconn, tmp_path):
    """Two companies in the store, exported to files: (files dir, export result)."""
    load_into(dbconn, generate(2, seed=41, form="base64", mix=SMALL_MIX))
    dest = tmp_path / "sessions"
    res = export(db, dest)
    return dest, res


def _pre_keys(directory):
    return sorted(n for n in os.listdir(directory) if n.startswith("pre-key-"))


def test_mirror_deletes_keys_absent_from_the_files_and_verifies(db, dbconn, handed_over):
    dest, _res = handed_over
    company = dest / "company-001"
    consumed = _pre_keys(company)[:2]
    for name in consumed:
        (company / name).unlink()
    (company / "pre-key-777777.json").write_text((company / _pre_keys(company)[0]).read_text())
    out = mirror(db, dest)
    c1 = {c["company_id"]: c for c in out["companies"]}["company-001"]
    assert c1["deleted"] == 2 and c1["inserted"] == 1
    assert c1["store_fingerprint_after"] == c1["files_fingerprint"]
    assert sorted(c1["replaced"]) == sorted("deleted pre-key/%s" % n[len("pre-key-"):-5] for n in consumed)
    assert count(dbconn, "SELECT count(*) FROM whatsapp_keys WHERE company_id = 'company-001' AND key_type = "
                 "'pre-key' AND key_id = ANY(%s)", ([n[len("pre-key-"):-5] for n in consumed],)) == 0
    again = mirror(db, dest, check_mode=True)
    assert not again["changed"] and all(c["already_equal"] for c in again["companies"])


def test_guard_creds_deletion(db, dbconn, handed_over):
    dest, _res = handed_over
    (dest / "company-002" / "creds.json").unlink()
    before = store_snapshot(dbconn)
    with pytest.raises(authstate.ImportRefused, match="company-002: the files have no creds.json"):
        mirror(db, dest)
    assert store_snapshot(dbconn) == before


def test_guard_share_of_deletions(db, dbconn, handed_over):
    dest, _res = handed_over
    company = dest / "company-001"
    keys = [n for n in os.listdir(company) if n.endswith(".json") and n != "creds.json" and not n.startswith(".")]
    for name in keys[: len(keys) * 6 // 10]:
        (company / name).unlink()
    before = store_snapshot(dbconn)
    with pytest.raises(authstate.ImportRefused, match=r"company-001: the files would delete \d+ of the store's"):
        mirror(db, dest, max_delete_share=0.5)
    assert store_snapshot(dbconn) == before
    out = mirror(db, dest, max_delete_share=0.7)  # the operator allows it
    assert out["totals"]["deleted"] == len(keys) * 6 // 10


def _handover(res):
    return failover_state.handover_entries(res["companies"])


def test_guard_store_changed_after_handover(db, dbconn, handed_over):
    dest, res = handed_over
    # another writer keeps using the database while the service runs on files
    dbconn.execute("UPDATE whatsapp_keys SET value = '{\"other\": 1}', updated_at = now() "
                   "WHERE company_id = 'company-002' AND key_type = 'session' AND key_id = ("
                   "SELECT min(key_id) FROM whatsapp_keys WHERE company_id = 'company-002' AND key_type = 'session')")
    dbconn.commit()
    (dest / "company-001" / "pre-key-888888.json").write_text('{"private": "AA==", "public": "AA=="}')
    before = store_snapshot(dbconn)
    with pytest.raises(authstate.ImportRefused, match=r"company company-002: the store changed after the handover"
                       r"(?s:.*)Rows written since .*session/") as err:
        mirror(db, dest, handover=_handover(res), handover_time=res["snapshot_time"])
    assert err.value.details["store_changed"] == ["company-002"]
    assert store_snapshot(dbconn) == before
    # the operator says the store wins for it: company-002 untouched, company-001 imported
    out = mirror(db, dest, handover=_handover(res), handover_time=res["snapshot_time"], on_store_changed="store")
    per = {c["company_id"]: c for c in out["companies"]}
    assert per["company-002"]["skipped"] and per["company-001"]["inserted"] == 1
    assert count(dbconn, "SELECT count(*) FROM whatsapp_keys WHERE value = '{\"other\": 1}'") == 1
    # or the files win
    out = mirror(db, dest, handover=_handover(res), handover_time=res["snapshot_time"], on_store_changed="files")
    assert {c["company_id"]: c for c in out["companies"]}["company-002"]["updated"] == 1
    assert count(dbconn, "SELECT count(*) FROM whatsapp_keys WHERE value = '{\"other\": 1}'") == 0


def test_rerun_after_committed_import_is_not_a_foreign_write(db, dbconn, handed_over):
    dest, res = handed_over
    (dest / "company-001" / "pre-key-999999.json").write_text('{"private": "AA==", "public": "AA=="}')
    first = mirror(db, dest, handover=_handover(res), handover_time=res["snapshot_time"])
    assert first["totals"]["inserted"] == 1
    # the run was killed after the commit: the store now differs from the handover but equals the files
    second = mirror(db, dest, handover=_handover(res), handover_time=res["snapshot_time"])
    assert not second["changed"] and all(c["already_equal"] for c in second["companies"])


def test_export_reports_fingerprints_for_the_handover(db, dbconn, handed_over):
    _dest, res = handed_over
    entries = _handover(res)
    assert set(entries) == {"company-001", "company-002"}
    for entry in entries.values():
        assert entry["fingerprint"].startswith("1:") and len(entry["creds_sha256"]) == 64 and entry["keys"] > 0


def test_non_utf8_key_file_name_is_named(db, dbconn, handed_over):
    dest, _res = handed_over
    bad = os.path.join(os.fsencode(str(dest / "company-001")), b"pre-key-\xff.json")
    with open(bad, "wb") as fh:
        fh.write(b'{"private": "AA==", "public": "AA=="}')
    before = store_snapshot(dbconn)
    with pytest.raises(authstate.ValidationError, match=r"pre-key-\\xff\.json: file name is not valid UTF-8"):
        authstate.import_auth_state(db, {}, str(dest))
    assert store_snapshot(dbconn) == before


def test_state_file_round_trip(tmp_path):
    path = str(tmp_path / "app" / "state.json")
    assert failover_state.read(path)["mode"] == "postgres"
    before, after, changed = failover_state.update(path, {"mode": "switching-to-files", "run_id": "r1"},
                                                   check_mode=True)
    assert changed and not os.path.exists(path)
    _b, after, changed = failover_state.update(path, {"mode": "files", "run_id": "r1",
                                                      "source": {"kind": "database", "snapshot_time": "t"}})
    assert changed and after["since"] and after["history"][-1]["mode"] == "files"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    assert failover_state.read(path) == after
    assert "files since" in failover_state.describe(after) and "database snapshot t" in failover_state.describe(after)
    # the same again changes nothing and writes nothing
    mtime = os.stat(path).st_mtime_ns
    _b, _a, changed = failover_state.update(path, {"mode": "files", "run_id": "r1"})
    assert not changed and os.stat(path).st_mtime_ns == mtime
    assert not [n for n in os.listdir(os.path.dirname(path)) if n != "state.json"]  # no temp file left


def test_damaged_state_file_is_an_error_not_postgres(tmp_path):
    path = tmp_path / "state.json"
    path.write_text("{not json")
    with pytest.raises(failover_state.StateError, match="damaged"):
        failover_state.read(str(path))
    path.write_text(json.dumps({"format": 1, "mode": "sideways"}))
    with pytest.raises(failover_state.StateError, match="mode in"):
        failover_state.read(str(path))
    with pytest.raises(failover_state.StateError, match="unknown failover state field"):
        failover_state.update(str(tmp_path / "x.json"), {"bogus": 1})


def test_legacy_marker_means_files_until_a_state_is_written(tmp_path):
    path, marker = str(tmp_path / "state.json"), tmp_path / "app.env.pre-rollback"
    assert failover_state.read(path, str(marker))["mode"] == "postgres"
    marker.write_text("USE_REPOSITORY_PATTERN=true\n")
    state = failover_state.read(path, str(marker))
    assert state["mode"] == "files" and "rolled back before the state file existed" in state["note"]
    failover_state.update(path, {"mode": "postgres", "run_id": "r2"})
    assert failover_state.read(path, str(marker))["mode"] == "postgres"  # the file, once written, decides


def test_auth_export_module_fails_naming_the_bad_company_after_exporting_the_good_ones(ansible_env, db, dbconn,
                                                                                       tmp_path):
    import subprocess

    load_into(dbconn, generate(2, seed=61, form="base64", mix=SMALL_MIX))
    dbconn.execute("INSERT INTO whatsapp_auth (company_id, creds) VALUES ('../x', '{}')")
    dbconn.commit()
    dest = tmp_path / "sessions"
    args = tmp_path / "args.json"
    args.write_text(json.dumps({"dest": str(dest), "login_host": db["login_host"], "login_port": db["login_port"],
                                "login_user": db["login_user"], "login_password": db["login_password"],
                                "login_db": db["login_db"]}))
    os.chmod(args, 0o600)
    book = tmp_path / "export.yml"
    book.write_text("- hosts: localhost\n  gather_facts: false\n  tasks:\n    - name: Export\n"
                    "      baileys.resilience.auth_export: \"{{ export_args }}\"\n")
    args.write_text(json.dumps({"export_args": json.loads(args.read_text())}))
    inventory = os.path.join(ROOT, "inventories", "demo", "hosts.yml")
    proc = subprocess.run(["ansible-playbook", "-i", inventory, str(book), "-e", "@%s" % args],
                          capture_output=True, text=True, env=dict(ansible_env, ANSIBLE_STDOUT_CALLBACK="json"),
                          check=False)
    assert proc.returncode != 0, proc.stdout
    result = json.loads(proc.stdout[proc.stdout.index("{"):])["plays"][0]["tasks"][0]["hosts"]["localhost"]
    assert result["failed"] and "refused 1" in result["msg"] and "'../x'" in result["msg"]
    assert result["totals"]["companies"] == 2
    assert sorted(os.listdir(dest)) == ["company-001", "company-002"]
    assert db["login_password"] not in proc.stdout
