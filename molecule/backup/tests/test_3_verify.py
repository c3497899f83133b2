"""Verify of the backup scenario, part 3: the restore test, and an older client refused."""

import json
import shlex

from scenario import (APP, BACKUP_CRON, BACKUP_DIR, BIN17, OLD_MAJOR, PG_HOST, PG_PASSWORD, SEED, TOOL, listing,
                      log_records, psql, run, run_like_cron)

testinfra_hosts = [APP]


def _verify_databases(host):
    return [r[0] for r in psql(host, "SELECT datname FROM pg_database WHERE datname LIKE 'baileys\\_verify\\_%'")]


def test_restore_test_as_cron_runs_it(host):
    assert _verify_databases(host) == []
    result, _command = run_like_cron(host, BACKUP_CRON, "baileys-resilience verify")
    log = host.file("/var/log/baileys-resilience/verify.log").content_string
    assert result.rc == 0, log
    finish = [r for r in log_records(host, "verify.log") if r["step"] == "finish"]
    assert finish[-1]["status"] == "ok" and finish[-1]["exit_code"] == 0, log
    assert "baileys-resilience verify: verified %s/" % BACKUP_DIR in log
    assert _verify_databases(host) == []


def test_restore_test_details(host):
    out = run(host, "%s verify --json" % TOOL)
    result = json.loads(out.stdout)
    assert result["ok"] is True and result["restored"] is True
    assert result["database"].startswith("baileys_verify_")
    assert result["counts"] == result["expected"] == SEED["counts"]
    assert result["companies"] == SEED["companies"]
    assert result["by_type"]["pre-key"] == sum(c.get("pre-key", 0) for c in SEED["by_company"].values())
    assert result["dropped"] is True and result["kept"] is False
    assert _verify_databases(host) == []  # the throwaway database is gone


def test_older_client_against_server_18_fails_and_writes_nothing(host):
    version = run(host, "%s/pg_dump --version" % BIN17).stdout
    assert version.startswith("pg_dump (PostgreSQL) %d." % OLD_MAJOR), version
    config = "\n".join([
        "login_host: %s" % PG_HOST, "login_user: postgres", "login_password: %s" % json.dumps(PG_PASSWORD),
        "login_db: whatsapp", "pg_bin_dir: %s" % BIN17, "backup_dir: %s" % BACKUP_DIR, ""])
    run(host, "install -d -m 0700 /root/client17 && umask 077 && printf '%%s' %s > /root/client17/config.yml"
        % shlex.quote(config))
    before = listing(host)
    result = host.run("%s --config /root/client17/config.yml backup --force" % TOOL)
    out = result.stdout + result.stderr
    print(out)
    assert result.rc == 1, out
    summary = [line for line in result.stdout.splitlines() if line.startswith("baileys-resilience backup:")]
    assert summary, out
    assert "(PostgreSQL) %d." % OLD_MAJOR in summary[0] and "(major %d)" % OLD_MAJOR in summary[0], summary
    assert "PostgreSQL 18." in summary[0] and "(major 18)" in summary[0], summary
    assert "is older than the server" in summary[0], summary
    after = listing(host)
    assert after == before, (before, after)
    assert not [n for n in after if n.endswith(".partial")]
