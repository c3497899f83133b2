"""``baileys-resilience pitr-metrics`` without Barman or a server (fakes), over time (a fake clock): the alert per
problem once per cooldown, one "resolved", the exit codes, the one textfile with each series once."""
from __future__ import annotations

import io
import json
import os
import re

import pytest
import yaml
from support.receivers import Receiver

from ansible_collections.baileys.resilience.plugins.module_utils import cli, clijobs, pitr

T0 = 1_750_000_000.0
TOKEN = "123456:AAH-pitr_token-XYZ"
PASSWORD = "barman-pa:ss w'o\"rd"
GiB = 1 << 30


class Clock:
    def __init__(self, t=T0):
        self.t = t

    def __call__(self):
        return self.t


class Streaming:
    """What the fakes answer: receive-wal, the slot (None: missing), its lag, other failed barman checks."""

    def __init__(self):
        self.receive_wal = True
        self.slot = True
        self.lag = 16 << 20
        self.failed = {}

    def check(self):
        checks = {"receive_wal_running": {"status": "OK" if self.receive_wal else "FAILED"},
                  "replication_slot": {"status": "OK" if self.receive_wal and self.slot else "FAILED"}}
        checks.update({name: {"status": "FAILED", "hint": hint} for name, hint in self.failed.items()})
        return checks

    def psql(self, *_args, **_kw):
        if not self.slot:
            return 0, "", ""
        return 0, "%s|%d|reserved|-1\n" % ("t" if self.receive_wal else "f", self.lag), ""


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def streaming(monkeypatch, tmp_path):
    state = Streaming()
    (tmp_path / "streaming").mkdir()

    class FakeBarman:
        def __init__(self, barman, config, server, user):
            self.server = server

        def check(self):
            return state.check()

        def backups(self):
            return [{"backup_id": "20260301T020000", "status": "DONE", "end_time_timestamp": "1772330500"}]

        def directories(self):
            return {"streaming_wals_directory": str(tmp_path / "streaming")}

    monkeypatch.setattr(pitr, "Barman", FakeBarman)
    monkeypatch.setattr(pitr.pgtools, "find_bin_dir", lambda *a, **kw: "/nonexistent/bin")
    monkeypatch.setattr(pitr, "run_psql", state.psql)
    return state


def private(path, text):
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    return str(path)


@pytest.fixture
def setup(tmp_path, receiver):
    """config.yml (Telegram to the receiver) and pitr.json next to it, as the cli and pitr roles write them."""
    (tmp_path / "textfiles").mkdir()

    def make(cooldowns=None, max_lag=GiB, textfile_dir=None):
        alerts = {"telegram": {"bot_token": TOKEN, "chat_id": "1", "api_base": receiver.url, "timeout": 3}}
        if cooldowns:
            alerts["cooldowns"] = cooldowns
        config = private(tmp_path / "config.yml", yaml.safe_dump({
            "lock_dir": str(tmp_path), "state_dir": str(tmp_path / "state"), "hostname": "bk1", "alerts": alerts,
            "textfile_dir": str(tmp_path / "cli-textfiles")}))
        private(tmp_path / "pitr.json", json.dumps({
            "server": "baileys", "slot": "barman_baileys", "barman": "/nonexistent/barman",
            "textfile_dir": textfile_dir or str(tmp_path / "textfiles"), "max_slot_lag_bytes": max_lag,
            "conn": {"login_host": "db", "login_user": "barman", "login_password": PASSWORD, "login_db": "baileys"}}))
        return config

    return make


def run_at(config, clock, *extra):
    """One cron run at ``clock``'s time (Context as cli.main makes it, with the fake clock)."""
    out, err = io.StringIO(), io.StringIO()
    args = cli.build_parser().parse_args(["--config", config, "pitr-metrics"] + list(extra))
    ctx = clijobs.Context(args, cli.load_config(config), out, err, config_path=config)
    ctx.clock = clock
    code = clijobs.run_job(ctx, "pitr-metrics", clijobs.JOBS["pitr-metrics"])
    return code, out.getvalue(), err.getvalue()


def test_streaming_down_for_an_hour_alerts_once_then_resolved(setup, streaming, receiver):
    config = setup(cooldowns={"receive_wal": "1h"})
    clock = Clock()
    assert run_at(config, clock)[0] == cli.EXIT_OK
    assert receiver.texts == []  # all well: nothing to say
    streaming.receive_wal = False
    codes = []
    for _minute in range(60):
        clock.t += 60
        codes.append(run_at(config, clock)[0])
    assert set(codes) == {cli.EXIT_FAILED}
    assert len(receiver.texts) == 1, receiver.texts
    text = receiver.texts[0]
    assert "pitr-metrics FAILED on bk1" in text and "[CRITICAL] receive_wal: receive-wal (WAL streaming) is not " \
        "running" in text
    assert "failure" not in text  # the problem's own key, not the job's generic one
    streaming.receive_wal = True
    for _minute in range(5):
        clock.t += 60
        assert run_at(config, clock)[0] == cli.EXIT_OK
    assert len(receiver.texts) == 2, receiver.texts
    assert "pitr-metrics recovered on bk1" in receiver.texts[1]
    assert "receive_wal resolved after 1h (60 occurrences, was critical)" in receiver.texts[1]
    assert PASSWORD not in "".join(receiver.texts)


def test_default_cooldown_repeats_every_five_minutes(setup, streaming, receiver):
    config = setup()
    clock = Clock()
    streaming.receive_wal = False
    for _minute in range(60):
        run_at(config, clock)
        clock.t += 60
    assert len(receiver.texts) == 12  # one per 5-minute cooldown
    assert all("still critical" in t for t in receiver.texts[1:])


def test_one_alert_key_per_problem(setup, streaming, receiver):
    config = setup(max_lag=GiB)
    clock = Clock()
    streaming.lag = 3 * GiB
    streaming.failed = {"archiver_errors": "2 errors in /var/lib/barman/baileys/errors"}
    code, out, _err = run_at(config, clock)
    assert code == cli.EXIT_FAILED
    assert "slot_lag: the database server keeps %d bytes (3.0 GiB) of WAL for slot barman_baileys, %d bytes over " \
        "the limit of %d" % (3 * GiB, 2 * GiB, GiB) in out
    text, = receiver.texts
    assert "[CRITICAL] slot_lag" in text and "[WARNING] barman_check:archiver_errors: barman check " \
        "archiver_errors FAILED (2 errors" in text
    # the lag is back under the limit, the archiver errors stay: only the lag is resolved; no exit 1 for a warning
    streaming.lag = 16 << 20
    clock.t += 60
    code, out, _err = run_at(config, clock)
    assert code == cli.EXIT_OK and out.startswith("baileys-resilience pitr-metrics: needs attention: barman_check")
    assert len(receiver.texts) == 2 and "slot_lag resolved" in receiver.texts[1]
    assert "archiver_errors" not in receiver.texts[1]
    # the slot disappears (the lag with it): a new key, sent at once
    streaming.slot = False
    clock.t += 60
    code, _out, _err = run_at(config, clock)
    assert code == cli.EXIT_FAILED
    assert "[CRITICAL] slot_missing: replication slot barman_baileys does not exist" in receiver.texts[2]


def test_textfile_has_each_series_once(setup, streaming, tmp_path):
    config = setup()
    clock = Clock()
    assert run_at(config, clock)[0] == cli.EXIT_OK
    streaming.receive_wal = False
    clock.t += 60
    assert run_at(config, clock)[0] == cli.EXIT_FAILED
    # one file, the pitr role's (node_exporter refuses a series found in two); none in config.yml's textfile_dir
    assert os.listdir(tmp_path / "textfiles") == ["baileys_pitr.prom"]
    assert not os.path.exists(tmp_path / "cli-textfiles")
    text = (tmp_path / "textfiles" / "baileys_pitr.prom").read_text()
    series = [line.rsplit(" ", 1)[0] for line in text.splitlines() if not line.startswith("#")]
    assert len(series) == len(set(series)), text
    assert len(re.findall(r"^# TYPE ", text, re.M)) == len(set(re.findall(r"^# TYPE (\S+)", text, re.M)))
    assert 'baileys_resilience_job_success{job="pitr-metrics"} 0\n' in text
    # the last success carried over from the previous file
    assert re.search(r'^baileys_resilience_job_last_success_timestamp_seconds\{job="pitr-metrics"\} \S+$', text,
                     re.M)
    assert 'baileys_pitr_receive_wal_up{server="baileys"} 0\n' in text
    assert 'baileys_pitr_slot_lag_bytes{server="baileys",slot="barman_baileys"} 16777216\n' in text


def test_cli_main_default_path_json_and_exit_codes(setup, streaming, tmp_path):
    config = setup()
    out, err = io.StringIO(), io.StringIO()
    assert cli.main(["--config", config, "pitr-metrics", "--json"], stdout=out, stderr=err) == cli.EXIT_OK
    result = json.loads(out.getvalue())  # what molecule's pitr scenario records as metrics.json
    assert result["ok"] and result["receive_wal"] == "OK" and result["slot_exists"] and result["slot_active"]
    assert result["slot_lag_bytes"] == 16 << 20 and result["failed_checks"] == [] and result["problems"] == []
    assert PASSWORD not in out.getvalue() + err.getvalue()
    lines = [json.loads(line) for line in err.getvalue().splitlines()]
    assert [entry["step"] for entry in lines if entry["step"] in ("lock", "collect", "finish")] == [
        "lock", "collect", "finish"]
    assert os.path.exists(tmp_path / "baileys-resilience-pitr-metrics.lock")
    streaming.slot = False
    assert cli.main(["--config", config, "pitr-metrics"], stdout=io.StringIO(), stderr=io.StringIO()) == \
        cli.EXIT_FAILED
    # pitr.json elsewhere, or missing, or readable by others: a failure (alerted), the textfile left as it was
    os.rename(tmp_path / "pitr.json", tmp_path / "other.json")
    streaming.slot = True
    assert cli.main(["--config", config, "pitr-metrics", "--pitr-config", str(tmp_path / "other.json")],
                    stdout=io.StringIO(), stderr=io.StringIO()) == cli.EXIT_OK
    before = (tmp_path / "textfiles" / "baileys_pitr.prom").read_text()
    out = io.StringIO()
    assert cli.main(["--config", config, "pitr-metrics"], stdout=out, stderr=io.StringIO()) == cli.EXIT_FAILED
    assert "cannot open %s" % (tmp_path / "pitr.json") in out.getvalue()
    assert (tmp_path / "textfiles" / "baileys_pitr.prom").read_text() == before
    os.chmod(tmp_path / "other.json", 0o644)
    out = io.StringIO()
    assert cli.main(["--config", config, "pitr-metrics", "--pitr-config", str(tmp_path / "other.json")],
                    stdout=out, stderr=io.StringIO()) == cli.EXIT_FAILED
    assert "refusing to read config" in out.getvalue()


def test_sentry_checkins_with_the_every_minute_schedule(setup, streaming, tmp_path, receiver):
    setup()
    config = yaml.safe_load((tmp_path / "config.yml").read_text())
    config["alerts"]["sentry"] = {"dsn": "http://public@127.0.0.1:%d/1" % receiver.port, "flush_timeout": 3}
    path = private(tmp_path / "config.yml", yaml.safe_dump(config))
    try:
        assert cli.main(["--config", path, "pitr-metrics"], stdout=io.StringIO(), stderr=io.StringIO()) == 0
        checkins = receiver.checkins()
    finally:
        import sentry_sdk
        sentry_sdk.get_client().close(timeout=1)
    assert [c["status"] for c in checkins] == ["in_progress", "ok"]
    assert checkins[0]["monitor_slug"] == "baileys-resilience-pitr-metrics"
    assert checkins[0]["monitor_config"]["schedule"] == {"type": "crontab", "value": "* * * * *"}
