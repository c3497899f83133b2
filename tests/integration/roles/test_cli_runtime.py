"""The cli role's own Python runtime (issue 12) and the store probe's schedule (issue 13), applied to localhost.

The role runs as provision.yml runs it, with every path under a throwaway prefix (as ``make demo`` does), the
distribution's packages left alone (cli_manage_packages: false) and the probe on cron (this machine has no
systemd): ``cli_runtime: venv`` builds the command's virtual environment with /usr/bin/python3 from a wheelhouse
(``cli_wheelhouse``, offline: ``pip --no-index``) that the session builds once with ``pip download`` from the
role's pinned requirements into ``.cache/cli-wheelhouse/`` (git-ignored), so reruns need no network.

Proven: the command runs (``--help``, ``probe --json`` against the test PostgreSQL: exit 0), its venv holds
sentry-sdk 2 or newer (a DSN is set), the config and the probe's cron line say what the variables say, a second
apply changes nothing, check mode on a fresh prefix creates nothing, no secret reaches the ``--diff`` output, and
the preflight refuses a wheelhouse that lacks a package and (system runtime) a sentry-sdk older than 2.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from support import ROOT

REQUIREMENTS = os.path.join(ROOT, "roles", "cli", "files", "requirements")
SYSTEM_PYTHON = "/usr/bin/python3"
TELEGRAM_TOKEN = "123456:telegram-token-never-shown-Zq8"
SENTRY_KEY = "sentrykeyneverinoutput0123456789"


def _python_version(python):
    out = subprocess.run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


@pytest.fixture(scope="session")
def system_python():
    """/usr/bin/python3 with the venv module and ensurepip (Debian: python3-venv), as on a host."""
    if not os.path.exists(SYSTEM_PYTHON):
        pytest.skip("no %s" % SYSTEM_PYTHON)
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import ensurepip, venv"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip("%s has no venv/ensurepip (python3-venv)" % SYSTEM_PYTHON)
    return SYSTEM_PYTHON


@pytest.fixture(scope="session")
def wheelhouse(system_python):
    """Every pinned wheel for the system Python, downloaded once into .cache/ (keyed by the pins)."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(REQUIREMENTS)):
        with open(os.path.join(REQUIREMENTS, name), "rb") as fh:
            digest.update(name.encode() + b"\0" + fh.read())
    version = _python_version(system_python)
    name = "cp%s-%s" % (version.replace(".", ""), digest.hexdigest()[:12])
    path = os.path.join(ROOT, ".cache", "cli-wheelhouse", name)
    done = os.path.join(path, ".complete")
    if not os.path.exists(done):
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path)
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q",
                               "-r", os.path.join(REQUIREMENTS, "all.txt"), "-d", path, "--only-binary=:all:",
                               "--python-version", version, "--platform", "manylinux2014_x86_64"],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            shutil.rmtree(path, ignore_errors=True)
            pytest.skip("cannot build the wheelhouse (no package index?): %s" % proc.stderr[-500:])
        with open(done, "w") as fh:
            fh.write("ok\n")
    return path


# what a host has before the role runs (/usr/local/bin, /etc/cron.d, node_exporter's textfile directory)
HOST_DIRS = ("bin", "cron.d", "metrics")


def role_vars(prefix, db, python, wheelhouse):
    p = str(prefix)
    for d in HOST_DIRS:
        os.makedirs(os.path.join(p, d), exist_ok=True)
    return {
        "cli_runtime": "venv", "cli_python": python, "cli_wheelhouse": wheelhouse, "cli_manage_packages": False,
        "cli_install_s3": True,
        "cli_install_dir": os.path.join(p, "opt"), "cli_bin": os.path.join(p, "bin", "baileys-resilience"),
        "cli_config_dir": os.path.join(p, "etc"), "cli_log_dir": os.path.join(p, "log"),
        "cli_state_dir": os.path.join(p, "state"), "cli_backup_dir": os.path.join(p, "backups"),
        "cli_textfile_dir": os.path.join(p, "metrics"),
        "cli_health_cron_file": os.path.join(p, "cron.d", "baileys-resilience-health"),
        "cli_probe_cron_file": os.path.join(p, "cron.d", "baileys-resilience-probe"),
        "cli_probe_scheduler": "cron", "cli_probe_interval": 15,
        "cli_alert_cooldowns": {"default": "10m", "store_unreachable": 60},
        "keys_cleanup_cron_file": os.path.join(p, "cron.d", "baileys-resilience-cleanup"),
        "cli_db_host": db["login_host"], "cli_db_port": db["login_port"], "cli_db_user": db["login_user"],
        "cli_db_password": db["login_password"], "cli_db_name": db["login_db"], "cli_db_ssl_mode": "disable",
        # alert channels that reach nothing: the probe of a healthy store sends nothing anyway
        "cli_telegram_bot_token": TELEGRAM_TOKEN, "cli_telegram_chat_id": "42",
        "cli_telegram_api_base": "http://127.0.0.1:9",
        "cli_sentry_dsn": "http://%s@127.0.0.1:9/1" % SENTRY_KEY,
    }


def apply(env, tmp_path, variables, *args, name="apply"):
    """The cli role on localhost (inventories/demo), variables from a 0600 file; (rc, stats, output)."""
    varfile = tmp_path / ("%s-vars.json" % name)
    varfile.write_text(json.dumps(variables))
    os.chmod(varfile, 0o600)
    book = tmp_path / ("%s.yml" % name)
    book.write_text(yaml.safe_dump([{"name": name, "hosts": "baileys_app", "gather_facts": True,
                                     "roles": ["baileys.resilience.cli"]}], sort_keys=False))
    proc = subprocess.run(["ansible-playbook", "-i", os.path.join(ROOT, "inventories", "demo", "hosts.yml"),
                           str(book), "-e", "@%s" % varfile, *args],
                          capture_output=True, text=True, cwd=ROOT, env=dict(env, ANSIBLE_NOCOLOR="1"), check=False)
    out = proc.stdout + proc.stderr
    stats = {}
    for line in proc.stdout.splitlines():
        if line.startswith("localhost") and "changed=" in line:
            stats = {k: int(v) for k, v in (f.split("=") for f in line.split(":", 1)[1].split())}
    return proc.returncode, stats, out


def assert_no_secret(out, db):
    for secret in (db["login_password"], TELEGRAM_TOKEN, SENTRY_KEY):
        assert secret not in out, "a secret reached the output: %s..." % secret[:4]


def test_venv_runtime_from_a_wheelhouse_runs_the_probe_idempotent_no_secret_in_diff(
        ansible_env, db, tmp_path, system_python, wheelhouse):
    prefix = tmp_path / "host"
    variables = role_vars(prefix, db, system_python, wheelhouse)
    rc, stats, out = apply(ansible_env, tmp_path, variables, "--diff")
    assert rc == 0, out[-6000:]
    assert stats["changed"] > 0, stats
    assert_no_secret(out, db)

    cli = variables["cli_bin"]
    venv_python = os.path.join(variables["cli_install_dir"], "venv", "bin", "python")
    with open(cli) as fh:
        assert fh.readline().strip() == "#!%s -I" % venv_python
    helped = subprocess.run([cli, "--help"], capture_output=True, text=True, check=False)
    assert helped.returncode == 0 and "probe" in helped.stdout, helped.stdout + helped.stderr
    probed = subprocess.run([cli, "probe", "--json"], capture_output=True, text=True, check=False)
    assert probed.returncode == 0, probed.stdout + probed.stderr
    assert json.loads(probed.stdout)["up"] is True
    assert os.path.exists(os.path.join(variables["cli_textfile_dir"], "baileys_resilience_probe.prom"))
    assert os.stat(variables["cli_state_dir"]).st_mode & 0o777 == 0o700

    script = ("import json, sentry_sdk, boto3, psycopg, yaml; print(json.dumps("
              "[sentry_sdk.VERSION, boto3.__version__, psycopg.__version__, yaml.__version__]))")
    versions = subprocess.run([venv_python, "-I", "-c", script], capture_output=True, text=True, check=True)
    sentry, boto3, psycopg, pyyaml = json.loads(versions.stdout)
    assert int(sentry.split(".")[0]) >= 2, sentry
    pins = {}
    for name in ("psycopg.txt", "sentry.txt", "s3.txt", "core.txt"):
        with open(os.path.join(REQUIREMENTS, name)) as fh:
            for line in fh:
                if "==" in line:
                    pkg, _sep, ver = line.strip().partition("==")
                    pins[pkg] = ver
    assert (sentry, boto3, psycopg, pyyaml) == (pins["sentry-sdk"], pins["boto3"], pins["psycopg[binary]"],
                                                pins["PyYAML"])

    with open(os.path.join(variables["cli_config_dir"], "config.yml")) as fh:
        config = yaml.safe_load(fh)
    assert config["state_dir"] == variables["cli_state_dir"]
    assert config["probe"]["interval"] == 15
    assert config["alerts"]["cooldowns"] == {"default": "10m", "store_unreachable": 60}
    assert config["textfile_dir"] == variables["cli_textfile_dir"]
    with open(variables["cli_probe_cron_file"]) as fh:
        cron = fh.read()
    assert "* * * * * root %s probe --loop --interval 15 --count 4 >> %s/probe.log 2>&1" % (
        cli, variables["cli_log_dir"]) in cron, cron

    # the second run: nothing changes (pip is not even run)
    rc, stats, out = apply(ansible_env, tmp_path, variables, "--diff", name="again")
    assert rc == 0, out[-6000:]
    assert stats["changed"] == 0, [line for line in out.splitlines() if line.startswith("changed")]
    assert_no_secret(out, db)

    # check mode on a fresh prefix: every task runs or says what it would do, nothing is created
    fresh = tmp_path / "fresh"
    rc, stats, out = apply(ansible_env, tmp_path, role_vars(fresh, db, system_python, wheelhouse), "--check",
                           "--diff", name="check")
    assert rc == 0, out[-6000:]
    assert stats["changed"] > 0, stats
    assert sorted(os.listdir(fresh)) == sorted(HOST_DIRS), os.listdir(fresh)
    assert [os.listdir(fresh / d) for d in HOST_DIRS] == [[]] * len(HOST_DIRS)
    assert_no_secret(out, db)


def test_a_wheelhouse_without_a_pinned_package_fails_in_the_preflight(
        ansible_env, db, tmp_path, system_python, wheelhouse):
    partial = tmp_path / "wheelhouse"
    partial.mkdir()
    for name in os.listdir(wheelhouse):
        if name.endswith(".whl") and not name.startswith(("sentry_sdk-", "jmespath-")):
            os.symlink(os.path.join(wheelhouse, name), partial / name)
    prefix = tmp_path / "host"
    rc, stats, out = apply(ansible_env, tmp_path, role_vars(prefix, db, system_python, str(partial)))
    assert rc != 0, out[-4000:]
    assert "Preflight | the wheelhouse holds a wheel of every pinned package" in out, out[-4000:]
    assert "jmespath==" in out and "sentry-sdk==" in out and "pip download -r" in out, out[-4000:]
    assert stats["changed"] == 0, stats
    assert sorted(os.listdir(prefix)) == sorted(HOST_DIRS)


def test_the_system_runtime_refuses_a_sentry_sdk_older_than_2_with_a_dsn(
        ansible_env, db, tmp_path, system_python):
    """A Python whose sentry-sdk is 1.9.10 (Debian 12's python3-sentry-sdk): refused, pointing at the venv."""
    old = tmp_path / "oldpy"
    subprocess.run([system_python, "-m", "venv", "--without-pip", str(old)], check=True)
    site = subprocess.run([str(old / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    os.makedirs(os.path.join(site, "sentry_sdk"))
    with open(os.path.join(site, "sentry_sdk", "__init__.py"), "w") as fh:
        fh.write('VERSION = "1.9.10"\n')
    prefix = tmp_path / "host"
    variables = dict(role_vars(prefix, db, str(old / "bin" / "python"), ""), cli_runtime="system")
    rc, stats, out = apply(ansible_env, tmp_path, variables)
    assert rc != 0, out[-4000:]
    assert "Preflight | the distribution's sentry-sdk is 2 or newer" in out, out[-4000:]
    assert "1.9.10" in out and "cli_runtime: venv" in out, out[-4000:]
    assert stats["changed"] == 0, stats
    assert sorted(os.listdir(prefix)) == sorted(HOST_DIRS)
    assert_no_secret(out, db)
