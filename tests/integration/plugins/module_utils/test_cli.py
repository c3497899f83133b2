"""The baileys-resilience host tool end to end against a real PostgreSQL.

The tool runs as the host will run it: plugins/module_utils copied as a package named
``baileys_resilience`` and started with ``python -m baileys_resilience.cli``, with a 0600
config holding the superuser password full of shell and URL metacharacters.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time

import pytest
import yaml

from ansible_collections.baileys.resilience.plugins.module_utils import cli, jobs, pgconn

from support import authgen, pgserver


MIX = {"pre-key": 12, "session": 6, "sender-key": 4, "app-state-sync-key": 2, "app-state-sync-version": 2,
       "tctoken": 2, "lid-mapping": 2}


def write_config(path, conn, mode=0o600, **extra):
    cfg = {k: v for k, v in conn.items() if v is not None}
    cfg.update(extra)
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        yaml.safe_dump(cfg, fh)
    os.chmod(str(path), mode)
    return str(path)


def run_host(host_pkg, args, timeout=120):
    env = dict(os.environ, PYTHONPATH=host_pkg)
    for var in ("PGPASSWORD", "PGPASSFILE", "PGHOST", "PGUSER"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, "-m", "baileys_resilience.cli"] + args, capture_output=True, text=True,
                          env=env, timeout=timeout, cwd="/", check=False)
    return proc


def log_lines(stderr):
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def run_inproc(args):
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(args, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def loaded(db, dbconn):
    companies = authgen.generate(2, seed=3, form="mixed", mix=MIX)
    authgen.load_into(dbconn, companies)
    return companies


@pytest.fixture
def lock_dir(tmp_path):
    d = tmp_path / "lock"
    d.mkdir()
    return str(d)


def dump_keys(conn):
    rows = conn.execute("SELECT company_id, key_type, key_id, value FROM whatsapp_keys").fetchall()
    creds = conn.execute("SELECT company_id, creds FROM whatsapp_auth").fetchall()
    return sorted(rows), sorted(creds)


def test_export_import_end_to_end_with_hostile_password(pg, db, loaded, tmp_path, host_pkg, lock_dir):
    assert db["login_password"] == pgserver.SUPERUSER_PASSWORD and "'" in db["login_password"]
    cfg = write_config(tmp_path / "config.yml", db, lock_dir=lock_dir)
    dest = tmp_path / "sessions"
    proc = run_host(host_pkg, ["--config", cfg, "export", "--dest", str(dest), "--json"])
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["totals"]["companies"] == 2 and result["totals"]["keys"] == 2 * sum(MIX.values())
    assert sorted(os.listdir(dest)) == ["company-001", "company-002"]
    assert (os.stat(dest / "company-001" / "creds.json").st_mode & 0o777) == 0o600
    steps = log_lines(proc.stderr)
    assert [s["step"] for s in steps][:3] == ["lock", "start", "export"]
    assert steps[-1]["step"] == "finish" and steps[-1]["exit_code"] == 0
    assert all({"ts", "job", "step", "status"} <= set(s) for s in steps)
    export_step = [s for s in steps if s["step"] == "export"][0]
    assert export_step["status"] == "ok" and export_step["keys"] == 2 * sum(MIX.values())
    assert "duration" in export_step
    assert pgserver.SUPERUSER_PASSWORD not in proc.stdout + proc.stderr
    # idempotent second export
    again = run_host(host_pkg, ["--config", cfg, "export", "--dest", str(dest), "--json"])
    assert again.returncode == 0 and json.loads(again.stdout)["changed"] is False

    # import into a second, empty database through the same tool
    admin = pgconn.connect(pg.params(), autocommit=True)
    target = db["login_db"] + "_copy"
    admin.execute('CREATE DATABASE "%s"' % target)
    admin.close()
    try:
        tparams = pg.params(target)
        conn = pgconn.connect(tparams)
        pgconn.create_schema(conn, pgconn.Store())
        conn.commit()
        cfg2 = write_config(tmp_path / "config2.yml", tparams, lock_dir=lock_dir)
        check = run_host(host_pkg, ["--config", cfg2, "import", "--src", str(dest), "--check", "--json"])
        assert check.returncode == 0, check.stderr
        assert json.loads(check.stdout)["totals"]["inserted"] == 2 * sum(MIX.values())
        assert conn.execute("SELECT count(*) FROM whatsapp_keys").fetchone()[0] == 0
        proc = run_host(host_pkg, ["--config", cfg2, "import", "--src", str(dest)])
        assert proc.returncode == 0, proc.stderr
        assert "imported 2 companies" in proc.stdout
        src_conn = pgconn.connect(db)
        src_keys, src_creds = dump_keys(src_conn)
        src_conn.close()
        dst_keys, dst_creds = dump_keys(conn)
        assert [k[:3] for k in dst_keys] == [k[:3] for k in src_keys]
        assert [c[0] for c in dst_creds] == [c[0] for c in src_creds]
        conn.close()
    finally:
        admin = pgconn.connect(pg.params(), autocommit=True)
        admin.execute('DROP DATABASE IF EXISTS "%s" WITH (FORCE)' % target)
        admin.close()


def test_passfile_instead_of_password(pg, db, loaded, tmp_path, host_pkg, lock_dir):
    """No password in the config: libpq reads it from a passfile named in connect_params."""
    passfile = tmp_path / "pgpass"
    escaped = pgserver.SUPERUSER_PASSWORD.replace("\\", "\\\\").replace(":", "\\:")
    fd = os.open(str(passfile), os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write("127.0.0.1:%d:*:%s:%s\n" % (pg.port, pgserver.SUPERUSER, escaped))
    conn = {k: v for k, v in db.items() if k != "login_password"}
    cfg = write_config(tmp_path / "c.yml", conn, lock_dir=lock_dir, connect_params={"passfile": str(passfile)})
    proc = run_host(host_pkg, ["--config", cfg, "health", "--json"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(proc.stdout)["database"]["reachable"] is True


def test_config_must_be_private(db, tmp_path, lock_dir):
    for mode in (0o644, 0o640, 0o604, 0o700):
        cfg = write_config(tmp_path / ("c%o.yml" % mode), db, mode=mode, lock_dir=lock_dir)
        code, out, err = run_inproc(["--config", cfg, "health"])
        assert code == cli.EXIT_USAGE
        assert "refusing to read config" in err and "chmod 0600" in err
        assert pgserver.SUPERUSER_PASSWORD not in out + err
    ok = write_config(tmp_path / "c400.yml", db, mode=0o400, lock_dir=lock_dir)
    assert run_inproc(["--config", ok, "health", "--json"])[0] == 0


def test_lock_prevents_overlap(db, loaded, dbconn, tmp_path, host_pkg, lock_dir):
    dbconn.execute("UPDATE whatsapp_keys SET updated_at = now() - interval '40 days'")
    dbconn.commit()
    before = dbconn.execute("SELECT count(*) FROM whatsapp_keys").fetchone()[0]
    cfg = write_config(tmp_path / "config.yml", db, lock_dir=lock_dir)
    holder = jobs.JobLock("cleanup", lock_dir).acquire()  # a run in progress
    try:
        proc = run_host(host_pkg, ["--config", cfg, "cleanup"])
        assert proc.returncode == cli.EXIT_LOCKED
        assert "another baileys-resilience cleanup run is in progress" in proc.stderr
        assert "pid %d" % os.getpid() in proc.stderr
        assert dbconn.execute("SELECT count(*) FROM whatsapp_keys").fetchone()[0] == before
        # another job is not blocked by the cleanup lock
        assert run_host(host_pkg, ["--config", cfg, "health"]).returncode == 0
    finally:
        holder.release()
    proc = run_host(host_pkg, ["--config", cfg, "cleanup", "--json"])
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["deleted"] > 0
    assert dbconn.execute("SELECT count(*) FROM whatsapp_keys").fetchone()[0] < before


def test_two_real_runs_overlap(db, loaded, tmp_path, host_pkg, lock_dir):
    """Two tool processes at once: the first is held inside its job by a table lock, the second must not start."""
    cfg = write_config(tmp_path / "config.yml", db, lock_dir=lock_dir)
    blocker = pgconn.connect(db)
    blocker.execute("LOCK TABLE whatsapp_keys IN ACCESS EXCLUSIVE MODE")  # the first run's queries wait on this
    env = dict(os.environ, PYTHONPATH=host_pkg)
    first = subprocess.Popen([sys.executable, "-m", "baileys_resilience.cli", "--config", cfg, "health"],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lock_path = os.path.join(lock_dir, "baileys-resilience-health.lock")
        deadline = time.time() + 30
        while time.time() < deadline:  # wait until the first run holds the lock
            if os.path.exists(lock_path) and open(lock_path).read().strip() == str(first.pid):
                break
            time.sleep(0.02)
        else:
            pytest.fail("first run never took the lock")
        second = run_host(host_pkg, ["--config", cfg, "health"])
        assert first.poll() is None, "the first run should still be waiting on the table lock"
        assert second.returncode == cli.EXIT_LOCKED, second.stderr
        assert "another baileys-resilience health run is in progress" in second.stderr
        assert "pid %d" % first.pid in second.stderr
    finally:
        blocker.rollback()
        blocker.close()
        out, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    assert log_lines(err)[-1]["exit_code"] == 0


def test_cleanup_threshold_and_flags(db, loaded, dbconn, tmp_path, lock_dir):
    dbconn.execute("UPDATE whatsapp_keys SET updated_at = now() - interval '40 days'")
    dbconn.commit()
    cfg = write_config(tmp_path / "config.yml", db, lock_dir=lock_dir, log_format="logfmt",
                       cleanup={"max_delete": 5, "batch_size": 4}, textfile_dir=str(tmp_path))
    code, out, err = run_inproc(["--config", cfg, "cleanup"])
    assert code == cli.EXIT_FAILED
    assert "refusing to delete" in out and "max_delete=5" in out
    assert "step=cleanup_scan" in err and "status=ok" in err and "job=cleanup" in err
    prom = open(tmp_path / "baileys_resilience_cleanup.prom").read()
    assert 'baileys_resilience_job_success{job="cleanup"} 0' in prom
    assert "baileys_resilience_cleanup_stopped 1" in prom
    code, out, err = run_inproc(["--config", cfg, "cleanup", "--check", "--confirm-large-delete", "--json"])
    assert code == 0
    preview = json.loads(out)
    assert preview["deleted"] == 0 and preview["would_delete"] > 5
    code, out, err = run_inproc(["--config", cfg, "cleanup", "--confirm-large-delete", "--json"])
    assert code == 0
    done = json.loads(out)
    assert done["deleted"] == preview["would_delete"] and done["batches"] == -(-done["deleted"] // 4)
    assert err.count("step=cleanup_batch") == done["batches"]
    prom = open(tmp_path / "baileys_resilience_cleanup.prom").read()
    assert 'baileys_resilience_job_success{job="cleanup"} 1' in prom
    assert "baileys_resilience_cleanup_deleted_keys %d" % done["deleted"] in prom
    assert 'baileys_resilience_job_last_success_timestamp_seconds{job="cleanup"}' in prom
    assert os.stat(tmp_path / "baileys_resilience_cleanup.prom").st_mode & 0o777 == 0o644
    # a failed run keeps the last success time
    code, _out, _err = run_inproc(["--config", cfg, "cleanup", "--older-than-days", "1", "--age-column", "nope"])
    assert code == cli.EXIT_USAGE  # argparse rejects the choice before anything runs
    bad = write_config(tmp_path / "bad.yml", dict(db, login_port=1), lock_dir=lock_dir, textfile_dir=str(tmp_path))
    code, out, err = run_inproc(["--config", bad, "cleanup"])
    assert code == cli.EXIT_FAILED and "cannot connect" in out
    assert pgserver.SUPERUSER_PASSWORD not in out + err
    prom = open(tmp_path / "baileys_resilience_cleanup.prom").read()
    assert 'baileys_resilience_job_success{job="cleanup"} 0' in prom
    assert 'baileys_resilience_job_last_success_timestamp_seconds{job="cleanup"}' in prom


def test_no_secret_on_any_command_line(db, loaded, tmp_path, host_pkg, lock_dir):
    """The tool takes no password option at all."""
    proc = run_host(host_pkg, ["--help"])
    assert proc.returncode == 0
    for sub in ("backup", "verify", "cleanup", "health", "export", "import"):
        text = run_host(host_pkg, [sub, "--help"]).stdout
        assert "--password" not in text and "--login-password" not in text and "token" not in text.lower()


backup_mod = None
try:
    from ansible_collections.baileys.resilience.plugins.module_utils import backup as backup_mod  # noqa: F811
except ImportError:
    pass


@pytest.mark.skipif(backup_mod is None or not hasattr(backup_mod, "run_backup"),
                    reason="plugins/module_utils/backup.py (run_backup/verify_backup) is not there yet")
def test_backup_and_verify_subcommands(pg, db, loaded, tmp_path, host_pkg, lock_dir):
    backup_dir = tmp_path / "backups"
    cfg = write_config(tmp_path / "config.yml", db, lock_dir=lock_dir, backup_dir=str(backup_dir),
                       pg_bin_dir=pg.bindir, textfile_dir=str(tmp_path), retention={"keep_daily": 3})
    proc = run_host(host_pkg, ["--config", cfg, "backup", "--json"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout)
    assert result["changed"] is True and os.path.exists(result["backup"])
    assert pgserver.SUPERUSER_PASSWORD not in proc.stdout + proc.stderr
    prom = open(tmp_path / "baileys_resilience_backup.prom").read()
    assert 'baileys_resilience_job_success{job="backup"} 1' in prom
    assert "baileys_resilience_backup_last_size_bytes" in prom
    proc = run_host(host_pkg, ["--config", cfg, "verify"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "verified" in proc.stdout
    health = run_host(host_pkg, ["--config", cfg, "health", "--json"])
    h = json.loads(health.stdout)
    assert h["backup"]["valid_count"] == 1 and h["backup"]["status"] == "ok", h["backup"]
    # a corrupted dump fails verification
    with open(result["backup"], "r+b") as fh:
        fh.seek(10)
        fh.write(b"\xff\xff\xff\xff")
    proc = run_host(host_pkg, ["--config", cfg, "verify", result["backup"]])
    assert proc.returncode == cli.EXIT_FAILED
