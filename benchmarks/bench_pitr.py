"""Point-in-time recovery benchmark: Barman streaming, 100 companies x 2,000 keys, recovery to a target time.

    python benchmarks/bench_pitr.py [--companies 100] [--keys 2000] [--barman PATH] [--keep]

Starts a throwaway PostgreSQL (tests/support/pgserver.py, with fsync and synchronous_commit back on) under
benchmarks/.data/pitr, loads the data (datagen.py), configures Barman for it (``backup_method = postgres``,
``streaming_archiver = on``, a slot; Barman from --barman, else pip-installed into benchmarks/.data/barman-venv),
takes a base backup, and runs a writer that commits one key change every 20 ms, journaling the acknowledgement
time of each. Then:

1. the accident: all keys of company-050 are deleted at T, writes go on;
   ``pitrscratch.recover`` to T-1s with ``import`` of company-050: the seconds from the start of the recovery
   until the company's auth state is back in production (and each step);
2. the server is SIGKILLed while the writer writes; ``recover`` latest: the recovery point (seconds between the
   last acknowledged write and the newest write the recovered instance holds) and the acknowledged writes lost.

Prints a summary and one JSON line.  The numbers in benchmarks/README.md come from here.
"""
from __future__ import annotations

import _paths  # noqa: F401  (sys.path: the collection, tests/)

import argparse
import datetime
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import threading
import time

import datagen
from ansible_collections.baileys.resilience.plugins.module_utils import pgconn, pitr, pitrscratch
from support import authgen, pgserver

DATA = os.path.join(_paths.HERE, ".data", "pitr")
VICTIM = "company-050"


def log(msg):
    print("[bench_pitr] %s" % msg, file=sys.stderr, flush=True)


def barman_bin(path):
    if path:
        return path
    venv = os.path.join(_paths.HERE, ".data", "barman-venv")
    if not os.path.exists(os.path.join(venv, "bin", "barman")):
        log("installing barman into %s" % venv)
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        subprocess.run([os.path.join(venv, "bin", "pip"), "install", "-q", "barman>=3.15,<4"], check=True)
    return os.path.join(venv, "bin", "barman")


class Writer(threading.Thread):
    """One upsert every 20 ms on a random company (never the victim after the accident)."""

    def __init__(self, params, companies):
        super().__init__(daemon=True)
        self.params, self.companies = params, list(companies)
        self.journal, self.stop, self.seq = [], threading.Event(), 0

    def run(self):
        conn = None
        i = 0
        while not self.stop.is_set():
            try:
                conn = conn or pgconn.connect(dict(self.params, connect_timeout=2))
                company = self.companies[i % len(self.companies)]
                i += 7
                seq = self.seq + 1
                with conn.cursor() as cur:
                    cur.execute("INSERT INTO whatsapp_keys (company_id, key_type, key_id, value) "
                                "VALUES (%s, 'session', %s, %s) ON CONFLICT (company_id, key_type, key_id) "
                                "DO UPDATE SET value = excluded.value",
                                (company, "bench-w-%d" % (i % 30), json.dumps({"seq": seq})))
                conn.commit()
                self.seq = seq
                self.journal.append((seq, time.time()))
            except (pgconn.PgError, pgconn.Error):  # the server killed: nothing unacknowledged is journaled
                conn = None
                time.sleep(0.2)
            time.sleep(0.02)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n", maxsplit=1)[0])
    ap.add_argument("--companies", type=int, default=100)
    ap.add_argument("--keys", type=int, default=2000)
    ap.add_argument("--barman")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args(argv)
    shutil.rmtree(DATA, ignore_errors=True)
    os.makedirs(DATA)
    os.chmod(DATA, 0o755)
    os.chmod(os.path.dirname(DATA), 0o755)
    pg = pgserver.PgServer(os.path.join(DATA, "pg")).start()
    pg.psql("ALTER SYSTEM SET fsync = on")
    pg.psql("ALTER SYSTEM SET synchronous_commit = on")
    pg.psql("ALTER SYSTEM SET full_page_writes = on")
    pg.stop()
    pg.start()
    admin = pgconn.connect(pg.params(), autocommit=True)
    admin.execute("CREATE DATABASE whatsapp")
    admin.close()
    prod = pg.params("whatsapp")
    conn = pgconn.connect(prod)
    pgconn.create_schema(conn, pgconn.Store())
    data, _mix = datagen.generate(args.companies, args.keys)
    t = time.monotonic()
    authgen.load_into(conn, data)
    conn.commit()
    conn.close()
    log("loaded %d x %d keys in %.1f s" % (args.companies, args.keys, time.monotonic() - t))

    user = pwd.getpwuid(os.geteuid()).pw_name
    run_as = "postgres" if os.geteuid() == 0 else user
    home = os.path.join(DATA, "barman")
    os.makedirs(os.path.join(home, "conf.d"))
    pgpass = os.path.join(DATA, "pgpass")
    with open(os.open(pgpass, os.O_WRONLY | os.O_CREAT, 0o600), "w") as fh:
        fh.write("*:*:*:postgres:%s\n" % pgserver.SUPERUSER_PASSWORD.replace("\\", "\\\\").replace(":", "\\:"))
    os.environ["PGPASSFILE"] = pgpass
    with open(os.path.join(home, "barman.conf"), "w") as fh:
        fh.write("[barman]\nbarman_user = %s\nconfiguration_files_directory = %s/conf.d\nbarman_home = %s\n"
                 "log_file = %s/barman.log\n" % (user, home, home, home))
    with open(os.path.join(home, "conf.d", "baileys.conf"), "w") as fh:
        fh.write("[baileys]\nconninfo = host=127.0.0.1 port=%d user=postgres dbname=whatsapp\n"
                 "streaming_conninfo = host=127.0.0.1 port=%d user=postgres\nbackup_method = postgres\n"
                 "streaming_archiver = on\nslot_name = barman_baileys\ncreate_slot = auto\npath_prefix = %s\n"
                 "immediate_checkpoint = true\nretention_policy = RECOVERY WINDOW OF 30 DAYS\n"
                 % (pg.port, pg.port, pg.bindir))
    barman = pitr.Barman(barman_bin(args.barman), os.path.join(home, "barman.conf"), "baileys", user)
    barman.run("cron")
    for _attempt in range(60):
        checks = barman.check()
        if checks.get("receive_wal_running", {}).get("status") == "OK":
            break
        time.sleep(1)
    t = time.monotonic()
    barman.run("backup", "--wait", "baileys")
    backup_seconds = time.monotonic() - t
    log("base backup in %.1f s" % backup_seconds)

    companies = sorted(data)
    writer = Writer(prod, companies)
    writer.start()
    time.sleep(5)
    conn = pgconn.connect(prod, autocommit=True)
    t_accident = time.time()
    conn.execute("DELETE FROM whatsapp_keys WHERE company_id = %s", (VICTIM,))
    conn.close()
    writer.companies.remove(VICTIM)
    time.sleep(3)
    target = datetime.datetime.fromtimestamp(t_accident - 1, datetime.timezone.utc).isoformat()
    started = time.monotonic()
    res = pitrscratch.recover(barman, target=target, action="import", companies=[VICTIM],
                              scratch_dir=os.path.join(DATA, "scratch"), pg_bin_dir=pg.bindir,
                              scratch_port=pgserver.free_port(), scratch_login_user="postgres", dbname="whatsapp",
                              prod_conn_params=prod, run_as=run_as)
    back_in_production = time.monotonic() - started
    conn = pgconn.connect(prod, autocommit=True)
    restored = conn.execute("SELECT count(*) FROM whatsapp_keys WHERE company_id = %s", (VICTIM,)).fetchone()[0]
    conn.close()
    steps = res["seconds"]
    log("company %s back in production in %.1f s (%d keys), steps %s" % (VICTIM, back_in_production, restored, steps))

    time.sleep(3)
    pid = int(open(os.path.join(pg.data, "postmaster.pid")).readline())
    os.kill(pid, signal.SIGKILL)
    killed_at = time.time()
    time.sleep(1)
    writer.stop.set()
    writer.join()
    last_seq, last_ack = writer.journal[-1]
    res_latest = pitrscratch.recover(barman, target="latest", action="keep", scratch_dir=os.path.join(DATA, "scratch"),
                                     pg_bin_dir=pg.bindir, scratch_port=pgserver.free_port(),
                                     scratch_login_user="postgres", dbname="whatsapp", run_as=run_as)
    scratch = res_latest["scratch"]
    sc = pgconn.connect({"login_unix_socket": scratch["socket"], "login_port": scratch["port"],
                         "login_user": "postgres", "login_db": "whatsapp"}, autocommit=True)
    recovered_seq = sc.execute("SELECT max((value->>'seq')::int) FROM whatsapp_keys WHERE key_id LIKE 'bench-w-%'"
                               ).fetchone()[0] or 0
    sc.close()
    subprocess.run((["runuser", "-u", run_as, "--"] if os.geteuid() == 0 else []) +
                   [os.path.join(pg.bindir, "pg_ctl"), "-D", res_latest["scratch"]["data"], "-m", "immediate", "stop"],
                   capture_output=True, check=False)
    acks = dict(writer.journal)
    rpo = last_ack - acks.get(recovered_seq, last_ack)
    result = {
        "companies": args.companies, "keys_per_company": args.keys, "base_backup_seconds": round(backup_seconds, 1),
        "target_time_import_seconds": round(back_in_production, 2), "target_time_steps": res["seconds"],
        "restored_keys": restored, "wal_replayed_bytes": res.get("wal_replayed_bytes"),
        "latest_seconds": res_latest["seconds"], "acknowledged_writes": last_seq, "recovered_seq": recovered_seq,
        "lost_acknowledged": last_seq - recovered_seq, "recovery_point_seconds": round(rpo, 3),
        "kill_after_last_ack_seconds": round(killed_at - last_ack, 3),
    }
    print("PITR %d companies x %d keys: base backup %.1f s; to T-1s + import of one company: %.1f s "
          "(restore %.1f s, replay %.1f s, import %.1f s); after SIGKILL, latest: %d of %d acknowledged writes lost, "
          "recovery point %.3f s" % (
              args.companies, args.keys, backup_seconds, back_in_production, res["seconds"]["restore_base_backup"],
              res["seconds"]["replay"], res["seconds"]["import"], result["lost_acknowledged"], last_seq, rpo))
    print(json.dumps(result, sort_keys=True))
    barman.run("receive-wal", "--stop", "baileys", check=False)
    if not args.keep:
        shutil.rmtree(DATA, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
