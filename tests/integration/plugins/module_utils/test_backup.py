"""pg_backup / backup_verify core against the real PostgreSQL of the fixtures."""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time

import pytest

from ansible_collections.baileys.resilience.plugins.module_utils import backup, pgconn, pgtools

from support import ROOT
from support.authgen import REFERENCE_MIX, generate, load_into


MIX = {k: max(2, v // 50) for k, v in REFERENCE_MIX.items()}
UTC = datetime.timezone.utc


def at(*args):
    return datetime.datetime(*args, tzinfo=UTC)


@pytest.fixture
def loaded(db, dbconn):
    load_into(dbconn, generate(2, seed=7, mix=MIX))
    return db


def counts(dbconn):
    row = dbconn.execute("SELECT (SELECT count(*) FROM whatsapp_auth), (SELECT count(*) FROM whatsapp_keys)").fetchone()
    dbconn.commit()
    return {"auth": row[0], "keys": row[1]}


def names(directory):
    return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


def verify_dbs(pg):
    conn = pgconn.connect(pg.params(), autocommit=True)
    try:
        return [r[0] for r in conn.execute("SELECT datname FROM pg_database WHERE datname LIKE 'baileys_verify_%'")]
    finally:
        conn.close()


def fake_bin(tmp_path, name, pg_dump_body, shebang="#!/bin/sh"):
    """A bin dir with a scripted pg_dump and the real pg_restore."""
    real = pgtools.find_bin_dir()
    d = tmp_path / name
    d.mkdir()
    script = d / "pg_dump"
    script.write_text(shebang + "\n" + textwrap.dedent(pg_dump_body).replace("@REAL@", real))
    script.chmod(0o755)
    os.symlink(os.path.join(real, "pg_restore"), d / "pg_restore")
    return str(d)


def clone_backup(src, backup_dir, when, kind):
    """A valid backup dated ``when``: the same dump (hard link) with its own manifest."""
    manifest = backup.read_manifest(src + backup.MANIFEST_SUFFIX)
    name = backup.backup_name("baileys-auth", when)
    path = os.path.join(backup_dir, name)
    os.link(src, path)
    manifest.update(file=name, kind=kind, created_at=when.strftime("%Y-%m-%dT%H:%M:%SZ"))
    with open(path + backup.MANIFEST_SUFFIX, "w") as fh:
        json.dump(manifest, fh)
    return name


# --------------------------------------------------------------------------- backup


def test_backup_dump_manifest_and_idempotence(loaded, dbconn, tmp_path):
    bdir = str(tmp_path / "backups")
    expected = counts(dbconn)

    # check mode: connects, says what it would write, writes nothing
    res = backup.run_backup(loaded, {}, bdir, check_mode=True, now=at(2026, 3, 5, 3, 0, 0))
    assert res["changed"] and res["backup"] == os.path.join(bdir, "baileys-auth-20260305T030000Z.dump")
    assert res["manifest"] is None and not os.path.exists(bdir)

    res = backup.run_backup(loaded, {}, bdir, now=at(2026, 3, 5, 3, 0, 0))
    assert res["changed"] and not res["skipped"] and res["deleted"] == []
    path = res["backup"]
    assert names(bdir) == ["baileys-auth-20260305T030000Z.dump", "baileys-auth-20260305T030000Z.dump.manifest.json"]
    assert stat.S_IMODE(os.stat(bdir).st_mode) == 0o700
    for n in names(bdir):
        assert stat.S_IMODE(os.stat(os.path.join(bdir, n)).st_mode) == 0o600
    m = backup.read_manifest(path + ".manifest.json")
    data = open(path, "rb").read()
    assert data[:5] == b"PGDMP"
    assert m["sha256"] == hashlib.sha256(data).hexdigest() and m["size"] == len(data)
    assert m["counts"] == expected == {"auth": 2, "keys": 2 * sum(MIX.values())}
    assert m["companies"] == 2 and m["kind"] == "monthly" and m["format"] == 1
    assert m["file"] == os.path.basename(path) and m["created_at"] == "2026-03-05T03:00:00Z"
    assert m["validated"] == {"restore_list": True, "row_counts": True}
    assert m["client_major"] >= int(m["server_version"].split(".")[0])
    assert m["compression"] == ("zstd:3" if m["client_major"] >= 16 else "gzip:6")
    assert m["database"] == loaded["login_db"] and m["server_version_num"] >= 100000
    # the dump's own rows, counted with no server, match
    bin_dir = pgtools.find_bin_dir()
    assert pgtools.count_table_rows(bin_dir, path, "whatsapp_keys", "public") == expected["keys"]
    [entry] = backup.list_backups(bdir, verify_checksum=True)
    assert entry["valid"] and entry["reason"] is None and entry["path"] == path
    assert backup.newest_valid_backup(bdir)["path"] == path

    # same day again: a no-op, nothing touched
    before = {n: os.stat(os.path.join(bdir, n)).st_mtime_ns for n in names(bdir)}
    res = backup.run_backup(loaded, {}, bdir, now=at(2026, 3, 5, 21, 0, 0))
    assert not res["changed"] and res["skipped"] and res["backup"] == path
    assert {n: os.stat(os.path.join(bdir, n)).st_mtime_ns for n in names(bdir)} == before
    res = backup.run_backup(loaded, {}, bdir, check_mode=True, now=at(2026, 3, 5, 21, 0, 0))
    assert not res["changed"] and res["skipped"]

    # forced: a second backup of the day, a daily one
    dbconn.execute("DELETE FROM whatsapp_keys WHERE key_type = 'pre-key'")
    dbconn.commit()
    res = backup.run_backup(loaded, {}, bdir, force=True, now=at(2026, 3, 5, 21, 0, 0))
    assert res["changed"] and res["manifest"]["kind"] == "daily"
    assert res["manifest"]["counts"]["keys"] == expected["keys"] - 2 * MIX["pre-key"]
    # retention keeps only the newest of a day among dailies, but the month's first one stays as monthly
    assert res["deleted"] == []
    assert len(backup.list_backups(bdir)) == 2


def test_truncated_or_tiny_dump_fails_validation(loaded, dbconn, tmp_path):
    bdir = str(tmp_path / "b")
    res = backup.run_backup(loaded, {}, bdir, now=at(2026, 3, 5, 3, 0, 0))
    bin_dir = res["pg_bin_dir"]
    good = res["backup"]
    expected = res["manifest"]["counts"]
    size = os.path.getsize(good)

    cut = str(tmp_path / "cut.dump")
    with open(good, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(size * 2 // 3))
    with pytest.raises(backup.BackupError) as err:
        backup.validate_dump(bin_dir, cut, {}, expected)
    assert "failed validation" in str(err.value)

    tiny = str(tmp_path / "tiny.dump")
    with open(good, "rb") as src, open(tiny, "wb") as dst:
        dst.write(src.read(100))
    with pytest.raises(backup.BackupError, match="empty or implausible"):
        backup.validate_dump(bin_dir, tiny, {}, expected)
    open(tiny, "wb").close()
    with pytest.raises(backup.BackupError, match="empty or implausible"):
        backup.validate_dump(bin_dir, tiny, {}, expected)

    # counts that differ from the snapshot's are a failure too
    with pytest.raises(backup.BackupError, match="expected"):
        backup.validate_dump(bin_dir, good, {}, dict(expected, keys=expected["keys"] + 1))
    assert backup.validate_dump(bin_dir, good, {}, expected)["row_counts"]

    # the backup itself damaged in place: no longer valid, by size and by checksum
    with open(good, "r+b") as fh:
        fh.seek(size // 2)
        byte = fh.read(1)
        fh.seek(size // 2)
        fh.write(bytes([byte[0] ^ 0xFF]))
    [entry] = backup.list_backups(bdir)
    assert entry["valid"]  # same size: only the checksum can tell
    [entry] = backup.list_backups(bdir, verify_checksum=True)
    assert not entry["valid"] and "sha256" in entry["reason"]
    assert backup.newest_valid_backup(bdir) is None
    with pytest.raises(backup.BackupError, match="sha256"):
        backup.read_backup_states(good, {})
    os.truncate(good, size - 10)
    [entry] = backup.list_backups(bdir)
    assert not entry["valid"] and "size" in entry["reason"]


def test_client_older_than_server_is_refused_before_writing(loaded, tmp_path):
    bin_dir = fake_bin(tmp_path, "old", """\
        if [ "$1" = "--version" ]; then echo "pg_dump (PostgreSQL) 14.0"; exit 0; fi
        echo "must not run" >&2; exit 3
    """)
    bdir = str(tmp_path / "backups")
    with pytest.raises(backup.BackupError) as err:
        backup.run_backup(loaded, {}, bdir, pg_bin_dir=bin_dir, now=at(2026, 3, 5, 3))
    msg = str(err.value)
    server = pgconn.connect(loaded).execute("SHOW server_version").fetchone()[0].split()[0]
    assert "pg_dump (PostgreSQL) 14.0" in msg and server in msg and "older" in msg
    assert not os.path.exists(bdir)
    # an existing directory gets nothing either, and check mode refuses the same way
    os.mkdir(bdir, 0o700)
    for check in (False, True):
        with pytest.raises(backup.BackupError, match="14.0"):
            backup.run_backup(loaded, {}, bdir, pg_bin_dir=bin_dir, check_mode=check)
    assert names(bdir) == []


def test_retention_with_simulated_dates(loaded, tmp_path):
    bdir = str(tmp_path / "b")
    first = backup.run_backup(loaded, {}, bdir, now=at(2025, 12, 20, 3))
    assert first["manifest"]["kind"] == "monthly"
    day = datetime.date(2025, 12, 21)
    while day < datetime.date(2026, 3, 15):
        when = at(day.year, day.month, day.day, 3)
        clone_backup(first["backup"], bdir, when, "monthly" if day.day == 1 else "daily")
        day += datetime.timedelta(days=1)
    # not valid: never a backup, never deleted by retention
    orphan = os.path.join(bdir, "baileys-auth-20251101T030000Z.dump")
    with open(orphan, "wb") as fh:
        fh.write(b"PGDMP truncated")
    assert len([b for b in backup.list_backups(bdir) if b["valid"]]) == 85

    # a failing backup deletes nothing
    broken = fake_bin(tmp_path, "broken", """\
        if [ "$1" = "--version" ]; then exec @REAL@/pg_dump --version; fi
        printf 'PGDMP not really a dump'; exit 0
    """)
    before = names(bdir)
    with pytest.raises(backup.BackupError, match="empty or implausible"):
        backup.run_backup(loaded, {}, bdir, pg_bin_dir=broken, now=at(2026, 3, 15, 3))
    assert names(bdir) == before

    # check mode tells what retention would delete, deletes nothing
    res = backup.run_backup(loaded, {}, bdir, check_mode=True, now=at(2026, 3, 15, 3))
    assert len(res["deleted"]) == 85 + 1 - 11 and names(bdir) == before

    res = backup.run_backup(loaded, {}, bdir, now=at(2026, 3, 15, 3))
    assert res["manifest"]["kind"] == "daily"
    kept = [b["created_at"][:10] for b in backup.list_backups(bdir) if b["valid"]]
    assert kept == ["2026-03-%02d" % d for d in range(15, 8, -1)] + ["2026-03-01", "2026-02-01", "2026-01-01",
                                                                     "2025-12-20"]
    assert len(res["deleted"]) == 85 + 1 - 11
    assert sorted(res["kept"]) == sorted(b["name"] for b in backup.list_backups(bdir) if b["valid"])
    assert os.path.exists(orphan) and os.path.basename(orphan) in [i["name"] for i in res["invalid"]]

    # the first backup of April is monthly; December falls out of the four months
    res = backup.run_backup(loaded, {}, bdir, now=at(2026, 4, 1, 3))
    assert res["manifest"]["kind"] == "monthly"
    kept = [b["created_at"][:10] for b in backup.list_backups(bdir) if b["valid"]]
    assert kept == ["2026-04-01"] + ["2026-03-%02d" % d for d in range(15, 9, -1)] + \
        ["2026-03-01", "2026-02-01", "2026-01-01"]

    # nothing kept by the rules: the newest valid backup still is
    res = backup.run_backup(loaded, {}, bdir, keep_daily=0, keep_monthly=0, now=at(2026, 4, 2, 3))
    assert [b["created_at"][:10] for b in backup.list_backups(bdir) if b["valid"]] == ["2026-04-02"]
    # a clock that went backwards: the new backup and the newest one are both kept
    res = backup.run_backup(loaded, {}, bdir, keep_daily=0, keep_monthly=0, now=at(2026, 3, 30, 3))
    assert [b["created_at"][:10] for b in backup.list_backups(bdir) if b["valid"]] == ["2026-04-02", "2026-03-30"]


KILL_SCRIPT = """
import json, sys
sys.path.insert(0, %(coll)r)
from ansible_collections.baileys.resilience.plugins.module_utils import backup
args = json.load(open(sys.argv[1]))
backup.run_backup(args["conn"], {}, args["dir"], pg_bin_dir=args["bin"])
"""


def test_killed_mid_dump_leaves_nothing_counted(loaded, tmp_path):
    bdir = str(tmp_path / "b")
    old = backup.run_backup(loaded, {}, bdir, now=at(2026, 3, 1, 3))
    clone_backup(old["backup"], bdir, at(2026, 3, 2, 3), "daily")
    slow = fake_bin(tmp_path, "slow", """\
        if [ "$1" = "--version" ]; then exec @REAL@/pg_dump --version; fi
        printf 'PGDMP half a dump'
        exec sleep 60
    """)
    argfile = tmp_path / "args.json"
    argfile.write_text(json.dumps({"conn": loaded, "dir": bdir, "bin": slow}))
    argfile.chmod(0o600)
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT % {"coll": os.path.join(ROOT, ".build", "collections")})
    proc = subprocess.Popen([sys.executable, str(script), str(argfile)], start_new_session=True,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        partial = None
        while time.monotonic() < deadline and partial is None:
            partial = next((n for n in names(bdir) if n.endswith(".partial") and
                            os.path.getsize(os.path.join(bdir, n)) > 0), None)
            time.sleep(0.05)
        assert partial, proc.stderr.read() if proc.poll() is not None else "no partial file appeared"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert partial.endswith(".dump.partial")
    # a partial file is never a backup; a dump without manifest is not valid
    with open(os.path.join(bdir, "baileys-auth-20260303T030000Z.dump"), "wb") as fh:
        fh.write(b"PGDMP truncated")
    listed = backup.list_backups(bdir)
    assert [b["name"] for b in listed] == ["baileys-auth-20260303T030000Z.dump", "baileys-auth-20260302T030000Z.dump",
                                           "baileys-auth-20260301T030000Z.dump"]
    assert [b["valid"] for b in listed] == [False, True, True]
    assert backup.newest_valid_backup(bdir)["name"] == "baileys-auth-20260302T030000Z.dump"

    # check mode reports the stale partial but leaves it
    res = backup.run_backup(loaded, {}, bdir, check_mode=True, now=at(2026, 3, 2, 9))
    assert res["partials_removed"] == [partial] and partial in names(bdir)
    # the next run removes it; today's valid backup exists so nothing else happens
    res = backup.run_backup(loaded, {}, bdir, now=at(2026, 3, 2, 9))
    assert res["skipped"] and res["changed"] and res["partials_removed"] == [partial]
    assert res["deleted"] == [] and partial not in names(bdir)
    assert len(names(bdir)) == 5  # two valid pairs + the invalid dump, untouched


def test_restore_test_happy_path_and_failures(pg, loaded, dbconn, tmp_path):
    bdir = str(tmp_path / "b")
    res = backup.run_backup(loaded, {}, bdir, now=at(2026, 3, 1, 3))
    path = res["backup"]

    ok = backup.verify_backup(path, pg.params(), {})
    assert ok["ok"] and ok["restored"] and ok["dropped"]
    assert ok["counts"] == res["manifest"]["counts"] and ok["companies"] == 2
    assert ok["restore_seconds"] > 0 and ok["database"].startswith("baileys_verify_")
    assert verify_dbs(pg) == []

    quick = backup.verify_backup(path, pg.params(), {}, check_only=True)
    assert quick["ok"] and not quick["restored"] and quick["counts"] == res["manifest"]["counts"]

    # tampered manifest counts: the restore test fails, the throwaway database is dropped anyway
    mpath = path + backup.MANIFEST_SUFFIX
    manifest = backup.read_manifest(mpath)
    manifest["counts"]["keys"] += 1
    with open(mpath, "w") as fh:
        json.dump(manifest, fh)
    with pytest.raises(backup.BackupError) as err:
        backup.verify_backup(path, pg.params(), {})
    assert "keys rows" in str(err.value)
    assert verify_dbs(pg) == []

    # a key type Baileys does not know, and creds that are not an object
    dbconn.execute("INSERT INTO whatsapp_keys (company_id, key_type, key_id, value) "
                   "VALUES ('company-001', 'bogus-type', '1', '{}')")
    dbconn.execute("UPDATE whatsapp_auth SET creds = '[1, 2]' WHERE company_id = 'company-002'")
    dbconn.commit()
    res = backup.run_backup(loaded, {}, bdir, now=at(2026, 3, 2, 3))
    with pytest.raises(backup.BackupError) as err:
        backup.verify_backup(res["backup"], pg.params(), {})
    assert "bogus-type" in str(err.value) and "company-002" in str(err.value)
    assert verify_dbs(pg) == []


SPY = """\
import json, os, stat, sys
if sys.argv[1:] == ["--version"]:
    os.execv("@REAL@/pg_dump", ["pg_dump", "--version"])
passfile = os.environ.get("PGPASSFILE")
with open(passfile) as fh:
    line = fh.read().rstrip("\\n")
fields, cur, esc = [], "", False
for c in line:
    if esc:
        cur, esc = cur + c, False
    elif c == "\\\\":
        esc = True
    elif c == ":":
        fields, cur = fields + [cur], ""
    else:
        cur += c
with open(os.environ["SPY_OUT"], "w") as out:
    json.dump({"argv": sys.argv, "mode": stat.S_IMODE(os.stat(passfile).st_mode), "passfile": passfile,
               "password": cur, "fields": fields, "pgpassword": os.environ.get("PGPASSWORD")}, out)
sys.stderr.write("pg_dump: error: connection failed for password %s\\n" % cur)
sys.exit(1)
"""


def test_password_reaches_pg_dump_only_through_a_passfile(pg, loaded, tmp_path, monkeypatch):
    password = loaded["login_password"]
    assert set("<>|?%@:/ '\"") <= set(password)  # every awkward character
    spy = fake_bin(tmp_path, "spy", SPY, shebang="#!" + sys.executable)
    out = tmp_path / "spy.json"
    monkeypatch.setenv("SPY_OUT", str(out))
    monkeypatch.setenv("PGPASSWORD", "from-the-environment")
    with pytest.raises(backup.BackupError) as err:
        backup.run_backup(loaded, {}, str(tmp_path / "b"), pg_bin_dir=spy)
    seen = json.loads(out.read_text())
    assert seen["password"] == password and seen["fields"] == ["*", "*", "*", "*"]
    assert seen["mode"] == 0o600 and not os.path.exists(seen["passfile"])
    assert seen["pgpassword"] is None  # an inherited PGPASSWORD would win over the passfile
    assert not any(password in a for a in seen["argv"])
    assert any(a.startswith("--snapshot=") for a in seen["argv"])
    # pg_dump's message is shown, its password masked
    assert "connection failed for password ********" in str(err.value) and password not in str(err.value)
    assert [n for n in os.listdir(tmp_path / "b") if not n.startswith(".")] == []


def test_secrets_never_in_errors(pg, loaded, tmp_path):
    password = pg.params()["login_password"]
    assert set("<>|?%@:/ '\"") <= set(password)  # the fixture's password has every awkward character
    wrong = dict(loaded, login_password=password + "-wrong")
    with pytest.raises(pgconn.PgError) as err:
        backup.run_backup(wrong, {}, str(tmp_path / "b"))
    assert password not in str(err.value) and "wrong" not in str(err.value)
    assert not os.path.exists(tmp_path / "b")
    good = backup.run_backup(loaded, {}, str(tmp_path / "b"))
    with pytest.raises(pgconn.PgError) as err:
        backup.verify_backup(good["backup"], dict(pg.params(), login_password=password + "-wrong"), {})
    assert password not in str(err.value) and "wrong" not in str(err.value)
    assert verify_dbs(pg) == []


def test_non_default_store_names(pg, db, dbconn, tmp_path):
    store = {"schema": "Baileys Store", "auth_table": "Auth-State", "keys_table": "keys"}
    pgconn.create_schema(dbconn, pgconn.Store(**store))
    dbconn.commit()
    load_into(dbconn, generate(1, seed=5, mix=MIX), store_schema=store["schema"], auth=store["auth_table"],
              keys=store["keys_table"])
    # the default tables of the fixture are empty: counts must come from the named ones
    res = backup.run_backup(db, store, str(tmp_path / "b"), now=at(2026, 3, 1, 3))
    m = res["manifest"]
    assert m["counts"] == {"auth": 1, "keys": sum(MIX.values())}
    assert (m["schema"], m["auth_table"], m["keys_table"]) == ("Baileys Store", "Auth-State", "keys")
    ok = backup.verify_backup(res["backup"], pg.params(), {})  # the manifest names the tables
    assert ok["ok"] and ok["counts"] == m["counts"]
    snapshot, states = backup.read_backup_states(res["backup"], {})
    states = list(states)
    assert [s.company_id for s in states] == ["company-001"] and len(states[0].keys) == sum(MIX.values())
    assert snapshot["counts"] == m["counts"]
