# -*- coding: utf-8 -*-
# Copyright: baileys.resilience contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The backups in a directory: listing them, the newest valid one, retention, leftovers of a killed run.

Also :class:`BackupError`, which every backup room raises.  What makes a file a backup (names,
the manifest, the checks) is backup_format.py's; this room applies those rules to a directory.
backup.py (making a backup), backupcheck.py (verifying, restoring) and backupsource.py (reading
one as an export source) build on it.  No Ansible import, no database.
"""
from __future__ import absolute_import, division, print_function

import datetime
import os
import re

from . import backup_format, errors, fsutil

__metaclass__ = type

# the backup file rules live in backup_format only; these are its names used here
DEFAULT_PREFIX = backup_format.DEFAULT_PREFIX
MANIFEST_SUFFIX = backup_format.MANIFEST_SUFFIX
_iso = backup_format.stamp_iso
# retention's defaults (pg_backup's keep_daily/keep_monthly, the host tool's retention section)
DEFAULT_KEEP_DAILY = 7
DEFAULT_KEEP_MONTHLY = 4


class BackupError(errors.BaileysResilienceError, RuntimeError):
    """A backup, retention or restore-test failure; the message says what and where."""


# --------------------------------------------------------------------------- listing


def check_prefix(prefix):
    """``prefix`` when it is a valid backup name prefix; raises :class:`BackupError` otherwise."""
    if not prefix or not re.match("^%s$" % backup_format.PREFIX_PATTERN, prefix) or len(prefix) > 100:
        raise BackupError("prefix %r must be letters, digits, '.', '_' or '-' and not start with '.'" % (prefix,))
    return prefix


def as_utc(now=None):
    """``now`` (default: the current time) in UTC, whole seconds; a naive datetime is taken as UTC."""
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
    check_prefix(prefix)
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


def plan_retention(backups, keep_daily=DEFAULT_KEEP_DAILY, keep_monthly=DEFAULT_KEEP_MONTHLY, protect=()):
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


def apply_retention(backup_dir, prefix=DEFAULT_PREFIX, keep_daily=DEFAULT_KEEP_DAILY, keep_monthly=DEFAULT_KEEP_MONTHLY,
                    protect=(), check_mode=False, backups=None):
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
    """Remove what a killed run left: ``<name>.partial``, ``<name>.age.partial`` (encrypt_local) and
    half-written manifests.  Returns the names."""
    dump_re = backup_format.name_re(prefix, backup_format.PARTIAL_SUFFIX)
    ciphertext_re = backup_format.name_re(prefix, backup_format.ENCRYPTING_SUFFIX)
    tmp_re = re.compile(r"^%s\d+-%s$" % (re.escape(fsutil.TEMP_PREFIX),
                                         backup_format.name_pattern(prefix, MANIFEST_SUFFIX)))
    removed = []
    try:
        names = os.listdir(backup_dir)
    except FileNotFoundError:
        return removed
    for name in sorted(names):
        if dump_re.match(name) or ciphertext_re.match(name) or tmp_re.match(name):
            if not check_mode:
                try:
                    os.unlink(os.path.join(backup_dir, name))
                except FileNotFoundError:
                    continue
            removed.append(name)
    if removed and not check_mode:
        fsutil.fsync_dir(backup_dir)
    return removed
