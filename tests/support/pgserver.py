"""A throwaway PostgreSQL cluster for tests, the demo and the benchmarks.

``python tests/support/pgserver.py start DIR`` / ``stop DIR`` from the shell, or
:class:`PgServer` from Python.  The cluster listens on 127.0.0.1 (a free
port) and on a unix socket in ``DIR/socket``, with scram-sha-256 password
authentication over TCP, so tests exercise real passwords.  As root, the
server runs as the ``postgres`` user (PostgreSQL refuses to run as root).
"""
from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import time

SUPERUSER = "postgres"
# Every character that broke the shell-built commands of the old system.
SUPERUSER_PASSWORD = "s3cr<e>t|pa?ss%w@rd:/ 'q\"x"


def find_bindir():
    """The newest PostgreSQL server binaries on this machine."""
    env = os.environ.get("PG_BINDIR")
    if env:
        return env
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(p.split("/")[4]))
    if candidates:
        return os.path.dirname(candidates[-1])
    found = shutil.which("postgres")
    if found:
        return os.path.dirname(found)
    raise RuntimeError("no PostgreSQL server found: apt-get install postgresql (make test does it)")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgServer:
    def __init__(self, base, port=None):
        self.base = os.path.abspath(base)
        self.data = os.path.join(self.base, "data")
        self.socket_dir = os.path.join(self.base, "socket")
        self.state_file = os.path.join(self.base, "server.json")
        self.bindir = find_bindir()
        self.port = port
        self.run_as = None
        if os.geteuid() == 0:
            self.run_as = SUPERUSER
            try:
                pwd.getpwnam(SUPERUSER)
            except KeyError:
                subprocess.run(["useradd", "--system", "--no-create-home", SUPERUSER], check=True)

    def _cmd(self, argv):
        if self.run_as:
            return ["runuser", "-u", self.run_as, "--"] + argv
        return argv

    def _own(self, path):
        if self.run_as:
            pw = pwd.getpwnam(self.run_as)
            os.chown(path, pw.pw_uid, pw.pw_gid)

    @property
    def version(self):
        out = subprocess.run([os.path.join(self.bindir, "postgres"), "--version"], capture_output=True, text=True,
                             check=False)
        return out.stdout.strip()

    def start(self):
        os.makedirs(self.base, exist_ok=True)
        os.chmod(self.base, 0o755)
        if self.port is None:
            self.port = free_port()
        if not os.path.exists(os.path.join(self.data, "PG_VERSION")):
            os.makedirs(self.data, mode=0o700, exist_ok=True)
            os.makedirs(self.socket_dir, exist_ok=True)
            self._own(self.data)
            self._own(self.socket_dir)
            pwfile = os.path.join(self.base, ".pwfile")
            with open(os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as fh:
                fh.write(SUPERUSER_PASSWORD + "\n")
            self._own(pwfile)
            subprocess.run(self._cmd([os.path.join(self.bindir, "initdb"), "-D", self.data, "-U", SUPERUSER,
                                      "--pwfile", pwfile, "--auth-host=scram-sha-256", "--auth-local=trust",
                                      "-E", "UTF8", "--locale=C.UTF-8", "--no-sync"]),
                           check=True, capture_output=True)
            os.unlink(pwfile)
            with open(os.path.join(self.data, "postgresql.auto.conf"), "a") as fh:
                fh.write("listen_addresses = '127.0.0.1'\nfsync = off\nsynchronous_commit = off\n"
                         "full_page_writes = off\nmax_wal_size = '2GB'\nshared_buffers = '256MB'\n")
        log = os.path.join(self.base, "server.log")
        if not os.path.exists(log):
            open(log, "a").close()
        self._own(log)
        subprocess.run(self._cmd([os.path.join(self.bindir, "pg_ctl"), "-D", self.data, "-l", log, "-w", "-t", "60",
                                  "-o", "-p %d -k %s" % (self.port, self.socket_dir), "start"]),
                       check=True, capture_output=True)
        with open(self.state_file, "w") as fh:
            json.dump({"port": self.port, "socket_dir": self.socket_dir, "bindir": self.bindir}, fh)
        return self

    def stop(self, mode="fast"):
        if os.path.exists(os.path.join(self.data, "postmaster.pid")):
            subprocess.run(self._cmd([os.path.join(self.bindir, "pg_ctl"), "-D", self.data, "-m", mode, "-w",
                                      "stop"]), capture_output=True, check=False)

    def params(self, dbname="postgres", user=SUPERUSER, password=SUPERUSER_PASSWORD):
        """Module-style connection options over TCP with a password."""
        return {"login_host": "127.0.0.1", "login_port": self.port, "login_user": user,
                "login_password": password, "login_db": dbname}

    def socket_params(self, dbname="postgres"):
        return {"login_unix_socket": self.socket_dir, "login_port": self.port, "login_user": SUPERUSER,
                "login_db": dbname}

    def psql(self, sql, dbname="postgres"):
        env = dict(os.environ, PGPASSWORD=SUPERUSER_PASSWORD)
        return subprocess.run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", self.socket_dir,
                               "-p", str(self.port), "-U", SUPERUSER, "-d", dbname, "-At", "-c", sql],
                              check=True, capture_output=True, text=True, env=env).stdout


def main(argv):
    if len(argv) < 3 or argv[1] not in ("start", "stop"):
        print("usage: pgserver.py start|stop DIR", file=sys.stderr)
        return 2
    server = PgServer(argv[2])
    if argv[1] == "start":
        if os.path.exists(server.state_file):
            server.port = json.load(open(server.state_file))["port"]
        server.start()
        print(json.dumps({"port": server.port, "socket_dir": server.socket_dir}))
    else:
        if os.path.exists(server.state_file):
            server.port = json.load(open(server.state_file))["port"]
        server.stop()
    return 0


if __name__ == "__main__":
    t0 = time.time()
    sys.exit(main(sys.argv))
