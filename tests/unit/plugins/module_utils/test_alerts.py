"""Alerts against real local HTTP receivers: Sentry envelopes (check-ins, events) and the Telegram Bot API."""
from __future__ import annotations

import gzip
import http.server
import io
import json
import socket
import threading
import zlib

import pytest

from ansible_collections.baileys.resilience.plugins.module_utils import alerts, jobs

TOKEN = "123456:AAH-secret_token-XYZ"
PASSWORD = "s3cr<e>t|pa?ss%w@rd:/ 'q\"x"


class Receiver:
    """http.server on 127.0.0.1 in a thread, recording every request."""

    def __init__(self, status=200, reply=b'{"ok": true, "result": {}}'):
        self.requests = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.port

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def dead_port():
    """A port nothing listens on (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def decode_body(request):
    body = request["body"]
    encoding = request["headers"].get("Content-Encoding", "")
    if encoding == "gzip":
        body = gzip.decompress(body)
    elif encoding == "deflate":
        body = zlib.decompress(body)
    elif encoding == "br":
        import brotli
        body = brotli.decompress(body)
    return body


def envelope_items(request):
    """[(item header, payload dict)] of one Sentry envelope."""
    data = decode_body(request)
    _envelope_header, _sep, rest = data.partition(b"\n")
    items = []
    while rest.strip():
        header_line, _sep, rest = rest.partition(b"\n")
        header = json.loads(header_line)
        if "length" in header:
            payload, rest = rest[: header["length"]], rest[header["length"]:]
            rest = rest[1:] if rest.startswith(b"\n") else rest
        else:
            payload, _sep, rest = rest.partition(b"\n")
        items.append((header, json.loads(payload) if payload.strip() else None))
    return items


def sentry_items(receiver):
    out = []
    for request in receiver.requests:
        assert request["path"] == "/api/1/envelope/"
        out.extend(envelope_items(request))
    return out


@pytest.fixture
def receivers():
    made = []

    def make(**kw):
        r = Receiver(**kw)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


@pytest.fixture(autouse=True)
def close_sentry():
    yield
    import sentry_sdk
    sentry_sdk.get_client().close(timeout=1)


def config(sentry=None, telegram=None, **tg):
    c = {}
    if sentry:
        c["sentry"] = {"dsn": "http://public@127.0.0.1:%d/1" % sentry, "schedules": {"backup": "7 3 * * *"},
                       "checkin_margin": 15, "max_runtime": 45, "flush_timeout": 3}
    if telegram:
        c["telegram"] = dict({"bot_token": TOKEN, "chat_id": "-100200300", "api_base": telegram, "timeout": 3}, **tg)
    return c


def test_sentry_checkins_and_failure_event(receivers):
    r = receivers()
    log_out = io.StringIO()
    log = jobs.JobLog("backup", stream=log_out, secrets=[PASSWORD])
    a = alerts.Alerts(config(sentry=r.port), log=log, secrets=[PASSWORD])
    a.job_started("backup")
    try:
        raise RuntimeError("pg_dump failed for password=%s" % PASSWORD)
    except RuntimeError as exc:
        a.job_finished("backup", False, "pg_dump failed", context={"login_password": PASSWORD, "rows": 3}, exc=exc)
    items = sentry_items(r)
    checkins = [p for h, p in items if h["type"] == "check_in"]
    assert [c["status"] for c in checkins] == ["in_progress", "error"]
    assert {c["monitor_slug"] for c in checkins} == {"baileys-resilience-backup"}
    assert checkins[0]["check_in_id"] == checkins[1]["check_in_id"]
    mc = checkins[0]["monitor_config"]
    assert mc["schedule"] == {"type": "crontab", "value": "7 3 * * *"}
    assert mc["checkin_margin"] == 15 and mc["max_runtime"] == 45 and mc["timezone"] == "UTC"
    assert checkins[1]["duration"] >= 0
    events = [p for h, p in items if h["type"] == "event"]
    assert len(events) == 1
    raw = b"".join(decode_body(req) for req in r.requests).decode("utf-8")
    assert PASSWORD not in raw and json.dumps(PASSWORD)[1:-1] not in raw
    assert events[0]["tags"]["job"] == "backup"
    assert events[0]["contexts"]["job"]["login_password"] == "********"
    assert events[0]["contexts"]["job"]["rows"] == 3
    assert "user" not in events[0] or not events[0]["user"].get("ip_address")
    assert a.delivery_failures == []


def test_sentry_ok_checkin_without_event(receivers):
    r = receivers()
    a = alerts.Alerts(config(sentry=r.port))
    a.job_started("cleanup")
    a.job_finished("cleanup", True, "deleted 3 keys")
    items = sentry_items(r)
    assert [(h["type"], p["status"]) for h, p in items] == [("check_in", "in_progress"), ("check_in", "ok")]
    assert items[0][1]["monitor_config"]["schedule"]["value"] == alerts.DEFAULT_SCHEDULES["cleanup"]


def test_telegram_failure_message(receivers):
    r = receivers()
    log_out = io.StringIO()
    a = alerts.Alerts(config(telegram=r.url), log=jobs.JobLog("cleanup", stream=log_out))
    a.job_started("cleanup")
    a.job_finished("cleanup", False, "refusing to delete 5000 keys", host="db1")
    assert len(r.requests) == 1
    req = r.requests[0]
    assert req["path"] == "/bot%s/sendMessage" % TOKEN
    assert req["headers"]["Content-Type"] == "application/json"
    body = json.loads(req["body"])
    assert body["chat_id"] == "-100200300"
    assert "cleanup FAILED on db1" in body["text"] and "refusing to delete 5000 keys" in body["text"]
    assert TOKEN not in log_out.getvalue()
    assert '"step":"alert_telegram","status":"ok"' in log_out.getvalue()


def test_telegram_success_only_when_enabled(receivers):
    r = receivers()
    quiet = alerts.Alerts(config(telegram=r.url))
    quiet.job_finished("backup", True, "backup written")
    assert r.requests == []
    chatty = alerts.Alerts(config(telegram=r.url, notify_success=True))
    chatty.job_finished("backup", True, "backup written")
    warn = alerts.Alerts(config(telegram=r.url))
    warn.job_finished("health", True, "backup is 30 h old", warn=True)
    texts = [json.loads(q["body"])["text"] for q in r.requests]
    assert len(texts) == 2
    assert "backup succeeded" in texts[0] and "backup written" in texts[0]
    assert "health needs attention" in texts[1]


def test_telegram_errors_never_leak_the_token(receivers):
    r = receivers(status=401, reply=b'{"ok": false, "description": "Unauthorized"}')
    out = io.StringIO()
    a = alerts.Alerts(config(telegram=r.url), log=jobs.JobLog("backup", stream=out))
    assert a.telegram("hello") is False
    assert a.delivery_failures and "401" in a.delivery_failures[0]["error"]
    dead = alerts.Alerts(config(telegram="http://127.0.0.1:%d/x" % dead_port()),
                         log=jobs.JobLog("backup", stream=out))
    assert dead.telegram("hello") is False
    assert "refused" in dead.delivery_failures[0]["error"].lower()
    assert TOKEN not in out.getvalue() and TOKEN not in json.dumps(a.delivery_failures + dead.delivery_failures)
    # the token in an error message (as in a URL) is masked
    dead._fail("telegram", OSError("cannot reach http://x/bot%s/sendMessage" % TOKEN))
    assert TOKEN not in dead.delivery_failures[-1]["error"] and "********" in dead.delivery_failures[-1]["error"]


def test_dead_receivers_do_not_raise():
    port = dead_port()
    a = alerts.Alerts(config(sentry=port, telegram="http://127.0.0.1:%d" % port))
    a.job_started("backup")
    a.job_finished("backup", False, "boom", exc=RuntimeError("boom"))  # must return normally
    assert any(f["channel"] == "telegram" for f in a.delivery_failures)


def test_telegram_text_is_truncated(receivers):
    r = receivers()
    alerts.Alerts(config(telegram=r.url)).telegram("x" * 10000)
    text = json.loads(r.requests[0]["body"])["text"]
    assert len(text) <= alerts.TELEGRAM_MAX_TEXT and text.endswith("(truncated)")


def test_bad_config():
    with pytest.raises(alerts.AlertConfigError, match="unknown key"):
        alerts.Alerts({"slack": {}})
    with pytest.raises(alerts.AlertConfigError, match="alerts.telegram"):
        alerts.Alerts({"telegram": {"token": "x"}})
    assert not alerts.Alerts({}).sentry_enabled and not alerts.Alerts(None).telegram_enabled
