"""Verify of the backup scenario, part 5: alerts reach a local receiver (tests/support/alert_receiver.py).

Sentry: the host command's check-ins arrive as envelopes (sentry-sdk 2 in the cli role's virtual environment,
on Debian 12 as on 13). Telegram: several health runs in a row with the same warning send one message, and one
"resolved" when it clears (the alert state on disk, /var/lib/baileys-resilience/alert-state.json).
"""

import json
import shlex
import time

from scenario import ALERTS_LOG, APP, CONFIG_DIR, TOOL, run

testinfra_hosts = [APP]
FRAGMENT = CONFIG_DIR + "/config.d/zz-molecule-latency.yml"


def _records(host, since=0.0):
    text = run(host, "cat %s 2>/dev/null || true" % ALERTS_LOG).stdout
    return [r for r in (json.loads(line) for line in text.splitlines() if line.strip()) if r["t"] >= since]


def _now(host):
    return float(run(host, "date +%s.%N").stdout)


def test_sentry_check_ins_reach_the_receiver(host):
    since = _now(host)
    result = host.run("%s health" % TOOL)
    assert result.rc in (0, 1), result.stdout + result.stderr
    deadline = time.time() + 20
    while True:
        check_ins = [item["payload"] for r in _records(host, since) if r["kind"] == "sentry"
                     for item in r["items"] if item["type"] == "check_in"]
        statuses = [c["status"] for c in check_ins if "health" in c.get("monitor_slug", "")]
        if ("ok" in statuses or "error" in statuses) or time.time() > deadline:
            break
        time.sleep(0.5)
    assert "in_progress" in statuses and ("ok" in statuses or "error" in statuses), check_ins


def test_repeated_health_warnings_send_one_message_then_one_resolved(host):
    run(host, "umask 077 && printf '%%s\\n' %s > %s" % (
        shlex.quote("health: {thresholds: {latency_p95_warning_ms: 0}}"), FRAGMENT))
    try:
        since = _now(host)
        for _run in range(3):
            result = host.run("%s health" % TOOL)
            assert result.rc == 1, result.stdout + result.stderr  # warning: p95 over 0 ms
        latency = [r["text"] for r in _records(host, since) if r["kind"] == "telegram" and "latency" in r["text"]]
        assert len(latency) == 1, latency
        assert "needs attention" in latency[0]
    finally:
        run(host, "rm -f %s" % FRAGMENT)
    since = _now(host)
    result = host.run("%s health" % TOOL)
    messages = [r["text"] for r in _records(host, since) if r["kind"] == "telegram" and "latency" in r["text"]]
    assert len(messages) == 1 and "latency resolved" in messages[0], (messages, result.stdout)
    since = _now(host)
    host.run("%s health" % TOOL)
    assert not [r for r in _records(host, since) if r["kind"] == "telegram" and "latency" in r["text"]]
    state = host.file("/var/lib/baileys-resilience/alert-state.json")
    assert state.mode == 0o600 and state.user == "root"
    assert host.file("/var/lib/baileys-resilience").mode == 0o700
