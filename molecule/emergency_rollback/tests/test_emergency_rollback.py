"""Verify of the emergency_rollback scenario (testinfra on the app host, after side_effect.yml).

State expected: the service is back on PostgreSQL after a rollback from the database (converge), a rollback
from the local backup with the database down (side_effect), 5 keys written in file mode and return_to_postgres.
"""

import json
import os
import shlex
from pathlib import Path

import pytest

testinfra_hosts = ["baileys_app"]

SESSIONS = "/srv/whatsapp/sessions"
COMPANY = "company-001"
COMPANY_DIR = f"{SESSIONS}/session-{COMPANY}"
ENV_FILE = "/srv/whatsapp/app.env"
PM2 = "/opt/baileys-standin/node_modules/.bin/pm2"
PM2_HOME = "/srv/whatsapp/.pm2"
REFERENCE_KEYS = 1650
NEW_KEYS = 5
RECOVERY_LIMIT = 30.0


def _results():
    eph = os.environ.get("MOLECULE_EPHEMERAL_DIRECTORY")
    assert eph, "MOLECULE_EPHEMERAL_DIRECTORY is not set (run through molecule)"
    return Path(eph) / "results"


def _result(name):
    path = _results() / name
    assert path.exists(), f"{path} missing: converge/side_effect did not record it"
    return json.loads(path.read_text())


@pytest.mark.parametrize("source", ["database", "backup"])
def test_recovery_time_under_30_seconds(source):
    report = _result(f"rollback-{source}.json")
    seconds = float(report["recovery_seconds"])
    print(f"RECOVERY source={source} seconds={seconds} keys={report['keys']} reason={report['reason']}")
    assert report["source"] == source
    assert int(report["keys"]) == REFERENCE_KEYS and int(report["creds"]) == 1
    assert seconds < RECOVERY_LIMIT, f"recovery from {source} took {seconds}s (limit {RECOVERY_LIMIT}s)"


def test_backup_rollback_said_why():
    report = _result("rollback-backup.json")
    assert "the database is not usable" in report["reason"]
    assert "newest valid local backup" in report["reason"]
    assert report["backup_file"].startswith("/var/backups/baileys-resilience/baileys-auth-")


def test_return_brought_the_new_keys_home():
    report = _result("return.json")
    assert int(report["inserted"]) == NEW_KEYS
    assert int(report["store_keys"]) == REFERENCE_KEYS + NEW_KEYS
    assert len(report["added_in_file_mode"]) == NEW_KEYS


def test_session_directories_are_0700_and_files_0600(host):
    # one command (each testinfra call is an Ansible round trip)
    listing = host.check_output(f"find {SESSIONS} -printf '%y %m %u %g %p\\n'").splitlines()
    entries = {line.split(" ", 4)[4]: line.split(" ", 4)[:4] for line in listing}
    for path in (SESSIONS, COMPANY_DIR):
        assert entries.get(path) == ["d", "700", "whatsapp", "whatsapp"], (path, entries.get(path))
    bad = [f"{meta} {path}" for path, meta in entries.items()
           if meta not in (["f", "600", "whatsapp", "whatsapp"], ["d", "700", "whatsapp", "whatsapp"])]
    assert not bad, bad[:10]
    names = [path.rsplit("/", 1)[1] for path in entries if path.startswith(COMPANY_DIR + "/")]
    assert "creds.json" in names
    # not creds.json, not the export's manifest (.baileys-resilience-manifest.json)
    key_files = [n for n in names if n.endswith(".json") and n != "creds.json" and not n.startswith(".")]
    # the reference mix exported, plus the 5 pre-keys the service wrote in file mode
    assert len(key_files) == REFERENCE_KEYS + NEW_KEYS, len(key_files)


def test_env_file_is_restored(host):
    out = host.check_output(
        f"stat -c '%U %G %a' {ENV_FILE}; cat {ENV_FILE};"
        f" test -e {ENV_FILE}.pre-rollback && echo PRE-ROLLBACK-EXISTS || true"
    )
    lines = [line.strip() for line in out.splitlines()]
    assert lines[0] == "whatsapp whatsapp 600", lines[0]
    assert "USE_REPOSITORY_PATTERN=true" in lines
    assert not any(line.startswith("USE_REPOSITORY_PATTERN=false") for line in lines)
    assert "PRE-ROLLBACK-EXISTS" not in lines


def test_pm2_process_is_online(host):
    out = host.check_output(f"runuser -u whatsapp -- env PM2_HOME={PM2_HOME} {PM2} jlist")
    procs = {p["name"]: p for p in json.loads(out[out.index("["):])}
    assert "whatsapp" in procs, list(procs)
    env = procs["whatsapp"]["pm2_env"]
    assert env["status"] == "online"
    assert env["ENV_FILE"] == ENV_FILE
    assert env["restart_time"] >= 3  # rollback (database), rollback (backup), return


def test_service_is_back_on_postgres_with_the_new_count(host):
    script = ("import urllib.request; "
              "print(urllib.request.urlopen('http://127.0.0.1:3000/health', timeout=5).read().decode())")
    health = json.loads(host.check_output(f"python3 -c {shlex.quote(script)}"))
    assert health["status"] == "ok"
    assert health["mode"] == "postgres"
    assert health["creds"] == 1
    assert health["keys"] == REFERENCE_KEYS + NEW_KEYS
    assert health["per_company"][COMPANY]["keys"] == REFERENCE_KEYS + NEW_KEYS


def test_store_holds_the_keys_written_in_file_mode(host):
    ids = _result("return.json")["added_in_file_mode"]
    sql = ("SELECT (SELECT count(*) FROM whatsapp_keys"
           " WHERE company_id = '%s' AND key_type = 'pre-key' AND key_id IN (%s))"
           " || ' ' || (SELECT count(*) FROM whatsapp_keys WHERE company_id = '%s')"
           % (COMPANY, ", ".join("'%s'" % i for i in ids), COMPANY))
    out = host.check_output("PGPASSWORD=er-baileys-pw /usr/lib/postgresql/18/bin/psql -h er-pg18 -U baileys -d whatsapp"
                            " -tAX -c " + shlex.quote(sql))
    assert out == f"{NEW_KEYS} {REFERENCE_KEYS + NEW_KEYS}", out
