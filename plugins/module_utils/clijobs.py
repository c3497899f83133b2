# -*- coding: utf-8 -*-
# Copyright: baileys.resilience contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The host tool's jobs: what ``baileys-resilience backup|replicate|fetch|reencrypt|verify|cleanup|health|export|
import|pitr-metrics`` does.

:func:`run_job` wraps every job: its own lock (a second concurrent run exits 75 at once), one
structured log line per step on stderr (JSON lines or logfmt, secrets masked), Sentry Crons and
Telegram when configured, a node_exporter textfile when ``textfile_dir`` is set, a non-zero exit
on failure.  A job function takes ``(ctx, log)`` (:class:`Context`: the parsed arguments and the
config of cliconfig.py) and returns an :class:`Outcome`.  Defaults come from the core rooms that
define them.  Part of ``baileys-resilience`` (cli.py); no Ansible import, no module imports it.
"""
from __future__ import absolute_import, division, print_function

import json
import os
import re
import socket
import time

from . import alerts as alerts_mod
from . import alertstate, authstate, backup_format, cleanup, health, jobs, pgconn, probe
from . import cliconfig

__metaclass__ = type

ConfigError = cliconfig.ConfigError

PROG = "baileys-resilience"
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_LOCKED = 75  # EX_TEMPFAIL: another run of the job holds the lock
CONNECT_TIMEOUT = 10  # seconds, unless the config sets connect_timeout
WATCH_INTERVAL = 10  # seconds between health --watch rounds, unless set


def _opt(args, name, default=None):
    value = getattr(args, name, None)
    return default if value is None else value


# --------------------------------------------------------------------------- jobs


class Context:
    def __init__(self, args, config, stdout, stderr, config_path=None):
        self.args = args
        self.config = config
        self.config_path = config_path  # config.yml: the files next to it (pitr.json) are found from it
        self.stdout = stdout
        self.stderr = stderr
        self.secrets = cliconfig.config_secrets(config)
        self.conn_params, self.store_params = pgconn.split_params(config)
        if self.conn_params.get("connect_timeout") is None:
            self.conn_params["connect_timeout"] = CONNECT_TIMEOUT
        self.conn_params["connect_params"] = dict(config.get("connect_params") or {})
        self.log_format = getattr(args, "log_format", None) or config.get("log_format") or jobs.DEFAULT_LOG_FORMAT
        self.lock_dir = getattr(args, "lock_dir", None) or config.get("lock_dir") or jobs.DEFAULT_LOCK_DIR
        self.json = bool(getattr(args, "json", False))
        self.host = config.get("hostname") or socket.gethostname()
        # what must survive a restart (alert state, probe histogram): on disk, 0700
        self.state_dir = config.get("state_dir") or alertstate.DEFAULT_STATE_DIR
        self.clock = None  # seconds since the epoch for the alert state (tests set a fake one)

    def add_secret(self, secret, log=None):
        """A secret a job reads elsewhere (pitr.json's password): masked like the config's, in the log, the
        output and the alerts (run_job hands ``secrets`` to them after the job)."""
        if secret and str(secret) not in self.secrets:
            self.secrets.append(str(secret))
            if log is not None:
                log.add_secret(secret)

    def section(self, name):
        return self.config.get(name) or {}

    def backup_prefix(self):
        return self.section("backup").get("prefix") or backup_format.DEFAULT_PREFIX

    def need(self, key, what):
        value = self.config.get(key)
        if not value:
            raise ConfigError("%s needs %s in the config file" % (what, key))
        return value


def _previous_sample(path, metric, job):
    """A sample from the previous textfile, to carry a last-success time over a failed run."""
    try:
        with open(path) as fh:
            for line in fh:
                m = re.match(r'^%s\{job="%s"\} (\S+)$' % (re.escape(metric), re.escape(job)), line.strip())
                if m:
                    return float(m.group(1))
    except (OSError, ValueError):
        pass
    return None


def _write_metrics(ctx, log, job, ok, duration, extra, textfile=None):
    directory, name = textfile or (None, None)
    directory = directory or ctx.config.get("textfile_dir")
    if not directory:
        return
    name = name or "baileys_resilience_%s.prom" % job
    metrics = jobs.job_metrics(job, ok, duration, extra=extra)
    if not ok:
        last = _previous_sample(os.path.join(directory, name), "baileys_resilience_job_last_success_timestamp_seconds",
                                job)
        if last is not None:
            metrics.append(("baileys_resilience_job_last_success_timestamp_seconds",
                            "End time of the last successful run.", "gauge", [({"job": job}, last)]))
    try:
        with log.step("textfile", path=os.path.join(directory, name)):
            jobs.write_textfile(directory, name, metrics)
    except (OSError, ValueError):
        pass  # logged by the step; metrics never change the job's result


class Outcome:
    """What a job function returns.

    ``checks`` (health's form ``[{"name", "status", "detail", "company_id"?}]``): one alert key per check, the
    checks at or above ``notify_on`` alert (default: the config's ``health.notify_on``).  ``textfile``
    ``(directory, name)``: where the job metrics go, instead of ``<textfile_dir>/baileys_resilience_<job>.prom``
    (either part None: the default).
    """

    def __init__(self, result, summary, exit_code=EXIT_OK, checkin_ok=None, notify=None, metrics=None,
                 checks=None, notify_on=None, textfile=None):
        self.result = result
        self.summary = summary
        self.exit_code = exit_code
        self.checkin_ok = exit_code == EXIT_OK if checkin_ok is None else checkin_ok
        self.notify = (exit_code != EXIT_OK) if notify is None else notify
        self.metrics = metrics or []
        self.checks = checks
        self.notify_on = notify_on
        self.textfile = textfile


# jobs whose textfile holds more than the job metrics (pitr-metrics: the pitr gauges the pitr alerts read): a run
# that raised leaves the file as it is (its last run time goes stale: JobMissed) instead of dropping them
KEEP_TEXTFILE_ON_ERROR = ("pitr-metrics",)
# Sentry Crons schedules of the jobs alerts.DEFAULT_SCHEDULES does not know (alerts.sentry.schedules wins)
SCHEDULES = {"pitr-metrics": "* * * * *"}


def make_alerts(ctx, log, alerting=True, job=None):
    """The job's alerts; with a channel configured, every decision goes through the alert state on disk
    (``alerts.state_file``, default ``<state_dir>/alert-state.json``; ``state_file: ""`` turns it off)."""
    config = ctx.config.get("alerts") if alerting else None
    channels = bool(config) and bool((config.get("sentry") or {}).get("dsn") or
                                     (config.get("telegram") or {}).get("bot_token"))
    default = os.path.join(ctx.state_dir, alertstate.DEFAULT_STATE_FILE_NAME) if channels else None
    if channels and job in SCHEDULES and (config.get("sentry") or {}).get("dsn"):
        sentry = dict(config["sentry"])
        sentry["schedules"] = dict({job: SCHEDULES[job]}, **(sentry.get("schedules") or {}))
        config = dict(config, sentry=sentry)
    return alerts_mod.Alerts(config, log=log, secrets=ctx.secrets, default_state_file=default, clock=ctx.clock)


def run_job(ctx, job, func, lock=True, alerting=True):
    """Lock, log, alert and report around ``func(ctx, log) -> Outcome``; returns the exit code."""
    log = jobs.JobLog(job, stream=ctx.stderr, fmt=ctx.log_format, secrets=ctx.secrets)
    alerts = make_alerts(ctx, log, alerting, job)
    started = time.monotonic()
    job_lock = jobs.JobLock(job, ctx.lock_dir)
    if lock:
        try:
            job_lock.acquire()
        except jobs.LockBusy as exc:
            log.emit("lock", "busy", error=str(exc), exit_code=EXIT_LOCKED)
            ctx.stderr.write("%s: %s\n" % (PROG, exc))
            alerts.telegram("\u26a0\ufe0f baileys-resilience %s on %s did not start: %s" % (job, ctx.host, exc),
                            alert_key=(job, "lock_busy", ""), level="warning")
            alerts.flush()
            return EXIT_LOCKED
        log.emit("lock", "ok", path=job_lock.path)
    outcome = None
    error = None
    try:
        log.emit("start", "ok", host=ctx.host, pid=os.getpid())
        alerts.job_started(job)
        try:
            outcome = func(ctx, log)
        except Exception as exc:  # noqa: BLE001 - every failure is reported, logged and turned into exit 1
            error = exc
            message = jobs.scrub_text("%s" % exc, ctx.secrets)
            if not isinstance(exc, (pgconn.PgError, authstate.AuthStateError, cleanup.CleanupError,
                                    health.HealthError, ConfigError, OSError)):
                message = "%s: %s" % (type(exc).__name__, message)
            result = getattr(exc, "result", None) or {}
            outcome = Outcome(dict(result, failed=True, msg=message), message, EXIT_FAILED)
            log.emit(job, "error", error=message)
        duration = time.monotonic() - started
        if error is None or job not in KEEP_TEXTFILE_ON_ERROR:
            _write_metrics(ctx, log, job, outcome.exit_code == EXIT_OK, duration, outcome.metrics,
                           outcome.textfile)
        alerts.secrets.extend(s for s in ctx.secrets if s not in alerts.secrets)  # ctx.add_secret during the job
        if alerting:
            alerts.job_finished(job, outcome.checkin_ok, outcome.summary, exc=error, host=ctx.host,
                                warn=outcome.notify and outcome.checkin_ok,
                                context={"host": ctx.host, "exit_code": outcome.exit_code},
                                checks=outcome.checks if error is None else None,
                                notify_on=outcome.notify_on or ctx.section("health").get("notify_on")
                                or cliconfig.NOTIFY_ON[0])
        log.emit("finish", "ok" if outcome.exit_code == EXIT_OK else "error", time.monotonic() - started,
                 exit_code=outcome.exit_code, alert_failures=len(alerts.delivery_failures) or None)
    finally:
        job_lock.release()
    _print_outcome(ctx, job, outcome)
    return outcome.exit_code


def _print_outcome(ctx, job, outcome):
    if ctx.json:
        ctx.stdout.write(json.dumps(jobs.scrub(outcome.result, ctx.secrets), indent=2, sort_keys=True,
                                    default=str) + "\n")
    else:
        ctx.stdout.write("%s %s: %s\n" % (PROG, job, jobs.scrub_text(outcome.summary, ctx.secrets)))
    ctx.stdout.flush()


def job_backup(ctx, log):
    from . import backup

    retention = ctx.section("retention")
    with log.step("backup") as step:
        result = backup.run_backup(
            ctx.conn_params, ctx.store_params, ctx.need("backup_dir", "backup"),
            pg_bin_dir=ctx.config.get("pg_bin_dir"),
            prefix=ctx.backup_prefix(), force=bool(ctx.args.force),
            keep_daily=int(retention.get("keep_daily", backup.DEFAULT_KEEP_DAILY)),
            keep_monthly=int(retention.get("keep_monthly", backup.DEFAULT_KEEP_MONTHLY)),
            check_mode=bool(ctx.args.check),
            # s3.encryption.encrypt_local: the local dump is kept as age ciphertext only
            encryption=ctx.section("s3").get("encryption"))
        manifest = result.get("manifest") or {}
        step.counts(changed=result.get("changed"), backup=result.get("backup"), size=manifest.get("size"),
                    deleted=len(result.get("deleted") or []), skipped=result.get("skipped"),
                    encrypted=result.get("encrypted"))
    summary = result.get("msg") or "%s %s" % ("backup" if result.get("changed") else "no new backup",
                                              result.get("backup") or "")
    s3_cfg = ctx.section("s3")
    if s3_cfg.get("targets") and s3_cfg.get("after_backup", True) and not ctx.args.check:
        # chained: every successful backup is replicated at once; a replication failure fails the job
        result["replication"] = _replicate(ctx, log)
        summary += "; replicated (%d uploaded, all targets verified)" % result["replication"].get("uploaded", 0)
    metrics = []
    size = manifest.get("size")
    if isinstance(size, int) and not isinstance(size, bool):
        metrics.append(("baileys_resilience_backup_last_size_bytes", "Size of the newest backup the last run made "
                        "or found.", "gauge", [({}, size)]))
        metrics.append(("baileys_resilience_backup_last_keys", "Keys rows in that backup.", "gauge",
                        [({}, (manifest.get("counts") or {}).get("keys"))]))
    return Outcome(result, summary, metrics=metrics)


def _s3_settings(ctx, check_mode=False):
    from . import s3

    cfg = ctx.section("s3")
    if not cfg.get("targets"):
        raise ConfigError("no S3 targets: the s3 section of the config needs targets")
    extra = dict(cfg.get("settings") or {})
    for key in ("verify_download", "verify_existing"):
        if cfg.get(key) is not None:
            extra[key] = bool(cfg[key])
    settings = s3.Settings(check_mode=check_mode, **extra)
    return s3, cfg, settings


def _replicate(ctx, log, check_mode=False):
    s3, cfg, settings = _s3_settings(ctx, check_mode)
    prefix = cfg.get("name_prefix") or ctx.backup_prefix()
    with log.step("replicate") as step:
        result = s3.replicate(ctx.need("backup_dir", "replicate"), cfg["targets"], settings, name_prefix=prefix,
                              encryption=cfg.get("encryption"))
        step.counts(uploaded=result.get("uploaded"), failures=len(result.get("failures") or []),
                    targets=len(result.get("targets") or []), encrypted=result.get("encrypted"))
    if not result.get("ok"):
        error = s3.S3Error(s3.failure_message(result))
        error.result = result
        raise error
    return result


def job_replicate(ctx, log):
    result = _replicate(ctx, log, bool(ctx.args.check))
    summary = "%d object(s) %s to %d target(s), all verified" % (
        result.get("uploaded", 0), "would be uploaded" if ctx.args.check else "uploaded",
        len(result.get("targets") or []))
    return Outcome(result, summary, metrics=[
        ("baileys_resilience_replicate_uploaded_objects", "Objects uploaded by the last replication run.", "gauge",
         [({}, result.get("uploaded", 0))])])


def job_fetch(ctx, log):
    s3, cfg, settings = _s3_settings(ctx, bool(ctx.args.check))
    dest = ctx.args.dest or cfg.get("fetch_dir")
    if not dest:
        raise ConfigError("fetch needs --dest or s3.fetch_dir in the config")
    prefix = cfg.get("name_prefix") or ctx.backup_prefix()
    identities = s3.load_identities(identity_file=getattr(ctx.args, "identity_file", None))
    with log.step("fetch") as step:
        result = s3.fetch(dest, cfg["targets"], settings, name_prefix=prefix, identities=identities)
        step.counts(target=result.get("target"), key=result.get("key"), tried=len(result.get("tried") or []))
    return Outcome(result, "%s from %s (%s)" % (
        result.get("path") or result.get("key"), result.get("target"),
        "check mode" if ctx.args.check else "decrypted, sha256 verified" if result.get("decrypted")
        else "sha256 verified"))


def job_reencrypt(ctx, log):
    """Key rotation: re-encrypt the retained S3 objects to the current s3.encryption.recipients."""
    s3, cfg, settings = _s3_settings(ctx)
    identities = s3.load_identities(identity_file=ctx.args.identity_file)
    prefix = cfg.get("name_prefix") or ctx.backup_prefix()
    with log.step("reencrypt") as step:
        result = s3.reencrypt(cfg["targets"], cfg.get("encryption"), identities, settings, name_prefix=prefix,
                              work_dir=ctx.args.work_dir)
        step.counts(reencrypted=result["reencrypted"], failures=len(result["failures"]))
    if not result["ok"]:
        error = s3.S3Error("re-encryption incomplete: %s" % "; ".join(
            "%s: %s: %s" % (f["target"], f["key"], f["error"]) for f in result["failures"][:20]))
        error.result = result
        raise error
    current = sum(t["current"] for t in result["targets"])
    return Outcome(result, "%d backup(s) re-encrypted to %s, %d already current" % (
        result["reencrypted"], ", ".join(result["recipients"]), current))


def _newest_backup_path(backup, backup_dir, prefix):
    found = backup.newest_valid_backup(backup_dir, prefix=prefix)
    if isinstance(found, dict):
        found = found.get("path") or found.get("file")
        if found and not os.path.isabs(found):
            found = os.path.join(backup_dir, found)
    return found


def _verify_maybe_encrypted(ctx, backup, path):
    from . import agecrypt, backupseal

    def verify(p):
        return backup.verify_backup(p, ctx.conn_params, ctx.store_params, pg_bin_dir=ctx.config.get("pg_bin_dir"))

    if not backupseal.is_encrypted_backup(path):
        return verify(path)
    identities = agecrypt.load_identities(identity_file=getattr(ctx.args, "identity_file", None))
    if not identities:
        return backupseal.ciphertext_check(path)
    with backupseal.decrypted_backup(path, identities) as plain:
        result = verify(plain)
    result.update(backup=path, encrypted=True, decrypted=True)
    return result


def job_verify(ctx, log):
    from . import backup

    path = ctx.args.backup_path
    if not path:
        backup_dir = ctx.need("backup_dir", "verify without a BACKUP path")
        with log.step("find_backup") as step:
            path = _newest_backup_path(backup, backup_dir, ctx.backup_prefix())
            step.counts(path=path)
        if not path:
            raise ConfigError("no valid backup found in %s" % backup_dir)
    with log.step("verify", path=path) as step:
        result = _verify_maybe_encrypted(ctx, backup, path)
        step.counts(ok=result.get("ok", result.get("valid")), decrypted=result.get("decrypted"))
    failed = result.get("failed") or result.get("ok") is False or result.get("valid") is False
    summary = "%s %s" % ("verified" if not failed else "VERIFY FAILED for", path)
    if failed and result.get("msg"):
        summary += ": %s" % result["msg"]
    return Outcome(result, summary, EXIT_FAILED if failed else EXIT_OK)


def job_cleanup(ctx, log):
    c = ctx.section("cleanup")
    args = ctx.args
    confirm = args.confirm_large_delete if args.confirm_large_delete is not None else c.get("confirm_large_delete")
    try:
        result = cleanup.cleanup_keys(
            ctx.conn_params, ctx.store_params,
            older_than_days=_opt(args, "older_than_days", c.get("older_than_days", cleanup.DEFAULT_OLDER_THAN_DAYS)),
            age_column=_opt(args, "age_column", c.get("age_column", cleanup.DEFAULT_AGE_COLUMN)),
            batch_size=_opt(args, "batch_size", c.get("batch_size", cleanup.DEFAULT_BATCH_SIZE)),
            max_delete=_opt(args, "max_delete", c.get("max_delete", cleanup.DEFAULT_MAX_DELETE)),
            confirm_large_delete=bool(confirm), companies=args.companies or c.get("companies"),
            vacuum=c.get("vacuum", True), check_mode=bool(args.check), log=log)
    except cleanup.LargeDeleteRefused as exc:
        r = exc.result
        summary = "%s (age buckets of the candidates: %s)" % (exc, ", ".join(
            "%s=%d" % kv for kv in (r.get("candidate_age_buckets") or {}).items()))
        return Outcome(dict(r, failed=True, msg=str(exc)), summary, EXIT_FAILED,
                       metrics=_cleanup_metrics(r))
    for warning in result.get("warnings", []):
        log.emit("warning", "warning", message=warning)
    verb = "would delete" if args.check else "deleted"
    n = result["would_delete"] if args.check else result["deleted"]
    summary = "%s %d keys in %d batches (%s); keys table %d -> %d bytes" % (
        verb, n, result["batches"], ", ".join("%s=%d" % kv for kv in sorted(
            (result.get("candidates_by_type") if args.check else result.get("deleted_by_type") or {}).items()))
        or "none", result["sizes_before"]["total_bytes"], result["sizes_after"]["total_bytes"])
    summary += "\nretention rules (docs/key-retention.md):\n" + cleanup.rules_text(result["rules"])
    return Outcome(result, summary, metrics=_cleanup_metrics(result))


def _cleanup_metrics(r):
    return [
        ("baileys_resilience_cleanup_deleted_keys", "Keys deleted by the last cleanup run.", "gauge",
         [({}, r.get("deleted", 0))]),
        ("baileys_resilience_cleanup_candidate_keys", "Keys the last cleanup run found old enough to delete.",
         "gauge", [({}, r.get("would_delete", 0))]),
        ("baileys_resilience_cleanup_stopped", "1 if the last cleanup stopped at max_delete.", "gauge",
         [({}, int(bool(r.get("stopped"))))]),
        ("baileys_resilience_cleanup_kept_old_keys", "Old keys the last cleanup run kept, per retention rule.",
         "gauge", [({"rule": rule["name"]}, rule["kept_old"]) for rule in r.get("rules", [])]),
        ("baileys_resilience_keys_table_size_bytes", "Keys table size after the last cleanup.", "gauge",
         [({}, (r.get("sizes_after") or {}).get("total_bytes"))]),
    ]


def _collect_health(ctx):
    h = ctx.section("health")
    args = ctx.args
    verify = args.verify_checksum if args.verify_checksum is not None else h.get("verify_checksum", False)
    return health.collect(ctx.conn_params, ctx.store_params, backup_dir=ctx.config.get("backup_dir"),
                          backup_prefix=ctx.backup_prefix(),
                          probes=_opt(args, "probes", h.get("probes", health.DEFAULT_PROBES)),
                          thresholds=h.get("thresholds"), verify_checksum=bool(verify))


def job_health(ctx, log):
    with log.step("collect") as step:
        result = _collect_health(ctx)
        step.counts(health=result["status"], keys=result["totals"].get("keys"),
                    p95_ms=(result["latency_ms"] or {}).get("p95"))
    bad = ["%s: %s" % (c["name"], c["detail"]) for c in result["checks"] if c["status"] != "ok"]
    summary = "health %s%s" % (result["status"].upper(), (" - " + "; ".join(bad)) if bad else "")
    if not ctx.json:
        summary = health.render_text(result).rstrip("\n")
    notify_on = ctx.section("health").get("notify_on", cliconfig.NOTIFY_ON[0])
    notify = notify_on != "never" and health.EXIT_CODES[result["status"]] >= health.EXIT_CODES.get(notify_on, 1)
    return Outcome(result, summary, result["exit_code"], checkin_ok=result["status"] != "critical",
                   notify=notify, metrics=health.prom_metrics(result), checks=result["checks"])


def watch_health(ctx):
    interval = _opt(ctx.args, "interval", ctx.section("health").get("watch_interval", WATCH_INTERVAL))
    rounds = 0
    code = EXIT_OK
    try:
        while True:
            result = _collect_health(ctx)
            code = result["exit_code"]
            if ctx.json:
                ctx.stdout.write(json.dumps(result, sort_keys=True, default=str) + "\n")
            else:
                ctx.stdout.write("--- %s\n%s" % (result["collected_at"], health.render_text(result)))
            ctx.stdout.flush()
            rounds += 1
            if ctx.args.count and rounds >= ctx.args.count:
                break
            time.sleep(max(0.1, float(interval)))
    except KeyboardInterrupt:
        pass
    return code


def _pitr_config(ctx):
    """``(path, config)`` of the pitr role's ``pitr.json`` (``--pitr-config``, default next to config.yml),
    refused as config.yml is unless 0600/0400 and owned by root or this user: it holds Barman's password."""
    path = getattr(ctx.args, "pitr_config", None) or os.path.join(
        os.path.dirname(os.path.abspath(ctx.config_path or cliconfig.DEFAULT_CONFIG)), "pitr.json")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError("cannot open %s: %s (the pitr role writes it in streaming mode)"
                          % (path, exc.strerror or exc))
    with os.fdopen(fd, "rb") as fh:
        cliconfig.check_config_file(fh.fileno(), path)
        raw = fh.read(1 << 20)
    try:
        config = json.loads(raw.decode("utf-8"))
    except ValueError as exc:  # UnicodeDecodeError too; the message quotes no content
        raise ConfigError("%s is not valid JSON: %s" % (path, exc))
    if not isinstance(config, dict):
        raise ConfigError("%s must be a JSON object" % path)
    return path, config


def job_pitr_metrics(ctx, log):
    """The pitr role's WAL streaming (Barman), every minute: ``pitr.evaluate`` with ``pitr.json``; its gauges and
    the job metrics into ``<its textfile_dir>/baileys_pitr.prom`` (one file: node_exporter refuses a series in two);
    one alert key per problem (``pitr.assess``); exit 1 on a critical one."""
    from . import pitr

    path, config = _pitr_config(ctx)
    conn = config.get("conn") or {}
    for secret in (conn.get("login_password"), (conn.get("connect_params") or {}).get("password")):
        ctx.add_secret(secret, log)
    with log.step("collect", config=path) as step:
        ok, metrics, result = pitr.evaluate(config)
        step.counts(ok=ok, receive_wal=result["receive_wal"], slot_exists=result["slot_exists"],
                    slot_active=result["slot_active"], slot_lag_bytes=result["slot_lag_bytes"],
                    wal_waiting_files=result["wal_waiting_files"],
                    problems=[p["name"] for p in result["problems"]] or None)
    problems = result["problems"]
    if problems:
        summary = "%s: %s" % ("NOT OK" if not ok else "needs attention",
                              "; ".join("%s: %s" % (p["name"], p["detail"]) for p in problems))
    else:
        summary = "ok: receive-wal streaming, slot %s %s, %s bytes of WAL kept for it, %s WAL file(s) waiting" % (
            result["slot"], "active" if result["slot_active"] else "inactive", result["slot_lag_bytes"],
            result["wal_waiting_files"])
    return Outcome(result, summary, EXIT_OK if ok else EXIT_FAILED, checkin_ok=ok, notify=bool(problems),
                   metrics=metrics, checks=problems, notify_on="warning",
                   textfile=(config.get("textfile_dir") or None, pitr.TEXTFILE_NAME))


def job_export(ctx, log):
    e = ctx.section("export")
    args = ctx.args
    dest = args.dest or e.get("dest")
    if not dest:
        raise ConfigError("export needs --dest or export.dest in the config file")
    opts = authstate.ExportOptions(
        dest=os.path.abspath(dest),
        company_dir=args.company_dir or e.get("company_dir") or authstate.DEFAULT_COMPANY_DIR,
        prune=args.prune if args.prune is not None else e.get("prune", True), owner=e.get("owner"),
        group=e.get("group"), mode=e.get("mode", authstate.DEFAULT_FILE_MODE),
        directory_mode=e.get("directory_mode", authstate.DEFAULT_DIRECTORY_MODE),
        check_mode=bool(args.check))
    with log.step("export", dest=opts.dest) as step:
        result = authstate.export_from_database(ctx.conn_params, ctx.store_params, opts,
                                                args.companies or e.get("companies"))
        step.counts(**result["totals"])
    for warning in result.get("warnings", [])[:20]:
        log.emit("warning", "warning", message=warning)
    t = result["totals"]
    summary = "%s %d companies to %s: %d keys, %d files %s, %d unchanged, %d removed" % (
        "would export" if args.check else "exported", t["companies"], opts.dest, t["keys"], t["written"],
        "to write" if args.check else "written", t["unchanged"], t["removed"])
    return Outcome(result, summary, metrics=[
        ("baileys_resilience_export_keys", "Keys in the last export.", "gauge", [({}, t["keys"])]),
        ("baileys_resilience_export_companies", "Companies in the last export.", "gauge", [({}, t["companies"])])])


def job_import(ctx, log):
    i = ctx.section("import")
    args = ctx.args
    src = args.src or i.get("src")
    if not src:
        raise ConfigError("import needs --src or import.src in the config file")
    with log.step("import", src=src) as step:
        result = authstate.import_auth_state(
            ctx.conn_params, ctx.store_params, os.path.abspath(src), companies=args.companies or i.get("companies"),
            company_dir=args.company_dir or i.get("company_dir") or authstate.DEFAULT_COMPANY_DIR,
            prune=args.prune if args.prune is not None else i.get("prune", False),
            buffer_encoding=args.buffer_encoding or i.get("buffer_encoding") or authstate.DEFAULT_BUFFER_ENCODING,
            check_mode=bool(args.check))
        step.counts(**result["totals"])
    t = result["totals"]
    summary = "%s %d companies from %s: %d inserted, %d updated, %d unchanged, %d deleted, %d creds changed" % (
        "would import" if args.check else "imported", t["companies"], src, t["inserted"], t["updated"],
        t["unchanged"], t["deleted"], t["creds_changed"])
    return Outcome(result, summary)


def probe_command(ctx):
    """``baileys-resilience probe [--loop]``: the store probe (probe.py), not a job: no lock, no check-in,
    no job metrics (its own textfile), alerts through the alert state only.  Exit 0 up, 1 slow, 2 down."""
    log = jobs.JobLog("probe", stream=ctx.stderr, fmt=ctx.log_format, secrets=ctx.secrets)
    section = ctx.section("probe")
    config = dict(ctx.config.get("alerts") or {})
    alerts = alerts_mod.Alerts(config, log=log, secrets=ctx.secrets,
                               default_state_file=os.path.join(ctx.state_dir, alertstate.DEFAULT_STATE_FILE_NAME))
    kwargs = dict(conn_params=ctx.conn_params, store_params=ctx.store_params,
                  textfile_dir=ctx.config.get("textfile_dir") or None, state_dir=ctx.state_dir, alerts=alerts,
                  slow_seconds=section.get("slow_seconds", probe.DEFAULT_SLOW_SECONDS),
                  connect_timeout=section.get("connect_timeout", probe.DEFAULT_CONNECT_TIMEOUT),
                  statement_timeout=section.get("statement_timeout", probe.DEFAULT_STATEMENT_TIMEOUT),
                  host=ctx.host, log=log)
    args = ctx.args
    try:
        if getattr(args, "loop", False):
            interval = args.interval or section.get("interval") or probe.DEFAULT_INTERVAL
            result = probe.probe_loop(interval=interval, count=args.count, **kwargs)
        else:
            result = probe.run_probe(**kwargs)
    finally:
        alerts.flush()
    if ctx.json:
        ctx.stdout.write(json.dumps(jobs.scrub(result, ctx.secrets), indent=2, sort_keys=True, default=str) + "\n")
    else:
        ctx.stdout.write(jobs.scrub_text(probe.render_text(result), ctx.secrets))
    return probe.exit_code(result)


JOBS = {
    "backup": job_backup,
    "replicate": job_replicate,
    "fetch": job_fetch,
    "reencrypt": job_reencrypt,
    "verify": job_verify,
    "cleanup": job_cleanup,
    "health": job_health,
    "export": job_export,
    "import": job_import,
    "pitr-metrics": job_pitr_metrics,
}
