# -*- coding: utf-8 -*-
# Copyright: baileys.resilience contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Running the PostgreSQL client programs (pg_dump, pg_restore) safely.

No Ansible import.  Commands are argument lists, never shell strings.  The
connection reaches the child through libpq environment variables; the
password goes into a temporary 0600 passfile (``PGPASSFILE``), never into
argv, so ``ps`` and ``/proc/<pid>/cmdline`` never show it.

Also here: the reader of ``COPY ... FROM stdin`` text blocks that
``pg_restore --data-only -f -`` prints, used to count and to read rows of a
dump without any server.
"""
from __future__ import absolute_import, division, print_function

import contextlib
import glob
import os
import re
import shutil
import subprocess
import tempfile

from . import errors, pgconn

__metaclass__ = type

DEFAULT_BIN_GLOB = "/usr/lib/postgresql/*/bin"

# libpq keyword -> environment variable (https://www.postgresql.org/docs/current/libpq-envars.html)
LIBPQ_ENV = {
    "host": "PGHOST",
    "hostaddr": "PGHOSTADDR",
    "port": "PGPORT",
    "dbname": "PGDATABASE",
    "user": "PGUSER",
    "passfile": "PGPASSFILE",
    "service": "PGSERVICE",
    "options": "PGOPTIONS",
    "application_name": "PGAPPNAME",
    "sslmode": "PGSSLMODE",
    "sslcompression": "PGSSLCOMPRESSION",
    "sslcert": "PGSSLCERT",
    "sslkey": "PGSSLKEY",
    "sslrootcert": "PGSSLROOTCERT",
    "sslcrl": "PGSSLCRL",
    "sslcrldir": "PGSSLCRLDIR",
    "sslsni": "PGSSLSNI",
    "requirepeer": "PGREQUIREPEER",
    "require_auth": "PGREQUIREAUTH",
    "channel_binding": "PGCHANNELBINDING",
    "ssl_min_protocol_version": "PGSSLMINPROTOCOLVERSION",
    "ssl_max_protocol_version": "PGSSLMAXPROTOCOLVERSION",
    "gssencmode": "PGGSSENCMODE",
    "krbsrvname": "PGKRBSRVNAME",
    "gsslib": "PGGSSLIB",
    "gssdelegation": "PGGSSDELEGATION",
    "connect_timeout": "PGCONNECT_TIMEOUT",
    "client_encoding": "PGCLIENTENCODING",
    "target_session_attrs": "PGTARGETSESSIONATTRS",
    "load_balance_hosts": "PGLOADBALANCEHOSTS",
    "sslnegotiation": "PGSSLNEGOTIATION",
}
# keywords that are secrets: never in argv, never in a conninfo string
SECRET_KEYWORDS = ("password", "sslpassword")
# every libpq variable we may set or that would override what we set
_SCRUBBED_ENV = tuple(sorted(set(LIBPQ_ENV.values()) | {"PGPASSWORD", "PGSERVICEFILE"}))


class ToolError(errors.BaileysResilienceError, RuntimeError):
    """A client program is missing, too old, or failed."""


# --------------------------------------------------------------------------- binaries and versions


def find_bin_dir(pg_bin_dir=None, tool="pg_dump"):
    """The directory of the client programs: ``pg_bin_dir`` or the newest /usr/lib/postgresql/N/bin.

    Never a blind ``PATH`` lookup: which major is used must be deliberate.
    """
    if pg_bin_dir:
        if not os.path.isfile(os.path.join(pg_bin_dir, tool)):
            raise ToolError("pg_bin_dir %s has no %s" % (pg_bin_dir, tool))
        return pg_bin_dir
    found = []
    for path in glob.glob(DEFAULT_BIN_GLOB):
        major = os.path.basename(os.path.dirname(path))
        if major.isdigit() and os.path.isfile(os.path.join(path, tool)):
            found.append((int(major), path))
    if not found:
        raise ToolError("no PostgreSQL client found under %s (install postgresql-client-N, "
                        "or set pg_bin_dir)" % DEFAULT_BIN_GLOB)
    return max(found)[1]


def tool_path(bin_dir, tool):
    path = os.path.join(bin_dir, tool)
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise ToolError("%s not found or not executable in %s" % (tool, bin_dir))
    return path


_VERSION_RE = re.compile(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?")


def parse_version(text):
    """``(major, full text)`` from ``pg_dump --version`` output."""
    first = (text or "").strip().splitlines()[0] if (text or "").strip() else ""
    m = _VERSION_RE.search(first)
    if not m:
        raise ToolError("cannot parse the version from %r" % first[:200])
    return int(m.group(1)), first


def client_version(bin_dir, tool="pg_dump"):
    """``(major, "pg_dump (PostgreSQL) 18.1")`` of a client program."""
    path = tool_path(bin_dir, tool)
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60,
                             env=_base_env(), stdin=subprocess.DEVNULL, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ToolError("cannot run %s --version: %s" % (path, exc))
    if out.returncode != 0:
        raise ToolError("%s --version failed (exit %d): %s" % (path, out.returncode, out.stderr.strip()[:500]))
    return parse_version(out.stdout)


def server_major(server_version_num):
    """Major version from ``server_version_num`` (9.6 counts as 9: older than any supported client)."""
    return int(server_version_num) // 10000


def check_client_not_older(client_major, client_text, server_version_num, server_version):
    """Refuse a client older than the server: pg_dump cannot dump a newer server reliably."""
    smajor = server_major(server_version_num)
    if client_major < smajor:
        raise ToolError(
            "client %s (major %d) is older than the server PostgreSQL %s (major %d): a dump needs a "
            "client at least as new as the server; install postgresql-client-%d and set pg_bin_dir"
            % (client_text, client_major, server_version, smajor, smajor))


def dump_compression(client_major):
    """``(pg_dump --compress value, label for the manifest)``."""
    if client_major >= 16:
        return "zstd:3", "zstd:3"
    return "6", "gzip:6"


# --------------------------------------------------------------------------- connection for children


def _base_env():
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
    env.setdefault("LC_ALL", "C.UTF-8")
    return env


def _conninfo_quote(value):
    return "'%s'" % str(value).replace("\\", "\\\\").replace("'", "\\'")


def _passfile_escape(value):
    return str(value).replace("\\", "\\\\").replace(":", "\\:")


class ClientConnection:
    """Environment and ``--dbname`` argument for a client program, from module-style options.

    Use as a context manager: a passfile, when needed, lives only inside the block.
    ``dbname`` overrides the database (the throwaway restore target).
    """

    def __init__(self, conn_params, dbname=None):
        self.conn_params = conn_params
        self.params = pgconn.libpq_params(conn_params)
        if dbname is not None:
            self.params["dbname"] = dbname
        self.password = self.params.pop("password", None)
        if self.params.get("sslpassword") is not None:
            raise ToolError("connect_params.sslpassword cannot be given to pg_dump/pg_restore without "
                            "exposing it; use an unencrypted client key readable only by this user")
        self._tmpdir = None
        self.env = None
        self.dbname_arg = None

    def __enter__(self):
        env = _base_env()
        extras = []
        inherited = {k: v for k, v in os.environ.items() if k in _SCRUBBED_ENV}
        env.update(inherited)  # libpq's own environment applies to unset options, as for psycopg
        for key, value in self.params.items():
            if key in SECRET_KEYWORDS:
                continue
            var = LIBPQ_ENV.get(key)
            if var:
                env[var] = str(value)
            else:
                extras.append("%s=%s" % (key, _conninfo_quote(value)))
        if self.password is not None:
            env.pop("PGPASSWORD", None)
            text = str(self.password)
            if "\n" in text or "\r" in text:
                env["PGPASSWORD"] = text  # a passfile line cannot hold it; the environment is private
            else:
                self._tmpdir = tempfile.mkdtemp(prefix="baileys-pg-")
                path = os.path.join(self._tmpdir, "pgpass")
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    fh.write("*:*:*:*:%s\n" % _passfile_escape(text))
                env["PGPASSFILE"] = path
        # --dbname carries the database name and keywords without an environment variable; never secrets
        parts = ["dbname=%s" % _conninfo_quote(self.params["dbname"])] if "dbname" in self.params else []
        self.dbname_arg = " ".join(parts + extras) or None
        self.env = env
        return self

    def __exit__(self, *exc):
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
        return False

    def scrub(self, text):
        text = pgconn._scrub(text, self.conn_params)
        if self.password:
            text = text.replace(str(self.password), "********")
        return text


def pg_dump_argv(bin_dir, client, compress, snapshot=None, extra=()):
    """The pg_dump command (custom format, to stdout).  No secret is ever part of it."""
    argv = [os.path.join(bin_dir, "pg_dump"), "--format=custom", "--compress=%s" % compress,
            "--no-password", "--encoding=UTF8", "--lock-wait-timeout=600000"]
    if snapshot:
        argv.append("--snapshot=%s" % snapshot)
    argv.extend(extra)
    if client.dbname_arg:
        argv.append("--dbname=%s" % client.dbname_arg)
    return argv


def pg_restore_argv(bin_dir, dump_path, client=None, data_only_table=None, schema=None, list_only=False):
    """pg_restore commands: ``--list``, a table's data to stdout (no server), or a restore into ``client``."""
    argv = [os.path.join(bin_dir, "pg_restore")]
    if list_only:
        argv.append("--list")
    elif data_only_table is not None:
        argv += ["--data-only", "--table=%s" % data_only_table]
        if schema is not None:
            argv.append("--schema=%s" % schema)
        argv += ["-f", "-"]
    else:
        argv += ["--no-password", "--no-owner", "--no-privileges", "--exit-on-error"]
        if client is None or not client.dbname_arg:
            raise ToolError("a restore needs a target database")
        argv.append("--dbname=%s" % client.dbname_arg)
    argv.append(dump_path)
    return argv


# --------------------------------------------------------------------------- COPY text format

_ESCAPES = {b"b": b"\b", b"f": b"\f", b"n": b"\n", b"r": b"\r", b"t": b"\t", b"v": b"\v"}
_ESCAPE_RE = re.compile(rb"\\(x[0-9A-Fa-f]{1,2}|[0-7]{1,3}|.)", re.S)


def _unescape_match(m):
    s = m.group(1)
    if s[:1] == b"x" and len(s) > 1:
        return bytes((int(s[1:], 16),))
    if s[:1].isdigit() and s[:1] in b"01234567":
        return bytes((int(s, 8) & 0xFF,))
    return _ESCAPES.get(s, s)


def copy_field(raw):
    """One field of a COPY text row: ``None`` for ``\\N``, else the decoded str."""
    if raw == b"\\N":
        return None
    if b"\\" in raw:
        raw = _ESCAPE_RE.sub(_unescape_match, raw)
    return raw.decode("utf-8")


def parse_copy_row(line):
    """A COPY text line (bytes, without its newline) -> list of fields."""
    return [copy_field(f) for f in line.split(b"\t")]


def _split_columns(text):
    cols, cur, quoted, i = [], [], False, 0
    while i < len(text):
        c = text[i]
        if quoted:
            if c == '"':
                if text[i + 1:i + 2] == '"':
                    cur.append('"')
                    i += 1
                else:
                    quoted = False
            else:
                cur.append(c)
        elif c == '"':
            quoted = True
        elif c == ",":
            cols.append("".join(cur).strip())
            cur = []
        else:
            cur.append(c)
        i += 1
    cols.append("".join(cur).strip())
    return cols


_COPY_RE = re.compile(rb"^COPY (.+?) \((.*)\) FROM stdin;$")


def iter_copy_blocks(stream):
    """Yield ``(table, columns, rows)`` for each COPY block of a pg_restore script.

    ``rows`` is an iterator of raw lines (bytes, no newline) that must be consumed
    before the next block is produced.  Reads ``stream`` line by line.
    """
    for line in stream:
        if line.startswith(b"SET client_encoding = "):
            if line.strip() not in (b"SET client_encoding = 'UTF8';", b"SET client_encoding = 'SQL_ASCII';"):
                raise ToolError("the dump is not UTF-8 (%s)" % line.strip().decode("ascii", "replace"))
            continue
        m = _COPY_RE.match(line.rstrip(b"\n"))
        if not m:
            continue
        table = m.group(1).decode("utf-8")
        columns = _split_columns(m.group(2).decode("utf-8"))

        def rows(table=table):
            for data in stream:
                if data in (b"\\.\n", b"\\."):
                    return
                if not data.endswith(b"\n"):
                    raise ToolError("COPY data of %s is truncated" % table)
                yield data[:-1]
            raise ToolError("COPY data of %s ends without its terminator" % table)

        yield table, columns, rows()


@contextlib.contextmanager
def restore_stream(bin_dir, dump_path, table, schema, what="read"):
    """Run ``pg_restore --data-only --table --schema -f - <dump>`` (no server); yield its stdout.

    Raises :class:`ToolError` when pg_restore fails (checked on exit).
    """
    argv = pg_restore_argv(bin_dir, dump_path, data_only_table=table, schema=schema)
    errf = tempfile.TemporaryFile()
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=errf, stdin=subprocess.DEVNULL,
                                env=_base_env(), bufsize=1024 * 1024)
    except OSError as exc:
        errf.close()
        raise ToolError("cannot run pg_restore: %s" % exc)
    ok = False
    try:
        yield proc.stdout
        ok = True
    finally:
        if not ok:
            proc.kill()
        # drain so that pg_restore can exit
        try:
            while proc.stdout.read(1024 * 1024):
                pass
        except (OSError, ValueError):
            pass
        proc.stdout.close()
        rc = proc.wait()
        errf.seek(0)
        err = errf.read().decode("utf-8", "replace").strip()
        errf.close()
        if ok and rc != 0:
            raise ToolError("pg_restore failed to %s %s.%s from %s (exit %d): %s"
                            % (what, schema, table, dump_path, rc, err[-2000:]))


def count_table_rows(bin_dir, dump_path, table, schema):
    """Rows of one table's data in a dump, counted from a stream (no server, nothing in memory).

    ``None`` when the dump holds no data for that table.
    """
    count = None
    with restore_stream(bin_dir, dump_path, table, schema, "count rows of") as out:
        for _name, _columns, rows in iter_copy_blocks(out):
            count = (count or 0) + sum(1 for _row in rows)
    return count


def list_archive(bin_dir, dump_path):
    """``pg_restore --list`` output; raises when pg_restore cannot read the archive."""
    argv = pg_restore_argv(bin_dir, dump_path, list_only=True)
    try:
        out = subprocess.run(argv, capture_output=True, stdin=subprocess.DEVNULL, env=_base_env(), timeout=3600,
                             check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ToolError("cannot run pg_restore --list: %s" % exc)
    if out.returncode != 0:
        raise ToolError("pg_restore --list cannot read %s (exit %d): %s" % (
            dump_path, out.returncode, out.stderr.decode("utf-8", "replace").strip()[-2000:]))
    return out.stdout.decode("utf-8", "replace")


def archive_has_table_data(listing, schema, table):
    """Whether a ``pg_restore --list`` listing has a TABLE DATA entry for schema.table."""
    # "<id>; <oid> <oid> TABLE DATA <schema> <table> <owner>"
    needle = " TABLE DATA %s %s " % (schema, table)
    return any(not line.startswith(";") and needle in line + " " for line in listing.splitlines())
