"""pitr's preflight and restore points against a real PostgreSQL of its own (pg_hba.conf and wal_level change).

Each refusal the pitr role must explain: no replication line in pg_hba.conf, a role without REPLICATION,
wal_level=minimal; each comes back as a problem with a plain message, the fallback flag set, and nothing on the
server changed (no slot).
"""
from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from ansible_collections.baileys.resilience.plugins.module_utils import pgconn, pitr

from support import pgserver


@pytest.fixture(scope="module")
def server():
    base = tempfile.mkdtemp(prefix="baileys-resilience-pitr-")
    os.chmod(base, 0o755)
    srv = pgserver.PgServer(base).start()
    srv.psql("CREATE ROLE norepl LOGIN PASSWORD 'norepl-pw'")
    srv.psql("CREATE ROLE streamer LOGIN REPLICATION PASSWORD 'streamer:pw'")
    yield srv
    srv.stop("immediate")
    shutil.rmtree(base, ignore_errors=True)


def _codes(result):
    return [p["code"] for p in result["problems"]]


def _slots(server):
    return int(server.psql("SELECT count(*) FROM pg_replication_slots").strip())


def test_preflight_ok(server):
    result = pitr.preflight(server.params(), bin_dir=server.bindir)
    assert result["ok"], result["problems"]
    assert result["replication_allowed"]
    assert result["system_identifier"] and result["timeline"] == 1
    assert result["wal_level"] == "replica"
    assert _slots(server) == 0


def test_replication_user_with_colon_in_password(server):
    repl = dict(server.params(), login_user="streamer", login_password="streamer:pw")
    result = pitr.preflight(server.params(), repl, bin_dir=server.bindir)
    assert result["ok"], result["problems"]


def test_no_replication_line_in_pg_hba(server):
    hba = os.path.join(server.data, "pg_hba.conf")
    original = open(hba).read()
    try:
        with open(hba, "w") as fh:
            fh.write("".join(line for line in original.splitlines(True) if "replication" not in line))
        server.psql("SELECT pg_reload_conf()")
        result = pitr.preflight(server.params(), bin_dir=server.bindir)
    finally:
        with open(hba, "w") as fh:
            fh.write(original)
        server.psql("SELECT pg_reload_conf()")
    assert _codes(result) == ["replication_refused"], result["problems"]
    assert "pg_hba.conf" in result["message"] and "host replication" in result["message"]
    assert not result["replication_allowed"] and not result["ok"]
    assert _slots(server) == 0


def test_role_without_replication(server):
    params = dict(server.params(), login_user="norepl", login_password="norepl-pw")
    result = pitr.preflight(params, bin_dir=server.bindir)
    assert _codes(result) == ["no_replication_privilege", "no_backup_privileges"], result["problems"]
    assert "ALTER ROLE norepl REPLICATION" in result["message"]
    assert "GRANT EXECUTE ON FUNCTION pg_backup_start" in result["message"]
    assert not result["replication_allowed"]
    assert _slots(server) == 0


def test_wal_level_minimal(server):
    server.psql("ALTER SYSTEM SET wal_level = minimal")
    server.psql("ALTER SYSTEM SET max_wal_senders = 0")
    server.stop()
    server.start()
    try:
        result = pitr.preflight(server.params(), bin_dir=server.bindir)
    finally:
        server.psql("ALTER SYSTEM RESET wal_level")
        server.psql("ALTER SYSTEM RESET max_wal_senders")
        server.stop()
        server.start()
    assert "wal_level" in _codes(result), result["problems"]
    assert "wal_level is minimal" in result["message"] and "replica" in result["message"]
    assert not result["replication_allowed"]
    assert _slots(server) == 0


def test_no_free_slot(server):
    server.psql("ALTER SYSTEM SET max_replication_slots = 1")
    server.stop()
    server.start()
    server.psql("SELECT pg_create_physical_replication_slot('someone_else')")
    try:
        result = pitr.preflight(server.params(), bin_dir=server.bindir)
        assert _codes(result) == ["no_free_slot"], result["problems"]
        assert result["replication_allowed"]  # the operator can fix it: no fallback, the role fails
    finally:
        server.psql("SELECT pg_drop_replication_slot('someone_else')")
        server.psql("ALTER SYSTEM RESET max_replication_slots")
        server.stop()
        server.start()


def test_restore_point_only_with_slot(server):
    params = server.params()
    out = pitr.restore_point(params, "before-switch-1", only_with_slot="barman_baileys")
    assert not out["created"] and "no replication slot" in out["reason"]
    server.psql("SELECT pg_create_physical_replication_slot('barman_baileys')")
    try:
        out = pitr.restore_point(params, "before-switch-1", only_with_slot="barman_baileys")
        assert out["created"] and "/" in out["lsn"]
    finally:
        server.psql("SELECT pg_drop_replication_slot('barman_baileys')")
    with pytest.raises(pitr.PitrError):
        pitr.restore_point(dict(params, login_user="norepl", login_password="norepl-pw"), "nope")
    with pytest.raises(pitr.PitrError):
        pitr.restore_point(params, "bad name; drop")
    assert pgconn.HAS_DRIVER
