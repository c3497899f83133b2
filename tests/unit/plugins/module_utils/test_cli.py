"""The host tool's config loading, argument parsing, step log, lock and textfile writer (no database)."""
from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys

import pytest

from ansible_collections.baileys.resilience.plugins.module_utils import cli, jobs

SECRET = "pa:ss w'o\"rd<>|?%@/"


def write(path, text, mode=0o600):
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(str(path), mode)
    return str(path)


def test_full_config_is_accepted(tmp_path):
    path = write(tmp_path / "c.yml", """
login_host: db.internal
port: 5433                      # aliases of the module options work
login_user: baileys
login_password: "%s"
login_db: whatsapp
ssl_mode: verify-full
ca_cert: /etc/ssl/certs/db-ca.pem
connect_params: {target_session_attrs: read-write}
schema: public
auth_table: whatsapp_auth
keys_table: whatsapp_keys
backup_dir: /var/backups/baileys-resilience
pg_bin_dir: /usr/lib/postgresql/18/bin
textfile_dir: /var/lib/prometheus/node-exporter
lock_dir: /run/lock
log_format: logfmt
backup: {prefix: baileys-auth}
retention: {keep_daily: 7, keep_monthly: 4}
cleanup: {older_than_days: 30, age_column: auto, batch_size: 1000, max_delete: 1000, confirm_large_delete: false}
health: {probes: 20, thresholds: {backup_age_warning_hours: 26}}
export: {dest: /srv/sessions, company_dir: "session-{company_id}", prune: true}
import: {src: /srv/sessions}
alerts:
  sentry: {dsn: "https://key@o1.ingest.sentry.io/2", environment: prod, schedules: {backup: "0 3 * * *"}}
  telegram: {bot_token: "1:ABC", chat_id: "-100", api_base: "https://api.telegram.org", notify_success: false}
""" % SECRET.replace('"', '\\"'))
    config = cli.load_config(path)
    assert config["login_port"] == 5433 and config["login_password"] == SECRET
    assert config["cleanup"]["max_delete"] == 1000
    assert set(cli.config_secrets(config)) == {SECRET, "https://key@o1.ingest.sentry.io/2", "1:ABC"}


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o620, 0o602, 0o700, 0o610])
def test_config_mode_refused(tmp_path, mode):
    path = write(tmp_path / "c.yml", "login_db: x\n", mode)
    with pytest.raises(cli.ConfigError, match="refusing to read config .*mode %04o" % mode):
        cli.load_config(path)


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_config_mode_accepted(tmp_path, mode):
    assert cli.load_config(write(tmp_path / "c.yml", "login_db: x\n", mode)) == {"login_db": "x"}


@pytest.mark.parametrize("text, message", [
    ("login_db: x\nlogin_pasword: y\n", "unknown option 'login_pasword'"),
    ("cleanup: {max_deletes: 3}\n", "unknown option cleanup.max_deletes"),
    ("login_port: 'fifty'\n", "login_port must be int"),
    ("cleanup: {confirm_large_delete: 'yes'}\n", "must be true or false"),
    ("alerts: {slack: {}}\n", "unknown option alerts.slack"),
    ("alerts: {telegram: {token: x}}\n", "unknown key.*alerts.telegram: token"),
    ("log_format: xml\n", "log_format"),
    ("- a\n- b\n", "must be a YAML mapping"),
])
def test_config_errors(tmp_path, text, message):
    with pytest.raises(cli.ConfigError, match=message):
        cli.load_config(write(tmp_path / "c.yml", text))


def test_config_d_fragments_are_merged(tmp_path):
    """The roles write config.d/<role>.yml next to config.yml; they merge in name order, sections deeply."""
    main = write(tmp_path / "config.yml", "login_db: whatsapp\nbackup_dir: /a\ncleanup: {max_delete: 10}\n"
                                          "alerts: {telegram: {bot_token: '1:x', chat_id: '5'}}\n")
    frag = tmp_path / "config.d"
    frag.mkdir(mode=0o700)
    write(frag / "pg_backup.yml", "backup_dir: /b\nretention: {keep_daily: '3'}\npg_bin_dir: /usr/lib/x\n")
    write(frag / "keys_cleanup.yml", "cleanup: {older_than_days: 14, age_column: updated_at}\n"
                                     "alerts: {sentry: {schedules: {cleanup: '0 5 * * *'}}}\n")
    write(frag / "README", "not yaml: [", 0o644)  # ignored: not *.yml
    config = cli.load_config(main)
    assert config["backup_dir"] == "/b" and config["retention"] == {"keep_daily": 3}
    assert config["cleanup"] == {"max_delete": 10, "older_than_days": 14, "age_column": "updated_at"}
    assert config["alerts"]["telegram"]["chat_id"] == "5"
    assert config["alerts"]["sentry"]["schedules"] == {"cleanup": "0 5 * * *"}
    write(frag / "zz.yml", "cleanup: {typo: 1}\n")
    with pytest.raises(cli.ConfigError, match="cleanup.typo"):
        cli.load_config(main)
    write(frag / "zz.yml", "login_password: x\n", 0o644)
    with pytest.raises(cli.ConfigError, match="refusing to read config .*zz.yml"):
        cli.load_config(main)
    os.unlink(frag / "zz.yml")
    os.chmod(frag, 0o777)
    with pytest.raises(cli.ConfigError, match="others can write it"):
        cli.load_config(main)


def test_yaml_error_does_not_echo_the_secret(tmp_path):
    path = write(tmp_path / "c.yml", "login_password: %s: [\n" % "topsecretvalue")
    with pytest.raises(cli.ConfigError) as info:
        cli.load_config(path)
    assert "topsecretvalue" not in str(info.value) and "line 1" in str(info.value)


def test_missing_config_exits_2(tmp_path):
    err = io.StringIO()
    assert cli.main(["--config", str(tmp_path / "none.yml"), "health"], stdout=io.StringIO(), stderr=err) == 2
    assert "cannot open config" in err.getvalue()


def test_help_and_usage():
    out = subprocess.run([sys.executable, "-c", "import sys; from ansible_collections.baileys.resilience.plugins."
                          "module_utils import cli; sys.exit(cli.main(['--help']))"], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)), check=False)
    assert out.returncode == 0
    for word in ("backup", "verify", "cleanup", "health", "export", "import", "--config", "75"):
        assert word in out.stdout
    assert cli.main(["frobnicate"], stdout=io.StringIO(), stderr=io.StringIO()) == 2
    assert cli.main([], stdout=io.StringIO(), stderr=io.StringIO()) == 2
    args = cli.build_parser().parse_args(["cleanup", "--config", "/x", "--check", "--company", "a", "--company", "b"])
    assert args.config == "/x" and args.check and args.companies == ["a", "b"]
    args = cli.build_parser().parse_args(["--config", "/y", "--json", "health", "--watch"])
    assert args.config == "/y" and args.json and args.watch


def test_joblog_json_and_logfmt_mask_secrets():
    out = io.StringIO()
    log = jobs.JobLog("backup", stream=out, secrets=[SECRET])
    with log.step("dump") as step:
        step.counts(rows=3, dsn="http://k@h/1", note="connecting with %s" % SECRET)
    with pytest.raises(ValueError):
        with log.step("fail"):
            raise ValueError("bad password %s" % SECRET)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(entry["job"], entry["step"], entry["status"]) for entry in lines] == [("backup", "dump", "ok"),
                                                                                   ("backup", "fail", "error")]
    assert lines[0]["rows"] == 3 and lines[0]["dsn"] == "********" and "duration" in lines[0]
    assert lines[0]["ts"].endswith("Z")
    assert SECRET not in out.getvalue() and "ValueError" in lines[1]["error"]
    out = io.StringIO()
    log = jobs.JobLog("cleanup", stream=out, fmt="logfmt")
    log.emit("batch", "ok", 0.5, deleted=10, note='a "quoted" value', status2=None)
    line = out.getvalue().strip()
    assert line.startswith("ts=") and " job=cleanup step=batch status=ok duration=0.5 deleted=10" in line
    assert 'note="a \\"quoted\\" value"' in line and "status2" not in line
    out = io.StringIO()
    # pylint: disable-next=kwarg-superseded-by-positional-arg  # on purpose: a field named like a parameter
    jobs.JobLog("x", stream=out).emit("s", "ok", status="clash", job="clash")
    record = json.loads(out.getvalue())
    assert record["status"] == "ok" and record["job"] == "x" and record["field_status"] == "clash"


def test_lock_is_exclusive_and_released(tmp_path):
    first = jobs.JobLock("backup", str(tmp_path)).acquire()
    assert stat.S_IMODE(os.stat(first.path).st_mode) == 0o600
    with pytest.raises(jobs.LockBusy, match="another baileys-resilience backup run is in progress.*pid %d"
                       % os.getpid()):
        jobs.JobLock("backup", str(tmp_path)).acquire()
    with jobs.JobLock("cleanup", str(tmp_path)):  # other jobs have their own lock
        pass
    first.release()
    with jobs.JobLock("backup", str(tmp_path)) as again:
        assert again.fd is not None
    with pytest.raises(jobs.LockBusy, match="cannot open lock file"):
        jobs.JobLock("backup", str(tmp_path / "missing")).acquire()


def test_textfile_is_atomic_and_valid(tmp_path):
    metrics = jobs.job_metrics("backup", True, 1.5, extra=[
        ("baileys_resilience_backup_last_size_bytes", "Size.", "gauge", [({}, 1234)]),
        ("baileys_resilience_keys_by_age", "Keys.", "gauge", [({"age": ">30d"}, 5), ({"age": "0-1d"}, 7)]),
        ("baileys_resilience_empty", "Skipped: no sample.", "gauge", [({}, None)]),
    ])
    path = jobs.write_textfile(str(tmp_path), "baileys_resilience_backup", metrics)
    text = open(path).read()
    assert path.endswith(".prom") and os.listdir(tmp_path) == ["baileys_resilience_backup.prom"]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert 'baileys_resilience_job_success{job="backup"} 1\n' in text
    assert 'baileys_resilience_job_duration_seconds{job="backup"} 1.5\n' in text
    assert "# TYPE baileys_resilience_backup_last_size_bytes gauge\nbaileys_resilience_backup_last_size_bytes 1234\n" \
        in text
    assert 'baileys_resilience_keys_by_age{age=">30d"} 5' in text and "baileys_resilience_empty" not in text
    for line in text.splitlines():
        assert line.startswith("#") or line.split(" ")[-1].replace(".", "").replace("e+", "").isdigit()
    with pytest.raises(ValueError):
        jobs.prom_text([("bad-name", "x", "gauge", [({}, 1)])])
    failed = jobs.job_metrics("backup", False, 1.0)
    assert "baileys_resilience_job_last_success_timestamp_seconds" not in jobs.prom_text(failed)
