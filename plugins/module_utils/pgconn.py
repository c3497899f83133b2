# -*- coding: utf-8 -*-
# Copyright: baileys.resilience contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""PostgreSQL connections, shared by every module and the command-line tool.

The options mirror community.postgresql (``login_host``, ``login_port``,
``login_user``, ``login_password``, ``login_db``, ``login_unix_socket``,
``ssl_mode``, ``ca_cert``) plus ``connect_params``.  Everything reaches libpq
as separate keyword parameters, never as a connection string built by hand,
so passwords with any character work and no secret is ever put on a command
line.  Unset options fall back to libpq's own environment (``PGHOST``,
``PGPASSWORD``, ``PGPASSFILE``, ``PGSERVICE``...) and ``~/.pgpass``.
"""
from __future__ import absolute_import, division, print_function

import re

from . import errors, jobs, pgdriver

__metaclass__ = type


class _NoDriver(errors.BaileysResilienceError):
    """Stands in for the driver's error classes when no driver is installed (never raised)."""


# psycopg 3 or psycopg2, whichever is installed (pgdriver.py): the rest of the core uses ``sql``,
# ``Error``, ``DataError`` and ``UniqueViolation`` from here and never imports a driver itself.
DRIVER, DRIVER_IMPORT_ERROR = pgdriver.load()
HAS_DRIVER = DRIVER is not None
sql = DRIVER.sql if HAS_DRIVER else None
Error = DRIVER.Error if HAS_DRIVER else _NoDriver
DataError = DRIVER.DataError if HAS_DRIVER else _NoDriver
UniqueViolation = DRIVER.UniqueViolation if HAS_DRIVER else _NoDriver

# Plain data, turned into an Ansible argument_spec by the modules.
CONNECTION_ARGSPEC = dict(
    login_host=dict(type="str", aliases=["host", "login_hostname"]),
    login_port=dict(type="int", aliases=["port"]),
    login_user=dict(type="str", aliases=["login", "user"]),
    login_password=dict(type="str", no_log=True, aliases=["password"]),
    login_db=dict(type="str", aliases=["db", "database"]),
    login_unix_socket=dict(type="str", aliases=["unix_socket"]),
    ssl_mode=dict(type="str", choices=["allow", "disable", "prefer", "require", "verify-ca", "verify-full"]),
    ca_cert=dict(type="str", aliases=["ssl_rootcert"]),
    connect_timeout=dict(type="int", default=10),
    connect_params=dict(type="dict", default={}),
)

STORE_ARGSPEC = dict(
    schema=dict(type="str", default="public"),
    auth_table=dict(type="str", default="whatsapp_auth"),
    keys_table=dict(type="str", default="whatsapp_keys", no_log=False),
)

_LIBPQ_MAP = (
    ("login_host", "host"),
    ("login_port", "port"),
    ("login_user", "user"),
    ("login_password", "password"),
    ("login_db", "dbname"),
    ("ssl_mode", "sslmode"),
    ("ca_cert", "sslrootcert"),
    ("connect_timeout", "connect_timeout"),
)


class PgError(errors.BaileysResilienceError, RuntimeError):
    """A connection or query failure, with a message fit for an operator."""


def require_driver():
    if not HAS_DRIVER:
        raise PgError(
            "a PostgreSQL driver is required on the host that runs this: the Python package 'psycopg' "
            "(version 3) or 'psycopg2' (Debian/Ubuntu: python3-psycopg or python3-psycopg2; pip: psycopg[binary] "
            "or psycopg2-binary) (%s)" % DRIVER_IMPORT_ERROR
        )


def driver_name():
    """``psycopg`` or ``psycopg2`` with its version, for reports; ``None`` without a driver."""
    return "%s %s" % (DRIVER.name, DRIVER.version) if HAS_DRIVER else None


def libpq_params(params):
    """libpq keyword parameters from module-style options (``None`` left out)."""
    out = {}
    for ours, theirs in _LIBPQ_MAP:
        value = params.get(ours)
        if value is not None and value != "":
            out[theirs] = value
    # a unix socket directory is a host to libpq; it wins over login_host
    if params.get("login_unix_socket"):
        out["host"] = params["login_unix_socket"]
    for key, value in (params.get("connect_params") or {}).items():
        if value is not None:
            out[str(key)] = value
    out.setdefault("application_name", "baileys-resilience")
    return out


def describe(params):
    """Where we connect, for messages: never includes the password."""
    p = libpq_params(params)
    host = p.get("host", "(libpq default)")
    port = p.get("port", "(default)")
    return "host=%s port=%s dbname=%s user=%s" % (host, port, p.get("dbname", "(default)"), p.get("user", "(default)"))


def secret_values(params):
    """The secret values among the connection options, for an AnsibleModule's ``no_log_values``.

    ``login_password`` is ``no_log`` in the argument spec; ``connect_params`` is a free-form dict and is not (that
    would mask every value of it, ``10`` or ``require``, wherever it appears in the output).  Only the values of its
    secret-looking keys are returned (``password``, ``sslpassword``, ``passfile``... by ``jobs.SECRET_KEY_RE``), and a
    key or certificate given as content (PEM) rather than as a path.  No Ansible import.
    """
    out = set()
    password = params.get("login_password")
    if password not in (None, ""):
        out.add(str(password))
    for key, value in (params.get("connect_params") or {}).items():
        if value in (None, "") or isinstance(value, bool):
            continue
        text = str(value)
        if jobs.SECRET_KEY_RE.search(str(key)) or "-----BEGIN" in text or "PRIVATE KEY" in text:
            out.add(text)
    return out


def _scrub(message, params):
    text = str(message).strip()
    for secret in sorted(secret_values(params), key=len, reverse=True):
        text = text.replace(secret, jobs.MASK)
    return text


def connect(params, autocommit=False):
    """Open a connection (psycopg 3's API, see pgdriver.py).  Errors say where, never the password."""
    require_driver()
    kwargs = libpq_params(params)
    try:
        conn = DRIVER.connect(autocommit=autocommit, **kwargs)
    except DRIVER.Error as exc:
        raise PgError("cannot connect to PostgreSQL (%s): %s" % (describe(params), _scrub(exc, params)))
    return conn


_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*$")


class Store:
    """Quoted identifiers of the auth state tables."""

    def __init__(self, schema="public", auth_table="whatsapp_auth", keys_table="whatsapp_keys"):
        require_driver()
        for label, name in (("schema", schema), ("auth_table", auth_table), ("keys_table", keys_table)):
            if not name or len(name) > 63 or "\x00" in name:
                raise PgError("invalid %s name %r" % (label, name))
        self.schema = schema
        self.auth_table = auth_table
        self.keys_table = keys_table
        self.auth = sql.Identifier(schema, auth_table)
        self.keys = sql.Identifier(schema, keys_table)

    @classmethod
    def from_params(cls, params):
        return cls(params.get("schema") or "public", params.get("auth_table") or "whatsapp_auth",
                   params.get("keys_table") or "whatsapp_keys")

    def check_tables(self, cur):
        """Fail with a clear message when a table is missing."""
        missing = []
        for table in (self.auth_table, self.keys_table):
            cur.execute(
                "SELECT 1 FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')",
                (self.schema, table),
            )
            if cur.fetchone() is None:
                missing.append("%s.%s" % (self.schema, table))
        if missing:
            raise PgError("auth state table(s) not found: %s (check schema/auth_table/keys_table)" % ", ".join(missing))


def company_filter(companies, alias=None, keyword=" WHERE "):
    """The company filter of a query on the store's tables: ``(SQL, args)`` to format in and pass.

    ``<keyword><alias>.company_id = ANY(%s)`` with ``(list(companies),)``; ``alias`` is the table's
    alias in the query (none: the bare column).  ``companies`` None: no filter, ``(SQL(""), ())``.
    An empty list is a filter that matches no company: where an empty list means "all", pass
    ``companies or None``.
    """
    if companies is None:
        return sql.SQL(""), ()
    column = sql.SQL("{}.company_id").format(sql.Identifier(alias)) if alias else sql.SQL("company_id")
    return sql.SQL("{}{} = ANY(%s)").format(sql.SQL(keyword), column), (list(companies),)


def server_version_num(conn):
    with conn.cursor() as cur:
        cur.execute("SHOW server_version_num")
        return int(cur.fetchone()[0])


SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS {auth} (
    company_id text PRIMARY KEY,
    creds jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS {keys} (
    company_id text NOT NULL,
    key_type text NOT NULL,
    key_id text NOT NULL,
    value jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NULL,
    PRIMARY KEY (company_id, key_type, key_id)
);
"""


def create_schema(conn, store):
    """Create the two tables (the reference layout) when absent."""
    with conn.cursor() as cur:
        cur.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(store.schema)))
        cur.execute(sql.SQL(SCHEMA_SQL).format(auth=store.auth, keys=store.keys))


def argspec(*parts, **extra):
    """Merge argument-spec dicts (deep-copied, so modules can't alter the shared ones)."""
    import copy

    spec = {}
    for part in parts:
        spec.update(copy.deepcopy(part))
    spec.update(extra)
    return spec


def split_params(params):
    """(connection options, store options) from a module's or the CLI's params."""
    conn = {k: params.get(k) for k in CONNECTION_ARGSPEC}
    store = {k: params.get(k) for k in STORE_ARGSPEC}
    return conn, store
