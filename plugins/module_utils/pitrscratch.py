# -*- coding: utf-8 -*-
# Copyright: baileys.resilience contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Point-in-time recovery into a scratch PostgreSQL instance on the backup host, then export, import or keep.

No Ansible import.  Never touches the production server's data directory: Barman restores a base backup into a
new directory under ``scratch_dir`` (``barman restore`` with the target), the WAL Barman is still receiving (the
``.partial`` segment of ``receive-wal``) is added to its ``pg_wal`` so that ``latest`` and a target time of a
few seconds ago reach as far as the stream did, and a private PostgreSQL (unix socket in a 0700 directory,
no TCP, ``local all all trust``) replays it as the Barman user.  Then:

* ``export``: the chosen companies' auth state to a directory in the Baileys layout (``authexport``);
* ``import``: the chosen companies back into production (``authexport`` to a private directory, then
  ``authimport`` as a mirror: one transaction, the failover guards: creds never deleted, at most
  ``max_delete_share`` of a company's keys deleted, fingerprints compared after the change); refused while the
  service runs on files (``failover_mode``);
* ``keep``: leave the instance running for inspection (its socket and port are reported);
* ``none``: only report.

It reports the recovered time (the last transaction replayed), the WAL replayed (``redo starts at`` to ``redo
done at``), key and creds counts per company and the seconds each step took; the scratch instance is stopped
and removed unless ``keep``, also when something failed.
"""
from __future__ import absolute_import, division, print_function

import datetime
import glob
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time

from . import authexport, authguards, authimport, authnames, errors, pgconn, pgtools, pitr

__metaclass__ = type

DEFAULT_SCRATCH_DIR = "/var/lib/barman/scratch"
DEFAULT_SCRATCH_PORT = 54329
ACTIONS = ("export", "import", "keep", "none")
_LSN_RE = r"([0-9A-F]+/[0-9A-F]+)"


class RecoveryError(pitr.PitrError):
    """The recovery or what follows it failed; the scratch instance is gone unless ``keep``."""


def lsn_int(text):
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) + int(lo, 16)


def parse_target(target):
    """``latest``, ``time:<ISO 8601>``, ``name:<restore point>``, or a bare ISO time -> (kind, value, epoch)."""
    text = str(target or "latest").strip()
    if text == "latest":
        return "latest", None, None
    if text.startswith("name:"):
        return "name", pitr.check_point_name(text[5:]), None
    if text.startswith("time:"):
        text = text[5:]
    try:
        when = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise RecoveryError("target %r: use latest, name:<restore point> or a time (ISO 8601 with its zone, "
                            "e.g. 2026-03-01T14:05:00+00:00)" % (target,))
    if when.tzinfo is None:
        raise RecoveryError("target time %r has no time zone: add +00:00 (or Z) so it cannot be misread" % (text,))
    return "time", when.isoformat(), when.timestamp()


def choose_backup(backups, kind, epoch, backup_id=None):
    done = [b for b in backups if b.get("status") == "DONE"]
    if backup_id:
        for b in done:
            if b.get("backup_id") == backup_id:
                return b
        raise RecoveryError("no DONE backup %s (have: %s)" % (backup_id, ", ".join(b["backup_id"] for b in done)))
    if kind == "time":
        done = [b for b in done if (pitr._epoch(b) or 0) < epoch]
        if not done:
            raise RecoveryError("no base backup ended before the target time: the earliest point to recover to "
                                "is the end of the oldest backup")
    if not done:
        raise RecoveryError("no DONE base backup: take one (barman backup) first")
    return done[0]


class Scratch:
    """The scratch instance: a data directory restored by Barman, run by ``user`` on a private socket."""

    def __init__(self, base, pg_bin_dir, port=DEFAULT_SCRATCH_PORT, user=pitr.DEFAULT_BARMAN_USER):
        self.base = base
        self.pg_bin_dir = pgtools.find_bin_dir(pg_bin_dir, tool="postgres")
        self.port = int(port)
        self.user = user
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
        self.dir = os.path.join(base, "pitr-%s-%d" % (stamp, os.getpid()))
        self.data = os.path.join(self.dir, "data")
        self.socket = os.path.join(self.dir, "socket")
        self.log = os.path.join(self.dir, "postgresql.log")
        self.started = False

    def _as_user(self, argv):
        if self.user and pwd.getpwuid(os.geteuid()).pw_name != self.user:
            return ["runuser", "-u", self.user, "--"] + argv
        return argv

    def _own(self, path):
        if self.user and os.geteuid() == 0:
            pw = pwd.getpwnam(self.user)
            os.chown(path, pw.pw_uid, pw.pw_gid)

    def prepare(self):
        if not os.path.isabs(self.base):
            raise RecoveryError("scratch_dir must be absolute, got %r" % self.base)
        os.makedirs(self.base, mode=0o700, exist_ok=True)
        self._own(self.base)
        os.mkdir(self.dir, 0o700)
        os.mkdir(self.socket, 0o700)
        self._own(self.dir)
        self._own(self.socket)

    def own_tree(self):
        self._own(self.dir)
        for root, dirs, files in os.walk(self.data):
            for name in dirs + files:
                self._own(os.path.join(root, name))
        self._own(self.data)

    def add_partial_wal(self, streaming_dir):
        """Copy receive-wal's ``.partial`` segment(s) into ``pg_wal`` under their full names: recovery reads
        them when the archive has no such segment (the WAL streamed since the last completed segment)."""
        added = []
        pg_wal = os.path.join(self.data, "pg_wal")
        for path in sorted(glob.glob(os.path.join(streaming_dir, "*.partial"))):
            name = os.path.basename(path)[:-len(".partial")]
            dest = os.path.join(pg_wal, name)
            if os.path.exists(dest):
                continue
            shutil.copyfile(path, dest + ".tmp")
            os.chmod(dest + ".tmp", 0o600)
            self._own(dest + ".tmp")
            os.rename(dest + ".tmp", dest)
            added.append(name)
        return added

    def configure(self):
        """A private instance: no TCP, socket in a 0700 directory, trust only there, nothing sent anywhere."""
        conf = os.path.join(self.data, "postgresql.conf")
        if not os.path.exists(conf):  # a Debian-layout server keeps its config outside the data directory
            with open(conf, "w") as fh:
                fh.write("# written by baileys.resilience pitr_restore (the backup had no postgresql.conf)\n")
            self._own(conf)
        hba = os.path.join(self.data, "pg_hba.conf")
        if os.path.exists(hba):
            os.replace(hba, hba + ".production")
        with open(hba, "w") as fh:
            fh.write("# baileys.resilience pitr_restore: the scratch instance is reachable only on its socket\n"
                     "local all all trust\n")
        self._own(hba)
        with open(os.path.join(self.data, "postgresql.auto.conf"), "a") as fh:
            fh.write("\n# baileys.resilience pitr_restore: scratch instance\n"
                     "port = %d\nlisten_addresses = ''\nunix_socket_directories = '%s'\n"
                     "hba_file = '%s'\nident_file = ''\nhot_standby = off\narchive_mode = off\n"
                     "shared_preload_libraries = ''\nlogging_collector = off\nssl = off\n"
                     "max_wal_senders = 0\nwal_level = replica\nsynchronous_standby_names = ''\n"
                     "primary_conninfo = ''\nprimary_slot_name = ''\ncluster_name = 'baileys-pitr-scratch'\n"
                     % (self.port, self.socket, hba))

    def start(self, timeout):
        argv = self._as_user([os.path.join(self.pg_bin_dir, "pg_ctl"), "-D", self.data, "-l", self.log, "-w",
                              "-t", str(int(timeout)), "start"])
        out = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False)
        self.started = True
        if out.returncode != 0:
            raise RecoveryError("the scratch instance did not start (pg_ctl exit %d): %s" % (
                out.returncode, self.log_tail()))

    def wait_promoted(self, conn_params, timeout):
        """Poll until the replay is over and the instance accepts connections (hot standby is off)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return pgconn.connect(conn_params, autocommit=True)
            except pgconn.PgError as exc:
                if not os.path.exists(os.path.join(self.data, "postmaster.pid")):
                    raise RecoveryError("the scratch instance stopped during recovery: %s" % self.log_tail())
                if "not accepting connections" not in str(exc) and "starting up" not in str(exc):
                    raise
                if time.monotonic() > deadline:
                    raise RecoveryError("the scratch instance did not finish recovery within %d s: %s" % (
                        timeout, self.log_tail()))
            time.sleep(0.2)

    def stop(self):
        if os.path.exists(os.path.join(self.data, "postmaster.pid")):
            subprocess.run(self._as_user([os.path.join(self.pg_bin_dir, "pg_ctl"), "-D", self.data, "-m",
                                          "immediate", "-w", "stop"]),
                           capture_output=True, stdin=subprocess.DEVNULL, check=False)

    def remove(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_text(self):
        try:
            with open(self.log, encoding="utf-8", errors="replace") as fh:
                return fh.read()
        except OSError:
            return ""

    def log_tail(self, lines=15):
        return "\n".join(self.log_text().strip().splitlines()[-lines:])

    def last_commit(self):
        """The time of the last commit in ``pg_wal``, read with pg_waldump before the instance starts (a recovery
        to the end of the WAL is a crash recovery, which does not log it, and recycles the segments)."""
        pg_wal = os.path.join(self.data, "pg_wal")
        segments = sorted(n for n in os.listdir(pg_wal) if re.match(r"^[0-9A-F]{24}$", n))
        if not segments:
            return None
        try:
            out = subprocess.run([pgtools.tool_path(self.pg_bin_dir, "pg_waldump"), "-p", pg_wal, "-r",
                                  "Transaction", segments[0], segments[-1]],
                                 capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL, check=False)
        except (OSError, subprocess.TimeoutExpired, pgtools.ToolError):
            return None
        found = re.findall(r"COMMIT (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)? [A-Za-z0-9+:-]+)", out.stdout)
        return found[-1] if found else None

    def conn_params(self, user, dbname):
        return {"login_unix_socket": self.socket, "login_port": self.port, "login_user": user, "login_db": dbname}


def replay_report(log):
    """What the scratch instance's log says about the replay."""
    out = {}
    m = re.search(r"redo starts at " + _LSN_RE, log)
    if m:
        out["redo_start_lsn"] = m.group(1)
    m = re.search(r"redo done at " + _LSN_RE, log)
    if m:
        out["redo_end_lsn"] = m.group(1)
    if "redo_start_lsn" in out and "redo_end_lsn" in out:
        out["wal_replayed_bytes"] = lsn_int(out["redo_end_lsn"]) - lsn_int(out["redo_start_lsn"])
    m = re.search(r"last completed transaction was at log time (\S+ \S+)", log)
    if m:
        out["last_transaction_time"] = m.group(1)
    m = re.search(r"recovery stopping (before|after) (?:commit|abort) of transaction (\d+), time (\S+ \S+)", log)
    if m:
        out["stopped"] = "%s transaction %s at %s" % m.groups()
    out["restored_segments"] = len(set(re.findall(r'restored log file "([0-9A-F]{24})"', log)))
    return out


def company_counts(conn, store, companies=None):
    """``{company: {"keys": n, "creds": bool}}`` of the recovered store (all companies, or the chosen ones)."""
    sql = pgconn.sql
    out = {}
    with conn.cursor() as cur:
        where, args = pgconn.company_filter(companies or None)
        cur.execute(sql.SQL("SELECT company_id, count(*) FROM {}{} GROUP BY company_id").format(store.keys, where),
                    args)
        for cid, n in cur.fetchall():
            out.setdefault(cid, {"keys": 0, "creds": False})["keys"] = int(n)
        cur.execute(sql.SQL("SELECT company_id FROM {}{}").format(store.auth, where), args)
        for (cid,) in cur.fetchall():
            out.setdefault(cid, {"keys": 0, "creds": False})["creds"] = True
        for cid in companies or []:
            out.setdefault(cid, {"keys": 0, "creds": False})
    return out


def recover(barman, target="latest", action="none", companies=None, scratch_dir=DEFAULT_SCRATCH_DIR,
            pg_bin_dir=None, scratch_port=DEFAULT_SCRATCH_PORT, scratch_login_user="postgres", dbname=None,
            store_params=None, export_dest=None, export_options=None, prod_conn_params=None, max_delete_share=0.5,
            failover_mode=None, backup_id=None, timeout=1800, check_mode=False, run_as=None):
    """Recover ``barman.server`` to ``target`` into a scratch instance and do ``action``.  See the module doc."""
    if action not in ACTIONS:
        raise RecoveryError("action must be one of %s" % ", ".join(ACTIONS))
    kind, value, epoch = parse_target(target)
    companies = list(companies or [])
    for cid in companies:
        authnames.check_company_id(cid)
    if action in ("export", "import") and not companies:
        raise RecoveryError("%s needs the companies to bring back (companies)" % action)
    if action == "export" and not export_dest:
        raise RecoveryError("export needs export_dest")
    if action == "import":
        if not prod_conn_params:
            raise RecoveryError("import needs the production connection")
        if failover_mode not in (None, "", "postgres"):
            raise RecoveryError("the failover state is %s: the service does not read the store now, an import "
                                "would be overwritten by the return; use action=export instead" % failover_mode)
    store_params = store_params or {}
    store = pgconn.Store.from_params(store_params)
    t0 = time.monotonic()
    steps = {}
    result = {"target": target, "target_kind": kind, "target_value": value, "action": action,
              "server": barman.server, "companies": {}, "kept": False}
    if check_mode:
        backups = barman.backups()
        chosen = choose_backup(backups, kind, epoch, backup_id)
        result.update(backup_id=chosen["backup_id"], changed=False, check_mode=True)
        return result
    # completed segments still in the streaming directory go to the archive first
    barman.run("archive-wal", barman.server, timeout=600)
    dirs = barman.directories()
    chosen = choose_backup(barman.backups(), kind, epoch, backup_id)
    result["backup_id"] = chosen["backup_id"]
    result["backup_end_time"] = chosen.get("end_time")
    steps["select"] = round(time.monotonic() - t0, 3)
    scratch = Scratch(scratch_dir, pg_bin_dir, scratch_port, run_as or barman.user)
    keep = action == "keep"
    try:
        scratch.prepare()
        args = ["restore", barman.server, chosen["backup_id"], scratch.data]
        if kind == "time":
            args += ["--target-time", value, "--target-action", "promote"]
        elif kind == "name":
            args += ["--target-name", value, "--target-action", "promote"]
        ts = time.monotonic()
        if scratch.user != barman.user:  # Barman writes as its user; the instance runs as another
            os.chown(scratch.dir, pwd.getpwnam(barman.user).pw_uid, -1)
        barman.run(*args, timeout=timeout)
        if scratch.user != barman.user:
            scratch.own_tree()
        steps["restore_base_backup"] = round(time.monotonic() - ts, 3)
        result["partial_wal_added"] = scratch.add_partial_wal(dirs["streaming_wals_directory"])
        scratch.configure()
        last_commit = scratch.last_commit() if kind == "latest" else None
        ts = time.monotonic()
        scratch.start(timeout)
        conn_params = scratch.conn_params(scratch_login_user, dbname or "postgres")
        conn = scratch.wait_promoted(conn_params, timeout)
        steps["replay"] = round(time.monotonic() - ts, 3)
        result.update(replay_report(scratch.log_text()))
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT pg_last_xact_replay_timestamp(), pg_is_in_recovery()")
                replayed_at, in_recovery = cur.fetchone()
            if in_recovery:
                raise RecoveryError("the scratch instance is still in recovery (the target was not reached)")
            result["recovered_time"] = (replayed_at.isoformat() if replayed_at else
                                        result.get("last_transaction_time") or last_commit)
            result["companies"] = company_counts(conn, store, companies or None)
        finally:
            conn.close()
        ts = time.monotonic()
        if action == "export":
            opts = authexport.ExportOptions(export_dest, source_label="pitr", **(export_options or {}))
            exported = authexport.export_from_database(conn_params, store_params, opts, companies=companies)
            result["export"] = {"dest": export_dest, "totals": exported.get("totals")}
        elif action == "import":
            result["import"] = _import(scratch, conn_params, store_params, prod_conn_params, companies,
                                       max_delete_share)
        steps[action] = round(time.monotonic() - ts, 3)
        if keep:
            result["kept"] = True
            psql = "psql -h %s -p %d -U %s %s" % (scratch.socket, scratch.port, scratch_login_user,
                                                  dbname or "postgres")
            result["scratch"] = {"data": scratch.data, "socket": scratch.socket, "port": scratch.port,
                                 "log": scratch.log, "user": scratch.user, "psql": psql}
    except (pitr.PitrError, pgconn.PgError, authnames.AuthStateError, OSError) as exc:
        if isinstance(exc, RecoveryError) or isinstance(exc, errors.BaileysResilienceError):
            message = str(exc)
        else:
            message = "%s: %s" % (type(exc).__name__, exc)
        if not keep:
            scratch.remove()
        raise RecoveryError("recovery to %s failed: %s%s" % (target, message, "" if keep else
                                                             " (the scratch instance was removed)"))
    finally:
        if not keep:
            scratch.remove()
    steps["total"] = round(time.monotonic() - t0, 3)
    result["seconds"] = steps
    result["changed"] = action in ("import", "export", "keep") and (
        action != "import" or bool(result["import"].get("changed")))
    return result


def _import(scratch, conn_params, store_params, prod_conn_params, companies, max_delete_share):
    """Export the companies from the scratch instance to a private directory, import that as a mirror."""
    tmp = tempfile.mkdtemp(prefix="import-", dir=scratch.dir)
    os.chmod(tmp, 0o700)
    opts = authexport.ExportOptions(tmp, source_label="pitr")
    authexport.export_from_database(conn_params, store_params, opts, companies=companies)
    missing = [cid for cid in companies if not os.path.isdir(os.path.join(tmp, cid))]
    if missing:
        raise RecoveryError("not in the recovered state (no creds, no keys at the target): %s; nothing imported"
                            % ", ".join(missing))
    guards = authguards.ImportGuards(max_delete_share=max_delete_share)
    out = authimport.import_auth_state(prod_conn_params, store_params, tmp, companies=companies, prune=True,
                                       guards=guards)
    fields = ("inserted", "updated", "deleted", "unchanged", "creds")
    companies = {c["company_id"]: {k: c.get(k) for k in fields} for c in out["companies"]}
    return {"changed": out["changed"], "totals": out["totals"], "companies": companies}
