"""The alert state over time (a fake clock): cooldowns, level changes, "resolved", damage, restarts, races."""
from __future__ import annotations

import json
import multiprocessing
import os
import stat

import pytest
from support.receivers import Receiver

from ansible_collections.baileys.resilience.plugins.module_utils import alerts, alertstate, jobs

HOUR = 3600
T0 = 1_750_000_000.0
TOKEN = "123456:AAH-state_token-XYZ"


class Clock:
    def __init__(self, t=T0):
        self.t = t

    def __call__(self):
        return self.t

    def advance(self, seconds):
        self.t += seconds


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def state_path(tmp_path):
    return str(tmp_path / "state" / "alert-state.json")


def key(check, company="", job="health"):
    return alertstate.AlertKey(job, check, company)


def test_defaults_and_fingerprint(state_path, clock):
    s = alertstate.AlertState(state_path, clock=clock)
    assert s.cooldown(key("stale_keys")) == 1800 and s.cooldown(key("expired_keys")) == 1800
    assert s.cooldown(key("latency")) == 300 and s.cooldown(key("failure", job="backup")) == 300
    assert s.cooldown(key("store_unreachable", job="probe")) == 300
    assert alertstate.fingerprint(("health", "stale_keys", "c1")) == ["baileys-resilience", "health", "stale_keys",
                                                                      "c1"]
    assert alertstate.fingerprint(alertstate.make_key("backup")) == ["baileys-resilience", "backup", "failure", ""]
    custom = alertstate.AlertState(state_path, clock=clock, cooldowns={"latency": "10m", "health.creds": 90,
                                                                       "default": "1h"})
    assert custom.cooldown(key("latency")) == 600 and custom.cooldown(key("creds")) == 90
    assert custom.cooldown(key("creds", job="other")) == 3600 and custom.cooldown(key("stale_keys")) == 1800
    for bad in ({"latency": -1}, {"latency": "soon"}, {"latency": True}, ["latency"]):
        with pytest.raises(alertstate.AlertStateError):
            alertstate.parse_cooldowns(bad)


@pytest.mark.parametrize("check, every, cooldown", [("stale_keys", 300, 1800), ("latency", 60, 300),
                                                    ("latency", 300, 300), ("latency", 7, 300)])
def test_repeated_warning_for_an_hour_sends_one_message_per_cooldown(state_path, clock, check, every, cooldown):
    s = alertstate.AlertState(state_path, clock=clock)
    sent = []
    elapsed = 0
    while elapsed <= HOUR:
        d = s.decide(key(check), "warning", message="still bad")
        if d.send:
            sent.append((elapsed, d.kind))
        clock.advance(every)
        elapsed += every
    # first at once, then once each time the cooldown has passed since the last message
    expected, last = [], None
    for t in range(0, HOUR + 1, every):
        if last is None or t - last >= cooldown:
            expected.append(t)
            last = t
    assert [t for t, _kind in sent] == expected
    assert len(sent) == len(expected) == {(1800, 300): 3, (300, 60): 13, (300, 300): 13, (300, 7): 12}[
        (cooldown, every)]
    assert sent[0][1] == "new" and {k for _elapsed, k in sent[1:]} == {"repeat"}
    entry, = s.entries().values()
    assert entry["count"] == HOUR // every + 1 and entry["level"] == "warning"
    assert entry["first_seen"] == T0 and entry["last_message"] == "still bad"


def test_level_change_sends_at_once(state_path, clock):
    s = alertstate.AlertState(state_path, clock=clock)
    steps = [("warning", True, "new"), ("warning", False, "suppressed"), ("critical", True, "changed"),
             ("critical", False, "suppressed"), ("warning", True, "changed"), ("warning", False, "suppressed")]
    for level, send, kind in steps:
        d = s.decide(key("latency"), level)
        assert (d.send, d.kind) == (send, kind), (level, d)
        clock.advance(30)
    assert d.previous_level == "warning" and d.count == 6


def test_recovery_sends_exactly_one_resolved(state_path, clock):
    s = alertstate.AlertState(state_path, clock=clock)
    assert s.decide(key("backup"), "ok").kind == "none"  # nothing open: nothing to resolve
    kinds = []
    for level in ["critical"] * 5 + ["ok"] * 5:
        kinds.append(s.decide(key("backup"), level).kind)
        clock.advance(60)
    assert kinds == ["new"] + ["suppressed"] * 4 + ["resolved"] + ["none"] * 4
    assert s.entries() == {}
    # and a new episode starts from scratch
    assert s.decide(key("backup"), "critical").kind == "new"


def test_resolved_decision_describes_the_episode(state_path, clock):
    s = alertstate.AlertState(state_path, clock=clock)
    s.decide(key("stale_keys", "company-001"), "warning")
    clock.advance(2400)
    s.decide(key("stale_keys", "company-001"), "warning")
    clock.advance(600)
    d = s.decide(key("stale_keys", "company-001"), "ok")
    assert d.send and d.kind == "resolved" and d.count == 2 and d.previous_level == "warning"
    assert d.open_for == 3000 and "50m" in d.describe() and "company-001" in d.describe()
    assert d.fingerprint == ["baileys-resilience", "health", "stale_keys", "company-001"]


def test_report_resolves_keys_the_job_no_longer_reports(state_path, clock):
    s = alertstate.AlertState(state_path, clock=clock)
    first = s.report("health", [(key("stale_keys", "c1"), "warning", "12 stale"),
                                (key("stale_keys", "c2"), "warning", "3 stale"),
                                (key("failure", job="backup"), "critical", "other job")])
    assert [d.kind for d in first] == ["new", "new", "new"]
    clock.advance(60)
    second = s.report("health", [(key("stale_keys", "c1"), "warning", "12 stale")])
    assert [(d.key.company, d.kind) for d in second] == [("c1", "suppressed"), ("c2", "resolved")]
    clock.advance(60)
    third = s.report("health", [])
    assert [(d.key.company, d.kind) for d in third] == [("c1", "resolved")]
    # another job's key is untouched by health's reports
    assert [e["job"] for e in s.entries().values()] == ["backup"]


def test_state_file_is_private_and_survives_a_restart(state_path, clock):
    s = alertstate.AlertState(state_path, clock=clock)
    assert s.decide(key("latency"), "warning").send
    assert stat.S_IMODE(os.stat(state_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(state_path)).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(state_path + ".lock").st_mode) == 0o600
    doc = json.load(open(state_path))
    assert doc["version"] == 1 and len(doc["alerts"]) == 1
    clock.advance(120)
    again = alertstate.AlertState(state_path, clock=clock)  # a new process, the same file
    assert again.decide(key("latency"), "warning").kind == "suppressed"
    clock.advance(180)
    d = alertstate.AlertState(state_path, clock=clock).decide(key("latency"), "warning")
    assert d.kind == "repeat" and d.count == 3 and d.suppressed == 1
    assert alertstate.AlertState(state_path, clock=clock).decide(key("latency"), "ok").kind == "resolved"
    assert not [n for n in os.listdir(os.path.dirname(state_path)) if n.startswith(".baileys-resilience-tmp")]


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe", b"[]", b'{"version": 99, "alerts": {}}',
                                     b'{"version": 1, "alerts": {"x": {"level": "purple"}}}', b""])
def test_damaged_state_file_is_kept_aside(state_path, clock, content):
    os.makedirs(os.path.dirname(state_path), mode=0o700)
    with open(state_path, "wb") as fh:
        fh.write(content)
    warned = []
    s = alertstate.AlertState(state_path, clock=clock, warn=warned.append)
    d = s.decide(key("latency"), "warning")
    assert d.send and d.kind == "new" and not d.degraded
    aside = [n for n in os.listdir(os.path.dirname(state_path)) if ".damaged-" in n]
    assert aside == ["alert-state.json.damaged-20250615T150640Z"]
    with open(os.path.join(os.path.dirname(state_path), aside[0]), "rb") as fh:
        assert fh.read() == content
    assert len(warned) == 1 and "damaged" in warned[0] and aside[0] in warned[0]
    # the new file is sound and the run goes on from it
    clock.advance(10)
    assert s.decide(key("latency"), "warning").kind == "suppressed"
    assert s.warnings == warned


def test_unusable_state_fails_open(tmp_path, clock):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    warned = []
    s = alertstate.AlertState(str(blocker / "alert-state.json"), clock=clock, warn=warned.append)
    for _run in range(3):  # no state: every problem is sent, as without a state file
        d = s.decide(key("latency"), "critical")
        assert d.send and d.degraded
    assert not s.decide(key("latency"), "ok").send
    assert warned and "without de-duplication" in warned[0]


def test_lock_held_too_long_fails_open(state_path, clock):
    import fcntl

    s = alertstate.AlertState(state_path, clock=clock, lock_timeout=0.2)
    s.decide(key("latency"), "warning")
    fd = os.open(state_path + ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        d = s.decide(key("latency"), "warning")
        assert d.send and d.degraded and "held for more than" in s.warnings[-1]
    finally:
        os.close(fd)
    assert s.decide(key("latency"), "warning").kind == "suppressed"


def test_undelivered_message_is_sent_again(state_path, clock):
    s = alertstate.AlertState(state_path, clock=clock)
    assert s.decide(key("failure", job="backup"), "critical").send
    s.mark_undelivered([key("failure", job="backup")])
    clock.advance(10)
    assert s.decide(key("failure", job="backup"), "critical").send
    clock.advance(10)
    assert not s.decide(key("failure", job="backup"), "critical").send


def _race(path, barrier, results, index):
    s = alertstate.AlertState(path, clock=lambda: T0)
    barrier.wait()
    d = s.decide(("backup", "failure", ""), "critical", message="from %d" % index)
    results.put((index, d.send, d.kind, d.degraded))


def test_racing_processes_send_one_message(state_path):
    os.makedirs(os.path.dirname(state_path), mode=0o700)
    ctx = multiprocessing.get_context("fork")
    n = 6
    for _round in range(3):
        if os.path.exists(state_path):
            os.unlink(state_path)
        barrier = ctx.Barrier(n)
        results = ctx.Queue()
        procs = [ctx.Process(target=_race, args=(state_path, barrier, results, i)) for i in range(n)]
        for p in procs:
            p.start()
        got = [results.get(timeout=30) for _proc in range(n)]
        for p in procs:
            p.join(30)
            assert p.exitcode == 0
        assert sum(1 for _index, send, _kind, _degraded in got if send) == 1, got
        assert sorted(kind for _index, _send, kind, _degraded in got) == ["new"] + ["suppressed"] * (n - 1)
        assert not any(degraded for _index, _send, _kind, degraded in got)
        entry, = alertstate.AlertState(state_path, clock=lambda: T0).entries().values()
        assert entry["count"] == n


# --------------------------------------------------------------------------- Alerts with the state


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def tg(receiver, **extra):
    return dict({"telegram": {"bot_token": TOKEN, "chat_id": "1", "api_base": receiver.url, "timeout": 3}}, **extra)


def health_checks(stale_c1=True, latency="ok"):
    checks = [{"name": "database", "status": "ok", "detail": "2 companies"},
              {"name": "latency", "status": latency, "detail": "probe p95 %s" % latency}]
    if stale_c1:
        checks.append({"name": "stale_keys", "status": "warning", "detail": "12 stale keys", "company_id": "c1"})
    return checks


def test_alerts_config_keys(tmp_path):
    a = alerts.Alerts({"state_file": str(tmp_path / "s.json"), "cooldowns": {"stale_keys": "1h"}})
    assert a.state is not None and a.state.cooldown(key("stale_keys")) == 3600
    assert alerts.Alerts({}).state is None  # no state file configured: the old behaviour
    assert alerts.Alerts({"state_file": ""}, default_state_file=str(tmp_path / "d.json")).state is None
    assert alerts.Alerts(None, default_state_file=str(tmp_path / "d.json")).state.path == str(tmp_path / "d.json")
    with pytest.raises(alerts.AlertConfigError, match="cooldowns"):
        alerts.Alerts({"cooldowns": {"latency": "often"}})
    with pytest.raises(alerts.AlertConfigError, match="state_file"):
        alerts.Alerts({"state_file": 3})


def test_health_runs_in_a_row_send_one_message_then_resolved(tmp_path, receiver, clock):
    cfg = tg(receiver, state_file=str(tmp_path / "alert-state.json"))
    for _run in range(12):  # an hour of 5-minute health runs with the same warning
        a = alerts.Alerts(cfg, clock=clock)
        a.job_finished("health", True, "health WARNING", host="db1", warn=True, checks=health_checks())
        clock.advance(300)
    # stale keys: 30-minute cooldown -> at 0 and at 30 min
    assert len(receiver.texts) == 2, receiver.texts
    assert "health needs attention on db1" in receiver.texts[0]
    assert "[WARNING] stale_keys (c1): 12 stale keys" in receiver.texts[0]
    assert "still warning" in receiver.texts[1]
    # latency turns critical: sent at once (and the stale warning stays quiet: 5 minutes since its message)
    clock.advance(-3600 + 2100)
    a = alerts.Alerts(cfg, clock=clock)
    checks = health_checks(latency="critical")
    a.job_finished("health", False, "health CRITICAL", host="db1", warn=False, checks=checks)
    assert len(receiver.texts) == 3 and "[CRITICAL] latency" in receiver.texts[2]
    assert "stale_keys" not in receiver.texts[2] and "FAILED" in receiver.texts[2]
    # an hour after the first message the stale warning is due again, with the critical latency
    clock.t = T0 + 3600
    alerts.Alerts(cfg, clock=clock).job_finished("health", False, "health CRITICAL", host="db1", checks=checks)
    assert len(receiver.texts) == 4
    assert "[WARNING] stale_keys (c1): 12 stale keys (still warning since 2025-06-15T15:06:40Z, 14 occurrences)" \
        in receiver.texts[3]
    assert "[CRITICAL] latency: probe p95 critical (still critical" in receiver.texts[3]
    clock.advance(300)
    # everything clears: one message with both "resolved" lines, then silence
    for _run in range(3):
        alerts.Alerts(cfg, clock=clock).job_finished("health", True, "health OK", host="db1",
                                                     checks=health_checks(stale_c1=False))
        clock.advance(300)
    assert len(receiver.texts) == 5, receiver.texts
    assert "recovered on db1" in receiver.texts[4]
    assert "latency resolved" in receiver.texts[4] and "stale_keys (c1) resolved" in receiver.texts[4]


def test_notify_on_critical_keeps_warnings_quiet(tmp_path, receiver, clock):
    cfg = tg(receiver, state_file=str(tmp_path / "alert-state.json"))
    alerts.Alerts(cfg, clock=clock).job_finished("health", True, "w", warn=False, checks=health_checks(),
                                                 notify_on="critical")
    assert receiver.texts == []
    alerts.Alerts(cfg, clock=clock).job_finished("health", True, "w", warn=True, checks=health_checks())
    assert len(receiver.texts) == 1
    # below notify_on now: still failing, so neither a message nor a "resolved"
    clock.advance(3600)
    for _run in range(2):
        alerts.Alerts(cfg, clock=clock).job_finished("health", True, "w", warn=False, checks=health_checks(),
                                                     notify_on="critical")
    assert len(receiver.texts) == 1
    alerts.Alerts(cfg, clock=clock).job_finished("health", True, "ok", checks=health_checks(stale_c1=False))
    assert len(receiver.texts) == 2 and "stale_keys (c1) resolved" in receiver.texts[1]


def test_failing_job_alerts_once_per_cooldown_then_recovers(tmp_path, receiver, clock):
    cfg = tg(receiver, state_file=str(tmp_path / "alert-state.json"))
    for _run in range(6):  # a cleanup failing every minute
        a = alerts.Alerts(cfg, clock=clock)
        a.job_started("cleanup")
        a.job_finished("cleanup", False, "refusing to delete 5000 keys", host="db1")
        clock.advance(60)
    assert len(receiver.texts) == 2
    assert "cleanup FAILED on db1" in receiver.texts[0] and "refusing to delete 5000 keys" in receiver.texts[0]
    assert "still critical" in receiver.texts[1]
    alerts.Alerts(cfg, clock=clock).job_finished("cleanup", True, "deleted 5000 keys", host="db1")
    alerts.Alerts(cfg, clock=clock).job_finished("cleanup", True, "deleted 0 keys", host="db1")
    assert len(receiver.texts) == 3 and "cleanup recovered on db1" in receiver.texts[2]
    assert "failure resolved" in receiver.texts[2]


def test_alert_method_and_dead_telegram_retry(tmp_path, clock):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dead = {"telegram": {"bot_token": TOKEN, "chat_id": "1", "api_base": "http://127.0.0.1:%d" % port, "timeout": 1},
            "state_file": str(tmp_path / "alert-state.json")}
    a = alerts.Alerts(dead, clock=clock, log=jobs.JobLog("probe", stream=open(os.devnull, "w")))
    assert a.alert("probe", "store_unreachable", "critical", "down").send
    assert a.delivery_failures
    clock.advance(15)
    # the message did not go out: the next occurrence tries again, within the cooldown
    assert a.alert("probe", "store_unreachable", "critical", "down").send
    assert a.alert("probe", "store_unreachable", "ok", "up").kind == "resolved"
