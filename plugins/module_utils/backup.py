# -*- coding: utf-8 -*-
# Copyright: baileys.resilience contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Verified PostgreSQL backups of the auth state, their retention and restore tests.

No Ansible import: the modules ``pg_backup`` and ``backup_verify``, the
``source: backup`` export and the cron command-line tool all call these
functions.  The artefacts follow docs/backup-format.md, whose rules (names,
manifest format, the checks) live in backup_format.py:

* the dump (``pg_dump --format=custom``), written as ``<name>.partial`` and
  renamed only after it has been validated;
* its manifest beside it, written atomically afterwards.

A backup is valid only when its manifest says it was validated and the dump's
size and sha256 match the manifest.  Every failure raises :class:`BackupError`
with a message an operator can act on; nothing here ever reports a backup that
was not verified.
"""
from __future__ import absolute_import, division, print_function

import datetime
import fcntl
import json
import os
import re
import secrets
import stat
import subprocess
import tempfile
import time

from . import backup_format
from . import baileys_codec as codec
from . import fsutil
from . import pgconn
from . import pgtools

__metaclass__ = type

MAGIC = b"PGDMP"
# a custom-format archive of even an empty database is larger than this
MIN_DUMP_SIZE = 512
VERIFY_DB_PREFIX = "baileys_verify_"
# the backup file rules live in backup_format; these names stay importable from here
DEFAULT_PREFIX = backup_format.DEFAULT_PREFIX
MANIFEST_SUFFIX = backup_format.MANIFEST_SUFFIX
backup_name = backup_format.backup_name
_iso = backup_format.stamp_iso


class BackupError(RuntimeError):
    """A backup, retention or restore-test failure; the message says what and where."""


# --------------------------------------------------------------------------- names and manifests


def _check_prefix(prefix):
    if not prefix or not re.match("^%s$" % backup_format.PREFIX_PATTERN, prefix) or len(prefix) > 100:
        raise BackupError("prefix %r must be letters, digits, '.', '_' or '-' and not start with '.'" % (prefix,))
    return prefix


def _utc(now=None):
    if now is None:
        now = datetime.datetime.now(datetime.timezone.utc)
    elif now.tzinfo is None:
        now = now.replace(tzinfo=datetime.timezone.utc)
    return now.astimezone(datetime.timezone.utc).replace(microsecond=0)


def read_manifest(manifest_path):
    """The parsed manifest; raises :class:`BackupError` when absent or unreadable."""
    try:
        _raw, data = backup_format.load_manifest(manifest_path)
    except FileNotFoundError:
        raise BackupError("no manifest %s" % manifest_path)
    except (OSError, ValueError) as exc:
        raise BackupError("unreadable manifest %s: %s" % (manifest_path, exc))
    if not isinstance(data, dict):
        raise BackupError("manifest %s is not a JSON object" % manifest_path)
    return data


def _entry(backup_dir, name, stamp, verify_checksum):
    path = os.path.join(backup_dir, name)
    entry = {"name": name, "path": path, "manifest_path": path + MANIFEST_SUFFIX, "created_at": _iso(stamp),
             "manifest": None, "valid": False, "reason": None, "size": None}
    try:
        entry["size"] = os.stat(path, follow_symlinks=False).st_size
    except OSError:
        pass
    try:
        entry["manifest"] = read_manifest(entry["manifest_path"])
    except BackupError as exc:
        entry["reason"] = str(exc)
        return entry
    entry["reason"] = backup_format.backup_problem(path, entry["manifest"], verify_checksum)
    entry["valid"] = entry["reason"] is None
    return entry


def list_backups(backup_dir, prefix=DEFAULT_PREFIX, verify_checksum=False):
    """Every ``<prefix>-<stamp>.dump`` in ``backup_dir``, newest first.

    Each is a dict with ``name``, ``path``, ``manifest_path``, ``created_at``,
    ``manifest`` (dict or ``None``), ``valid`` and ``reason`` (why not valid).
    ``.partial`` files are never listed.  Without ``verify_checksum`` only the
    size is compared with the manifest.
    """
    _check_prefix(prefix)
    pattern = backup_format.name_re(prefix)
    try:
        names = os.listdir(backup_dir)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise BackupError("cannot list %s: %s" % (backup_dir, exc.strerror or exc))
    found = []
    for name in names:
        m = pattern.match(name)
        if m:
            found.append((m.group(1), name))
    found.sort(reverse=True)
    return [_entry(backup_dir, name, stamp, verify_checksum) for stamp, name in found]


def newest_valid_backup(backup_dir, prefix=DEFAULT_PREFIX, verify_checksum=True):
    """The newest valid backup's entry (see :func:`list_backups`), or ``None``.

    With ``verify_checksum`` (the default) the sha256 is checked, newest first,
    until a backup passes.
    """
    for entry in list_backups(backup_dir, prefix):
        if not entry["valid"]:
            continue
        if verify_checksum:
            entry["reason"] = backup_format.backup_problem(entry["path"], entry["manifest"], True)
            entry["valid"] = entry["reason"] is None
            if not entry["valid"]:
                continue
        return entry
    return None


# --------------------------------------------------------------------------- retention


def plan_retention(backups, keep_daily=7, keep_monthly=4, protect=()):
    """Which valid backups to keep and which to delete.

    Keeps the newest backup of each of the ``keep_daily`` newest days, one backup
    for each of the ``keep_monthly`` newest months (the month's ``monthly``
    backup, else its oldest), the newest valid backup and every name in
    ``protect``.  Invalid backups are never deleted (they are reported, they may
    be evidence).  Returns ``(keep, delete)``: ``{name: reason}`` and a list of entries.
    """
    if keep_daily < 0 or keep_monthly < 0:
        raise BackupError("keep_daily and keep_monthly must be >= 0")
    valid = sorted((b for b in backups if b["valid"]), key=lambda b: b["created_at"], reverse=True)
    keep = {}
    if valid:
        keep[valid[0]["name"]] = "newest"
    days = []
    for b in valid:
        day = b["created_at"][:10]
        if day in days:
            continue
        if len(days) >= keep_daily:
            break
        days.append(day)
        keep.setdefault(b["name"], "daily")
    months = {}
    for b in valid:  # newest first: a later (older) entry replaces an equally ranked one
        month = b["created_at"][:7]
        is_monthly = (b.get("manifest") or {}).get("kind") == "monthly"
        rep = months.get(month)
        if rep is None or is_monthly or not rep[0]:  # a monthly one wins; among equals, the oldest
            months[month] = (is_monthly, b)
    for month in sorted(months, reverse=True)[:keep_monthly]:
        keep.setdefault(months[month][1]["name"], "monthly")
    for name in protect:
        keep.setdefault(name, "protected")
    delete = [b for b in valid if b["name"] not in keep]
    return keep, delete


def _delete_backup(entry):
    """Manifest first (the pair stops being a backup at once), then the dump."""
    for path in (entry["manifest_path"], entry["path"]):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def apply_retention(backup_dir, prefix=DEFAULT_PREFIX, keep_daily=7, keep_monthly=4, protect=(), check_mode=False,
                    backups=None):
    """Delete the valid backups :func:`plan_retention` does not keep.  Returns the deleted entries' names.

    ``backups`` (from :func:`list_backups`) may be given, for example with a
    backup that check mode only pretends to have made.
    """
    if backups is None:
        backups = list_backups(backup_dir, prefix)
    _keep, delete = plan_retention(backups, keep_daily, keep_monthly, protect)
    if not check_mode:
        for entry in delete:
            _delete_backup(entry)
        if delete:
            fsutil.fsync_dir(backup_dir)
    return [b["name"] for b in delete]


def remove_stale_partials(backup_dir, prefix=DEFAULT_PREFIX, check_mode=False):
    """Remove what a killed run left: ``<name>.partial`` and half-written manifests.  Returns the names."""
    dump_re = backup_format.name_re(prefix, backup_format.PARTIAL_SUFFIX)
    tmp_re = re.compile(r"^%s\d+-%s$" % (re.escape(fsutil.TEMP_PREFIX),
                                         backup_format.name_pattern(prefix, MANIFEST_SUFFIX)))
    removed = []
    try:
        names = os.listdir(backup_dir)
    except FileNotFoundError:
        return removed
    for name in sorted(names):
        if dump_re.match(name) or tmp_re.match(name):
            if not check_mode:
                try:
                    os.unlink(os.path.join(backup_dir, name))
                except FileNotFoundError:
                    continue
            removed.append(name)
    if removed and not check_mode:
        fsutil.fsync_dir(backup_dir)
    return removed


# --------------------------------------------------------------------------- validation


def _store_names(store_params):
    store_params = store_params or {}
    return (store_params.get("schema") or "public", store_params.get("auth_table") or "whatsapp_auth",
            store_params.get("keys_table") or "whatsapp_keys")


def validate_dump(bin_dir, dump_path, store_params, expected_counts):
    """Check that a dump is a usable backup; raise :class:`BackupError` otherwise.

    The archive must be plausibly large, readable by ``pg_restore --list``, hold
    the data of both tables, and the row counts in it (counted from a
    ``pg_restore --data-only`` stream, no server) must equal ``expected_counts``.
    """
    schema, auth_table, keys_table = _store_names(store_params)
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


def _tables_for(manifest, store_params):
    """The tables of a backup: the manifest's names (they describe what was dumped), else ``store_params``."""
    names = {k: manifest.get(k) for k in ("schema", "auth_table", "keys_table")}
    if all(isinstance(v, str) and v for v in names.values()):
        return names
    return dict(zip(("schema", "auth_table", "keys_table"), _store_names(store_params)))


def _load_valid(backup_path, verify_checksum=True):
    backup_path = os.path.abspath(backup_path)
    manifest = read_manifest(backup_path + MANIFEST_SUFFIX)
    problem = backup_format.backup_problem(backup_path, manifest, verify_checksum)
    if problem:
        raise BackupError("%s is not a valid backup: %s" % (backup_path, problem))
    return backup_path, manifest


def _restore_bin_dir(pg_bin_dir, manifest):
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
    backup_path, manifest = _load_valid(backup_path)
    bin_dir, restore_text = _restore_bin_dir(pg_bin_dir, manifest)
    store_params = _tables_for(manifest, None)
    schema, auth_table, keys_table = _store_names(store_params)
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


# --------------------------------------------------------------------------- backup


def _server_version(conn):
    row = conn.execute("SELECT current_setting('server_version_num')::int, current_setting('server_version')"
                       ).fetchone()
    return row[0], row[1].split()[0]


def _open_backup_dir(backup_dir, check_mode):
    """``(fd or None, created, mode_fixed)``; creates (0700) and locks the directory unless check mode."""
    if not os.path.isabs(backup_dir):
        raise BackupError("backup_dir must be an absolute path, got %r" % (backup_dir,))
    created = mode_fixed = False
    if not os.path.isdir(backup_dir):
        if os.path.lexists(backup_dir):
            raise BackupError("backup_dir %s exists and is not a directory" % backup_dir)
        if check_mode:
            return None, True, False
        try:
            os.makedirs(backup_dir, 0o700)
        except OSError as exc:
            raise BackupError("cannot create backup_dir %s: %s" % (backup_dir, exc.strerror or exc))
        created = True
    try:
        fd = os.open(backup_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise BackupError("cannot open backup_dir %s: %s" % (backup_dir, exc.strerror or exc))
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != 0o700:
            mode_fixed = True
            if not check_mode:
                os.fchmod(fd, 0o700)
        if not check_mode:
            if not os.access(backup_dir, os.W_OK):
                raise BackupError("backup_dir %s is not writable by uid %d" % (backup_dir, os.geteuid()))
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise BackupError("another backup is running in %s (its lock is held); try again later" % backup_dir)
    except BaseException:
        os.close(fd)
        raise
    return fd, created, mode_fixed and not created


def _dump(conn, conn_params, store, bin_dir, compress, path):
    """pg_dump into ``<path>.partial`` in a snapshot whose counts we take; validate; rename.  Returns partial info."""
    partial = path + backup_format.PARTIAL_SUFFIX
    started = time.monotonic()
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        try:
            conn.execute("SET LOCAL idle_in_transaction_session_timeout = 0")
            snapshot_id = conn.execute("SELECT pg_export_snapshot()").fetchone()[0]
            snapshot_time = conn.execute("SELECT now()").fetchone()[0]
            sql = pgconn.sql
            counts = {
                "auth": conn.execute(sql.SQL("SELECT count(*) FROM {}").format(store.auth)).fetchone()[0],
                "keys": conn.execute(sql.SQL("SELECT count(*) FROM {}").format(store.keys)).fetchone()[0],
            }
            companies = conn.execute(sql.SQL(
                "SELECT count(*) FROM (SELECT company_id FROM {} UNION SELECT company_id FROM {}) s"
            ).format(store.auth, store.keys)).fetchone()[0]
            with pgtools.ClientConnection(conn_params) as client:
                argv = pgtools.pg_dump_argv(bin_dir, client, compress, snapshot_id)
                try:
                    proc = subprocess.run(argv, stdout=fd, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                          env=client.env)
                except OSError as exc:
                    raise BackupError("cannot run %s: %s" % (argv[0], exc))
                err = client.scrub(proc.stderr.decode("utf-8", "replace").strip())
        finally:
            try:
                conn.execute("ROLLBACK")
            except pgconn.psycopg.Error:
                pass
        if proc.returncode != 0:
            raise BackupError("pg_dump failed (exit %d) for %s: %s" % (
                proc.returncode, pgconn.describe(conn_params), err[-2000:] or "no message"))
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        fsutil._unlink_quiet(partial)
        raise
    os.close(fd)
    try:
        validated = validate_dump(bin_dir, partial, {"schema": store.schema, "auth_table": store.auth_table,
                                                     "keys_table": store.keys_table}, counts)
        sha, size = backup_format.sha256_file(partial)
    except BaseException:
        fsutil._unlink_quiet(partial)
        raise
    validated.pop("counts")
    return {"partial": partial, "sha256": sha, "size": size, "counts": counts, "companies": companies,
            "validated": validated, "snapshot_time": snapshot_time, "seconds": time.monotonic() - started}


def _publish(path, dump_info, manifest):
    """Rename the validated dump into place, then write its manifest atomically."""
    manifest_path = path + MANIFEST_SUFFIX
    try:
        # a forced re-run in the same second replaces a backup: stop it being valid first
        fsutil._unlink_quiet(manifest_path)
        os.rename(dump_info["partial"], path)
        fsutil.fsync_dir(os.path.dirname(path))
        data = (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
        fsutil.atomic_write(manifest_path, data, mode=0o600)
    except BaseException:
        fsutil._unlink_quiet(dump_info["partial"])
        raise


def run_backup(conn_params, store_params, backup_dir, pg_bin_dir=None, prefix=DEFAULT_PREFIX, force=False,
               keep_daily=7, keep_monthly=4, check_mode=False, now=None):
    """Make one verified backup in ``backup_dir`` and apply retention.

    Returns a dict: ``changed``, ``backup`` (path), ``manifest``, ``deleted``
    (names removed by retention), ``kept``, ``partials_removed``, ``skipped``
    (today's valid backup already exists), ``invalid`` (backups that are not
    valid, left alone), versions and ``duration``.  In check mode nothing is
    written: the result says which file would be made and what retention would
    delete.  Raises :class:`BackupError` (or ``pgconn.PgError``) when no valid,
    verified backup can be made; retention then deletes nothing.
    """
    started = time.monotonic()
    now = _utc(now)
    _check_prefix(prefix)
    if int(keep_daily) < 0 or int(keep_monthly) < 0:
        raise BackupError("keep_daily and keep_monthly must be >= 0")
    if not backup_dir or not os.path.isabs(backup_dir):
        raise BackupError("backup_dir must be an absolute path, got %r" % (backup_dir,))
    store = pgconn.Store.from_params(store_params or {})
    try:
        bin_dir = pgtools.find_bin_dir(pg_bin_dir, "pg_dump")
        client_major, client_text = pgtools.client_version(bin_dir, "pg_dump")
    except pgtools.ToolError as exc:
        raise BackupError(str(exc))

    conn = pgconn.connect(conn_params, autocommit=True)
    dir_fd = None
    try:
        try:
            server_num, server_text = _server_version(conn)
            # before anything is written: an older client cannot be trusted with a newer server
            pgtools.check_client_not_older(client_major, client_text, server_num, server_text)
            restore_major, restore_text = pgtools.client_version(bin_dir, "pg_restore")
            if restore_major < client_major:
                raise pgtools.ToolError("%s is older than %s in %s" % (restore_text, client_text, bin_dir))
            with conn.cursor() as cur:
                store.check_tables(cur)
        except pgtools.ToolError as exc:
            raise BackupError(str(exc))
        except pgconn.psycopg.Error as exc:
            raise pgconn.PgError("cannot read %s: %s" % (pgconn.describe(conn_params),
                                                         pgconn._scrub(exc, conn_params)))
        compress, compression = pgtools.dump_compression(client_major)

        dir_fd, dir_created, mode_fixed = _open_backup_dir(backup_dir, check_mode)
        partials = remove_stale_partials(backup_dir, prefix, check_mode)
        backups = list_backups(backup_dir, prefix)
        result = {
            "changed": bool(dir_created or mode_fixed or partials),
            "backup_dir": backup_dir,
            "backup": None,
            "manifest": None,
            "skipped": False,
            "deleted": [],
            "kept": [],
            "partials_removed": partials,
            "invalid": [{"name": b["name"], "reason": b["reason"]} for b in backups if not b["valid"]],
            "server_version": server_text,
            "client_version": client_text,
            "pg_bin_dir": bin_dir,
        }
        today = now.strftime("%Y-%m-%d")
        if not force:
            for entry in backups:
                if entry["valid"] and entry["created_at"][:10] == today:
                    problem = backup_format.backup_problem(entry["path"], entry["manifest"], verify_checksum=True)
                    if problem is None:
                        result.update(skipped=True, backup=entry["path"], manifest=entry["manifest"],
                                      msg="a valid backup of %s already exists: %s" % (today, entry["name"]))
                        result["duration"] = round(time.monotonic() - started, 3)
                        return result
        name = backup_name(prefix, now)
        created_at = _iso(now.strftime(backup_format.STAMP_FORMAT))
        path = os.path.join(backup_dir, name)
        month = now.strftime("%Y-%m")
        kind = "daily" if any(b["valid"] and b["created_at"][:7] == month and b["name"] != name
                              for b in backups) else "monthly"
        result["backup"] = path
        result["changed"] = True
        if check_mode:
            pretend = {"name": name, "path": path, "manifest_path": path + MANIFEST_SUFFIX,
                       "created_at": created_at, "manifest": {"kind": kind}, "valid": True}
            others = [b for b in backups if b["name"] != name]
            result["deleted"] = apply_retention(backup_dir, prefix, keep_daily, keep_monthly, (name,), True,
                                                backups=[pretend] + others)
            result["kind"] = kind
            result["msg"] = "would write %s (%s) and delete %d old backup(s)" % (name, kind, len(result["deleted"]))
            result["duration"] = round(time.monotonic() - started, 3)
            return result

        try:
            info = _dump(conn, conn_params, store, bin_dir, compress, path)
        except pgconn.psycopg.Error as exc:
            raise pgconn.PgError("backup failed while reading %s: %s" % (pgconn.describe(conn_params),
                                                                         pgconn._scrub(exc, conn_params)))
        manifest = {
            "format": backup_format.FORMAT,
            "file": name,
            "kind": kind,
            "created_at": created_at,
            "sha256": info["sha256"],
            "size": info["size"],
            "compression": compression,
            "server_version": server_text,
            "server_version_num": server_num,
            "client_version": client_text,
            "client_major": client_major,
            "database": conn.info.dbname,
            "schema": store.schema,
            "auth_table": store.auth_table,
            "keys_table": store.keys_table,
            "counts": info["counts"],
            "companies": info["companies"],
            "duration": round(info["seconds"], 3),
            "validated": info["validated"],
            "snapshot_time": info["snapshot_time"].astimezone(datetime.timezone.utc).isoformat(),
        }
        _publish(path, info, manifest)
        result["manifest"] = manifest
        # retention only after a verified backup exists; it is protected by name
        backups = list_backups(backup_dir, prefix)
        keep, _delete = plan_retention(backups, keep_daily, keep_monthly, (name,))
        result["deleted"] = apply_retention(backup_dir, prefix, keep_daily, keep_monthly, (name,), backups=backups)
        result["kept"] = sorted(keep, reverse=True)
        result["msg"] = "backup %s written (%d auth, %d keys rows), %d old backup(s) deleted" % (
            name, info["counts"]["auth"], info["counts"]["keys"], len(result["deleted"]))
        result["duration"] = round(time.monotonic() - started, 3)
        return result
    finally:
        if dir_fd is not None:
            os.close(dir_fd)
        conn.close()


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
    backup_path, manifest = _load_valid(backup_path)
    bin_dir, restore_text = _restore_bin_dir(pg_bin_dir, manifest)
    store_params = _tables_for(manifest, store_params)
    expected = manifest.get("counts") or {}
    name = database or "%s%s_%s" % (VERIFY_DB_PREFIX, _utc().strftime("%Y%m%d%H%M%S"), secrets.token_hex(3))
    keep_database = keep_database or bool(database)
    admin = pgconn.connect(conn_params, autocommit=True)
    result = {"backup": backup_path, "manifest": manifest, "database": name, "pg_bin_dir": bin_dir,
              "client_version": restore_text, "expected": expected, "restored": False, "kept": bool(keep_database)}
    created = False
    try:
        try:
            server_num, server_text = _server_version(admin)
            result["server_version"] = server_text
            admin.execute(pgconn.sql.SQL("CREATE DATABASE {} TEMPLATE template0 ENCODING 'UTF8'").format(
                pgconn.sql.Identifier(name)))
            created = True
        except pgconn.psycopg.Error as exc:
            raise BackupError("cannot create the %s database %s (%s): %s" % (
                "target" if database else "throwaway", name, pgconn.describe(conn_params),
                pgconn._scrub(exc, conn_params)))
        restore_started = time.monotonic()
        with pgtools.ClientConnection(conn_params, dbname=name) as client:
            argv = pgtools.pg_restore_argv(bin_dir, backup_path, client)
            try:
                proc = subprocess.run(argv, capture_output=True, stdin=subprocess.DEVNULL, env=client.env)
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
        except pgconn.psycopg.Error as exc:
            raise BackupError("cannot inspect the restored database %s: %s" % (name, pgconn._scrub(exc, conn_params)))
        finally:
            conn.close()
        result.update(counts=counts, companies=companies, by_type=by_type)
        for label in ("auth", "keys"):
            if counts[label] != expected.get(label):
                problems.insert(0, "%s rows: %s restored, manifest says %s" % (label, counts[label],
                                                                                expected.get(label)))
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
            except pgconn.psycopg.Error as exc:  # the original error, if any, matters more
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
            counts, companies, by_type, problems = _inspect_restored(conn, _tables_for(manifest, store_params))
        except pgconn.psycopg.Error as exc:
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


# --------------------------------------------------------------------------- reading a backup without a server


def _column(columns, name, table):
    try:
        return columns.index(name)
    except ValueError:
        raise BackupError("table %s in the dump has no column %r (columns: %s)" % (table, name, ", ".join(columns)))


def read_backup_states(backup_file, store_params=None, companies=None, pg_bin_dir=None):
    """Read the auth state straight from a backup file, with no database server.

    Returns ``(snapshot, states)``: ``snapshot`` has ``snapshot_time`` (the
    manifest's ``created_at``), ``server_version_num`` and ``source``
    (``backup:<file name>``); ``states`` iterates :class:`authstate.CompanyState`
    exactly as :meth:`authstate.DatabaseSource.states` would at that snapshot, so
    :func:`authstate.export_states` writes identical files.  The sha256 is checked
    against the manifest first, and the row counts read must equal the manifest's.
    Everything is read before this returns: a broken backup raises here, before
    the caller touches anything.  The tables read are the ones the manifest
    names; ``store_params`` only matters for a manifest that names none.
    """
    from . import authstate

    backup_path, manifest = _load_valid(backup_file)
    bin_dir, _text = _restore_bin_dir(pg_bin_dir, manifest)
    schema, auth_table, keys_table = _store_names(_tables_for(manifest, store_params))
    wanted = set(companies) if companies else None
    creds = {}
    counts = {"auth": 0, "keys": 0}
    spool = tempfile.TemporaryFile()
    index = {}
    try:
        for label, table in (("auth", auth_table), ("keys", keys_table)):
            found = False
            with pgtools.restore_stream(bin_dir, backup_path, table, schema) as out:
                for name, columns, rows in pgtools.iter_copy_blocks(out):
                    found = True
                    ci = _column(columns, "company_id", name)
                    if label == "auth":
                        vi = _column(columns, "creds", name)
                        for line in rows:
                            counts["auth"] += 1
                            fields = line.split(b"\t")
                            company_id = pgtools.copy_field(fields[ci])
                            if wanted is None or company_id in wanted:
                                creds[company_id] = pgtools.copy_field(fields[vi])
                    else:
                        wanted_cols = [_column(columns, c, name) for c in ("key_type", "key_id", "value")]
                        for line in rows:
                            counts["keys"] += 1
                            fields = line.split(b"\t")
                            company_id = pgtools.copy_field(fields[ci])
                            if wanted is not None and company_id not in wanted:
                                continue
                            record = b"\t".join(fields[i] for i in wanted_cols) + b"\n"
                            index.setdefault(company_id, []).append((spool.tell(), len(record)))
                            spool.write(record)
            if not found:
                raise BackupError("backup %s holds no data for %s.%s" % (backup_path, schema, table))
        expected = manifest.get("counts") or {}
        for label in ("auth", "keys"):
            if counts[label] != expected.get(label):
                raise BackupError("backup %s holds %d %s rows, its manifest says %s" % (
                    backup_path, counts[label], label, expected.get(label)))
        spool.flush()
    except pgtools.ToolError as exc:
        spool.close()
        raise BackupError("cannot read backup %s: %s" % (backup_path, exc))
    except BaseException:
        spool.close()
        raise
    snapshot = {"snapshot_time": manifest.get("created_at"), "server_version_num": manifest.get("server_version_num"),
                "source": "backup:%s" % os.path.basename(backup_path), "counts": counts}

    def states():
        try:
            for company_id in sorted(index):
                state = authstate.CompanyState(company_id, creds.get(company_id))
                for offset, length in index[company_id]:
                    spool.seek(offset)
                    key_type, key_id, value = pgtools.parse_copy_row(spool.read(length)[:-1])
                    state.keys.append((key_type, key_id, value))
                yield state
            for company_id in sorted(set(creds) - set(index)):
                yield authstate.CompanyState(company_id, creds[company_id])
        finally:
            spool.close()

    return snapshot, states()
