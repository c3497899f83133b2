"""`make demo`: the main job end to end on a throwaway PostgreSQL under .demo/.

1. start a PostgreSQL server under .demo/pg (nothing else on the machine is touched);
2. load a realistic generated auth state (1 company, 1,650 keys of every type, legacy Buffer forms included);
3. export it with the export_auth_state playbook, then again (idempotent: changed=false);
4. import the files into a second database with the import_auth_state playbook;
5. export the second database and compare every file's sha256 with the first export;
6. print a summary table; exit non-zero if anything does not match.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, ".demo")
sys.path[:0] = [os.path.join(ROOT, "tests"), os.path.join(ROOT, ".build", "collections")]

from authgen import generate, load_into  # noqa: E402
from pgserver import PgServer  # noqa: E402

from ansible_collections.baileys.resilience.plugins.module_utils import pgconn  # noqa: E402

MANIFEST = ".baileys-resilience-manifest.json"


def run_playbook(name, extra):
    varfile = os.path.join(DEMO, "vars.json")
    fd = os.open(varfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(extra, fh)
    env = dict(os.environ, ANSIBLE_STDOUT_CALLBACK="json", ANSIBLE_CONFIG=os.path.join(ROOT, "ansible.cfg"),
               ANSIBLE_COLLECTIONS_PATH=os.path.join(ROOT, ".build", "collections"))
    started = time.monotonic()
    proc = subprocess.run(["ansible-playbook", "-i", os.path.join(ROOT, "inventories", "demo", "hosts.yml"),
                           os.path.join(ROOT, "playbooks", name), "-e", "@" + varfile],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    elapsed = time.monotonic() - started
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-2000:])
        raise SystemExit("demo: %s failed" % name)
    out = json.loads(proc.stdout[proc.stdout.index("{"):])
    for task in out["plays"][0]["tasks"]:
        result = task["hosts"]["localhost"]
        if "totals" in result:
            return result, elapsed
    raise SystemExit("demo: no result from %s" % name)


def checksums(root):
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            if name == MANIFEST:
                continue
            path = os.path.join(dirpath, name)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def main():
    t0 = time.monotonic()
    rows = []
    shutil.rmtree(DEMO, ignore_errors=True)
    os.makedirs(DEMO, mode=0o755)
    server = PgServer(os.path.join(DEMO, "pg"))
    t = time.monotonic()
    server.start()
    rows.append(("start PostgreSQL (%s)" % server.version.split()[2], time.monotonic() - t, "", "yes"))
    try:
        admin = pgconn.connect(server.params(), autocommit=True)
        for name in ("whatsapp", "whatsapp_restored"):
            admin.execute('CREATE DATABASE "%s"' % name)
            conn = pgconn.connect(server.params(name))
            pgconn.create_schema(conn, pgconn.Store())
            conn.commit()
            conn.close()
        admin.close()
        t = time.monotonic()
        data = generate(1, seed=2026, form="mixed")
        conn = pgconn.connect(server.params("whatsapp"))
        load_into(conn, data)
        conn.close()
        n_keys = sum(len(k) for _c, k in data.values())
        rows.append(("load generated auth state", time.monotonic() - t, "1 company, %d keys" % n_keys, "yes"))

        def dbvars(db):
            p = server.params(db)
            return {"baileys_db_host": p["login_host"], "baileys_db_port": p["login_port"],
                    "baileys_db_user": p["login_user"], "baileys_db_password": p["login_password"],
                    "baileys_db_name": db}

        files_a = os.path.join(DEMO, "sessions")
        res, secs = run_playbook("export_auth_state.yml", dict(dbvars("whatsapp"), baileys_sessions_dir=files_a))
        rows.append(("export (playbook)", secs, "%d files written" % res["totals"]["written"],
                     "yes" if res["totals"]["keys"] == n_keys else "NO"))
        res, secs = run_playbook("export_auth_state.yml", dict(dbvars("whatsapp"), baileys_sessions_dir=files_a))
        rows.append(("re-export (no-op)", secs, "changed=%s, %d unchanged" % (res["changed"],
                                                                            res["totals"]["unchanged"]),
                     "yes" if not res["changed"] else "NO"))
        res, secs = run_playbook("import_auth_state.yml", dict(dbvars("whatsapp_restored"),
                                                               baileys_sessions_dir=files_a))
        rows.append(("import into 2nd database", secs, "%d inserted" % res["totals"]["inserted"],
                     "yes" if res["totals"]["inserted"] == n_keys else "NO"))
        files_b = os.path.join(DEMO, "sessions-restored")
        res, secs = run_playbook("export_auth_state.yml", dict(dbvars("whatsapp_restored"),
                                                               baileys_sessions_dir=files_b))
        a, b = checksums(files_a), checksums(files_b)
        same = a == b and len(a) == n_keys + 1
        rows.append(("re-export 2nd database", secs, "%d files, sha256 %s" % (len(b), "match" if same else "DIFFER"),
                     "yes" if same else "NO"))
    finally:
        server.stop()
    print()
    print("%-30s %8s  %-34s %s" % ("step", "seconds", "counts", "verified"))
    print("-" * 84)
    for step, secs, counts, ok in rows:
        print("%-30s %8.2f  %-34s %s" % (step, secs, counts, ok))
    print("-" * 84)
    total = time.monotonic() - t0
    ok = all(r[3] == "yes" for r in rows)
    print("%-30s %8.2f  %s" % ("total", total, "ALL VERIFIED" if ok else "FAILED"))
    print("\nfiles: %s (PostgreSQL data under .demo/pg, stopped)" % files_a)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
