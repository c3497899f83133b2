"""A local alert receiver for the molecule scenarios: Sentry envelopes and Telegram's sendMessage.

    python3 alert_receiver.py PORT OUT.jsonl        (standard library only: it runs in the test containers)

Every POST is answered 200 and appended to OUT.jsonl as one JSON line, flushed and fsync'd at once:
``{"t": <unix time received>, "kind": "sentry"|"telegram"|"other", "path": ..., ...}`` with, for Sentry
(``/api/<project>/envelope/``), ``items``: ``[{"type": ..., "payload": <decoded JSON or text>}]``, and for
Telegram (``/bot<token>/sendMessage``), ``text`` and ``chat_id`` (the token is never written).
A DSN ``http://public@127.0.0.1:PORT/1`` and a Telegram api_base ``http://127.0.0.1:PORT`` point here.
"""
import gzip
import http.server
import json
import os
import re
import sys
import threading
import time
import zlib

LOCK = threading.Lock()


def parse_envelope(body):
    """The items of a Sentry envelope: header line, then per item a header line and its payload."""
    items = []
    _head, _sep, rest = body.partition(b"\n")
    while rest.strip():
        header_line, _sep, rest = rest.partition(b"\n")
        try:
            header = json.loads(header_line)
        except ValueError:
            break
        if "length" in header:
            payload, rest = rest[: header["length"]], rest[header["length"]:]
            if rest.startswith(b"\n"):
                rest = rest[1:]
        else:
            payload, _sep, rest = rest.partition(b"\n")
        try:
            decoded = json.loads(payload)
        except ValueError:
            decoded = payload.decode("utf-8", "replace")
        items.append({"type": header.get("type"), "payload": decoded})
    return items


def make_handler(out_path):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            encoding = (self.headers.get("Content-Encoding") or "").lower()
            if encoding == "gzip":
                body = gzip.decompress(body)
            elif encoding == "deflate":
                body = zlib.decompress(body)
            record = {"t": time.time(), "path": re.sub(r"/bot[^/]+/", "/bot<token>/", self.path)}
            if "/envelope/" in self.path or "/store/" in self.path:
                record.update(kind="sentry", items=parse_envelope(body))
            elif self.path.endswith("/sendMessage"):
                try:
                    message = json.loads(body)
                except ValueError:
                    message = {}
                record.update(kind="telegram", text=message.get("text"), chat_id=message.get("chat_id"))
            else:
                record.update(kind="other")
            line = (json.dumps(record, sort_keys=True) + "\n").encode("utf-8")
            with LOCK:
                fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                try:
                    os.write(fd, line)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            reply = b'{"ok": true, "result": {}}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    return Handler


def main(argv):
    port, out_path = int(argv[1]), argv[2]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), make_handler(out_path))
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv)
