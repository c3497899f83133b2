# -*- coding: utf-8 -*-
# Copyright: baileys.resilience contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The service's side of a failover: its environment file and its health check.

No Ansible import: the ``service_env`` and ``service_health`` modules call it.

* :func:`switch_env` sets ``KEY=VALUE`` lines of a dotenv-style environment file, keeping a copy of the
  original once (never overwritten), and :func:`restore_env` puts that copy back.  Every write is atomic
  (temporary file, fsync, rename) with the file's owner and mode; the content is never returned (it may hold
  ``PGPASSWORD``), only the names of the keys that changed.
* :func:`wait_healthy` polls an HTTP health URL every ``interval`` seconds, in one call, until it answers 200
  (and, when asked, reports the expected mode and counts) or ``timeout`` runs out.
"""
from __future__ import absolute_import, division, print_function

import json
import os
import re
import time

from . import errors, fsutil

__metaclass__ = type


class ServiceError(errors.BaileysResilienceError, RuntimeError):
    """The message says what is wrong and where."""


_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")


def _read(path):
    try:
        with open(path, "rb") as fh:
            return fh.read(), os.stat(path)
    except FileNotFoundError:
        raise ServiceError("the service's environment file %s does not exist" % path)
    except OSError as exc:
        raise ServiceError("cannot read %s: %s" % (path, exc.strerror or exc))


def _write_like(path, data, st):
    fsutil.atomic_write(path, data, mode=st.st_mode & 0o7777, uid=st.st_uid, gid=st.st_gid)


def switch_env(path, values, backup_suffix=".pre-rollback", check_mode=False):
    """Set ``values`` (KEY -> VALUE) in ``path``; keep ``path + backup_suffix`` as the original (once).

    A key already set (``KEY=`` or ``export KEY=``) has its last line replaced; a missing one is appended.
    Returns ``{"changed", "changed_keys", "backup", "backup_created"}``.
    """
    for key in values:
        if not _KEY.match(str(key)):
            raise ServiceError("%r is not an environment variable name" % (key,))
    raw, st = _read(path)
    lines = raw.decode("utf-8").splitlines()
    changed_keys = []
    for key, value in values.items():
        want = "%s=%s" % (key, value)
        pattern = re.compile(r"^\s*(export\s+)?%s\s*=" % re.escape(key))
        hits = [i for i, line in enumerate(lines) if pattern.match(line)]
        if hits:
            if lines[hits[-1]] != want:
                lines[hits[-1]] = want
                changed_keys.append(key)
        else:
            lines.append(want)
            changed_keys.append(key)
    backup = path + backup_suffix
    backup_created = not os.path.exists(backup)
    if not check_mode:
        if backup_created:
            _write_like(backup, raw, st)
        if changed_keys:
            _write_like(path, ("\n".join(lines) + "\n").encode("utf-8"), st)
    return {"changed": bool(changed_keys or backup_created), "changed_keys": changed_keys, "backup": backup,
            "backup_created": backup_created}


def restore_env(path, backup_suffix=".pre-rollback", check_mode=False):
    """Put ``path + backup_suffix`` back over ``path`` and remove it.  Nothing to do without a copy."""
    backup = path + backup_suffix
    if not os.path.exists(backup):
        return {"changed": False, "restored": False, "backup": backup}
    raw, st = _read(backup)
    if not check_mode:
        _write_like(path, raw, st)
        os.unlink(backup)
        fsutil.fsync_dir(os.path.dirname(os.path.abspath(path)))
    return {"changed": True, "restored": True, "backup": backup}


def wait_healthy(url, timeout=60.0, interval=0.25, expect=None, opener=None):
    """Poll ``url`` until it answers 200 with JSON holding every ``expect`` item (e.g. ``{"mode": "files"}``).

    Returns ``{"healthy", "seconds", "attempts", "status", "json", "error"}``; never raises for the service.
    """
    import urllib.error
    import urllib.request

    opener = opener or urllib.request.urlopen
    expect = expect or {}
    started = time.monotonic()
    attempts, status, body, error = 0, None, None, None
    while True:
        attempts += 1
        try:
            with opener(url, timeout=max(1.0, interval * 4)) as resp:
                status = resp.status
                text = resp.read().decode("utf-8", "replace")
            try:
                body = json.loads(text)
            except ValueError:
                body = None
            missing = {k: v for k, v in expect.items() if not isinstance(body, dict) or body.get(k) != v}
            error = None if not missing else "answered %s, expected %s" % (
                {k: body.get(k) for k in missing} if isinstance(body, dict) else text[:200], missing)
            if status == 200 and not missing:
                return {"healthy": True, "seconds": round(time.monotonic() - started, 3), "attempts": attempts,
                        "status": status, "json": body, "error": None}
        except urllib.error.HTTPError as exc:
            status, error = exc.code, "HTTP %d" % exc.code
        except (OSError, ValueError) as exc:  # refused, reset, timeout, bad URL
            status, error = None, str(getattr(exc, "reason", exc))
        if time.monotonic() - started + interval > timeout:
            return {"healthy": False, "seconds": round(time.monotonic() - started, 3), "attempts": attempts,
                    "status": status, "json": body, "error": error}
        time.sleep(interval)
