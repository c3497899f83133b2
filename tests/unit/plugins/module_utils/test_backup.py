"""Backup helpers that need no server: argv/environment builders, COPY text parsing, retention plans."""
from __future__ import annotations

import io
import os
import stat

import pytest

from ansible_collections.baileys.resilience.plugins.module_utils import backup, pgtools

PASSWORD = "s3cr<e>t|pa?ss%w@rd:/ 'q\"x\\y"


def params(**extra):
    p = {"login_host": "db.example", "login_port": 5433, "login_user": "backup", "login_password": PASSWORD,
         "login_db": "whatsapp", "connect_timeout": 10, "connect_params": {}}
    p.update(extra)
    return p


def test_argv_never_holds_the_password_and_passfile_does():
    conn = params(connect_params={"sslmode": "require", "keepalives": 1, "target_session_attrs": "read-write"})
    with pgtools.ClientConnection(conn) as client:
        dump = pgtools.pg_dump_argv("/usr/lib/postgresql/18/bin", client, "zstd:3", snapshot="00000003-1")
        restore = pgtools.pg_restore_argv("/usr/lib/postgresql/18/bin", "/b/x.dump", client)
        passfile = client.env["PGPASSFILE"]
        assert stat.S_IMODE(os.stat(passfile).st_mode) == 0o600
        with open(passfile) as fh:
            line = fh.read()
        env = dict(client.env)
    for argv in (dump, restore):
        assert all(isinstance(a, str) for a in argv)
        assert not any(PASSWORD in a or "s3cr" in a for a in argv), argv
    assert dump[:3] == ["/usr/lib/postgresql/18/bin/pg_dump", "--format=custom", "--compress=zstd:3"]
    assert "--snapshot=00000003-1" in dump and "--no-password" in dump
    # options without an environment variable go in --dbname, quoted; the rest in the environment
    assert dump[-1] == "--dbname=dbname='whatsapp' keepalives='1'"
    assert env["PGHOST"] == "db.example" and env["PGPORT"] == "5433" and env["PGUSER"] == "backup"
    assert env["PGSSLMODE"] == "require" and env["PGTARGETSESSIONATTRS"] == "read-write"
    assert "PGPASSWORD" not in env and not any(PASSWORD in v for v in env.values())
    # passfile syntax: ':' and '\' escaped
    assert line == "*:*:*:*:s3cr<e>t|pa?ss%w@rd\\:/ 'q\"x\\\\y\n"
    assert not os.path.exists(passfile)  # gone after the block


def test_password_in_connect_params_and_restore_target():
    conn = params(login_password=None, connect_params={"password": PASSWORD})
    with pgtools.ClientConnection(conn, dbname="baileys_verify_1") as client:
        argv = pgtools.pg_restore_argv("/bin", "/b/x.dump", client)
        with open(client.env["PGPASSFILE"]) as fh:
            assert fh.read().startswith("*:*:*:*:s3cr")
    assert argv[-2] == "--dbname=dbname='baileys_verify_1'" and argv[-1] == "/b/x.dump"
    assert not any("s3cr" in a for a in argv)


def test_no_password_leaves_libpq_defaults(monkeypatch):
    monkeypatch.setenv("PGPASSWORD", "inherited")
    with pgtools.ClientConnection(params(login_password=None)) as client:
        assert client.env.get("PGPASSWORD") == "inherited" and "PGPASSFILE" not in client.env
    with pgtools.ClientConnection(params()) as client:
        assert "PGPASSWORD" not in client.env  # would win over our passfile


def test_sslpassword_refused():
    with pytest.raises(pgtools.ToolError, match="sslpassword"):
        pgtools.ClientConnection(params(connect_params={"sslpassword": "x"}))


def test_error_text_is_scrubbed():
    with pgtools.ClientConnection(params()) as client:
        assert client.scrub("FATAL: bad password %s here" % PASSWORD) == "FATAL: bad password ******** here"


def test_data_only_restore_needs_no_server():
    argv = pgtools.pg_restore_argv("/bin", "/b/x.dump", data_only_table="whatsapp_keys", schema="public")
    assert argv == ["/bin/pg_restore", "--data-only", "--table=whatsapp_keys", "--schema=public", "-f", "-",
                    "/b/x.dump"]


@pytest.mark.parametrize("raw, value", [
    (b"\\N", None),
    (b"plain", "plain"),
    (b"a\\tb\\nc\\rd\\\\e", "a\tb\nc\rd\\e"),
    (b"\\\\N", "\\N"),
    (b"\\b\\f\\v", "\b\f\v"),
    (b"\\101\\x42\\7", "AB\x07"),
    (b"\\.", "."),
    ("✓ 𝄞".encode(), "✓ 𝄞"),
    (b"\\xe2\\x9c\\x93", "✓"),
    (b"", ""),
])
def test_copy_field(raw, value):
    assert pgtools.copy_field(raw) == value


def test_copy_blocks_stream():
    script = (b"SET client_encoding = 'UTF8';\n"
              b"COPY public.\"odd \"\"t\"\"\" (company_id, \"value\", expires_at) FROM stdin;\n"
              b"a\t{\"x\": \"y\\\\n\"}\t\\N\n"
              b"b\\tc\t[]\t2026-01-01\n"
              b"\\.\n\n")
    blocks = []
    for table, columns, rows in pgtools.iter_copy_blocks(io.BytesIO(script)):
        blocks.append((table, columns, [pgtools.parse_copy_row(r) for r in rows]))
    assert blocks == [('public."odd ""t"""', ["company_id", "value", "expires_at"],
                       [["a", '{"x": "y\\n"}', None], ["b\tc", "[]", "2026-01-01"]])]
    with pytest.raises(pgtools.ToolError, match="terminator"):
        for _t, _c, rows in pgtools.iter_copy_blocks(io.BytesIO(b"COPY t (a) FROM stdin;\nx\n")):
            list(rows)
    with pytest.raises(pgtools.ToolError, match="not UTF-8"):
        list(pgtools.iter_copy_blocks(io.BytesIO(b"SET client_encoding = 'LATIN1';\n")))


def test_versions():
    assert pgtools.parse_version("pg_dump (PostgreSQL) 18.1 (Debian 18.1-1.pgdg13+2)\n") == (
        18, "pg_dump (PostgreSQL) 18.1 (Debian 18.1-1.pgdg13+2)")
    assert pgtools.parse_version("pg_dump (PostgreSQL) 9.6.24")[0] == 9
    with pytest.raises(pgtools.ToolError):
        pgtools.parse_version("garbage")
    assert pgtools.server_major(180001) == 18 and pgtools.server_major(90624) == 9
    pgtools.check_client_not_older(18, "pg_dump (PostgreSQL) 18.1", 150004, "15.4")
    with pytest.raises(pgtools.ToolError) as err:
        pgtools.check_client_not_older(15, "pg_dump (PostgreSQL) 15.4", 180001, "18.1")
    assert "15.4" in str(err.value) and "18.1" in str(err.value)
    assert pgtools.dump_compression(16) == ("zstd:3", "zstd:3") and pgtools.dump_compression(15) == ("6", "gzip:6")


def test_bin_dir_is_never_path(tmp_path, monkeypatch):
    monkeypatch.setattr(pgtools, "DEFAULT_BIN_GLOB", str(tmp_path / "*" / "bin"))
    with pytest.raises(pgtools.ToolError, match="no PostgreSQL client"):
        pgtools.find_bin_dir()
    for major in ("9", "15", "18", "notanumber"):
        (tmp_path / major / "bin").mkdir(parents=True)
        (tmp_path / major / "bin" / "pg_dump").write_text("")
    assert pgtools.find_bin_dir() == str(tmp_path / "18" / "bin")
    with pytest.raises(pgtools.ToolError, match="has no pg_dump"):
        pgtools.find_bin_dir(str(tmp_path))


def entry(stamp, kind="daily", valid=True):
    name = "baileys-auth-%s.dump" % stamp
    return {"name": name, "path": "/b/" + name, "manifest_path": "/b/%s.manifest.json" % name,
            "created_at": backup._iso(stamp), "manifest": {"kind": kind}, "valid": valid, "reason": None}


def test_plan_retention():
    import datetime

    day = datetime.date(2026, 1, 1)
    items = []
    while day <= datetime.date(2026, 6, 10):
        items.append(entry(day.strftime("%Y%m%dT030000Z"), "monthly" if day.day == 1 else "daily"))
        if day.day == 5:
            items.append(entry(day.strftime("%Y%m%dT150000Z")))  # a forced second one that day
        day += datetime.timedelta(days=1)
    items.append(entry("20251201T030000Z", "monthly", valid=False))  # invalid: never touched
    items.sort(key=lambda e: e["created_at"], reverse=True)
    keep, delete = backup.plan_retention(items, 7, 4)
    kept = sorted((k[13:21] for k in keep), reverse=True)
    assert kept == ["202606%02d" % d for d in range(10, 3, -1)] + ["20260601", "20260501", "20260401", "20260301"]
    assert "baileys-auth-20260605T150000Z.dump" in keep and "baileys-auth-20260605T030000Z.dump" not in keep
    assert "baileys-auth-20260601T030000Z.dump" in keep  # June's monthly is one of the four months
    assert len(keep) == 7 + 4 and all(e["valid"] for e in delete)
    assert "baileys-auth-20251201T030000Z.dump" not in [e["name"] for e in delete]
    # a month whose monthly backup is gone keeps its oldest
    partial = [e for e in items if e["name"] != "baileys-auth-20260301T030000Z.dump"]
    keep, _delete = backup.plan_retention(partial, 7, 4)
    assert "baileys-auth-20260302T030000Z.dump" in keep
    # zero of both: only the newest, plus what the caller protects
    keep, delete = backup.plan_retention(items, 0, 0, protect=("baileys-auth-20260102T030000Z.dump",))
    assert sorted(keep) == ["baileys-auth-20260102T030000Z.dump", "baileys-auth-20260610T030000Z.dump"]
    assert len(delete) == len([e for e in items if e["valid"]]) - 2
    with pytest.raises(backup.BackupError):
        backup.plan_retention(items, -1, 4)
    assert backup.plan_retention([], 7, 4) == ({}, [])
