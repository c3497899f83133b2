"""Verify of the backup scenario, part 1: what the roles installed (testinfra, on the app host)."""

import hashlib
import json
import shlex

import yaml
from scenario import (APP, BACKUP_CRON, BACKUP_DIR, BIN18, CLEANUP_CRON, CONFIG_DIR, HEALTH_CRON, LOG_DIR, PG_HOST,
                      PROJECT, TOOL, VENV_PYTHON, cron_job, run)

testinfra_hosts = [APP]


def test_backup_cron_file(host):
    f = host.file(BACKUP_CRON)
    assert f.exists and f.user == "root" and f.group == "root"
    assert f.mode & 0o022 == 0, oct(f.mode)  # cron ignores group/other-writable files
    env, schedule, user, command = cron_job(host, BACKUP_CRON, "baileys-resilience backup")
    assert env["PATH"] == "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    assert (schedule, user) == ("0 3 * * *", "root")
    assert command == "%s backup >> %s/backup.log 2>&1" % (TOOL, LOG_DIR)
    _env, schedule, user, command = cron_job(host, BACKUP_CRON, "baileys-resilience verify")
    assert (schedule, user) == ("0 4 1 * *", "root")
    assert command == "%s verify >> %s/verify.log 2>&1" % (TOOL, LOG_DIR)


def test_cleanup_cron_file(host):
    f = host.file(CLEANUP_CRON)
    assert f.exists and f.user == "root" and f.mode & 0o022 == 0
    _env, schedule, user, command = cron_job(host, CLEANUP_CRON, "baileys-resilience cleanup")
    assert (schedule, user) == ("30 4 * * *", "root")
    assert command == "%s cleanup >> %s/cleanup.log 2>&1" % (TOOL, LOG_DIR)
    assert "baileys-resilience health" not in f.content_string  # moved to the cli role's own file


def test_health_cron_file(host):
    f = host.file(HEALTH_CRON)
    assert f.exists and f.user == "root" and f.mode & 0o022 == 0
    _env, schedule, user, command = cron_job(host, HEALTH_CRON, "baileys-resilience health")
    assert (schedule, user) == ("*/5 * * * *", "root")
    assert command == "%s health >> %s/health.log 2>&1" % (TOOL, LOG_DIR)


def test_directories_are_private(host):
    for path in (CONFIG_DIR, CONFIG_DIR + "/config.d", BACKUP_DIR, LOG_DIR, "/opt/baileys-resilience"):
        d = host.file(path)
        assert d.is_directory and d.user == "root" and d.group == "root", path
        assert d.mode == 0o700, (path, oct(d.mode))


def test_config_and_fragments_are_0600(host):
    for name in ("config.yml", "config.d/pg_backup.yml", "config.d/keys_cleanup.yml"):
        f = host.file("%s/%s" % (CONFIG_DIR, name))
        assert f.exists and f.user == "root" and f.mode == 0o600, (name, oct(f.mode))
    config = yaml.safe_load(host.file(CONFIG_DIR + "/config.yml").content_string)
    assert config["login_host"] == PG_HOST and config["login_db"] == "whatsapp"
    assert config["login_user"] == "postgres" and config["login_password"]
    assert config["pg_bin_dir"] == BIN18
    assert config["backup_dir"] == BACKUP_DIR
    backup = yaml.safe_load(host.file(CONFIG_DIR + "/config.d/pg_backup.yml").content_string)
    assert backup["retention"] == {"keep_daily": 7, "keep_monthly": 4}
    assert backup["backup"] == {"prefix": "baileys-auth"} and backup["pg_bin_dir"] == BIN18
    cleanup = yaml.safe_load(host.file(CONFIG_DIR + "/config.d/keys_cleanup.yml").content_string)["cleanup"]
    assert cleanup["max_delete"] == 1000 and cleanup["older_than_days"] == 30
    assert cleanup["confirm_large_delete"] is False


def test_tool_is_installed(host):
    cmd = host.file(TOOL)
    assert cmd.exists and cmd.user == "root" and cmd.mode == 0o755
    # the host command runs in its own virtual environment (cli_runtime: venv), the same pinned versions on
    # Debian 12 and 13; Sentry is installed because a DSN is set (sentry-sdk 2: check-ins / crons)
    assert cmd.content_string.startswith("#!%s -I\n" % VENV_PYTHON)
    assert host.package("cron").is_installed
    versions = json.loads(run(host, "%s -c %s" % (VENV_PYTHON, shlex.quote(
        "import json, importlib.metadata as m; print(json.dumps({p: m.version(p) for p in "
        "('sentry-sdk', 'psycopg', 'PyYAML')}))"))).stdout)
    assert int(versions["sentry-sdk"].split(".")[0]) >= 2, versions
    run(host, "%s -c 'import sentry_sdk.crons, psycopg, yaml'" % VENV_PYTHON)
    out = run(host, "%s --help" % TOOL).stdout
    for command in ("backup", "verify", "cleanup", "health", "export", "import"):
        assert command in out
    # the installed package is the collection's module_utils, byte for byte, and nothing else (one zip)
    pkg = "/opt/baileys-resilience/lib/baileys_resilience.zip"
    f = host.file(pkg)
    assert f.user == "root" and f.mode == 0o644
    installed = json.loads(run(host, "python3 -c %s %s" % (shlex.quote(
        "import hashlib, json, sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); print(json.dumps("
        "{i.filename: hashlib.sha256(z.read(i)).hexdigest() for i in z.infolist()}))"), pkg)).stdout)
    sources = sorted((PROJECT / "plugins" / "module_utils").glob("*.py"))
    expected = {"baileys_resilience/" + p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sources}
    expected["baileys_resilience/__init__.py"] = installed.get("baileys_resilience/__init__.py")
    assert installed == expected
    assert not host.file("/opt/baileys-resilience/lib/baileys_resilience").exists
