"""Helpers shared by the s3_replication scenario's verifiers (testinfra, run on the controller)."""

import hashlib
import json
import os
import re
import shlex
import subprocess
from pathlib import Path

# tests/support (the package `support`) is on PYTHONPATH: .config/molecule/config.yml, verifier.env
from support import molecule_seed
# pylint: disable-next=unused-import  # re-exported: the test modules import them from here
from support.molecule_cron import cron_job, run, run_backup_job, run_like_cron  # noqa: F401  (used by the test modules)

PROJECT = Path(os.environ.get("MOLECULE_PROJECT_DIRECTORY", Path(__file__).resolve().parents[3]))
SEED = molecule_seed.expected("s3_replication")  # one company, the 1,650-key reference mix
# testinfra's podman backend: a plain `podman exec` of the platform's container (fast)
APP_NAME = "s3-replication-trixie"
APP = "podman://" + APP_NAME
PG_HOST = "s3-replication-pg18"
DR_HOST = "s3-replication-dr-pg18"
PG_PASSWORD = os.environ.get("BAILEYS_TEST_PG_PASSWORD", "molecule-pg18")
DB = SEED["database"]
TOOL = "/usr/local/bin/baileys-resilience"
CONFIG_DIR = "/etc/baileys-resilience"
CREDENTIALS_DIR = CONFIG_DIR + "/s3"
BACKUP_DIR = "/var/backups/baileys-resilience"
LOG_DIR = "/var/log/baileys-resilience"
BIN18 = "/usr/lib/postgresql/18/bin"
BACKUP_CRON = "/etc/cron.d/baileys-resilience-backup"
S3_CRON = "/etc/cron.d/baileys-resilience-s3"
PREFIX = "baileys-auth"
DUMP_RE = re.compile(r"^%s-(\d{8}T\d{6}Z)\.dump$" % re.escape(PREFIX))

# moto on the controller (molecule.yml: baileys_test_s3_*; the containers use host.containers.internal)
S3_PORT = int(os.environ.get("BAILEYS_MOTO_PORT", "8766"))
S3_URL = "http://127.0.0.1:%d" % S3_PORT
ACCESS_KEY = "AKIAMOLECULES3REPL01"
SECRET_KEY = "molecule/S3+Repl=Secret/0001"
# name, bucket, region, key prefix, configured by the role
TARGETS = [
    {"name": "primary", "bucket": "baileys-molecule-eu", "region": "eu-west-1", "prefix": "prod/", "configured": True},
    {"name": "dr-region", "bucket": "baileys-molecule-us", "region": "us-east-1", "prefix": "prod/",
     "configured": False},
]


# encryption on (converge.yml): the operator's identity and recipient, made on the controller by prepare.yml
EPHEMERAL = Path(os.environ.get("MOLECULE_EPHEMERAL_DIRECTORY", "."))
IDENTITY_FILE = EPHEMERAL / "age-identity.txt"
RECIPIENT = (EPHEMERAL / "age-recipient.txt").read_text().strip() if (EPHEMERAL / "age-recipient.txt").exists() else ""
AGE_HEADER = b"age-encryption.org/v1"
SEALED_DIR = BACKUP_DIR + "/.sealed"
# the plaintext path, kept tested: one `replicate` and one `fetch` with a config without recipients, to a bucket of
# its own (test_3_dr_restore.py), so that "every object of the targets' buckets is ciphertext" stays exact
PLAIN_BUCKET = "baileys-molecule-plain"


def fingerprint(recipient):
    """agecrypt.fingerprint: 'age:' + the first 16 hex digits of the sha256 of the age1... text."""
    return "age:" + hashlib.sha256(recipient.encode("ascii")).hexdigest()[:16]


def put_file(name, path, content):
    """Write content to path in container name, 0600 from its creation (umask 077), through stdin."""
    subprocess.run(["podman", "exec", "-i", name, "sh", "-c", "umask 077 && cat > %s" % shlex.quote(path)],
                   input=content.encode(), check=True)


def s3_client(region):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=S3_URL, region_name=region, aws_access_key_id=ACCESS_KEY,
                        aws_secret_access_key=SECRET_KEY,
                        config=Config(retries={"mode": "standard", "total_max_attempts": 3}))


def psql(host, pg_host, db, query):
    """Rows (lists of strings) of a query, run with client 18 on the app host."""
    out = run(host, "PGPASSWORD=%s PGCONNECT_TIMEOUT=10 %s/psql -h %s -U postgres -d %s -AtqX -F '|' "
                    "-v ON_ERROR_STOP=1 -c %s" % (shlex.quote(PG_PASSWORD), BIN18, pg_host, db, shlex.quote(query)))
    return [line.split("|") for line in out.stdout.splitlines() if line]


def dumps(host, directory=BACKUP_DIR):
    return sorted(n for n in run(host, "ls -A %s" % directory).stdout.split() if DUMP_RE.match(n))


def manifest(host, path):
    return json.loads(host.file(path + ".manifest.json").content_string)


def sha256(host, path):
    return run(host, "sha256sum %s" % shlex.quote(path)).stdout.split()[0]


def log_records(host, log_name):
    """The JSON step records of a job's log (other lines, like the summary, are skipped)."""
    return [json.loads(line) for line in host.file("%s/%s" % (LOG_DIR, log_name)).content_string.splitlines()
            if line.startswith("{")]
