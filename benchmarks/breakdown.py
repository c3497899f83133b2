"""Where import time goes: file reading vs database work, ours and naive.

Run after ``benchmarks/run.py --keep`` (it reuses benchmarks/.data):
``python benchmarks/breakdown.py``.  Times, best of --repeat:

  read only        the import's fast reader: open, read, name/UTF-8/NUL checks, COPY rows (no JSON parse)
  strict read      read_directory() for every company (open, read, strict JSON parse, checks): the
                   fallback that lists bad files
  read+loads       the naive reader: open, read, json.loads, nothing else
  ours: db only    the import's COPY with the rows already in memory, fresh database
  naive: db only   the 100-row INSERT ... ON CONFLICT batches from rows already in memory, fresh database
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402
from support.pgserver import PgServer  # noqa: E402

authstate, codec, pgconn = run.authstate, run.codec, run.pgconn


def read_fast(src):
    """What import_auth_state reads on the happy path: bytes, checks, no JSON parsing."""
    targets = authstate._discover(src, authstate.DirTemplate("{company_id}"))
    return list(authstate._read_all_fast(targets, "base64"))


def read_ours(src):
    template = authstate.DirTemplate("{company_id}")
    problems, states = [], []
    for cid, directory in authstate._discover(src, template):
        states.append(authstate.read_directory(cid, directory, "base64", problems)[0])
    assert not problems, problems[:3]
    return states


def read_naive(src):
    rows, creds = [], []
    for cid, name, value in run.naive_files(src):
        if name == codec.CREDS_FILE:
            creds.append((cid, value))
        else:
            rows.append((cid,) + codec.parse_key_file_name(name) + (value,))
    return rows, creds


def db_ours(params, datas):
    conn = pgconn.connect(params)
    with conn.transaction():
        conn.execute("SET LOCAL temp_buffers = '%s'" % authstate.IMPORT_TEMP_BUFFERS)
        authstate._apply(conn, pgconn.Store(), [authstate._CompanyData(d.company_id, d.keys, d.creds, d.copy)
                                                for d in datas], check_creds=True,
                         company_ids=[d.company_id for d in datas])
    conn.close()


def db_naive(params, rows, creds):
    from psycopg.types.json import Jsonb  # the harness loads with psycopg 3
    conn = pgconn.connect(params, autocommit=True)
    conn.prepare_threshold = None  # as run.naive_import
    with conn.cursor() as cur:
        for cid, value in creds:
            cur.execute(run.NAIVE_AUTH_SQL, (cid, Jsonb(value)))
        for i in range(0, len(rows), run.BATCH):
            batch = rows[i:i + run.BATCH]
            sql = run.NAIVE_KEYS_SQL % ", ".join(["(%s, %s, %s, %s)"] * len(batch))
            cur.execute(sql, [x if j < 3 else Jsonb(x) for r in batch for j, x in enumerate(r)])
    conn.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    src = sorted(d for d in os.listdir(os.path.join(run.DATA, "work")) if d.startswith("export-"))[-1]
    src = os.path.join(run.DATA, "work", src)
    pg = PgServer(os.path.join(run.DATA, "pg")).start()
    admin = pgconn.connect(pg.params(), autocommit=True)
    best = {}
    datas = states = rows = creds = None  # set by the read runs below, each repeat (every label runs every time)
    try:
        for i in range(args.repeat):
            for label, fn in (("read only (ours)", lambda: read_fast(src)),
                              ("strict read (ours)", lambda: read_ours(src)),
                              ("read+loads (naive)", lambda: read_naive(src))):
                run.settle(admin)
                t = time.perf_counter()
                out = fn()
                best[label] = min(best.get(label, 1e9), time.perf_counter() - t)
                if label.startswith("read only"):
                    datas = out
                elif label.startswith("strict"):
                    states = out
                else:
                    rows, creds = out
            for label, fn in (("db only (ours)", lambda p, d=datas: db_ours(p, d)),
                              ("db only (naive)", lambda p, r=rows, c=creds: db_naive(p, r, c))):
                params = run.create_db(admin, pg, "breakdown")
                run.settle(admin)
                t = time.perf_counter()
                fn(params)
                best[label] = min(best.get(label, 1e9), time.perf_counter() - t)
            print(i, {k: round(v, 2) for k, v in best.items()}, file=sys.stderr)
    finally:
        admin.execute('DROP DATABASE IF EXISTS "breakdown" WITH (FORCE)')
        admin.close()
        pg.stop("immediate")
    n = sum(len(s.keys) + 1 for s in states)
    for k, v in best.items():
        print("%-20s %7.2fs %9.0f rows/s" % (k, v, n / v))
    ours = best["read only (ours)"] + best["db only (ours)"]
    naive = best["read+loads (naive)"] + best["db only (naive)"]
    print("naive / ours = %.2fx; with zero-cost reading for us the ceiling is %.2fx"
          % (naive / ours, naive / best["db only (ours)"]))


if __name__ == "__main__":
    main()
