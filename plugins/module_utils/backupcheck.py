# -*- coding: utf-8 -*-
# Copyright: baileys.resilience contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Checking a backup: the dump's validation, the check without a server, the restore test, restoring.

* :func:`validate_dump`: a new dump is plausible, ``pg_restore --list`` reads it, its row counts
  are the ones counted in its snapshot (backup.py calls it before a dump becomes a backup);
* :func:`check_backup_file`: manifest, size, sha256 and ``pg_restore --list``, no server;
* :func:`verify_backup`: the restore test into a throwaway database;
* :func:`restore_backup`: disaster recovery into a new database, idempotent.

The manifest rules are backup_format.py's; the backups of a directory and :class:`BackupError`
are backupfiles.py's.  No Ansible import.
"""
from __future__ import absolute_import, division, print_function

import json
import os
import secrets
import subprocess
import time

from . import backup_format
from . import baileys_codec as codec
from . import backupfiles, pgconn, pgtools

__metaclass__ = type

BackupError = backupfiles.BackupError
MANIFEST_SUFFIX = backup_format.MANIFEST_SUFFIX

MAGIC = b"PGDMP"
# a custom-format archive of even an empty database is larger than this
MIN_DUMP_SIZE = 512
VERIFY_DB_PREFIX = "baileys_verify_"


# --------------------------------------------------------------------------- validation


def store_names(store_params):
    """``(schema, auth_table, keys_table)`` of ``store_params``, with the store's defaults."""
    store_params = store_params or {}
    return (store_params.get("schema") or "public", store_params.get("auth_table") or "whatsapp_auth",
            store_params.get("keys_table") or "whatsapp_keys")


def validate_dump(bin_dir, dump_path, store_params, expected_counts):
    """Check that a dump is a usable backup; raise :class:`BackupError` otherwise.

    The archive must be plausibly large, readable by ``pg_restore --list``, hold
    the data of both tables, and the row counts in it (counted from a
    ``pg_restore --data-only`` stream, no server) must equal ``expected_counts``.
    """
    schema, auth_table, keys_table = store_names(store_params)
    try:
        size = os.path.getsize(dump_path)
        with open(dump_path, "rb") as fh:
            head = fh.read(len(MAGIC))
    except OSError as exc:
        raise BackupError("cannot read dump %s: %s" % (dump_path, exc.strerror or exc))
    if size < MIN_DUMP_SIZE or head != MAGIC:
        raise BackupError("dump %s is empty or implausible (%d bytes%s): not a backup" % (
            dump_path, size, "" if head == MAGIC else ", no custom-format header"))
    try:
        listing = pgtools.list_archive(bin_dir, dump_path)
    except pgtools.ToolError as exc:
        raise BackupError("dump %s failed validation: %s" % (dump_path, exc))
    for table in (auth_table, keys_table):
        if not pgtools.archive_has_table_data(listing, schema, table):
            raise BackupError("dump %s has no data for %s.%s" % (dump_path, schema, table))
    counts = {}
    for label, table in (("auth", auth_table), ("keys", keys_table)):
        try:
            counts[label] = pgtools.count_table_rows(bin_dir, dump_path, table, schema)
        except pgtools.ToolError as exc:
            raise BackupError("dump %s failed validation: %s" % (dump_path, exc))
        if counts[label] != expected_counts.get(label):
            raise BackupError("dump %s holds %s rows of %s.%s, expected %s" % (
                dump_path, counts[label], schema, table, expected_counts.get(label)))
    return {"restore_list": True, "row_counts": True, "counts": counts}


def tables_for(manifest, store_params):
    """The tables of a backup: the manifest's names (they describe what was dumped), else ``store_params``."""
    names = {k: manifest.get(k) for k in ("schema", "auth_table", "keys_table")}
    if all(isinstance(v, str) and v for v in names.values()):
        return names
    return dict(zip(("schema", "auth_table", "keys_table"), store_names(store_params)))


def load_valid(backup_path, verify_checksum=True):
    """``(absolute path, manifest)`` of a valid backup; raises :class:`BackupError` otherwise."""
    backup_path = os.path.abspath(backup_path)
    manifest = backupfiles.read_manifest(backup_path + MANIFEST_SUFFIX)
    problem = backup_format.backup_problem(backup_path, manifest, verify_checksum)
    if problem:
        raise BackupError("%s is not a valid backup: %s" % (backup_path, problem))
    if backup_format.local_encryption(manifest) is not None:
        made_for = ", ".join(str(r) for r in manifest["encryption"]["recipients"])
        raise BackupError("%s is age-encrypted (encrypted on the host, encrypt_local, to %s): give identity_file or "
                          "identity to read it" % (backup_path, made_for))
    return backup_path, manifest


def restore_bin_dir(pg_bin_dir, manifest):
    """``(bin_dir, pg_restore version text)`` of a client able to read the dump ``manifest`` describes."""
    try:
        bin_dir = pgtools.find_bin_dir(pg_bin_dir, "pg_restore")
        major, text = pgtools.client_version(bin_dir, "pg_restore")
    except pgtools.ToolError as exc:
        raise BackupError(str(exc))
    dumped_by = manifest.get("client_major")
    if isinstance(dumped_by, int) and major < dumped_by:
        raise BackupError("%s (major %d) cannot read a dump made by %s; use a client >= %d (pg_bin_dir)"
                          % (text, major, manifest.get("client_version"), dumped_by))
    return bin_dir, text


def check_backup_file(backup_path, pg_bin_dir=None, count_rows=False):
    """Validity without a server: manifest, size, sha256, ``pg_restore --list`` (and, optionally, row counts)."""
    started = time.monotonic()
    backup_path, manifest = load_valid(backup_path)
    bin_dir, restore_text = restore_bin_dir(pg_bin_dir, manifest)
    store_params = tables_for(manifest, None)
    schema, auth_table, keys_table = store_names(store_params)
    if count_rows:
        validate_dump(bin_dir, backup_path, store_params, manifest.get("counts") or {})
    else:
        try:
            listing = pgtools.list_archive(bin_dir, backup_path)
        except pgtools.ToolError as exc:
            raise BackupError(str(exc))
        for table in (auth_table, keys_table):
            if not pgtools.archive_has_table_data(listing, schema, table):
                raise BackupError("dump %s has no data for %s.%s" % (backup_path, schema, table))
    return {"backup": backup_path, "manifest": manifest, "pg_bin_dir": bin_dir, "client_version": restore_text,
            "checksum": True, "restore_list": True, "row_counts": bool(count_rows),
            "duration": round(time.monotonic() - started, 3)}


def server_version(conn):
    """``(server_version_num, server version text)`` of the server ``conn`` is connected to."""
    row = conn.execute("SELECT current_setting('server_version_num')::int, current_setting('server_version')"
                       ).fetchone()
    return row[0], row[1].split()[0]


# --------------------------------------------------------------------------- restore test


def _drop_database(conn, name, server_num):
    ident = pgconn.sql.Identifier(name)
    query = "DROP DATABASE IF EXISTS {} WITH (FORCE)" if server_num >= 130000 else "DROP DATABASE IF EXISTS {}"
    conn.execute(pgconn.sql.SQL(query).format(ident))


def _inspect_restored(conn, store_params):
    store = pgconn.Store.from_params(store_params)
    sql = pgconn.sql
    problems = []
    with conn.cursor() as cur:
        store.check_tables(cur)
        counts = {
            "auth": cur.execute(sql.SQL("SELECT count(*) FROM {}").format(store.auth)).fetchone()[0],
            "keys": cur.execute(sql.SQL("SELECT count(*) FROM {}").format(store.keys)).fetchone()[0],
        }
        companies = cur.execute(sql.SQL(
            "SELECT count(*) FROM (SELECT company_id FROM {} UNION SELECT company_id FROM {}) s"
        ).format(store.auth, store.keys)).fetchone()[0]
        cur.execute(sql.SQL("SELECT company_id, creds::text FROM {}").format(store.auth))
        for company_id, text in cur:
            try:
                value = json.loads(text) if text is not None else None
            except ValueError as exc:
                problems.append("company %r: creds are not JSON (%s)" % (company_id, exc))
                continue
            if not isinstance(value, dict):
                problems.append("company %r: creds are not a JSON object" % (company_id,))
        by_type = dict(cur.execute(sql.SQL("SELECT key_type, count(*) FROM {} GROUP BY 1 ORDER BY 1")
                                   .format(store.keys)).fetchall())
    unknown = sorted(t for t in by_type if t not in codec.KEY_TYPES)
    if unknown:
        problems.append("unknown key type(s): %s" % ", ".join(repr(t) for t in unknown))
    return counts, companies, by_type, problems


def verify_backup(backup_path, conn_params, store_params=None, pg_bin_dir=None, keep_database=False,
                  check_only=False, database=None):
    """Restore test: restore ``backup_path`` into a throwaway database and check it.

    The database (``baileys_verify_<UTC stamp>_<random>``) is created on the
    server ``conn_params`` points at and dropped afterwards, also on failure,
    unless ``keep_database``.  Row counts must equal the manifest's, every
    company's creds must be a JSON object and every key type a known one.
    With ``check_only`` nothing is restored: only checksum and ``pg_restore --list``.
    With ``database``, the backup is restored into that new database, which is kept
    (disaster recovery: see :func:`restore_backup`).
    The tables checked are the ones the manifest names (``store_params`` only when it names none).
    Returns a dict (``ok``, ``counts``, ``restore_seconds``...); raises
    :class:`BackupError` on any failure.
    """
    started = time.monotonic()
    if check_only:
        info = check_backup_file(backup_path, pg_bin_dir)
        info.update(ok=True, restored=False, counts=info["manifest"].get("counts"), restore_seconds=None)
        return info
    backup_path, manifest = load_valid(backup_path)
    bin_dir, restore_text = restore_bin_dir(pg_bin_dir, manifest)
    store_params = tables_for(manifest, store_params)
    expected = manifest.get("counts") or {}
    stamp = backupfiles.as_utc().strftime("%Y%m%d%H%M%S")
    name = database or "%s%s_%s" % (VERIFY_DB_PREFIX, stamp, secrets.token_hex(3))
    keep_database = keep_database or bool(database)
    admin = pgconn.connect(conn_params, autocommit=True)
    result = {"backup": backup_path, "manifest": manifest, "database": name, "pg_bin_dir": bin_dir,
              "client_version": restore_text, "expected": expected, "restored": False, "kept": bool(keep_database)}
    created = False
    try:
        try:
            server_num, server_text = server_version(admin)
            result["server_version"] = server_text
            admin.execute(pgconn.sql.SQL("CREATE DATABASE {} TEMPLATE template0 ENCODING 'UTF8'").format(
                pgconn.sql.Identifier(name)))
            created = True
        except pgconn.Error as exc:
            raise BackupError("cannot create the %s database %s (%s): %s" % (
                "target" if database else "throwaway", name, pgconn.describe(conn_params),
                pgconn._scrub(exc, conn_params)))
        restore_started = time.monotonic()
        with pgtools.ClientConnection(conn_params, dbname=name) as client:
            argv = pgtools.pg_restore_argv(bin_dir, backup_path, client)
            try:
                proc = subprocess.run(argv, capture_output=True, stdin=subprocess.DEVNULL, env=client.env, check=False)
            except OSError as exc:
                raise BackupError("cannot run %s: %s" % (argv[0], exc))
            err = client.scrub(proc.stderr.decode("utf-8", "replace").strip())
        result["restore_seconds"] = round(time.monotonic() - restore_started, 3)
        if proc.returncode != 0:
            raise BackupError("restore of %s into %s failed (exit %d): %s" % (
                backup_path, name, proc.returncode, err[-2000:] or "no message"))
        result["restored"] = True
        target = dict(conn_params, login_db=name,
                      connect_params={k: v for k, v in (conn_params.get("connect_params") or {}).items()
                                      if k != "dbname"})
        conn = pgconn.connect(target)
        try:
            counts, companies, by_type, problems = _inspect_restored(conn, store_params)
        except pgconn.Error as exc:
            raise BackupError("cannot inspect the restored database %s: %s" % (name, pgconn._scrub(exc, conn_params)))
        finally:
            conn.close()
        result.update(counts=counts, companies=companies, by_type=by_type)
        for label in ("auth", "keys"):
            if counts[label] != expected.get(label):
                problems.insert(0, "%s rows: %s restored, manifest says %s"
                                % (label, counts[label], expected.get(label)))
        if manifest.get("companies") is not None and companies != manifest.get("companies"):
            problems.append("companies: %s restored, manifest says %s" % (companies, manifest.get("companies")))
        if problems:
            raise BackupError("restore test of %s failed: %s" % (os.path.basename(backup_path), "; ".join(problems)))
        result["ok"] = True
    finally:
        if created and not keep_database:
            try:
                _drop_database(admin, name, server_num)
                result["dropped"] = True
            except pgconn.Error as exc:  # the original error, if any, matters more
                result["dropped"] = False
                result["drop_error"] = pgconn._scrub(exc, conn_params)
        admin.close()
    result["duration"] = round(time.monotonic() - started, 3)
    return result


def restore_backup(backup_path, conn_params, database, store_params=None, pg_bin_dir=None, check_mode=False):
    """Disaster recovery: restore ``backup_path`` into the new database ``database`` and verify it.

    Idempotent: when ``database`` already exists and holds exactly the manifest's
    row counts, nothing is done (``changed`` false); when it exists with other
    contents, this refuses (it never overwrites a database).  Check mode verifies
    the backup (checksum, ``pg_restore --list``) and says whether it would restore.
    """
    started = time.monotonic()
    info = check_backup_file(backup_path, pg_bin_dir)
    manifest = info["manifest"]
    expected = manifest.get("counts") or {}
    admin = pgconn.connect(conn_params, autocommit=True)
    try:
        exists = admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone() is not None
    finally:
        admin.close()
    result = {"backup": info.get("backup", backup_path), "manifest": manifest, "database": database,
              "expected": expected, "changed": False}
    if exists:
        target = dict(conn_params, login_db=database,
                      connect_params={k: v for k, v in (conn_params.get("connect_params") or {}).items()
                                      if k != "dbname"})
        conn = pgconn.connect(target)
        try:
            counts, companies, by_type, problems = _inspect_restored(conn, tables_for(manifest, store_params))
        except pgconn.Error as exc:
            raise BackupError("database %s already exists and does not hold the auth state (%s); refusing to "
                              "restore over it" % (database, pgconn._scrub(exc, conn_params)))
        finally:
            conn.close()
        if counts.get("auth") != expected.get("auth") or counts.get("keys") != expected.get("keys") or problems:
            raise BackupError("database %s already exists with other contents (%s rows: %s); refusing to restore "
                              "over it: choose a new database name" % (database, counts, "; ".join(problems) or
                                                                       "counts differ from the manifest"))
        result.update(ok=True, counts=counts, companies=companies, by_type=by_type, restored=False,
                      msg="%s already holds this backup's counts" % database)
    elif check_mode:
        result.update(ok=True, changed=True, restored=False, msg="would restore into new database %s" % database)
    else:
        result.update(verify_backup(backup_path, conn_params, store_params, pg_bin_dir, database=database))
        result["changed"] = True
    result["duration"] = round(time.monotonic() - started, 3)
    return result
