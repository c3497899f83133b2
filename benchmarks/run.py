"""Export/import benchmarks against baselines measured in the same run (``make bench``).

Starts a throwaway PostgreSQL under benchmarks/.data, loads N companies x K
keys (default 100 x 2,000 = 200,000 key rows), then times:

  raw limit         one COPY ... TO STDOUT of the same rows, each value written
                    to its Baileys file name by a minimal open/write loop
                    (no temp files, no fsync, no manifest, no normalisation)
  naive export      per-company SELECT, json.loads + json.dumps, one write per file
  export (cold)     export_from_database into a fresh dest
  export (no-op)    the same export again over its own output
  naive import      read files, json.loads, 100-row INSERT ... VALUES ...
                    ON CONFLICT DO UPDATE per batch (the reference system),
                    into a fresh database
  import (cold)     import_auth_state into a fresh database
  import (no-op)    the same import again

Each measurement runs --repeat times (fresh dest / fresh database for every
cold run) and the best time is used; every time is printed.  Targets:
cold export <= 1.5x raw limit; no-op export < 20% of cold export; cold import
>= 5x faster than the naive import.  Exits 0 whatever the verdicts.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import shutil
import sys
import time

from _paths import HERE  # noqa: E402 - sets sys.path for the imports below

import datagen  # noqa: E402
from support.pgserver import PgServer  # noqa: E402

from ansible_collections.baileys.resilience.plugins.module_utils import authstate  # noqa: E402
from ansible_collections.baileys.resilience.plugins.module_utils import baileys_codec as codec  # noqa: E402
from ansible_collections.baileys.resilience.plugins.module_utils import pgconn  # noqa: E402

import psycopg  # noqa: E402  - the harness loads its data with psycopg 3; the code measured uses pgconn's driver

DATA = os.path.join(HERE, ".data")
BATCH = 100


# --------------------------------------------------------------------------- helpers


def log(msg):
    print("  .. %s" % msg, file=sys.stderr, flush=True)


def drop_page_cache():
    """True when the kernel page cache could be dropped (needs a privileged, non-container root)."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
        return True
    except OSError:
        return False


class Timer:
    def __enter__(self):
        gc.collect()
        self.cpu0 = time.process_time()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t0
        self.cpu = time.process_time() - self.cpu0
        return False


def rmtree(path):
    if os.path.lexists(path):
        shutil.rmtree(path)


TRASH = os.path.join(DATA, "trash")


def discard(path):
    """Set a measured tree aside; it is deleted after the last measurement.

    Deleting tens of thousands of files just before a measurement that creates
    files makes the next file creations slow on ext4: for dirty_expire_centisecs
    (30 s) after a delete, ``find_inode_bit`` skips every recently deleted inode
    and checks each one's inode table block (``recently_deleted``), which cost
    up to 1 ms of kernel CPU per new file here.  Whichever measurement ran right
    after a deletion paid for it.
    """
    if os.path.lexists(path):
        os.makedirs(TRASH, exist_ok=True)
        os.rename(path, os.path.join(TRASH, "%d-%s" % (len(os.listdir(TRASH)), os.path.basename(path))))


def recently_deleted_window():
    """Seconds during which ext4 avoids reusing a deleted inode (see :func:`discard`)."""
    try:
        with open("/proc/sys/vm/dirty_expire_centisecs") as fh:
            return int(fh.read()) / 100.0
    except (OSError, ValueError):
        return 30.0


def create_db(admin, pg, name):
    admin.execute('DROP DATABASE IF EXISTS "%s" WITH (FORCE)' % name)
    admin.execute('CREATE DATABASE "%s"' % name)
    params = pg.params(name)
    conn = pgconn.connect(params)  # the schema through the driver measured (pgconn's sql objects are that driver's)
    pgconn.create_schema(conn, pgconn.Store())
    conn.commit()
    conn.close()
    return params


def settle(admin):
    """Flush dirty PostgreSQL buffers and dirty file pages outside the timed sections.

    Without this a run pays for the writeback of the previous one (and our
    export's syncfs would flush it synchronously).
    """
    admin.execute("CHECKPOINT")
    os.sync()


def count_files(root):
    n = 0
    for _dirpath, _dirs, files in os.walk(root):
        n += sum(1 for f in files if f != codec.MANIFEST_FILE)
    return n


# --------------------------------------------------------------------------- baselines


def _harness_connect(params, autocommit=False):
    """The harness's own connections (data, baselines, checks): psycopg 3 whatever the driver of the code measured
    (BAILEYS_RESILIENCE_PG_DRIVER), so both drivers are measured against the same baselines."""
    return psycopg.connect(autocommit=autocommit, **pgconn.libpq_params(params))


def raw_limit_export(params, dest):
    """The floor: stream the rows with COPY and write each value with open/write (psycopg 3 whatever the driver
    of the code measured: the floor is the same for both)."""
    os.mkdir(dest)
    made = set()
    n = 0
    conn = psycopg.connect(**pgconn.libpq_params(params))
    try:
        with conn.cursor() as cur:
            with cur.copy("COPY (SELECT company_id, creds::text FROM whatsapp_auth) TO STDOUT") as cp:
                for company_id, creds in cp.rows():
                    d = os.path.join(dest, company_id)
                    if company_id not in made:
                        os.mkdir(d, 0o700)
                        made.add(company_id)
                    with open(os.path.join(d, codec.CREDS_FILE), "wb") as fh:
                        fh.write(creds.encode())
                    n += 1
            with cur.copy("COPY (SELECT company_id, key_type, key_id, value::text FROM whatsapp_keys) TO STDOUT") as cp:
                for company_id, key_type, key_id, value in cp.rows():
                    d = os.path.join(dest, company_id)
                    if company_id not in made:
                        os.mkdir(d, 0o700)
                        made.add(company_id)
                    with open(os.path.join(d, codec.key_file_name(key_type, key_id)), "wb") as fh:
                        fh.write(value.encode())
                    n += 1
    finally:
        conn.close()
    return n


def naive_export(params, dest):
    """Per-company SELECT, parse each value, dump it again, one write per file."""
    os.mkdir(dest)
    n = 0
    conn = _harness_connect(params)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT company_id, creds::text FROM whatsapp_auth ORDER BY company_id")
            for company_id, creds in cur.fetchall():
                d = os.path.join(dest, company_id)
                os.mkdir(d, 0o700)
                with open(os.path.join(d, codec.CREDS_FILE), "w") as fh:
                    fh.write(json.dumps(json.loads(creds)))
                n += 1
                cur.execute("SELECT key_type, key_id, value::text FROM whatsapp_keys WHERE company_id = %s",
                            (company_id,))
                for key_type, key_id, value in cur.fetchall():
                    with open(os.path.join(d, codec.key_file_name(key_type, key_id)), "w") as fh:
                        fh.write(json.dumps(json.loads(value)))
                    n += 1
    finally:
        conn.close()
    return n


NAIVE_KEYS_SQL = ("INSERT INTO whatsapp_keys (company_id, key_type, key_id, value) VALUES %s "
                  "ON CONFLICT (company_id, key_type, key_id) DO UPDATE SET value = EXCLUDED.value, "
                  "updated_at = now()")
NAIVE_AUTH_SQL = ("INSERT INTO whatsapp_auth (company_id, creds) VALUES (%s, %s) "
                  "ON CONFLICT (company_id) DO UPDATE SET creds = EXCLUDED.creds, updated_at = now()")


def naive_files(src):
    """The naive reader: ``(company_id, file name, json.loads of the file)`` for every file under ``src``."""
    for company_id in sorted(os.listdir(src)):
        d = os.path.join(src, company_id)
        for name in sorted(os.listdir(d)):
            if name == codec.MANIFEST_FILE:
                continue
            with open(os.path.join(d, name), "rb") as fh:
                yield company_id, name, json.loads(fh.read())


def naive_import(params, src):
    """Read every file, json.loads it, INSERT ... ON CONFLICT in 100-row statements (autocommit)."""
    Jsonb = psycopg.types.json.Jsonb
    statements = {}
    n = 0
    conn = _harness_connect(params, autocommit=True)
    # node-postgres sends each parameterised query unnamed (parsed and planned every time);
    # psycopg would prepare it after 5 runs, which the reference system does not get
    conn.prepare_threshold = None
    try:
        with conn.cursor() as cur:
            batch = []

            def flush():
                sql = statements.get(len(batch))
                if sql is None:
                    sql = statements[len(batch)] = NAIVE_KEYS_SQL % ", ".join(["(%s, %s, %s, %s)"] * len(batch))
                cur.execute(sql, [x for row in batch for x in row])
                batch.clear()

            for company_id, name, value in naive_files(src):
                n += 1
                if name == codec.CREDS_FILE:
                    cur.execute(NAIVE_AUTH_SQL, (company_id, Jsonb(value)))
                    continue
                key_type, key_id = codec.parse_key_file_name(name)
                batch.append((company_id, key_type, key_id, Jsonb(value)))
                if len(batch) == BATCH:
                    flush()
            if batch:
                flush()
    finally:
        conn.close()
    return n


# --------------------------------------------------------------------------- ours


def our_export(params, dest):
    res = authstate.export_from_database(params, {}, authstate.ExportOptions(dest))
    t = res["totals"]
    return t["keys"] + t["creds"], t["written"]


def our_import(params, src):
    res = authstate.import_auth_state(params, {}, src)
    t = res["totals"]
    return t["files"], t["inserted"] + t["updated"] + t["creds_changed"]


# --------------------------------------------------------------------------- main


def load(pg, admin, companies, keys, seed, legacy_array, legacy_numeric):
    from support import authgen

    log("generating %d companies x %d keys (seed %d)" % (companies, keys, seed))
    t0 = time.perf_counter()
    data, mix = datagen.generate(companies, keys, seed, legacy_array, legacy_numeric)
    log("generated in %.1fs; mix per company: %s" % (time.perf_counter() - t0, mix))
    params = create_db(admin, pg, "bench_src")
    conn = _harness_connect(params)
    t0 = time.perf_counter()
    authgen.load_into(conn, data)
    conn.close()
    del data
    admin_src = _harness_connect(params, autocommit=True)
    admin_src.execute("VACUUM (ANALYZE) whatsapp_keys")
    admin_src.execute("VACUUM (ANALYZE) whatsapp_auth")
    row = admin_src.execute(
        "SELECT count(*), pg_total_relation_size('whatsapp_keys'), sum(octet_length(value::text)), "
        "count(*) FILTER (WHERE value::text ~ '\"data\": \\[' OR value::text ~ '[{,] ?\"0\": ') "
        "FROM whatsapp_keys").fetchone()
    admin_src.close()
    log("loaded in %.1fs: %d key rows, table %.0f MB, value text %.0f MB, %d values in a legacy Buffer form"
        % (time.perf_counter() - t0, row[0], row[1] / 1e6, row[2] / 1e6, row[3]))
    return params, {"rows": row[0], "table_mb": row[1] / 1e6, "text_mb": row[2] / 1e6, "legacy_values": row[3],
                    "mix": mix}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--companies", type=int, default=100)
    ap.add_argument("--keys", type=int, default=2000, help="keys per company")
    ap.add_argument("--repeat", type=int, default=2, help="runs per measurement; the best is used")
    ap.add_argument("--legacy-array", type=float, default=0.07, help="share of values in the legacy array form")
    ap.add_argument("--legacy-numeric", type=float, default=0.03, help="share of values as numeric-keyed objects")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--keep", action="store_true", help="keep benchmarks/.data afterwards")
    ap.add_argument("--json", help="also write the results as JSON to this file")
    ap.add_argument("--fast-pg", action="store_true",
                    help="keep tests/support/pgserver.py's fsync=off, synchronous_commit=off (default: production "
                         "durability, so every commit pays its WAL flush as it would on a real server)")
    ap.add_argument("--drop-caches", action="store_true",
                    help="drop the kernel page cache before every run (root only; disturbs anything else running "
                         "on the machine; file reads then dominate every import)")
    args = ap.parse_args(argv)

    started = time.perf_counter()
    pg_dir = os.path.join(DATA, "pg")
    work = os.path.join(DATA, "work")
    if os.path.exists(os.path.join(pg_dir, "server.json")):
        old = PgServer(pg_dir)
        old.port = json.load(open(os.path.join(pg_dir, "server.json")))["port"]
        old.stop("immediate")
    deleted = any(os.path.lexists(p) for p in (pg_dir, work, TRASH))
    rmtree(pg_dir)
    rmtree(work)
    rmtree(TRASH)
    os.makedirs(work)
    if deleted:
        pause = recently_deleted_window() + 2
        log("removed the previous run's files; waiting %.0fs so that file creation is not slowed by "
            "recently deleted inodes (see discard() in run.py)" % pause)
        time.sleep(pause)
    pg = PgServer(pg_dir).start()
    admin = _harness_connect(pg.params(), autocommit=True)
    if not args.fast_pg:
        # tests/support/pgserver.py turns durability off for test speed; a real server has it on, and the
        # naive import commits 2,000 times where ours commits once.
        for setting in ("fsync", "synchronous_commit", "full_page_writes"):
            admin.execute("ALTER SYSTEM SET %s = on" % setting)
        admin.execute("SELECT pg_reload_conf()")
        time.sleep(0.5)
    durability = ", ".join("%s=%s" % (k, admin.execute("SHOW %s" % k).fetchone()[0])
                           for k in ("fsync", "synchronous_commit", "full_page_writes"))
    log("PostgreSQL: %s on port %d (%s)" % (pg.version, pg.port, durability))
    results = {}
    try:
        src_params, info = load(pg, admin, args.companies, args.keys, args.seed, args.legacy_array,
                                args.legacy_numeric)
        rows = args.companies * (args.keys + 1)  # key rows + one creds row per company
        cache_dropped = args.drop_caches and drop_page_cache()
        if args.drop_caches and not cache_dropped:
            log("page cache drop: not permitted here; every measurement runs with a warm page cache")
        else:
            log("page cache: %s" % ("dropped before each run" if cache_dropped else "warm (see --drop-caches)"))

        def run_once(label, fn, i, setup=None, cleanup=None):
            arg = setup(i) if setup else None
            settle(admin)
            if cache_dropped:
                drop_page_cache()
            with Timer() as t:
                out = fn(arg)
            entry = results.setdefault(label, {"times": []})
            entry["times"].append((t.wall, t.cpu))
            best = min(entry["times"])
            entry.update(best=best[0], cpu=best[1], runs=[w for w, _c in entry["times"]])
            log("%-16s run %d: %.2fs wall, %.2fs client CPU -> %s" % (label, i + 1, t.wall, t.cpu, out))
            if cleanup:
                cleanup(arg, i)

        def rounds(*variants):
            """Run every variant once per round, the order reversed every other round: slow drift of
            the machine during the run (file system state, other load) then weighs on all of them."""
            for i in range(args.repeat):
                for label, fn, *hooks in (variants if i % 2 == 0 else variants[::-1]):
                    run_once(label, fn, i, *hooks)

        def fresh_dir(tag):
            def setup(i):
                path = os.path.join(work, "%s-%d" % (tag, i))
                discard(path)
                return path
            return setup

        def drop_dir(path, _i):
            discard(path)

        # ---- export side
        export_dirs = []

        def keep_dir(path, _i):
            export_dirs.append(path)  # the last one feeds the no-op export and the imports

        rounds(("raw limit", lambda d: raw_limit_export(src_params, d), fresh_dir("raw"), drop_dir),
               ("naive export", lambda d: naive_export(src_params, d), fresh_dir("naive"), drop_dir),
               ("export cold", lambda d: our_export(src_params, d), fresh_dir("export"), keep_dir))
        files = export_dirs[-1]
        for path in export_dirs[:-1]:
            discard(path)
        log("export output: %d files (manifests excluded)" % count_files(files))
        rounds(("export no-op", lambda _: our_export(src_params, files)))

        # ---- import side
        def fresh_db(tag):
            def setup(i):
                return create_db(admin, pg, "bench_%s_%d" % (tag, i))
            return setup

        def drop_db(params, _i):
            admin.execute('DROP DATABASE IF EXISTS "%s" WITH (FORCE)' % params["login_db"])

        imported = []
        rounds(("naive import", lambda p: naive_import(p, files), fresh_db("naive"), drop_db),
               ("import cold", lambda p: our_import(p, files), fresh_db("import"), lambda p, i: imported.append(p)))
        target_db = imported[-1]
        for p in imported[:-1]:
            drop_db(p, 0)
        rounds(("import no-op", lambda _: our_import(target_db, files)))
        # check the round trip: the imported database holds the same rows (values normalised)
        conn = _harness_connect(target_db)
        n_imported = conn.execute("SELECT count(*) FROM whatsapp_keys").fetchone()[0]
        conn.close()
        if n_imported != info["rows"]:
            log("WARNING: imported %d key rows, source has %d" % (n_imported, info["rows"]))
    finally:
        admin.close()
        pg.stop("immediate")
        rmtree(TRASH)
        if not args.keep:
            rmtree(DATA)

    info["durability"] = durability
    report(results, rows, args, info, cache_dropped, time.perf_counter() - started)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"results": results, "rows": rows, "info": info, "args": vars(args)}, fh, indent=1,
                      default=str)
    return 0


def report(results, rows, args, info, cache_dropped, elapsed):
    r = {k: v["best"] for k, v in results.items()}
    print()
    print("baileys.resilience benchmark  %s" % datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"))
    print("data: %d companies x %d keys = %d key rows + %d creds (%d rows, %.0f MB of JSON text, %d values "
          "in a legacy Buffer form)" % (args.companies, args.keys, info["rows"], args.companies, rows,
                                        info["text_mb"], info["legacy_values"]))
    print("machine: %s, %d CPUs, load average %.1f at the end, Python %s, page cache %s; best of %d runs"
          % (platform.machine(), os.cpu_count(), os.getloadavg()[0], platform.python_version(),
             "dropped before each run" if cache_dropped else "warm", args.repeat))
    print("PostgreSQL: %s; driver of the code measured: %s (BAILEYS_RESILIENCE_PG_DRIVER)"
          % (info["durability"], pgconn.driver_name()))
    print()
    print("%-16s %9s %9s %11s   %s" % ("measurement", "best s", "client s", "rows/s", "all runs (s)"))
    order = ("raw limit", "naive export", "export cold", "export no-op", "naive import", "import cold",
             "import no-op")
    for label in order:
        v = results[label]
        runs = " ".join("%.2f" % x for x in v["runs"])
        print("%-16s %9.2f %9.2f %11.0f   %s" % (label, v["best"], v["cpu"], rows / v["best"], runs))
    print()
    checks = [
        ("cold export vs raw limit", r["export cold"] / r["raw limit"], "x", "<= 1.50x",
         r["export cold"] / r["raw limit"] <= 1.5),
        ("no-op export vs cold export", 100 * r["export no-op"] / r["export cold"], "%", "< 20%",
         r["export no-op"] / r["export cold"] < 0.2),
        ("naive import vs cold import", r["naive import"] / r["import cold"], "x", ">= 5.00x",
         r["naive import"] / r["import cold"] >= 5),
    ]
    print("%-30s %9s  %-9s %s" % ("target", "measured", "wanted", "verdict"))
    for name, value, unit, wanted, ok in checks:
        print("%-30s %8.2f%s  %-9s %s" % (name, value, unit, wanted, "PASS" if ok else "FAIL"))
    print()
    print("for information: naive export / cold export = %.2fx; no-op import / cold import = %.0f%%"
          % (r["naive export"] / r["export cold"], 100 * r["import no-op"] / r["import cold"]))
    print("total benchmark time %.0fs" % elapsed)


if __name__ == "__main__":
    sys.exit(main())
