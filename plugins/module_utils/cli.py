# -*- coding: utf-8 -*-
# Copyright: baileys.resilience contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""``baileys-resilience``: the host tool (backup, verify, cleanup, health, export, import, pitr-metrics...).

Made from the same core as the Ansible modules, with relative imports only, so it runs both as
``ansible_collections.baileys.resilience.plugins.module_utils.cli`` and with this directory
copied on a host as the package ``baileys_resilience`` (``python3 -m baileys_resilience.cli``).
No Ansible import.

Every job reads the config file (``/etc/baileys-resilience/config.yml``, then the fragments
``config.d/*.yml`` next to it, merged in name order; each refused unless mode 0600/0400 and owned
by root or the user running the tool), takes its own lock (a second
concurrent run exits 75 at once), logs one structured line per step on stderr (JSON lines or
logfmt, secrets masked), reports to Sentry Crons and Telegram when configured, writes a
node_exporter textfile when ``textfile_dir`` is set, and exits non-zero on failure.  Passwords
reach libpq as a connection parameter (from the config) or through a passfile, never argv.

This room holds the command line (:func:`build_parser`) and :func:`main`; the others hold the rest,
and the names callers use are re-exported here (``cli.X``):

=============  =====================================================================================
cliconfig      the config: SECTIONS, TOP_LEVEL, ConfigError, load_config, fragment_paths,
               check_config_file, config_secrets
clijobs        the jobs: Context, Outcome, run_job, job_* and JOBS, watch_health, the exit codes
=============  =====================================================================================

Every name below is bound once, at import: monkeypatching ``cli.X`` does not reach the room that
uses X; patch it in its room.
"""
from __future__ import absolute_import, division, print_function

import argparse
import os
import sys

from . import authnames, cleanup, cliconfig, clijobs, jobs, probe

__metaclass__ = type

# cliconfig: the config file
DEFAULT_CONFIG = cliconfig.DEFAULT_CONFIG
SECTIONS = cliconfig.SECTIONS
TOP_LEVEL = cliconfig.TOP_LEVEL
ConfigError = cliconfig.ConfigError
check_config_file = cliconfig.check_config_file
fragment_paths = cliconfig.fragment_paths
load_config = cliconfig.load_config
config_secrets = cliconfig.config_secrets

# clijobs: the jobs
PROG = clijobs.PROG
EXIT_OK = clijobs.EXIT_OK
EXIT_FAILED = clijobs.EXIT_FAILED
EXIT_USAGE = clijobs.EXIT_USAGE
EXIT_LOCKED = clijobs.EXIT_LOCKED
Context = clijobs.Context
Outcome = clijobs.Outcome
run_job = clijobs.run_job
watch_health = clijobs.watch_health
JOBS = clijobs.JOBS
job_backup = clijobs.job_backup
job_replicate = clijobs.job_replicate
job_fetch = clijobs.job_fetch
job_reencrypt = clijobs.job_reencrypt
job_verify = clijobs.job_verify
job_cleanup = clijobs.job_cleanup
job_health = clijobs.job_health
job_export = clijobs.job_export
job_import = clijobs.job_import
job_pitr_metrics = clijobs.job_pitr_metrics


# --------------------------------------------------------------------------- arguments


def build_parser():
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", default=argparse.SUPPRESS, metavar="PATH",
                        help="config file (default %s; mode 0600 or 0400)" % DEFAULT_CONFIG)
    common.add_argument("--log-format", choices=list(jobs.LOG_FORMATS), default=argparse.SUPPRESS,
                        help="format of the step log on stderr (default: config log_format, else json)")
    common.add_argument("--lock-dir", default=argparse.SUPPRESS, metavar="DIR",
                        help="directory of the job lock files (default: config lock_dir, else %s)"
                        % jobs.DEFAULT_LOCK_DIR)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print the job's full result as JSON on stdout")

    parser = argparse.ArgumentParser(
        prog=PROG, parents=[common],
        description="Keep a Baileys (WhatsApp) service's PostgreSQL auth state safe: backups, verification, "
                    "key cleanup, health, and export/import to useMultiFileAuthState files.",
        epilog="Exit codes: 0 success (health: ok), 1 failure (health: warning), 2 usage or config error "
               "(health: critical), 75 another run of the same job holds its lock. Secrets are read from the "
               "config file or a libpq passfile, never from the command line.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("backup", parents=[common], help="pg_dump the auth state, validate it, apply retention")
    p.add_argument("--force", action="store_true", help="back up even if today's backup exists")
    p.add_argument("--check", action="store_true", help="report what would be done, change nothing")

    p = sub.add_parser("replicate", parents=[common],
                       help="copy every valid local backup a target lacks to the S3 targets, verified")
    p.add_argument("--check", action="store_true", help="report what would be uploaded, upload nothing")

    p = sub.add_parser("fetch", parents=[common],
                       help="download the newest backup whose sha256 verifies, trying the S3 targets in order")
    p.add_argument("--dest", metavar="DIR", help="download directory (default: config s3.fetch_dir)")
    p.add_argument("--check", action="store_true", help="say which object would be fetched, download nothing")
    p.add_argument("--identity-file", metavar="FILE",
                   help="age identity (AGE-SECRET-KEY-1...) that opens encrypted backups; decrypted while downloading")

    p = sub.add_parser("reencrypt", parents=[common],
                       help="key rotation: re-encrypt the backups on the S3 targets to the current "
                            "s3.encryption.recipients (streamed, no plaintext on disk, verified, idempotent)")
    p.add_argument("--identity-file", metavar="FILE", required=True,
                   help="age identity that opens the existing objects (an old recipient's, e.g. the break-glass key)")
    p.add_argument("--work-dir", metavar="DIR",
                   help="where the ciphertext of one backup is staged before its upload (default: $TMPDIR)")

    p = sub.add_parser("verify", parents=[common], help="verify a backup (default: the newest valid one)")
    p.add_argument("backup_path", nargs="?", metavar="BACKUP", help="path of a .dump file")
    p.add_argument("--identity-file", metavar="FILE",
                   help="age identity for an encrypted BACKUP (without it only the ciphertext's integrity is checked)")

    p = sub.add_parser("cleanup", parents=[common],
                       help="delete old signal keys the retention rules let go (never pre-keys, app-state keys...)")
    p.add_argument("--check", action="store_true",
                   help="list what each retention rule keeps and would delete, delete nothing")
    p.add_argument("--confirm-large-delete", action="store_true", default=None,
                   help="delete even when more keys than max_delete are candidates")
    p.add_argument("--older-than-days", type=int, metavar="N",
                   help="age limit by updated_at (default %d)" % cleanup.DEFAULT_OLDER_THAN_DAYS)
    p.add_argument("--age-column", choices=list(cleanup.AGE_COLUMNS),
                   help="auto: expires_at < now() where set, else the updated_at age (default %s)"
                   % cleanup.DEFAULT_AGE_COLUMN)
    p.add_argument("--batch-size", type=int, metavar="N",
                   help="rows per delete transaction (default %d)" % cleanup.DEFAULT_BATCH_SIZE)
    p.add_argument("--max-delete", type=int, metavar="N",
                   help="stop without deleting when more keys are candidates (default %d)" % cleanup.DEFAULT_MAX_DELETE)
    p.add_argument("--company", action="append", dest="companies", metavar="ID", help="only this company (repeat)")

    p = sub.add_parser("health", parents=[common], help="store and backup health; exit 0 ok, 1 warning, 2 critical")
    p.add_argument("--watch", action="store_true", help="repeat every --interval seconds until interrupted")
    p.add_argument("--interval", type=float, metavar="SECONDS",
                   help="seconds between --watch rounds (default %d)" % clijobs.WATCH_INTERVAL)
    p.add_argument("--count", type=int, metavar="N", help="with --watch, stop after N rounds")
    p.add_argument("--probes", type=int, metavar="N", help="probe queries for the latency percentiles")
    p.add_argument("--verify-checksum", action="store_true", default=None,
                   help="also check the sha256 of the newest backup")

    p = sub.add_parser("probe", parents=[common],
                       help="probe the store (connect + one read); exit 0 up, 1 slow, 2 down; alerts once per "
                            "cooldown through the alert state")
    p.add_argument("--loop", action="store_true", help="probe every --interval seconds (--count times)")
    p.add_argument("--interval", type=float, metavar="SECONDS",
                   help="seconds between probes with --loop (default: config probe.interval, else %g)"
                   % probe.DEFAULT_INTERVAL)
    p.add_argument("--count", type=int, metavar="N", help="with --loop, stop after N probes")

    p = sub.add_parser("pitr-metrics", parents=[common],
                       help="the pitr role's WAL streaming (Barman receive-wal, the replication slot's lag, barman "
                            "check, WAL not archived): metrics into baileys_pitr.prom, an alert per problem; exit 1 "
                            "when receive-wal is down or the slot is missing, lost or over its lag limit")
    p.add_argument("--pitr-config", metavar="PATH",
                   help="the pitr role's settings (default: pitr.json next to the config file)")

    p = sub.add_parser("export", parents=[common], help="mirror the store into useMultiFileAuthState directories")
    p.add_argument("--dest", metavar="DIR", help="root directory (default: config export.dest)")
    p.add_argument("--company", action="append", dest="companies", metavar="ID", help="only this company (repeat)")
    p.add_argument("--company-dir", metavar="TEMPLATE",
                   help="directory name template, default %s" % authnames.DEFAULT_COMPANY_DIR)
    p.add_argument("--no-prune", dest="prune", action="store_false", default=None,
                   help="keep key files the store no longer has")
    p.add_argument("--check", action="store_true", help="report what would change, write nothing")

    p = sub.add_parser("import", parents=[common], help="load useMultiFileAuthState directories into the store")
    p.add_argument("--src", metavar="DIR", help="root directory (default: config import.src)")
    p.add_argument("--company", action="append", dest="companies", metavar="ID", help="only this company (repeat)")
    p.add_argument("--company-dir", metavar="TEMPLATE",
                   help="directory name template, default %s" % authnames.DEFAULT_COMPANY_DIR)
    p.add_argument("--prune", action="store_true", default=None,
                   help="delete keys of the imported companies that the files do not have")
    p.add_argument("--buffer-encoding", choices=["base64", "array"])
    p.add_argument("--check", action="store_true", help="report what would change, write nothing")
    return parser


def main(argv=None, stdout=None, stderr=None):
    """Entry point; returns the exit code."""
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    old_umask = os.umask(0o077)  # lock files, temporary files: private unless a mode says otherwise
    try:
        path = getattr(args, "config", None) or os.environ.get("BAILEYS_RESILIENCE_CONFIG") or DEFAULT_CONFIG
        try:
            config = load_config(path)
            ctx = Context(args, config, stdout, stderr, config_path=path)
        except ConfigError as exc:
            stderr.write("%s: %s\n" % (PROG, exc))
            return EXIT_USAGE
        if args.command == "health" and args.watch:
            return watch_health(ctx)
        if args.command == "probe":
            return clijobs.probe_command(ctx)
        return run_job(ctx, args.command, JOBS[args.command])
    finally:
        os.umask(old_umask)


if __name__ == "__main__":
    sys.exit(main())
