# -*- coding: utf-8 -*-
# Copyright: baileys.resilience contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Point-in-time recovery with Barman in streaming mode: preflight, Barman commands, restore points, metrics.

No Ansible import.  Barman itself does the work (``backup_method = postgres``, ``streaming_archiver = on``, a
replication slot, ``barman cron``); this room only

* asks the server, before anything is configured, whether streaming can work (``preflight``): a normal query for
  the role's REPLICATION attribute, ``wal_level``, free slots and WAL senders, then an ``IDENTIFY_SYSTEM`` over a
  replication connection (the one thing ``pg_hba.conf`` decides), and the client programs' version;
* runs Barman as its own user (``Barman``) and reads its JSON output (backups, check);
* creates a named restore point (``restore_point``, taken before every failover switch);
* turns ``barman check``, the slot's lag and state and the WAL files waiting in the streaming directory (not yet
  archived) into metrics (``collect_metrics``) and into problems, one per thing wrong (``assess``): what the host
  command's job ``baileys-resilience pitr-metrics`` (clijobs.py, every minute from the pitr role's cron) writes
  and alerts on; ``python3 -m baileys_resilience.pitr metrics CONFIG`` is the older cron line's entry point (the
  same metrics and exit code, no alerts).

Recovery into a scratch instance is in ``pitrscratch``.  Client programs get the connection through
``pgtools.ClientConnection``: never a password on a command line.
"""
from __future__ import absolute_import, division, print_function

import json
import os
import pwd
import re
import subprocess
import sys
import time

from . import errors, jobs, pgconn, pgtools

__metaclass__ = type

DEFAULT_SERVER = "baileys"
DEFAULT_SLOT = "barman_baileys"
DEFAULT_BARMAN = "/opt/barman/bin/barman"
DEFAULT_BARMAN_CONFIG = "/etc/barman.conf"
DEFAULT_BARMAN_USER = "barman"
DEFAULT_MAX_WAL_WAITING_SECONDS = 600  # as the BaileysResiliencePitrWalNotArchived rule
JOB_NAME = "pitr-metrics"  # the job label of its job metrics (the rules' job_name)
TEXTFILE_NAME = "baileys_pitr.prom"  # the one file with the metrics and the job metrics of pitr-metrics
# the problems that mean "the provider does not allow streaming": the role falls back to hourly dumps for them
NOT_ALLOWED = ("replication_refused", "no_replication_privilege", "wal_level")
_SLOT_RE = re.compile(r"^[a-z0-9_]{1,63}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,62}$")


class PitrError(errors.BaileysResilienceError, RuntimeError):
    """A Barman command, a preflight probe or a recovery failed; the message says which and why."""


def check_slot_name(slot):
    if not _SLOT_RE.match(slot or ""):
        raise PitrError("slot name %r: lower-case letters, digits and _ only, at most 63" % (slot,))
    return slot


def check_point_name(name):
    if not _NAME_RE.match(name or ""):
        raise PitrError("restore point name %r: letters, digits and . _ : - only, at most 63" % (name,))
    return name


# --------------------------------------------------------------------------- client programs


def run_psql(bin_dir, conn_params, query, replication=False, timeout=30):
    """``(rc, stdout, stderr)`` of ``psql -Atc QUERY`` (simple protocol, so replication commands work)."""
    params = dict(conn_params)
    if replication:
        params["connect_params"] = dict(params.get("connect_params") or {}, replication="true")
    argv = [pgtools.tool_path(bin_dir, "psql"), "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-F", "|",
            "-c", query]
    with pgtools.ClientConnection(params) as client:
        if client.dbname_arg:
            argv += ["--dbname", client.dbname_arg]
        try:
            out = subprocess.run(argv, env=client.env, capture_output=True, text=True, timeout=timeout,
                                 stdin=subprocess.DEVNULL, check=False)
        except subprocess.TimeoutExpired:
            return 124, "", "psql did not answer within %d s" % timeout
        except OSError as exc:
            raise PitrError("cannot run psql: %s" % exc)
        return out.returncode, out.stdout, client.scrub(out.stderr.strip())


_SETTINGS_SQL = (
    "SELECT r.rolreplication, r.rolsuper, current_setting('wal_level'), "
    "current_setting('max_replication_slots')::int, (SELECT count(*) FROM pg_replication_slots), "
    "EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = '%s'), "
    "current_setting('max_wal_senders')::int, (SELECT count(*) FROM pg_stat_replication), "
    "current_setting('server_version_num')::int, current_setting('server_version'), "
    "current_setting('max_slot_wal_keep_size'), current_user, "
    # what Barman's has_backup_privileges asks (PostgreSQL 15+ names); function grants are per database
    "CASE WHEN r.rolsuper OR current_setting('server_version_num')::int < 150000 THEN true ELSE "
    "(pg_has_role(current_user, 'pg_monitor', 'USAGE') OR (pg_has_role(current_user, 'pg_read_all_settings', "
    "'USAGE') AND pg_has_role(current_user, 'pg_read_all_stats', 'USAGE'))) "
    "AND has_function_privilege(current_user, 'pg_backup_start(text,boolean)', 'EXECUTE') "
    "AND has_function_privilege(current_user, 'pg_backup_stop(boolean)', 'EXECUTE') "
    "AND has_function_privilege(current_user, 'pg_switch_wal()', 'EXECUTE') "
    "AND has_function_privilege(current_user, 'pg_create_restore_point(text)', 'EXECUTE') END "
    "FROM pg_roles r WHERE r.rolname = current_user")


def _problem(code, message):
    return {"code": code, "message": message}


def preflight(conn_params, replication_params=None, bin_dir=None, slot=DEFAULT_SLOT):
    """What stands in the way of streaming, each problem with a plain message.  Changes nothing.

    ``conn_params``: Barman's normal connection; ``replication_params``: its streaming connection (default: the
    same).  Returns ``ok``, ``problems`` (``code``, ``message``), ``replication_allowed`` (False when only the
    provider can fix it: the fallback applies), the server's identity and settings.
    """
    check_slot_name(slot)
    replication_params = replication_params or conn_params
    bin_dir = pgtools.find_bin_dir(bin_dir, tool="pg_receivewal")
    problems = []
    result = {"slot": slot, "bin_dir": bin_dir}
    where = pgconn.describe(conn_params)
    rc, out, err = run_psql(bin_dir, conn_params, _SETTINGS_SQL % slot)
    if rc != 0:
        raise PitrError("cannot query the server (%s): %s" % (where, err or "psql exit %d" % rc))
    cols = out.strip().split("|")
    if len(cols) != 13:
        raise PitrError("unexpected answer from the server (%s): %r" % (where, out[:200]))
    (rolrepl, rolsuper, wal_level, max_slots, used_slots, slot_exists, max_senders, used_senders, version_num,
     version, keep_size, user, backup_privileges) = cols
    result.update(wal_level=wal_level, max_replication_slots=int(max_slots), used_slots=int(used_slots),
                  slot_exists=slot_exists == "t", max_wal_senders=int(max_senders), wal_senders=int(used_senders),
                  server_version_num=int(version_num), server_version=version, max_slot_wal_keep_size=keep_size,
                  user=user)
    repl_user = pgconn.libpq_params(replication_params).get("user", user)
    if repl_user == user and rolrepl != "t" and rolsuper != "t":
        problems.append(_problem("no_replication_privilege",
                                 "role %s has no REPLICATION attribute: ALTER ROLE %s REPLICATION (on a managed "
                                 "service, the provider's way to grant replication)" % (user, user)))
    if backup_privileges != "t":
        problems.append(_problem("no_backup_privileges",
                                 "role %s may not run base backups: GRANT pg_read_all_settings, pg_read_all_stats, "
                                 "pg_checkpoint TO %s; and, in database %s, GRANT EXECUTE ON FUNCTION "
                                 "pg_backup_start(text, boolean), pg_backup_stop(boolean), pg_switch_wal(), "
                                 "pg_create_restore_point(text) TO %s" % (
                                     user, user, pgconn.libpq_params(conn_params).get("dbname", "(default)"), user)))
    if wal_level not in ("replica", "logical"):
        problems.append(_problem("wal_level", "wal_level is %s: streaming needs replica (or logical): set "
                                 "wal_level = replica and restart the server" % wal_level))
    if not result["slot_exists"] and int(used_slots) >= int(max_slots):
        problems.append(_problem("no_free_slot", "no free replication slot: %s of max_replication_slots=%s in use; "
                                 "drop an unused slot (SELECT slot_name, active FROM pg_replication_slots) or raise "
                                 "max_replication_slots" % (used_slots, max_slots)))
    # Barman needs two WAL senders: receive-wal and pg_basebackup
    if int(max_senders) - int(used_senders) < (1 if result["slot_exists"] else 2):
        problems.append(_problem("no_free_wal_sender", "max_wal_senders=%s with %s in use: Barman needs two "
                                 "(receive-wal and the base backup)" % (max_senders, used_senders)))
    # the replication connection: what pg_hba.conf and the REPLICATION attribute decide
    rc, out, err = run_psql(bin_dir, replication_params, "IDENTIFY_SYSTEM", replication=True)
    if rc == 0 and out.strip():
        fields = out.strip().split("|")
        result.update(system_identifier=fields[0], timeline=int(fields[1]), xlogpos=fields[2])
    elif "pg_hba.conf" in err and "replication" in err:
        problems.append(_problem("replication_refused",
                                 "the server refuses replication connections from this host (%s): pg_hba.conf needs "
                                 "a line such as 'host replication %s <this host>/32 scram-sha-256' (a managed "
                                 "service must allow replication). Server said: %s" % (
                                     pgconn.describe(replication_params), repl_user, err.splitlines()[0])))
    elif re.search(r"superuser or replication role|REPLICATION attribute|permission denied to start WAL sender",
                   err):
        if not any(p["code"] == "no_replication_privilege" for p in problems):
            problems.append(_problem("no_replication_privilege",
                                     "role %s may not start a WAL sender: ALTER ROLE %s REPLICATION. Server said: %s"
                                     % (repl_user, repl_user, err.splitlines()[0])))
    elif "max_wal_senders" in err or "wal_level" in err:
        if not any(p["code"] in ("wal_level", "no_free_wal_sender") for p in problems):
            problems.append(_problem("no_free_wal_sender", "no WAL sender available: %s" % err.splitlines()[0]))
    else:
        problems.append(_problem("replication_refused", "IDENTIFY_SYSTEM over a replication connection failed "
                                 "(%s): %s" % (pgconn.describe(replication_params), err or "exit %d" % rc)))
    # client programs at least as new as the server (pg_receivewal, pg_basebackup refuse older servers' newer WAL)
    try:
        major, text = pgtools.client_version(bin_dir, "pg_receivewal")
        result["client_version"] = text
        if major < pgtools.server_major(version_num):
            problems.append(_problem("client_too_old", "%s is older than the server (%s): install the PostgreSQL %d "
                                     "client programs (baileys.resilience.pg_client)" % (
                                         text, version, pgtools.server_major(version_num))))
    except pgtools.ToolError as exc:
        problems.append(_problem("client_too_old", "no usable pg_receivewal in %s: %s" % (bin_dir, exc)))
    result["problems"] = problems
    result["ok"] = not problems
    result["replication_allowed"] = not any(p["code"] in NOT_ALLOWED for p in problems)
    result["message"] = "; ".join(p["message"] for p in problems) or "streaming replication is possible"
    return result


# --------------------------------------------------------------------------- Barman


class Barman:
    """Runs ``barman`` as its own user, with its config, for one server."""

    def __init__(self, barman=DEFAULT_BARMAN, config=DEFAULT_BARMAN_CONFIG, server=DEFAULT_SERVER,
                 user=DEFAULT_BARMAN_USER):
        self.barman = barman
        self.config = config
        self.server = server
        self.user = user

    def argv(self, *args, **kw):
        argv = [self.barman, "-c", self.config]
        if kw.get("json"):  # -q would silence the JSON too
            argv += ["-f", "json"]
        else:
            argv += ["-q"]
        argv += list(args)
        if self.user and pwd.getpwuid(os.geteuid()).pw_name != self.user:
            argv = ["runuser", "-u", self.user, "--"] + argv
        return argv

    def run(self, *args, **kw):
        timeout = kw.pop("timeout", 3600)
        check = kw.pop("check", True)
        argv = self.argv(*args, **kw)
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                                 check=False, env=dict(os.environ, LC_ALL="C.UTF-8"))
        except subprocess.TimeoutExpired:
            raise PitrError("barman %s did not finish within %d s" % (" ".join(args), timeout))
        except OSError as exc:
            raise PitrError("cannot run %s: %s" % (self.barman, exc))
        if check and out.returncode != 0:
            raise PitrError("barman %s failed (exit %d): %s" % (" ".join(args), out.returncode,
                                                                (out.stderr or out.stdout).strip()[-2000:]))
        return out

    def json(self, *args, **kw):
        out = self.run(*args, json=True, **kw)
        try:
            return json.loads(out.stdout or "{}")
        except ValueError:
            raise PitrError("barman %s: not JSON: %r" % (" ".join(args), out.stdout[:300]))

    def backups(self):
        """The server's backups, newest first, each ``{backup_id, status, begin_time, end_time, ...}``."""
        data = self.json("list-backups", self.server, timeout=300)
        items = data.get(self.server, data) if isinstance(data, dict) else data
        out = []
        for item in items or []:
            if isinstance(item, dict):
                out.append(item)
        return sorted(out, key=lambda b: b.get("backup_id", ""), reverse=True)

    def show(self, backup_id):
        data = self.json("show-backup", self.server, backup_id, timeout=300)
        return data.get(self.server, data)

    def check(self):
        """``{check name: {"status": "OK"|"FAILED", "hint": ...}}`` of ``barman check``."""
        out = self.run("check", self.server, json=True, check=False, timeout=300)
        try:
            data = json.loads(out.stdout or "{}")
        except ValueError:
            detail = (out.stdout or out.stderr)[:300]
            raise PitrError("barman check: not JSON (exit %d): %r" % (out.returncode, detail))
        return data.get(self.server, data)

    def directories(self):
        """The server's directories (``streaming_wals_directory``...): read from Barman's configuration files
        (``show-servers`` connects to the server, which hangs for its connect timeouts when the server is dead),
        else from ``barman show-servers``."""
        import configparser
        import glob

        try:
            parser = configparser.ConfigParser(interpolation=None)
            parser.read(self.config)
            conf_dir = parser.get("barman", "configuration_files_directory", fallback="")
            if conf_dir:
                parser.read(sorted(glob.glob(os.path.join(conf_dir, "*.conf"))))
            home = parser.get("barman", "barman_home")
            backup_dir = parser.get(self.server, "backup_directory", fallback=os.path.join(home, self.server))
            streaming = parser.get(self.server, "streaming_wals_directory",
                                   fallback=os.path.join(backup_dir, "streaming"))
            return {"backup_directory": backup_dir, "streaming_wals_directory": streaming}
        except (configparser.Error, OSError):
            pass
        data = self.json("show-servers", self.server, timeout=120)
        conf = data.get(self.server, data)
        if not conf.get("streaming_wals_directory"):
            raise PitrError("barman show-servers %s: no streaming_wals_directory" % self.server)
        return {k: v for k, v in conf.items() if k.endswith("_directory")}


def failed_checks(checks):
    return sorted(name for name, value in (checks or {}).items()
                  if isinstance(value, dict) and str(value.get("status", "")).upper() != "OK")


# --------------------------------------------------------------------------- restore points


def restore_point(conn_params, name, only_with_slot=None):
    """``SELECT pg_create_restore_point(name)``; with ``only_with_slot``, only when that replication slot exists
    (the PITR role's: without it no WAL is kept and the point would be useless).  Returns ``{created, lsn,
    reason}``."""
    check_point_name(name)
    conn = pgconn.connect(conn_params, autocommit=True)
    try:
        with conn.cursor() as cur:
            if only_with_slot:
                cur.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (only_with_slot,))
                if cur.fetchone() is None:
                    return {"created": False, "lsn": None, "name": name,
                            "reason": "no replication slot %s: point-in-time recovery is not set up" % only_with_slot}
            cur.execute("SELECT pg_create_restore_point(%s)::text, now()", (name,))
            lsn, at = cur.fetchone()
            return {"created": True, "lsn": lsn, "name": name, "at": at.isoformat(), "reason": ""}
    except pgconn.Error as exc:
        reason = pgconn._scrub(exc, conn_params)
        raise PitrError("cannot create restore point %s (%s): %s" % (name, pgconn.describe(conn_params), reason))
    finally:
        conn.close()


# --------------------------------------------------------------------------- metrics

_SLOT_SQL = ("SELECT active, COALESCE(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn), -1)::bigint, "
             "COALESCE(wal_status, ''), COALESCE(safe_wal_size, -1) FROM pg_replication_slots "
             "WHERE slot_name = '%s'")
# what pg_receivewal leaves in Barman's streaming directory once complete: a WAL segment (24 hex digits) or a
# timeline history file; the segment being written ends in .partial
_WAITING_WAL_RE = re.compile(r"^(?:[0-9A-F]{24}|[0-9A-F]{8}\.history)$")


def wal_waiting(directory, now=None):
    """``(files, oldest age in seconds by mtime, 0 when none)`` of the completed WAL files in Barman's streaming
    directory: streamed, not yet archived.  ``barman cron`` archives each only once its ``pre_archive_retry_script``
    (the S3 copy) succeeded, so a failing upload keeps them here.  OSError when the directory cannot be read."""
    now = time.time() if now is None else now
    count, oldest = 0, None
    with os.scandir(directory) as entries:
        for entry in entries:
            if not _WAITING_WAL_RE.match(entry.name):
                continue
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
                mtime = entry.stat(follow_symlinks=False).st_mtime
            except FileNotFoundError:  # archived meanwhile
                continue
            count += 1
            oldest = mtime if oldest is None else min(oldest, mtime)
    return count, 0 if oldest is None else max(0, round(now - oldest, 3))


def collect_metrics(barman, conn_params, slot=DEFAULT_SLOT, bin_dir=None):
    """Metrics (``jobs.prom_text`` form) and a summary: receive-wal state, failed checks, slot lag and state, WAL
    waiting in the streaming directory, last backup."""
    check_slot_name(slot)
    labels = {"server": barman.server}
    summary = {"server": barman.server, "slot": slot}
    try:
        checks = barman.check()
    except PitrError as exc:
        checks = {}
        summary["check_error"] = str(exc)
    failed = failed_checks(checks) if checks else ["barman check"]
    receive = (checks.get("receive_wal_running") or checks.get("receive-wal running") or {}).get("status", "FAILED")
    hints = {name: str(checks[name]["hint"]) for name in failed
             if isinstance(checks.get(name), dict) and checks[name].get("hint")}
    summary.update(failed_checks=failed, receive_wal=receive, failed_check_hints=hints)
    slot_active, lag, wal_status, safe = None, None, "", None
    try:
        rc, out, err = run_psql(pgtools.find_bin_dir(bin_dir, tool="psql"), conn_params, _SLOT_SQL % slot)
        if rc == 0 and out.strip():
            active, lag_s, wal_status, safe_s = out.strip().split("|")
            slot_active, lag, safe = active == "t", int(lag_s), int(float(safe_s))
        elif rc != 0:
            summary["slot_error"] = err
    except (pgtools.ToolError, PitrError, ValueError) as exc:
        summary["slot_error"] = str(exc)
    slot_lost = None if slot_active is None else int(wal_status == "lost")
    summary.update(slot_exists=slot_active is not None, slot_active=slot_active, slot_lag_bytes=lag,
                   slot_wal_status=wal_status, slot_lost=slot_lost)
    waiting, waiting_age, streaming = None, None, None
    try:
        streaming = barman.directories()["streaming_wals_directory"]
        waiting, waiting_age = wal_waiting(streaming)
    except (PitrError, KeyError) as exc:
        summary["wal_waiting_error"] = "no streaming directory: %s" % exc
    except OSError as exc:
        summary["wal_waiting_error"] = "cannot read the streaming directory %s: %s" % (streaming, exc.strerror or exc)
    summary.update(streaming_wals_directory=streaming, wal_waiting_files=waiting,
                   wal_waiting_oldest_age_seconds=waiting_age)
    last_backup = None
    try:
        done = [b for b in barman.backups() if b.get("status") == "DONE"]
        if done:
            summary["last_backup_id"] = done[0].get("backup_id")
            last_backup = _epoch(done[0])
    except PitrError as exc:
        summary["backups_error"] = str(exc)
    metrics = [
        ("baileys_pitr_receive_wal_up", "1 if Barman's receive-wal (WAL streaming) is running.", "gauge",
         [(labels, int(receive == "OK"))]),
        ("baileys_pitr_check_ok", "1 if every barman check passes.", "gauge", [(labels, int(not failed))]),
        ("baileys_pitr_check_failed", "Failed barman checks, one series per check.", "gauge",
         [(dict(labels, check=name), 1) for name in failed]),
        ("baileys_pitr_slot_exists", "1 if the replication slot exists on the server.", "gauge",
         [(dict(labels, slot=slot), int(slot_active is not None))]),
        ("baileys_pitr_slot_active", "1 if a receiver is connected to the slot.", "gauge",
         [(dict(labels, slot=slot), None if slot_active is None else int(slot_active))]),
        ("baileys_pitr_slot_lag_bytes", "WAL the server keeps for the slot (current LSN - restart_lsn).", "gauge",
         [(dict(labels, slot=slot), lag)]),
        ("baileys_pitr_slot_safe_wal_size_bytes", "WAL that may still be written before the slot is lost "
         "(max_slot_wal_keep_size); -1 when unlimited.", "gauge", [(dict(labels, slot=slot), safe)]),
        ("baileys_pitr_slot_lost", "1 if the server invalidated the slot (wal_status lost).", "gauge",
         [(dict(labels, slot=slot), slot_lost)]),
        ("baileys_pitr_wal_waiting_files", "Completed WAL files in the streaming directory, not yet archived.",
         "gauge", [(labels, waiting)]),
        ("baileys_pitr_wal_waiting_oldest_age_seconds", "Age (mtime) of the oldest WAL file waiting in the "
         "streaming directory; 0 when none.", "gauge", [(labels, waiting_age)]),
        ("baileys_pitr_last_backup_timestamp_seconds", "End time of the newest DONE base backup.", "gauge",
         [(labels, last_backup)]),
    ]
    return metrics, summary


def _epoch(backup):
    """End time of a backup as seconds since the epoch (Barman's ``end_time_timestamp``), or None."""
    try:
        return float(backup.get("end_time_timestamp"))
    except (TypeError, ValueError):
        return _backup_epoch(backup.get("end_time") or "")


def _backup_epoch(text):
    import datetime

    for fmt in ("%a %b %d %H:%M:%S %Y", "%Y-%m-%d %H:%M:%S.%f%z", "%Y-%m-%d %H:%M:%S%z", "%Y-%m-%dT%H:%M:%S.%f%z"):
        try:
            value = datetime.datetime.strptime(text.strip(), fmt)
        except ValueError:
            continue
        if value.tzinfo is None:
            value = value.replace(tzinfo=datetime.timezone.utc)
        return round(value.timestamp(), 3)
    return None


# barman check's own names for what assess reports as receive_wal and slot problems
_STREAMING_CHECKS = ("receive_wal_running", "receive-wal running", "replication_slot")


def _size(n):
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return "%.1f %s" % (n / scale, unit)
    return "%d B" % n


def assess(summary, max_slot_lag_bytes=None, max_wal_waiting_seconds=DEFAULT_MAX_WAL_WAITING_SECONDS):
    """What is wrong, from :func:`collect_metrics`' summary: ``[{"name", "status", "detail"}]`` in health's
    form, one entry per problem, so that each is its own alert key.  ``critical`` (the job fails): receive-wal
    not running, the slot missing or lost, its lag over ``max_slot_lag_bytes``; ``warning``: another failed
    barman check (``barman_check:<check>``), completed WAL waiting in the streaming directory for longer than
    ``max_wal_waiting_seconds`` (the S3 upload of ``barman cron`` failing)."""
    out = []
    slot = summary.get("slot")
    if summary.get("receive_wal") != "OK":
        detail = "receive-wal (WAL streaming) is not running: barman check receive_wal_running %s" % (
            summary.get("receive_wal") or "FAILED")
        if summary.get("check_error"):
            detail = "receive-wal state unknown: %s" % summary["check_error"]
        out.append({"name": "receive_wal", "status": "critical", "detail": detail})
    if not summary.get("slot_exists"):
        detail = "replication slot %s does not exist on the database server: no WAL is kept for Barman" % slot
        if summary.get("slot_error"):
            detail = "cannot ask the database server about replication slot %s: %s" % (slot, summary["slot_error"])
        out.append({"name": "slot_missing", "status": "critical", "detail": detail})
    elif summary.get("slot_lost"):
        out.append({"name": "slot_lost", "status": "critical", "detail":
                    "the database server invalidated replication slot %s (wal_status lost): WAL Barman had not "
                    "received is gone, recovery past it needs a new base backup" % slot})
    lag = summary.get("slot_lag_bytes") or 0
    if max_slot_lag_bytes and lag > int(max_slot_lag_bytes):
        out.append({"name": "slot_lag", "status": "critical", "detail":
                    "the database server keeps %d bytes (%s) of WAL for slot %s, %d bytes over the limit of %d "
                    "(pitr_max_slot_lag_bytes)" % (lag, _size(lag), slot, lag - int(max_slot_lag_bytes),
                                                   int(max_slot_lag_bytes))})
    hints = summary.get("failed_check_hints") or {}
    for name in summary.get("failed_checks") or ():
        if name in _STREAMING_CHECKS or name == "barman check":
            continue
        hint = hints.get(name)
        out.append({"name": "barman_check:%s" % name, "status": "warning",
                    "detail": "barman check %s FAILED%s" % (name, " (%s)" % hint if hint else "")})
    age = summary.get("wal_waiting_oldest_age_seconds") or 0
    if max_wal_waiting_seconds and age > float(max_wal_waiting_seconds):
        out.append({"name": "wal_waiting", "status": "warning", "detail":
                    "%s WAL file(s) streamed but not archived, the oldest for %d s (limit %d s): barman cron "
                    "archives a file only once its S3 upload (pre_archive_retry_script) succeeds" % (
                        summary.get("wal_waiting_files"), age, float(max_wal_waiting_seconds))})
    return out


def evaluate(config):
    """``(ok, metrics, summary)`` of one run with the JSON config the role wrote (``pitr.json``): the metrics of
    :func:`collect_metrics` and its summary with ``problems`` (:func:`assess`), ``ok`` (no critical problem),
    ``duration`` and ``at``."""
    barman = Barman(config.get("barman", DEFAULT_BARMAN), config.get("barman_config", DEFAULT_BARMAN_CONFIG),
                    config.get("server", DEFAULT_SERVER), config.get("barman_user", DEFAULT_BARMAN_USER))
    started = time.monotonic()
    metrics, summary = collect_metrics(barman, config.get("conn", {}), config.get("slot", DEFAULT_SLOT),
                                       config.get("pg_bin_dir"))
    problems = assess(summary, config.get("max_slot_lag_bytes"),
                      config.get("max_wal_waiting_seconds", DEFAULT_MAX_WAL_WAITING_SECONDS))
    ok = not any(p["status"] == "critical" for p in problems)
    summary.update(ok=ok, problems=problems, duration=round(time.monotonic() - started, 3), at=jobs.iso())
    return ok, metrics, summary


def metrics_job(config):
    """The older cron job (``python3 -m baileys_resilience.pitr metrics``): :func:`evaluate`, then
    ``<textfile_dir>/baileys_pitr.prom`` with the job metrics; no alerts.  ``(ok, summary)``."""
    ok, metrics, summary = evaluate(config)
    if config.get("textfile_dir"):
        summary["metrics_file"] = jobs.write_textfile(config["textfile_dir"], TEXTFILE_NAME,
                                                      jobs.job_metrics(JOB_NAME, ok, summary["duration"],
                                                                       extra=metrics))
    return ok, summary


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "metrics":
        sys.stderr.write("usage: python3 -m baileys_resilience.pitr metrics CONFIG.json (the older cron line; "
                         "baileys-resilience pitr-metrics also alerts)\n")
        return 2
    try:
        with open(argv[1], encoding="utf-8") as fh:
            config = json.load(fh)
        ok, summary = metrics_job(config)
    except (OSError, ValueError, errors.BaileysResilienceError) as exc:
        sys.stdout.write(json.dumps({"at": jobs.iso(), "ok": False, "error": str(exc)}) + "\n")
        return 1
    sys.stdout.write(json.dumps(summary, sort_keys=True, default=str) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
