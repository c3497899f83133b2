"""The store probe against a real PostgreSQL: metrics text, a histogram across runs, alerts once and resolved once."""
from __future__ import annotations

import json
import os
import re
import socket
import stat

import pytest

from ansible_collections.baileys.resilience.plugins.module_utils import alerts, probe
from support.receivers import Receiver

STORE = {"schema": "public", "auth_table": "whatsapp_auth", "keys_table": "whatsapp_keys"}
TOKEN = "555:probe-token_secret"
T0 = 1_750_000_000.0


class Clock:
    def __init__(self):
        self.t = T0

    def __call__(self):
        return self.t


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def samples(text):
    """{'name{labels}': value} of an exposition text."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_probe_up_writes_metrics_and_accumulates_a_histogram(db, tmp_path):
    textfiles, state = tmp_path / "textfile", tmp_path / "state"
    textfiles.mkdir()
    clock = Clock()
    for _run in range(3):
        result = probe.run_probe(db, STORE, str(textfiles), str(state), None, clock=clock)
        assert result["up"] and result["error"] is None, result
        assert 0 < result["query_seconds"] <= result["duration"] < 5
        clock.t += 15
    path = textfiles / probe.TEXTFILE_NAME
    assert result["textfile"] == str(path) and stat.S_IMODE(os.stat(path).st_mode) == 0o644
    text = path.read_text()
    assert "# TYPE baileys_resilience_probe_duration_seconds histogram" in text
    assert "# TYPE baileys_resilience_probe_up gauge" in text
    assert "# TYPE baileys_resilience_probe_failures_total counter" in text
    s = samples(text)
    assert s['baileys_resilience_probe_up{target="store"}'] == 1
    assert s['baileys_resilience_probe_duration_seconds_count{target="store"}'] == 3
    assert s['baileys_resilience_probe_duration_seconds_bucket{le="+Inf",target="store"}'] == 3
    assert 0 < s['baileys_resilience_probe_duration_seconds_sum{target="store"}'] < 15
    assert s['baileys_resilience_probe_last_timestamp_seconds{target="store"}'] == T0 + 30
    assert s['baileys_resilience_probe_last_success_timestamp_seconds{target="store"}'] == T0 + 30
    assert s['baileys_resilience_probe_failures_total{target="store"}'] == 0
    les = re.findall(r'baileys_resilience_probe_duration_seconds_bucket\{le="([^"]+)"', text)
    assert les == ["0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1.0", "2.5", "5.0", "10.0", "+Inf"]
    counts = [s['baileys_resilience_probe_duration_seconds_bucket{le="%s",target="store"}' % le] for le in les]
    assert counts == sorted(counts) and counts[-1] == 3  # cumulative
    hist = state / probe.HISTOGRAM_FILE
    assert stat.S_IMODE(os.stat(hist).st_mode) == 0o600 and stat.S_IMODE(os.stat(state).st_mode) == 0o700
    assert json.loads(hist.read_text())["count"] == 3
    # the health job's quantile gauge is another metric, untouched
    assert "baileys_resilience_probe_latency_seconds" not in text


def test_down_store_alerts_once_then_at_cooldown_then_resolved(db, tmp_path, receiver):
    textfiles, state = tmp_path / "textfile", tmp_path / "state"
    textfiles.mkdir()
    clock = Clock()
    cfg = {"telegram": {"bot_token": TOKEN, "chat_id": "7", "api_base": receiver.url, "timeout": 3}}
    down = dict(db, login_port=closed_port())

    def run(params):
        a = alerts.Alerts(cfg, clock=clock)  # a new process every probe, as under a systemd timer
        result = probe.run_probe(params, STORE, str(textfiles), str(state), a, clock=clock, host="db1")
        clock.t += 15
        return result

    first = run(db)
    assert first["up"] and receiver.texts == []  # up and fast: nothing to say
    results = [run(down) for _probe in range(24)]  # six minutes down, a probe every 15 s
    assert not any(r["up"] for r in results)
    assert all("cannot connect" in r["error"] and db["login_password"] not in r["error"] for r in results)
    # at once, then once when the 5-minute cooldown is over
    assert len(receiver.texts) == 2, receiver.texts
    assert "store_unreachable CRITICAL" in receiver.texts[0] and "on db1" in receiver.texts[0]
    assert "still critical" in receiver.texts[1]
    assert [r["alerts"][0]["kind"] for r in results][:2] == ["new", "suppressed"]
    assert [i for i, r in enumerate(results) if r["alerts"][0]["send"]] == [0, 20]
    s = samples((textfiles / probe.TEXTFILE_NAME).read_text())
    assert s['baileys_resilience_probe_up{target="store"}'] == 0
    assert s['baileys_resilience_probe_failures_total{target="store"}'] == 24
    assert s['baileys_resilience_probe_duration_seconds_count{target="store"}'] == 1  # failures are not observed
    assert s['baileys_resilience_probe_last_success_timestamp_seconds{target="store"}'] == T0
    # back up: exactly one "resolved"
    for _probe in range(4):
        assert run(db)["up"]
    assert len(receiver.texts) == 3, receiver.texts
    assert "store_unreachable resolved after 6m" in receiver.texts[2] and "25 occurrences" not in receiver.texts[2]
    assert "24 occurrences" in receiver.texts[2]
    s = samples((textfiles / probe.TEXTFILE_NAME).read_text())
    assert s['baileys_resilience_probe_up{target="store"}'] == 1
    assert s['baileys_resilience_probe_duration_seconds_count{target="store"}'] == 5
    assert json.loads((state / probe.ALERT_STATE_FILE).read_text())["alerts"] == {}
    assert TOKEN not in json.dumps(results)


def test_slow_store_warns_once(db, tmp_path, receiver):
    clock = Clock()
    cfg = {"telegram": {"bot_token": TOKEN, "chat_id": "7", "api_base": receiver.url, "timeout": 3},
           "state_file": str(tmp_path / "shared-alert-state.json")}
    for _run in range(5):
        a = alerts.Alerts(cfg, clock=clock)
        result = probe.run_probe(db, STORE, None, str(tmp_path / "state"), a, clock=clock, slow_seconds=0)
        assert result["up"] and result["slow"] and probe.exit_code(result) == 1
        clock.t += 15
    assert len(receiver.texts) == 1 and "store_slow WARNING" in receiver.texts[0]
    # the configured alert state is the one used (shared with the jobs), not the probe's own
    assert os.path.exists(tmp_path / "shared-alert-state.json")
    assert not os.path.exists(tmp_path / "state" / probe.ALERT_STATE_FILE)
    probe.run_probe(db, STORE, None, str(tmp_path / "state"), alerts.Alerts(cfg, clock=clock), clock=clock)
    assert len(receiver.texts) == 2 and "store_slow resolved" in receiver.texts[1]


def test_missing_table_is_down_and_damaged_histogram_is_kept_aside(db, tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / probe.HISTOGRAM_FILE).write_text("{broken")
    result = probe.run_probe(db, dict(STORE, auth_table="nope"), str(tmp_path), str(state), None, clock=Clock())
    assert not result["up"] and "nope" in result["error"] and probe.exit_code(result) == 2
    assert any("damaged" in w for w in result["warnings"])
    assert [n for n in os.listdir(state) if ".damaged-" in n]
    assert json.loads((state / probe.HISTOGRAM_FILE).read_text())["failures"] == 1


def test_probe_loop_runs_count_times(db, tmp_path):
    waits = []
    now = [100.0]

    def sleep(seconds):
        waits.append(seconds)
        now[0] += seconds

    def monotonic():
        now[0] += 0.25  # each probe "takes" a quarter of a second
        return now[0]

    result = probe.probe_loop(interval=15, count=3, sleep=sleep, monotonic=monotonic, conn_params=db,
                              store_params=STORE,
                              textfile_dir=str(tmp_path), state_dir=str(tmp_path / "state"), alerts=None)
    assert result["up"] and waits == [14.75, 14.75]
    assert samples((tmp_path / probe.TEXTFILE_NAME).read_text())[
        'baileys_resilience_probe_duration_seconds_count{target="store"}'] == 3
