"""service.switch_env / restore_env (atomic, owner and mode kept, never the content in results) and
service.wait_healthy against a real HTTP server on loopback."""
from __future__ import annotations

import http.server
import json
import os
import stat
import threading

import pytest

from ansible_collections.baileys.resilience.plugins.module_utils import service


def test_switch_keeps_the_original_once_and_restore_puts_it_back(tmp_path):
    env = tmp_path / "app.env"
    original = "# service\nexport USE_REPOSITORY_PATTERN=true\nPGPASSWORD=p<a>|ss?\n"
    env.write_text(original)
    os.chmod(env, 0o640)
    res = service.switch_env(str(env), {"USE_REPOSITORY_PATTERN": "false", "NEW": "1"}, check_mode=True)
    assert res["changed"] and env.read_text() == original and not (tmp_path / "app.env.pre-rollback").exists()
    res = service.switch_env(str(env), {"USE_REPOSITORY_PATTERN": "false", "NEW": "1"})
    assert res["changed_keys"] == ["USE_REPOSITORY_PATTERN", "NEW"] and res["backup_created"]
    assert "p<a>|ss?" not in json.dumps(res)
    assert env.read_text() == "# service\nUSE_REPOSITORY_PATTERN=false\nPGPASSWORD=p<a>|ss?\nNEW=1\n"
    assert stat.S_IMODE(os.stat(env).st_mode) == 0o640
    assert (tmp_path / "app.env.pre-rollback").read_text() == original
    again = service.switch_env(str(env), {"USE_REPOSITORY_PATTERN": "false", "NEW": "1"})
    assert not again["changed"] and (tmp_path / "app.env.pre-rollback").read_text() == original
    res = service.restore_env(str(env))
    assert res["restored"] and env.read_text() == original and not (tmp_path / "app.env.pre-rollback").exists()
    assert not service.restore_env(str(env))["changed"]
    assert sorted(os.listdir(tmp_path)) == ["app.env"]  # no temporary file left


def test_switch_refuses_a_missing_file_and_bad_names(tmp_path):
    with pytest.raises(service.ServiceError, match="does not exist"):
        service.switch_env(str(tmp_path / "nope.env"), {"A": "1"})
    (tmp_path / "a.env").write_text("")
    with pytest.raises(service.ServiceError, match="not an environment variable name"):
        service.switch_env(str(tmp_path / "a.env"), {"A=B": "1"})


@pytest.fixture
def health_server():
    answers = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            code, body = answers.pop(0) if len(answers) > 1 else answers[0]
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield "http://127.0.0.1:%d/health" % server.server_address[1], answers
    server.shutdown()


def test_wait_healthy_polls_until_the_mode_is_right(health_server):
    url, answers = health_server
    answers.extend([(503, {"status": "starting"}), (200, {"mode": "postgres"}), (200, {"mode": "files", "keys": 3})])
    res = service.wait_healthy(url, timeout=5, interval=0.05, expect={"mode": "files"})
    assert res["healthy"] and res["attempts"] == 3 and res["json"]["keys"] == 3


def test_wait_healthy_times_out_with_the_last_answer(health_server):
    url, answers = health_server
    answers.append((200, {"mode": "postgres"}))
    res = service.wait_healthy(url, timeout=0.3, interval=0.05, expect={"mode": "files"})
    assert not res["healthy"] and "postgres" in res["error"] and res["attempts"] >= 2
    closed = service.wait_healthy("http://127.0.0.1:1/health", timeout=0.2, interval=0.05)
    assert not closed["healthy"] and closed["error"]
