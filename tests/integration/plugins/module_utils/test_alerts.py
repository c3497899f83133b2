"""The tool's alerts with real local receivers: Sentry Crons check-ins and Telegram, live and dead."""
from __future__ import annotations

import io
import json
import os
import socket

import pytest
import yaml

from ansible_collections.baileys.resilience.plugins.module_utils import cli

from support import authgen, pgserver
from support.receivers import Receiver


TOKEN = "987654:BOT-token_with-secret"


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()
    import sentry_sdk
    sentry_sdk.get_client().close(timeout=1)


def dead_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alerts_config(port):
    return {"sentry": {"dsn": "http://public@127.0.0.1:%d/1" % port, "schedules": {"cleanup": "30 4 * * *"},
                       "flush_timeout": 3},
            "telegram": {"bot_token": TOKEN, "chat_id": "42", "api_base": "http://127.0.0.1:%d" % port,
                         "timeout": 3}}


def setup(tmp_path, db, dbconn, port):
    authgen.load_into(dbconn, authgen.generate(1, seed=9, form="base64",
                                               mix={"pre-key": 10, "session": 10, "app-state-sync-key": 1}))
    dbconn.execute("UPDATE whatsapp_keys SET updated_at = now() - interval '60 days'")
    dbconn.commit()
    cfg = dict(db, lock_dir=str(tmp_path), state_dir=str(tmp_path / "state"), alerts=alerts_config(port),
               cleanup={"max_delete": 5})
    path = tmp_path / "config.yml"
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        yaml.safe_dump(cfg, fh)
    return str(path)


def run(args):
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(args, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def test_failed_job_alerts_and_keeps_its_exit_code(db, dbconn, tmp_path, receiver):
    cfg = setup(tmp_path, db, dbconn, receiver.port)
    code, out, err = run(["--config", cfg, "cleanup"])  # 10 candidates (the sessions; pre-keys are kept) > max_delete 5
    assert code == cli.EXIT_FAILED
    checkins = receiver.checkins()
    assert [c["status"] for c in checkins] == ["in_progress", "error"]
    assert checkins[0]["monitor_slug"] == "baileys-resilience-cleanup"
    assert checkins[0]["monitor_config"]["schedule"] == {"type": "crontab", "value": "30 4 * * *"}
    assert checkins[0]["monitor_config"]["timezone"] == "UTC"
    (path, body), = receiver.telegram()
    assert path == "/bot%s/sendMessage" % TOKEN
    assert body["chat_id"] == "42" and "cleanup FAILED" in body["text"] and "max_delete=5" in body["text"]
    everything = out + err + "".join(b.decode("utf-8", "replace") for _path, b in receiver.requests)
    assert pgserver.SUPERUSER_PASSWORD not in everything and json.dumps(pgserver.SUPERUSER_PASSWORD) not in everything
    assert TOKEN not in err + out


def test_successful_job_checks_in_ok_quietly(db, dbconn, tmp_path, receiver):
    cfg = setup(tmp_path, db, dbconn, receiver.port)
    code, out, err = run(["--config", cfg, "cleanup", "--confirm-large-delete"])
    assert code == 0, out + err
    assert [c["status"] for c in receiver.checkins()] == ["in_progress", "ok"]
    assert receiver.telegram() == []  # notify_success is off


def test_dead_receivers_do_not_change_exit_codes(db, dbconn, tmp_path):
    cfg = setup(tmp_path, db, dbconn, dead_port())
    code, out, err = run(["--config", cfg, "cleanup"])
    assert code == cli.EXIT_FAILED  # the job's own failure, not an alert failure
    lines = [json.loads(line) for line in err.splitlines()]
    assert any(entry["step"] == "alert_telegram" and entry["status"] == "error" for entry in lines)
    assert TOKEN not in err
    code, out, err = run(["--config", cfg, "cleanup", "--confirm-large-delete"])
    assert code == 0, out + err
    code, out, err = run(["--config", cfg, "health", "--json"])
    assert code == 0 and json.loads(out)["status"] == "ok"
    import sentry_sdk
    sentry_sdk.get_client().close(timeout=1)


def test_health_warning_notifies_per_notify_on(db, dbconn, tmp_path, receiver):
    setup(tmp_path, db, dbconn, receiver.port)
    for notify_on, expected in (("warning", 1), ("critical", 0)):
        del receiver.requests[:]
        cfg = dict(db, lock_dir=str(tmp_path), state_dir=str(tmp_path / "state"),
                   alerts=alerts_config(receiver.port),
                   health={"probes": 2, "notify_on": notify_on, "thresholds": {"latency_p95_warning_ms": 0}})
        path = tmp_path / ("h-%s.yml" % notify_on)
        fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            yaml.safe_dump(cfg, fh)
        code, out, err = run(["--config", str(path), "health"])
        assert code == 1, out + err
        # a warning is not a failed run: the monitor gets ok
        assert [c["status"] for c in receiver.checkins()] == ["in_progress", "ok"]
        messages = receiver.telegram()
        assert len(messages) == expected
        if expected:
            assert "health needs attention" in messages[0][1]["text"] and "latency" in messages[0][1]["text"]


def write_config(tmp_path, name, cfg):
    path = tmp_path / name
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        yaml.safe_dump(cfg, fh)
    return str(path)


def test_repeated_health_warnings_send_one_message_then_one_resolved(db, dbconn, tmp_path, receiver):
    """Several health runs in a row with the same warning: one Telegram message (cooldown 5 min), then one
    "resolved" when it clears, then nothing."""
    authgen.load_into(dbconn, authgen.generate(1, seed=9, form="base64", mix={"pre-key": 10, "session": 10}))
    dbconn.commit()
    base = dict(db, lock_dir=str(tmp_path), state_dir=str(tmp_path / "state"), alerts=alerts_config(receiver.port))
    warn = write_config(tmp_path, "warn.yml", dict(base, health={"probes": 2,
                                                                 "thresholds": {"latency_p95_warning_ms": 0}}))
    calm = write_config(tmp_path, "calm.yml", dict(base, health={"probes": 2}))
    for _run in range(3):
        code, out, err = run(["--config", warn, "health"])
        assert code == 1, out + err
    messages = [m["text"] for _p, m in receiver.telegram()]
    assert len(messages) == 1 and "latency" in messages[0], messages
    code, out, err = run(["--config", calm, "health"])
    assert code == 0, out + err
    messages = [m["text"] for _p, m in receiver.telegram()]
    assert len(messages) == 2 and "resolved" in messages[1], messages
    code, out, err = run(["--config", calm, "health"])
    assert code == 0 and len(receiver.telegram()) == 2
    state = json.loads((tmp_path / "state" / "alert-state.json").read_text())
    assert state["alerts"] == {}
    assert oct((tmp_path / "state" / "alert-state.json").stat().st_mode & 0o777) == "0o600"


def _prom(path):
    samples = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _sp, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def test_probe_command_alerts_once_per_outage_and_resolves(db, tmp_path, receiver):
    textfiles = tmp_path / "textfile"
    textfiles.mkdir()
    base = dict(db, lock_dir=str(tmp_path), state_dir=str(tmp_path / "state"), textfile_dir=str(textfiles),
                alerts=alerts_config(receiver.port))
    down = write_config(tmp_path, "down.yml", dict(base, login_port=dead_port(), login_host="127.0.0.1",
                                                   login_unix_socket=None))
    up = write_config(tmp_path, "up.yml", base)
    for _run in range(3):
        code, out, err = run(["--config", down, "probe", "--json"])
        assert code == 2, out + err
        assert json.loads(out)["up"] is False
    messages = [m["text"] for _p, m in receiver.telegram()]
    assert len(messages) == 1 and "unreachable" in messages[0], messages
    prom = _prom(textfiles / "baileys_resilience_probe.prom")
    assert prom['baileys_resilience_probe_up{target="store"}'] == 0
    assert prom['baileys_resilience_alert_active{alert="probe/store_unreachable",level="critical"}'] == 1
    assert prom['baileys_resilience_probe_failures_total{target="store"}'] == 3

    code, out, err = run(["--config", up, "probe", "--loop", "--interval", "0.2", "--count", "3", "--json"])
    assert code == 0, out + err
    result = json.loads(out)
    assert result["up"] is True and result["histogram"]["count"] == 3
    messages = [m["text"] for _p, m in receiver.telegram()]
    assert len(messages) == 2 and "resolved" in messages[1], messages
    prom = _prom(textfiles / "baileys_resilience_probe.prom")
    assert prom['baileys_resilience_probe_up{target="store"}'] == 1
    assert prom['baileys_resilience_probe_duration_seconds_count{target="store"}'] == 3
    assert not [k for k in prom if k.startswith("baileys_resilience_alert_active")]
    code, out, err = run(["--config", up, "probe"])
    assert code == 0 and out.startswith("store up:") and len(receiver.telegram()) == 2
