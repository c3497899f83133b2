"""Helpers shared by the backup scenario's verifiers (testinfra, run on the controller)."""

import json
import os
import re
import shlex
from pathlib import Path

# tests/support (the package `support`) is on PYTHONPATH: .config/molecule/config.yml, verifier.env
from support import molecule_seed
# pylint: disable-next=unused-import  # re-exported: the test modules import them from here
from support.molecule_cron import cron_job, run, run_backup_job, run_like_cron  # noqa: F401  (used by the test modules)

PROJECT = Path(os.environ.get("MOLECULE_PROJECT_DIRECTORY", Path(__file__).resolve().parents[3]))
SEED = molecule_seed.expected("backup")
# testinfra's ansible backend has no podman support: it would run every check as an ansible ad-hoc
# command (seconds each); its podman backend is a plain `podman exec` of the platform's container.
# the same tests run with a Debian 13 and a Debian 12 app host (scripts/molecule.sh: backup, backup@bookworm)
DISTRO = os.environ.get("BAILEYS_TEST_DISTRO", "trixie")
APP = "podman://backup-%s" % DISTRO
PG_HOST = "backup-pg18-%s" % DISTRO
PG_PASSWORD = os.environ.get("BAILEYS_TEST_PG_PASSWORD", "molecule-pg18")
DB = SEED["database"]
TOOL = "/usr/local/bin/baileys-resilience"
CONFIG_DIR = "/etc/baileys-resilience"
BACKUP_DIR = "/var/backups/baileys-resilience"
LOG_DIR = "/var/log/baileys-resilience"
BIN18 = "/usr/lib/postgresql/18/bin"
OLD_CLIENTS = {"trixie": 17, "bookworm": 15}  # each distribution's own PostgreSQL client: older than the server
OLD_MAJOR = OLD_CLIENTS[DISTRO]
BIN_OLD = "/usr/lib/postgresql/%d/bin" % OLD_MAJOR
BIN17 = BIN_OLD  # the name the tests used when only trixie ran
BACKUP_CRON = "/etc/cron.d/baileys-resilience-backup"
CLEANUP_CRON = "/etc/cron.d/baileys-resilience-cleanup"
HEALTH_CRON = "/etc/cron.d/baileys-resilience-health"  # the cli role owns the health job
VENV_PYTHON = "/opt/baileys-resilience/venv/bin/python"  # the host command's own runtime (cli role)
# the local alert receiver (tests/support/alert_receiver.py, started by prepare.yml): Sentry and Telegram land here
ALERTS_LOG = "/var/tmp/baileys-alerts.jsonl"
PREFIX = "baileys-auth"
DUMP_RE = re.compile(r"^%s-(\d{8}T\d{6}Z)\.dump$" % re.escape(PREFIX))


def psql(host, query):
    """Rows (lists of strings) of a query on the seeded database, run with client 18 on the app host."""
    out = run(host, "PGPASSWORD=%s PGCONNECT_TIMEOUT=10 %s/psql -h %s -U postgres -d %s -AtqX -F '|' "
                    "-v ON_ERROR_STOP=1 -c %s" % (shlex.quote(PG_PASSWORD), BIN18, PG_HOST, DB, shlex.quote(query)))
    return [line.split("|") for line in out.stdout.splitlines() if line]


def listing(host, directory=BACKUP_DIR):
    return sorted(run(host, "ls -A %s" % directory).stdout.split())


def manifest(host, name):
    return json.loads(host.file("%s/%s.manifest.json" % (BACKUP_DIR, name)).content_string)


def sha256(host, path):
    return run(host, "sha256sum %s" % shlex.quote(path)).stdout.split()[0]


def log_records(host, log_name):
    """The JSON step records of a job's log (other lines, like the summary, are skipped)."""
    records = []
    for line in host.file("%s/%s" % (LOG_DIR, log_name)).content_string.splitlines():
        if line.startswith("{"):
            records.append(json.loads(line))
    return records
