"""S3 test helpers: moto standalone servers, a fault-injecting HTTP proxy, fake backups.

* :class:`MotoServer` runs ``moto_server -H 127.0.0.1 -p <free port>`` from the
  virtualenv in its own process; boto3 talks to it over real HTTP.
* :class:`FaultProxy` sits between a client and moto.  It parses each HTTP/1.1
  request and, following a schedule of :class:`Rule` objects, forwards it, answers
  ``503 SlowDown`` / ``500 InternalError``, resets the connection after reading
  the request, resets it in the middle of the request body (an interrupted
  UploadPart), or resets it in the middle of the response body (an interrupted
  download).  Every request and what was done with it is kept in ``proxy.log``.
* :func:`make_backup` writes a fake ``.dump`` (random bytes) and a manifest that
  satisfies docs/backup-format.md, without PostgreSQL.

The pytest fixtures built on them (``moto``, ``moto2``, ``aws_env``, ``fault_proxy``,
``backup_dir``) are in tests/conftest.py.
"""
from __future__ import annotations

import datetime
import hashlib
import http.client
import itertools
import json
import os
import random
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request

_bucket_counter = itertools.count(1)

TEST_ACCESS_KEY = "AKIAMOTOTESTKEY00001"
TEST_SECRET_KEY = "moto/Secret+Key=With/odd+chars0001"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dead_endpoint():
    """An http URL on 127.0.0.1 where nothing listens (connection refused)."""
    return "http://127.0.0.1:%d" % free_port()


# --------------------------------------------------------------------------- moto


class MotoServer:
    """A moto standalone server in its own process."""

    def __init__(self, port=None, log_path=None):
        self.port = port or free_port()
        self.log_path = log_path
        self.proc = None

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.port

    def start(self, timeout=30):
        exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        env = dict(os.environ)
        env.pop("MOTO_S3_CUSTOM_ENDPOINTS", None)
        self.proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(self.port)], stdout=out,
                                     stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("moto_server exited with %s" % self.proc.returncode)
            try:
                with urllib.request.urlopen(self.url + "/moto-api/", timeout=2):
                    return self
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("moto_server did not start on port %d" % self.port)
                time.sleep(0.1)

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def reset(self):
        req = urllib.request.Request(self.url + "/moto-api/reset", method="POST", data=b"")
        with urllib.request.urlopen(req, timeout=10):
            pass


def s3_client(endpoint_url, region="us-east-1", **config):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint_url, region_name=region, aws_access_key_id=TEST_ACCESS_KEY,
                        aws_secret_access_key=TEST_SECRET_KEY,
                        config=Config(retries={"mode": "standard", "total_max_attempts": 2}, **config))


def create_bucket(endpoint_url, region, name=None):
    name = name or "bkt-%d-%d-%s" % (os.getpid(), next(_bucket_counter), region)
    client = s3_client(endpoint_url, region)
    if region == "us-east-1":
        client.create_bucket(Bucket=name)
    else:
        client.create_bucket(Bucket=name, CreateBucketConfiguration={"LocationConstraint": region})
    return name


def list_keys(endpoint_url, bucket, region="us-east-1", prefix=""):
    client = s3_client(endpoint_url, region)
    keys = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            keys[obj["Key"]] = obj["Size"]
    return keys


def corrupt_object(endpoint_url, bucket, key, region="us-east-1"):
    """Overwrite an object's body with same-size garbage, keeping its metadata (sha256)."""
    client = s3_client(endpoint_url, region)
    head = client.head_object(Bucket=bucket, Key=key)
    body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    bad = bytearray(body)
    for i in range(0, len(bad), max(1, len(bad) // 7)):
        bad[i] ^= 0xFF
    client.put_object(Bucket=bucket, Key=key, Body=bytes(bad), Metadata=head.get("Metadata", {}))
    return head.get("Metadata", {})


def remote_sha256(endpoint_url, bucket, key, region="us-east-1"):
    client = s3_client(endpoint_url, region)
    return hashlib.sha256(client.get_object(Bucket=bucket, Key=key)["Body"].read()).hexdigest()


# --------------------------------------------------------------------------- fault proxy

SLOWDOWN_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
                 b"<Message>Please reduce your request rate.</Message><RequestId>FAULTPROXY</RequestId></Error>")
INTERNAL_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InternalError</Code>'
                 b"<Message>We encountered an internal error. Please try again.</Message>"
                 b"<RequestId>FAULTPROXY</RequestId></Error>")
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "expect", "te", "upgrade"}
ACTIONS = ("forward", "slowdown", "error500", "reset", "reset_body", "reset_response")


class Rule:
    """Apply ``action`` to requests matching ``method`` and the ``path`` regex (searched in path+query).

    ``skip`` matching requests pass through first; then the rule fires ``count``
    times (``None``: for ever).
    """

    def __init__(self, action, method=None, path=None, count=None, skip=0):
        if action not in ACTIONS:
            raise ValueError(action)
        self.action = action
        self.method = method
        self.path = re.compile(path) if path else None
        self.count = count
        self.skip = skip
        self.fired = 0

    def match(self, method, target):
        if self.method and self.method != method:
            return False
        if self.path and not self.path.search(target):
            return False
        if self.skip > 0:
            self.skip -= 1
            return False
        if self.count is not None and self.fired >= self.count:
            return False
        self.fired += 1
        return True


def _rst(sock):
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class FaultProxy:
    """A threaded HTTP/1.1 proxy in front of ``upstream_port`` that injects faults."""

    def __init__(self, upstream_port, rules=()):
        self.upstream_port = upstream_port
        self.rules = list(rules)
        self.log = []  # (method, target, action)
        self.access_keys = set()  # access key ids seen in SigV4 Authorization headers
        self.requests = []  # (method, target, {lower-case header: value})
        self._lock = threading.Lock()
        self._sock = None
        self._stop = False
        self.port = None

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.port

    def start(self):
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def stop(self):
        self._stop = True
        if self._sock is not None:
            self._sock.close()

    def add(self, *rules):
        with self._lock:
            self.rules.extend(rules)

    def clear(self):
        with self._lock:
            self.rules = []

    def actions(self, action=None):
        with self._lock:
            return [entry for entry in self.log if action is None or entry[2] == action]

    def _decide(self, method, target):
        with self._lock:
            action = "forward"
            for rule in self.rules:
                if rule.match(method, target):
                    action = rule.action
                    break
            self.log.append((method, target, action))
            return action

    def _accept(self):
        while not self._stop:
            try:
                conn, _addr = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _read_body(rfile, headers):
        if headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int(rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(rfile.read(size))
                rfile.readline()
        length = int(headers.get("content-length", "0") or 0)
        return rfile.read(length) if length else b""

    def _serve(self, conn):
        rfile = conn.makefile("rb")
        upstream = None
        try:
            while True:
                line = rfile.readline(65537)
                if not line or not line.strip():
                    return
                method, target, _version = line.decode("latin-1").split(None, 2)
                raw_headers = []
                while True:
                    h = rfile.readline(65537)
                    if h in (b"\r\n", b"\n", b""):
                        break
                    name, value = h.decode("latin-1").split(":", 1)
                    raw_headers.append((name.strip(), value.strip()))
                headers = {k.lower(): v for k, v in raw_headers}
                cred = re.search(r"Credential=([^/,\s]+)/", headers.get("authorization", ""))
                if cred:
                    with self._lock:
                        self.access_keys.add(cred.group(1))
                with self._lock:
                    self.requests.append((method, target, headers))
                action = self._decide(method, target)
                if headers.get("expect", "").lower() == "100-continue":
                    conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                if action == "reset_body":
                    length = int(headers.get("content-length", "0") or 0)
                    rfile.read(length // 2)
                    _rst(conn)
                    return
                body = self._read_body(rfile, headers)
                if action == "reset":
                    _rst(conn)
                    return
                if action in ("slowdown", "error500"):
                    status, payload = ((b"503 Slow Down", SLOWDOWN_BODY) if action == "slowdown"
                                       else (b"500 Internal Server Error", INTERNAL_BODY))
                    if method == "HEAD":
                        payload = b""
                    conn.sendall(b"HTTP/1.1 " + status + b"\r\nContent-Type: application/xml\r\nContent-Length: "
                                 + str(len(payload)).encode() + b"\r\nx-amz-request-id: FAULTPROXY\r\n\r\n"
                                 + payload)
                    continue
                for _attempt in range(2):
                    if upstream is None:
                        upstream = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=120)
                    try:
                        upstream.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
                        for name, value in raw_headers:
                            if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                                upstream.putheader(name, value)
                        if body or method in ("PUT", "POST"):
                            upstream.putheader("Content-Length", str(len(body)))
                        upstream.endheaders(body)
                        resp = upstream.getresponse()
                        data = resp.read()
                        break
                    except (http.client.HTTPException, OSError):
                        upstream.close()
                        upstream = None
                else:
                    _rst(conn)
                    return
                out = ["HTTP/1.1 %d %s" % (resp.status, resp.reason)]
                for name, value in resp.getheaders():
                    if name.lower() in HOP_BY_HOP:
                        continue
                    if name.lower() == "content-length" and method != "HEAD":
                        continue
                    out.append("%s: %s" % (name, value))
                if method != "HEAD":
                    out.append("Content-Length: %d" % len(data))
                head = ("\r\n".join(out) + "\r\n\r\n").encode("latin-1")
                if action == "reset_response" and method != "HEAD":
                    conn.sendall(head + data[: len(data) // 2])
                    _rst(conn)
                    return
                conn.sendall(head + data)
        except OSError:
            return
        finally:
            if upstream is not None:
                upstream.close()
            try:
                conn.close()
            except OSError:
                pass


# --------------------------------------------------------------------------- fake backups


def make_backup(backup_dir, when, size=4096, prefix="baileys-auth", seed=None, validated=True, kind="daily"):
    """Write ``<prefix>-<stamp>.dump`` (random bytes) and its manifest per docs/backup-format.md.

    ``when`` is a datetime (UTC) or an int (hours after 2026-01-01T00:00Z).
    Returns a dict: name, path, manifest_path, manifest, sha256, size.
    """
    if isinstance(when, int):
        when = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc) + datetime.timedelta(hours=when)
    name = "%s-%s.dump" % (prefix, when.strftime("%Y%m%dT%H%M%SZ"))
    rnd = random.Random(seed if seed is not None else name)
    data = rnd.randbytes(size)
    path = os.path.join(backup_dir, name)
    _write(path, data)
    manifest = {
        "format": 1, "file": name, "kind": kind, "created_at": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "sha256": hashlib.sha256(data).hexdigest(), "size": size, "compression": "zstd:3",
        "server_version": "18.1", "server_version_num": 180001, "client_version": "pg_dump (PostgreSQL) 18.1",
        "client_major": 18, "database": "whatsapp", "schema": "public", "auth_table": "whatsapp_auth",
        "keys_table": "whatsapp_keys", "counts": {"auth": 1, "keys": 1650}, "companies": 1, "duration": 0.5,
        "validated": {"restore_list": validated, "row_counts": validated},
    }
    manifest_path = path + ".manifest.json"
    _write(manifest_path, json.dumps(manifest, indent=1, sort_keys=True).encode())
    return {"name": name, "path": path, "manifest_path": manifest_path, "manifest": manifest,
            "sha256": manifest["sha256"], "size": size}


def make_backups(backup_dir, count, size=4096, prefix="baileys-auth", start=0):
    return [make_backup(backup_dir, start + i, size=size, prefix=prefix) for i in range(count)]


def _write(path, data):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
