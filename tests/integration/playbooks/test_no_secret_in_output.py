"""No secret in any output: every playbook of playbooks/ with ``--check --diff -vvv`` and, where it can run on this
machine, for real with ``--diff -vvv``, against an inventory whose group_vars hold recognisable secrets.

The secrets (the database password, a secret key of ``connect_params``, the Telegram bot token, the Sentry DSN's
key, S3 access and secret keys, an age identity, the PGPASSWORD line of the service's environment file) live in the
temporary inventory's ``group_vars/all.yml`` (as an operator's vault would); the paths (all under tmp) go in a
0600 extra-vars file (``-e @file``): no secret is ever on a command line. The test fails when any secret appears in
stdout or stderr, as it is, URL-encoded, JSON/YAML/Python-escaped or by a distinctive part of it.

What runs for real, what only in check mode (and why):

* provision.yml: for real with every path under tmp (``cli_manage_packages: false``, cron files under tmp,
  S3 replication against the moto server with the bucket configured), skipping the tag ``pg_client`` (it adds the
  PGDG apt repository and installs a package: network and the host's apt); in check mode with every tag, the
  pg_client role included (its check of the client against the real server runs, with the secret password).
* export_auth_state.yml, import_auth_state.yml, health.yml, verify_backup.yml: for real against the real
  PostgreSQL (a role whose password is the secret), and in check mode; health.yml also against a closed port
  (the connection error must not carry a secret).
* emergency_rollback.yml, return_to_postgres.yml: for real as tests/integration/roles/test_failover.py runs them
  (service manager ``none``, a health command, the environment file under tmp holding PGPASSWORD), and in check
  mode.
* pitr_restore.yml: check mode only (it needs Barman, a base backup and the WAL archive: molecule scenario pitr).
* dr_restore.yml: for real (the newest backup fetched from the moto server with the secret S3 keys, restored into
  a new database on the real PostgreSQL), and in check mode (it fetches nothing; the restore step then fails
  on purpose: there is no downloaded file to restore; the output up to there is checked all the same).

dr_restore.yml takes an age identity (dr_restore_identity): a real one (pyrage) is in the inventory; it is also set
under the names another role would use, so that it is checked the day one does.
"""
from __future__ import annotations

import html
import json
import os
import re
import shlex
import subprocess
import sys
import urllib.parse

import pytest
import yaml

from ansible_collections.baileys.resilience.plugins.module_utils import backup, pgconn, s3replicate
from support import ROOT
from support.authgen import REFERENCE_MIX, generate, load_into
from support.s3fixtures import create_bucket, free_port

MIX = {k: max(2, v // 40) for k, v in REFERENCE_MIX.items()}
PLAYBOOKS = sorted(n for n in os.listdir(os.path.join(ROOT, "playbooks")) if n.endswith(".yml"))

DB_PASSWORD = "S3cr3t-<>|?&\"'$-DB"
CONNECT_SECRET = "SslPw-9f3aC0nnParam"  # connect_params: {sslpassword: ...}, a free-form dict option
TELEGRAM_TOKEN = "7012345678:AAHtgB0tTok3n_Zq-0123456789abcdefXYZ"
SENTRY_KEY = "5e3b2c1a9d8f4e7a6b5c4d3e2f1a0b9c"
SENTRY_DSN = "https://%s@o4507.ingest.sentry.invalid/4242" % SENTRY_KEY
S3_ACCESS_KEY = "AKIAREC0GNISABLEKEY7"
S3_SECRET_KEY = "Rec0gnisable/S3cretKey+777=xyz"
try:  # a real age identity when pyrage is installed (dr_restore opens encrypted backups with it)
    import pyrage

    AGE_IDENTITY = str(pyrage.x25519.Identity.generate())
except ImportError:
    AGE_IDENTITY = "AGE-SECRET-KEY-1QYQSZQGPQYQSZQGPQYQSZQGPQYQSZQGPQYQSZQGPQYQSZQGPQYQSXAGEID"
ENV_PGPASSWORD = "EnvPgPw77-<'&\">-x"
VISIBLE = "br-visible-app-name"  # a connect_params value that is no secret: it must stay visible
PGP_KEY = ("-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nmQINBFakenotarealkeyforthechecktest\n"
           "-----END PGP PUBLIC KEY BLOCK-----")

# each secret and a distinctive part of it (found in any output, in any escaping, it is a leak)
SECRETS = {
    "database password": (DB_PASSWORD, "S3cr3t"),
    "connect_params sslpassword": (CONNECT_SECRET, "9f3aC0nnParam"),
    "Telegram bot token": (TELEGRAM_TOKEN, "tgB0tTok3n"),
    "Sentry DSN key": (SENTRY_KEY, SENTRY_KEY),
    "S3 access key": (S3_ACCESS_KEY, S3_ACCESS_KEY),
    "S3 secret key": (S3_SECRET_KEY, "S3cretKey"),
    "age identity": (AGE_IDENTITY, AGE_IDENTITY[len("AGE-SECRET-KEY-1"):][:24]),
    "PGPASSWORD of the environment file": (ENV_PGPASSWORD, "EnvPgPw77"),
}


def forms(secret):
    """The secret as it could appear in output: as is, URL-encoded, JSON/YAML/Python/shell/HTML-escaped."""
    out = {
        secret, urllib.parse.quote(secret, safe=""), urllib.parse.quote(secret), urllib.parse.quote_plus(secret),
        json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1], json.dumps(json.dumps(secret))[1:-1],
        secret.replace("'", "''"), repr(secret)[1:-1], shlex.quote(secret), html.escape(secret),
        html.escape(secret, quote=False),
    }
    return {f for f in out if len(f) >= 8}


def leaks(text):
    found = []
    for label, (secret, part) in SECRETS.items():
        for form in sorted(forms(secret) | {part}):
            if form in text:
                at = text.index(form)
                found.append("%s (as %r) near: %r" % (label, form, text[max(0, at - 200):at + 60]))
                break
    return found


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def secret_role(pg, db):
    """A login role whose password is DB_PASSWORD (superuser: the restore tests create databases)."""
    name = "br_secret_%d" % os.getpid()
    admin = pgconn.connect(pg.params(), autocommit=True)
    sql = pgconn.sql
    exists = admin.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone()
    verb = "ALTER" if exists else "CREATE"
    statement = sql.SQL(verb + " ROLE {} LOGIN SUPERUSER PASSWORD {}")
    admin.execute(statement.format(sql.Identifier(name), sql.Literal(DB_PASSWORD)))
    admin.close()
    return dict(db, login_user=name, login_password=DB_PASSWORD)


class Runner:
    def __init__(self, env, work, inventory):
        self.env, self.work, self.inventory = env, work, inventory
        self.outputs = []

    def run(self, book, extra, *args):
        varfile = self.work / ("vars-%d.json" % len(self.outputs))
        fd = os.open(str(varfile), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(extra, fh)
        argv = ["ansible-playbook", "-i", str(self.inventory), os.path.join(ROOT, "playbooks", book),
                "-e", "@%s" % varfile, *args]
        assert not any(part in " ".join(argv) for secret, part in SECRETS.values())
        proc = subprocess.run(argv, capture_output=True, text=True, env=self.env, cwd=ROOT, check=False)
        out = "$ %s\n%s\n--- stderr\n%s" % (" ".join(argv[2:]), proc.stdout, proc.stderr)
        self.outputs.append((book, args, out))
        fd = os.open(str(self.work / ("out-%d.txt" % len(self.outputs))), os.O_WRONLY | os.O_CREAT, 0o600)
        with os.fdopen(fd, "w") as fh:  # kept with the test's tmp dir, to read after a failure
            fh.write(out)
        found = leaks(proc.stdout + "\n" + proc.stderr)
        assert not found, "%s %s shows a secret:\n%s" % (book, " ".join(args), "\n".join(found))
        return proc.returncode, out


def recap(out):
    m = re.search(r"localhost\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", out)
    assert m, out[-3000:]
    return {k: int(v) for k, v in zip(("ok", "changed", "unreachable", "failed"), m.groups())}


class World:
    """The managed host's file system (all under tmp), the inventory with the secrets, a runner."""


@pytest.fixture
def world(ansible_env, pg, db, dbconn, secret_role, moto, tmp_path):
    w = World()
    load_into(dbconn, generate(2, seed=77, form="base64", mix=MIX))
    w.pg, w.role, w.tmp = pg, secret_role, tmp_path
    work = tmp_path / "work"
    work.mkdir()
    w.host = host = tmp_path / "host"  # the managed host's file system, all of it under tmp
    for d in ("bin", "etc", "opt", "log", "cron.d", "metrics", "backups", "dr", "fetch"):
        (host / d).mkdir(parents=True)

    # the service's environment file, with its PGPASSWORD line
    w.app = app = tmp_path / "app"
    app.mkdir()
    w.env_file = app / "app.env"
    w.env_file.write_text("USE_REPOSITORY_PATTERN=true\nPGHOST=127.0.0.1\nPGPASSWORD=%s\n" % ENV_PGPASSWORD)
    os.chmod(w.env_file, 0o600)

    # S3: one target on the moto server with recognisable keys (moto accepts any); a backup made by the backup
    # code with the secret role, replicated there, for verify_backup, health and dr_restore
    region = "eu-west-1"
    bucket = create_bucket(moto.url, region)
    target = {"name": "eu", "bucket": bucket, "region": region, "endpoint_url": moto.url, "prefix": "prod/",
              "access_key": S3_ACCESS_KEY, "secret_key": S3_SECRET_KEY}
    made = backup.run_backup(secret_role, {}, str(host / "backups"), pg_bin_dir=pg.bindir)
    assert made["backup"]
    rep = s3replicate.replicate(str(host / "backups"), [target])
    assert rep["ok"] and rep["uploaded"] >= 1, rep

    # the inventory: localhost, and every secret in group_vars (as an operator's vault would hold them)
    inventory = tmp_path / "inventory"
    (inventory / "group_vars").mkdir(parents=True)
    with open(os.path.join(ROOT, "inventories", "demo", "hosts.yml")) as fh:
        (inventory / "hosts.yml").write_text(fh.read())
    secrets = {
        "baileys_db_host": secret_role["login_host"], "baileys_db_port": secret_role["login_port"],
        "baileys_db_user": secret_role["login_user"], "baileys_db_password": DB_PASSWORD,
        "baileys_db_name": secret_role["login_db"],
        "baileys_db_connect_params": {"connect_timeout": 7, "sslpassword": CONNECT_SECRET,
                                      "application_name": VISIBLE},
        "cli_sentry_dsn": SENTRY_DSN, "cli_sentry_environment": "test",
        "cli_telegram_bot_token": TELEGRAM_TOKEN, "cli_telegram_chat_id": "-1001234567890",
        "cli_telegram_api_base": "http://127.0.0.1:%d" % free_port(),
        # as in inventories/production: the role-only key configure_bucket, and the failover's S3 source
        "s3_replication_targets": [dict(target, configure_bucket=True)],
        "failover_s3_targets": "{{ s3_replication_targets }}",
        # dr_restore.yml takes the identity itself; the other names are those a role would use
        "dr_restore_identity": AGE_IDENTITY,
        "cli_age_identity": AGE_IDENTITY, "s3_replication_age_identity": AGE_IDENTITY,
        "failover_age_identity": AGE_IDENTITY, "baileys_age_identity": AGE_IDENTITY,
    }
    (inventory / "group_vars" / "all.yml").write_text(yaml.safe_dump(secrets))
    os.chmod(inventory / "group_vars" / "all.yml", 0o600)

    env = dict(ansible_env, AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=str(tmp_path / "no-aws-config"),
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "no-aws-credentials"))
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "PGPASSWORD"):
        env.pop(k, None)
    w.r = Runner(env, work, inventory / "hosts.yml")
    return w


CHECK = ("--check", "--diff", "-vvv")
REAL = ("--diff", "-vvv")
# which test runs which playbook (every playbook of playbooks/ is in one)
COVERED = {
    "provision.yml": "test_provision",
    "export_auth_state.yml": "test_export_import", "import_auth_state.yml": "test_export_import",
    "health.yml": "test_health_and_verify_backup", "verify_backup.yml": "test_health_and_verify_backup",
    "emergency_rollback.yml": "test_rollback_and_return", "return_to_postgres.yml": "test_rollback_and_return",
    "dr_restore.yml": "test_dr_restore",
    "pitr_restore.yml": "test_pitr_restore_check_mode",
}


def test_every_playbook_is_covered():
    assert sorted(COVERED) == PLAYBOOKS


def test_provision(world):
    w, r, host = world, world.r, world.host
    prov = {
        "cli_install_dir": str(host / "opt"), "cli_bin": str(host / "bin" / "baileys-resilience"),
        "cli_config_dir": str(host / "etc"), "cli_log_dir": str(host / "log"), "cli_python": sys.executable,
        "cli_manage_packages": False, "cli_pg_bin_dir": w.pg.bindir, "cli_backup_dir": str(host / "backups"),
        "cli_textfile_dir": str(host / "metrics"),
        "cli_health_cron_file": str(host / "cron.d" / "baileys-resilience-health"),
        "pg_backup_dir": str(host / "backups"), "pg_backup_pg_bin_dir": w.pg.bindir,
        "pg_backup_cron_file": str(host / "cron.d" / "baileys-resilience-backup"),
        "keys_cleanup_cron_file": str(host / "cron.d" / "baileys-resilience-cleanup"),
        "s3_replication_cron_file": str(host / "cron.d" / "baileys-resilience-s3"),
        "s3_replication_credentials_dir": str(host / "etc" / "s3"),
        "s3_replication_fetch_dir": str(host / "fetch"),
        "pg_client_facts_dir": str(host / "facts.d"), "pg_client_keyring": str(host / "keyrings" / "pgdg.asc"),
    }
    # check mode first, as on a fresh host. Every role: pg_client's check of the client against the real server
    # runs (with the secret password), then its repository tasks in check mode (the signing key given as content:
    # no network here) up to the package, which this host's apt may not know (rc not asserted); then every role
    # but pg_client, to the end
    rc, out = r.run("provision.yml", dict(prov, pg_client_key=PGP_KEY), *CHECK)
    assert "Read the server's version" in out and "Write the repository signing key" in out, out[-6000:]
    rc, out = r.run("provision.yml", prov, "--skip-tags", "pg_client", *CHECK)
    assert rc == 0, out[-6000:]
    # for real: every role but pg_client (the PGDG apt repository and a package: network and the host's apt)
    rc, out = r.run("provision.yml", prov, "--skip-tags", "pg_client", *REAL)
    assert rc == 0, out[-6000:]
    assert recap(out)["changed"] > 0
    config = (host / "etc" / "config.yml").read_text()
    assert DB_PASSWORD in config and TELEGRAM_TOKEN in config  # the secrets were written (0600), never shown
    assert len(os.listdir(host / "cron.d")) == 4
    assert S3_SECRET_KEY in (host / "etc" / "s3" / "eu.credentials").read_text()
    # again: nothing to change, still nothing shown; and check mode on the provisioned host
    rc, out = r.run("provision.yml", prov, "--skip-tags", "pg_client", *REAL)
    assert rc == 0, out[-6000:]


def test_export_import(world):
    r = world.r
    sessions = world.tmp / "exported"
    io_vars = {"baileys_sessions_dir": str(sessions)}
    rc, out = r.run("export_auth_state.yml", io_vars, *CHECK)
    assert rc == 0 and not sessions.exists(), out[-6000:]
    # -vvv shows the module's arguments: connect_params with its secret key masked, its other values as they are
    assert re.search(r"sslpassword\W+(\*{8}|VALUE_SPECIFIED_IN_NO_LOG_PARAMETER)", out) and VISIBLE in out, out[-6000:]
    rc, out = r.run("export_auth_state.yml", io_vars, *REAL)
    assert rc == 0 and sessions.is_dir(), out[-6000:]
    rc, out = r.run("import_auth_state.yml", io_vars, *CHECK)
    assert rc == 0, out[-6000:]
    (sessions / "company-001" / "pre-key-999999.json").write_text('{"private": "AQ==", "public": "Ag=="}')
    rc, out = r.run("import_auth_state.yml", io_vars, *REAL)
    assert rc == 0 and recap(out)["changed"] == 1, out[-6000:]


def test_health_and_verify_backup(world):
    r = world.r
    hv = {"baileys_backup_dir": str(world.host / "backups"), "baileys_pg_bin_dir": world.pg.bindir,
          "baileys_health_fail_on": "never"}
    # pg_restore refuses connect_params.sslpassword (it cannot be passed without exposing it): the restore test
    # gets the password as a secret key of connect_params instead
    hv_tools = dict(hv, baileys_db_connect_params={"connect_timeout": 7, "password": DB_PASSWORD,
                                                   "application_name": VISIBLE})
    for book, v in (("health.yml", hv), ("verify_backup.yml", hv_tools)):
        rc, out = r.run(book, v, *CHECK)
        assert rc == 0, out[-6000:]
        rc, out = r.run(book, v, *REAL)
        assert rc == 0 and VISIBLE in out, out[-6000:]
    # a connection error: the message says where, never a secret
    rc, out = r.run("health.yml", dict(hv, baileys_db_port=free_port(), baileys_health_fail_on="critical"), *REAL)
    assert rc != 0 and "cannot connect" in out, out[-6000:]
    rc, out = r.run("verify_backup.yml", dict(hv_tools, baileys_db_port=free_port()), *REAL)
    assert rc != 0, out[-6000:]


def test_rollback_and_return(world):
    r = world.r
    fv = {
        "failover_sessions_dir": str(world.app / "sessions"), "failover_env_file": str(world.env_file),
        "failover_service_manager": "none", "failover_health_type": "command", "failover_health_command": "true",
        "failover_backup_dir": str(world.host / "backups"), "failover_pg_bin_dir": world.pg.bindir,
        "failover_s3_download_dir": str(world.host / "dr"),
    }
    for book in ("emergency_rollback.yml", "return_to_postgres.yml"):
        rc, out = r.run(book, fv, *CHECK)
        assert rc == 0, out[-6000:]
        rc, out = r.run(book, fv, *REAL)
        assert rc == 0, out[-6000:]
    assert "PGPASSWORD=%s" % ENV_PGPASSWORD in world.env_file.read_text()  # restored
    # the database down: the rollback's source is the local backup, then (none valid) the S3 backup
    down = dict(fv, failover_db_port=free_port())
    rc, out = r.run("emergency_rollback.yml", down, *REAL)
    assert rc == 0 and "failover source: backup" in out, out[-6000:]
    rc, out = r.run("return_to_postgres.yml", fv, *REAL)
    assert rc == 0, out[-6000:]
    rc, out = r.run("emergency_rollback.yml", dict(down, failover_backup_dir=str(world.tmp / "none")), *REAL)
    assert rc == 0 and "failover source: s3" in out, out[-6000:]
    rc, out = r.run("return_to_postgres.yml", fv, *CHECK)
    assert rc == 0, out[-6000:]


def test_dr_restore(world):
    r, role = world.r, world.role
    restore_db = "dr_%d" % os.getpid()
    dr = {"dr_restore_target_host": role["login_host"], "dr_restore_target_port": role["login_port"],
          "dr_restore_target_user": role["login_user"], "dr_restore_target_password": DB_PASSWORD,
          "dr_restore_db": restore_db, "dr_restore_download_dir": str(world.host / "dr-restore"),
          "dr_restore_pg_bin_dir": world.pg.bindir}
    (world.host / "dr-restore").mkdir()
    try:
        # check mode: nothing is fetched, so the restore step has no file and fails; the output up to there counts
        rc, out = r.run("dr_restore.yml", dr, *CHECK)
        assert "Fetch the newest verified backup" in out, out[-6000:]
        rc, out = r.run("dr_restore.yml", dr, *REAL)
        assert rc == 0, out[-6000:]
    finally:
        admin = pgconn.connect(world.pg.params(), autocommit=True)
        admin.execute('DROP DATABASE IF EXISTS "%s" WITH (FORCE)' % restore_db)
        admin.close()


def test_pitr_restore_check_mode(world):
    """Check mode only: point-in-time recovery needs Barman and its base backups and WAL archive (the pitr role,
    molecule scenario pitr), which this machine has not; it runs up to where it can (its preflight on this host)."""
    rc, out = world.r.run("pitr_restore.yml", {"baileys_target": "localhost", "pitr_restore_action": "none"}, *CHECK)
    assert "Check the variables" in out, out[-6000:]
