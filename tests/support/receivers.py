"""A local HTTP receiver for alert tests: Telegram's sendMessage and Sentry envelopes, on 127.0.0.1.

``requests`` holds every POST as ``(path, body)`` (gzip undone); ``texts`` the Telegram message texts;
``checkins()`` the Sentry check-in payloads; ``telegram()`` ``(path, message)`` pairs; ``url``/``port`` where it
listens. Used as the ``receiver`` fixture (tests/conftest.py).
"""
import gzip
import http.server
import json
import threading


class Receiver:
    def __init__(self):
        self.requests = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                outer.requests.append((self.path, body))
                reply = b'{"ok": true, "result": {}}'
                self.send_response(200)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = "http://127.0.0.1:%d" % self.port
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def texts(self):
        return [message["text"] for _path, message in self.telegram()]

    def telegram(self):
        return [(p, json.loads(b)) for p, b in self.requests if "/sendMessage" in p]

    def checkins(self):
        """Check-in payloads of every envelope (item header line, then payload of header['length'] bytes)."""
        out = []
        for path, body in self.requests:
            if path != "/api/1/envelope/":
                continue
            _envelope_header, _sep, rest = body.partition(b"\n")
            while rest.strip():
                header_line, _sep, rest = rest.partition(b"\n")
                header = json.loads(header_line)
                if "length" in header:
                    payload, rest = rest[: header["length"]], rest[header["length"]:].lstrip(b"\n")
                else:
                    payload, _sep, rest = rest.partition(b"\n")
                if header.get("type") == "check_in":
                    out.append(json.loads(payload))
        return out

    def close(self):
        self.server.shutdown()
        self.server.server_close()
