# -*- coding: utf-8 -*-
# Copyright: baileys.resilience contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Making a verified PostgreSQL backup of the auth state; and the map of the backup rooms.

No Ansible import: the modules ``pg_backup``, ``backup_verify`` and ``backup_restore``, the
``source: backup`` export and the cron command-line tool all call ``backup.X``.  The artefacts
follow docs/backup-format.md, whose rules (names, manifest format, the checks) live in
backup_format.py:

* the dump (``pg_dump --format=custom``), written as ``<name>.partial`` and
  renamed only after it has been validated;
* its manifest beside it, written atomically afterwards.

With ``encrypt_local`` (an :class:`agecrypt.Encryption` with recipients) the validated
``<name>.partial`` is encrypted as a stream into ``<name>.age.partial`` (backupseal.encrypt_local_dump),
which is renamed to ``<name>`` while the plaintext partial is removed: the backup is then age
ciphertext and its manifest records both hashes, the recipients and the format.

A backup is valid only when its manifest says it was validated and the dump's
size and sha256 match the manifest.  Every failure raises :class:`BackupError`
with a message an operator can act on; nothing here ever reports a backup that
was not verified.

This room makes a backup (:func:`run_backup`); the others hold the rest, and their public names
are re-exported here so that callers keep writing ``backup.X``:

=============  =====================================================================================
backupfiles    the backups of a directory: BackupError, list_backups, newest_valid_backup,
               read_manifest, plan_retention, apply_retention, remove_stale_partials
backupcheck    validate_dump, check_backup_file (no server), verify_backup (restore test),
               restore_backup (disaster recovery)
backupsource   read_backup_states: a backup as an export source, no server
=============  =====================================================================================

Every name below is bound once, at import: monkeypatching ``backup.X`` does not reach the room
that uses X; patch it in its room.
"""
from __future__ import absolute_import, division, print_function

import datetime
import fcntl
import os
import stat
import subprocess
import time

from . import agecrypt, backup_format, backupcheck, backupfiles, backupseal, backupsource, fsutil, pgconn, pgtools

__metaclass__ = type

# backup_format: the file rules (names and manifests)
DEFAULT_PREFIX = backup_format.DEFAULT_PREFIX
MANIFEST_SUFFIX = backup_format.MANIFEST_SUFFIX
backup_name = backup_format.backup_name
_iso = backup_format.stamp_iso

# backupfiles: the backups of a directory, retention
BackupError = backupfiles.BackupError
DEFAULT_KEEP_DAILY = backupfiles.DEFAULT_KEEP_DAILY
DEFAULT_KEEP_MONTHLY = backupfiles.DEFAULT_KEEP_MONTHLY
read_manifest = backupfiles.read_manifest
list_backups = backupfiles.list_backups
newest_valid_backup = backupfiles.newest_valid_backup
plan_retention = backupfiles.plan_retention
apply_retention = backupfiles.apply_retention
remove_stale_partials = backupfiles.remove_stale_partials

# backupcheck: validation, restore test, restore
MAGIC = backupcheck.MAGIC
MIN_DUMP_SIZE = backupcheck.MIN_DUMP_SIZE
VERIFY_DB_PREFIX = backupcheck.VERIFY_DB_PREFIX
validate_dump = backupcheck.validate_dump
check_backup_file = backupcheck.check_backup_file
verify_backup = backupcheck.verify_backup
restore_backup = backupcheck.restore_backup

# backupsource: a backup as an export source
read_backup_states = backupsource.read_backup_states


# --------------------------------------------------------------------------- backup


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
                                          env=client.env, check=False)
                except OSError as exc:
                    raise BackupError("cannot run %s: %s" % (argv[0], exc))
                err = client.scrub(proc.stderr.decode("utf-8", "replace").strip())
        finally:
            try:
                conn.execute("ROLLBACK")
            except pgconn.Error:
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


def _encrypt(path, dump_info, manifest, encryption):
    """encrypt_local: the validated plaintext partial encrypted into ``<path>.age.partial``; the manifest gets
    its ``encryption`` block.  On failure both partials are removed and nothing is published."""
    ciphertext = path + backup_format.ENCRYPTING_SUFFIX
    try:
        manifest["encryption"] = backupseal.encrypt_local_dump(dump_info["partial"], ciphertext, manifest, encryption)
    except BaseException as exc:
        fsutil._unlink_quiet(dump_info["partial"])
        if isinstance(exc, (agecrypt.AgeError, OSError)):
            raise BackupError("backup %s was validated but could not be encrypted (encrypt_local): %s; nothing was "
                              "kept" % (os.path.basename(path), getattr(exc, "strerror", None) or exc))
        raise
    dump_info["ciphertext"] = ciphertext


def _publish(path, dump_info, manifest):
    """Rename the validated dump (or its ciphertext, removing the plaintext) into place, then write its
    manifest atomically."""
    manifest_path = path + MANIFEST_SUFFIX
    source = dump_info.get("ciphertext") or dump_info["partial"]
    try:
        # a forced re-run in the same second replaces a backup: stop it being valid first
        fsutil._unlink_quiet(manifest_path)
        os.rename(source, path)
        if source != dump_info["partial"]:
            os.unlink(dump_info["partial"])  # no plaintext of an encrypted backup stays
        fsutil.fsync_dir(os.path.dirname(path))
        fsutil.atomic_write(manifest_path, backup_format.manifest_bytes(manifest), mode=0o600)
    except BaseException:
        fsutil._unlink_quiet(dump_info["partial"])
        fsutil._unlink_quiet(source)
        raise


def run_backup(conn_params, store_params, backup_dir, pg_bin_dir=None, prefix=DEFAULT_PREFIX, force=False,
               keep_daily=DEFAULT_KEEP_DAILY, keep_monthly=DEFAULT_KEEP_MONTHLY, check_mode=False, now=None,
               encryption=None):
    """Make one verified backup in ``backup_dir`` and apply retention.

    ``encryption``: an :class:`agecrypt.Encryption` or its options (``s3.encryption``), checked before
    anything is read; with ``encrypt_local`` the validated dump is kept only as age ciphertext (see the
    room's docstring) and the result has ``encrypted: true``.  Without ``encrypt_local`` it changes nothing.

    Returns a dict: ``changed``, ``backup`` (path), ``manifest``, ``deleted``
    (names removed by retention), ``kept``, ``partials_removed``, ``skipped``
    (today's valid backup already exists), ``invalid`` (backups that are not
    valid, left alone), versions and ``duration``.  In check mode nothing is
    written: the result says which file would be made and what retention would
    delete.  Raises :class:`BackupError` (or ``pgconn.PgError``) when no valid,
    verified backup can be made; retention then deletes nothing.
    """
    started = time.monotonic()
    now = backupfiles.as_utc(now)
    backupfiles.check_prefix(prefix)
    if int(keep_daily) < 0 or int(keep_monthly) < 0:
        raise BackupError("keep_daily and keep_monthly must be >= 0")
    if not backup_dir or not os.path.isabs(backup_dir):
        raise BackupError("backup_dir must be an absolute path, got %r" % (backup_dir,))
    store = pgconn.Store.from_params(store_params or {})
    if not isinstance(encryption, agecrypt.Encryption):
        try:
            encryption = agecrypt.Encryption.from_options(encryption)
        except agecrypt.AgeError as exc:
            raise BackupError("%s: no backup was made" % exc)
    encrypt = encryption.encrypt_local
    try:
        bin_dir = pgtools.find_bin_dir(pg_bin_dir, "pg_dump")
        client_major, client_text = pgtools.client_version(bin_dir, "pg_dump")
    except pgtools.ToolError as exc:
        raise BackupError(str(exc))

    conn = pgconn.connect(conn_params, autocommit=True)
    dir_fd = None
    try:
        try:
            server_num, server_text = backupcheck.server_version(conn)
            # before anything is written: an older client cannot be trusted with a newer server
            pgtools.check_client_not_older(client_major, client_text, server_num, server_text)
            restore_major, restore_text = pgtools.client_version(bin_dir, "pg_restore")
            if restore_major < client_major:
                raise pgtools.ToolError("%s is older than %s in %s" % (restore_text, client_text, bin_dir))
            with conn.cursor() as cur:
                store.check_tables(cur)
        except pgtools.ToolError as exc:
            raise BackupError(str(exc))
        except pgconn.Error as exc:
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
            "encrypted": encrypt,
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
            result["msg"] = "would write %s (%s%s) and delete %d old backup(s)" % (
                name, kind, ", age-encrypted to %s" % ", ".join(encryption.fingerprints) if encrypt else "",
                len(result["deleted"]))
            result["duration"] = round(time.monotonic() - started, 3)
            return result

        try:
            info = _dump(conn, conn_params, store, bin_dir, compress, path)
        except pgconn.Error as exc:
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
        if encrypt:
            _encrypt(path, info, manifest, encryption)
        _publish(path, info, manifest)
        result["manifest"] = manifest
        # retention only after a verified backup exists; it is protected by name
        backups = list_backups(backup_dir, prefix)
        keep, _delete = plan_retention(backups, keep_daily, keep_monthly, (name,))
        result["deleted"] = apply_retention(backup_dir, prefix, keep_daily, keep_monthly, (name,), backups=backups)
        result["kept"] = sorted(keep, reverse=True)
        result["msg"] = "backup %s written (%d auth, %d keys rows%s), %d old backup(s) deleted" % (
            name, info["counts"]["auth"], info["counts"]["keys"],
            "; age-encrypted to %s" % ", ".join(encryption.fingerprints) if encrypt else "", len(result["deleted"]))
        result["duration"] = round(time.monotonic() - started, 3)
        return result
    finally:
        if dir_fd is not None:
            os.close(dir_fd)
        conn.close()
