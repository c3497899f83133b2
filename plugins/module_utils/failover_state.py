# -*- coding: utf-8 -*-
# Copyright: baileys.resilience contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The failover state: where the service's auth state lives now, on the service host's disk.

No Ansible import: the ``failover_state`` module and the tests call it.

One small JSON file (written atomically: temporary file, fsync, rename, directory fsync; mode 0600)
that every failover entry point reads first and acts from:

* ``mode``: ``postgres`` (the service reads the store), ``switching-to-files`` (a rollback stopped the
  service and is handing the state over), ``files`` (the service runs on the session files: they are
  the truth from ``since`` on), ``switching-to-postgres`` (a return stopped the service and is
  bringing the files home);
* ``since``: when that mode began (UTC, ISO 8601); ``run_id``: the run that set it;
* ``source``: what a rollback exported (``kind`` ``database`` with its ``snapshot_time``, or
  ``backup`` with ``backup_file`` and ``sha256``, or ``s3`` with the object too);
* ``companies``: per company what was handed over (``fingerprint`` of the key rows, ``creds_sha256``,
  ``keys``), which a return compares with the store to notice another writer;
* ``history``: the last transitions (mode, at, run id).

A missing file means ``postgres`` (the service was never rolled back by this collection).  A file
that does not parse is an error, never silently ``postgres``: the next step could overwrite newer
files.
"""
from __future__ import absolute_import, division, print_function

import datetime
import json
import os

from . import errors, fsutil

__metaclass__ = type

FORMAT = 1
MODES = ("postgres", "switching-to-files", "files", "switching-to-postgres")
FIELDS = ("mode", "since", "run_id", "source", "companies", "handover_time", "stopped_at", "note")
HISTORY = 20


class StateError(errors.BaileysResilienceError, RuntimeError):
    """The state file cannot be read or written; the message says which and why."""


def utcnow():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def default_state():
    return {"format": FORMAT, "mode": "postgres", "since": None, "run_id": None, "source": None, "companies": {},
            "handover_time": None, "stopped_at": None, "note": None, "history": []}


def read(path, legacy_files_marker=None):
    """The state in ``path``.  Without a file: ``files`` when ``legacy_files_marker`` exists (a service
    rolled back before this file existed left it, e.g. the environment file's ``.pre-rollback`` copy),
    else ``postgres``."""
    if not path or not os.path.isabs(path):
        raise StateError("the failover state path must be absolute, got %r" % (path,))
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        state = default_state()
        if legacy_files_marker and os.path.exists(legacy_files_marker):
            state["mode"] = "files"
            state["note"] = "no state file; %s exists: rolled back before the state file existed" % (
                legacy_files_marker,)
        return state
    except OSError as exc:
        raise StateError("cannot read the failover state %s: %s" % (path, exc.strerror or exc))
    try:
        data = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise StateError("the failover state %s is damaged (%s); look at it and fix or remove it by hand: "
                         "the service may be running on files" % (path, exc))
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("mode") not in MODES:
        raise StateError("the failover state %s is not a format-%d state with a mode in %s" % (
            path, FORMAT, ", ".join(MODES)))
    state = default_state()
    state.update(data)
    return state


def _comparable(state):
    return {k: v for k, v in state.items() if k != "history"}


HANDOVER_FIELDS = ("fingerprint", "creds_sha256", "keys")


def handover_entries(companies):
    """``{company_id: {fingerprint, creds_sha256, keys}}`` from a map, or from a list of per-company results
    of ``auth_export`` / ``auth_import`` (an import's ``store_fingerprint_after`` is the store's fingerprint)."""
    if isinstance(companies, dict):
        return companies
    out = {}
    for c in companies or ():
        if not isinstance(c, dict) or not c.get("company_id"):
            raise StateError("companies must be a map or a list of results with company_id, got %r" % (c,))
        entry = {k: c.get(k) for k in HANDOVER_FIELDS}
        if c.get("store_fingerprint_after"):
            entry["fingerprint"] = c["store_fingerprint_after"]
        out[c["company_id"]] = entry
    return out


def update(path, changes, check_mode=False, now=None, legacy_files_marker=None):
    """Merge ``changes`` (keys from :data:`FIELDS`) into the state; return ``(before, after, changed)``.

    A change of ``mode`` sets ``since`` (unless given) and appends to ``history``.  ``companies``
    replaces the whole map.  Nothing is written when nothing changes, or in check mode.
    """
    unknown = sorted(set(changes) - set(FIELDS))
    if unknown:
        raise StateError("unknown failover state field(s): %s" % ", ".join(unknown))
    if "mode" in changes and changes["mode"] not in MODES:
        raise StateError("mode must be one of %s, got %r" % (", ".join(MODES), changes["mode"]))
    if "companies" in changes:
        changes = dict(changes, companies=handover_entries(changes["companies"]))
    before = read(path, legacy_files_marker)
    after = json.loads(json.dumps(before))
    after.update(changes)
    if changes.get("mode") and changes["mode"] != before["mode"]:
        at = now or utcnow()
        if "since" not in changes:
            after["since"] = at
        after["history"] = (before.get("history") or [])[-(HISTORY - 1):] + [
            {"mode": changes["mode"], "at": at, "run_id": after.get("run_id")}]
    changed = _comparable(after) != _comparable(before)
    if changed and not check_mode:
        write(path, after)
    return before, after, changed


def write(path, state):
    """Write ``state`` atomically (0600; the directory is created 0700 when missing)."""
    directory = os.path.dirname(path)
    try:
        if not os.path.isdir(directory):
            os.makedirs(directory, 0o700)
        data = (json.dumps(state, indent=2, sort_keys=True) + "\n").encode("utf-8")
        fsutil.atomic_write(path, data, mode=0o600)
    except OSError as exc:
        raise StateError("cannot write the failover state %s: %s" % (path, exc.strerror or exc))


def describe(state):
    """One line for a report: ``files since ... (run ..., source ...)``."""
    src = state.get("source") or {}
    what = src.get("kind")
    if what == "database":
        what = "database snapshot %s" % src.get("snapshot_time")
    elif what in ("backup", "s3"):
        what = "%s %s" % (what, src.get("backup_file"))
    return "%s since %s (run %s%s)" % (state["mode"], state.get("since") or "ever", state.get("run_id") or "-",
                                       ", source %s" % what if what else "")
