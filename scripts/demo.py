"""`make demo`: the whole job end to end on this machine, everything under .demo/.

1. a throwaway PostgreSQL (.demo/pg) holding a realistic auth state (1 company, 1,650 keys of every type,
   legacy Buffer forms included), and a local S3 endpoint with two buckets standing for two regions;
2. export / re-export (no-op) / import into a second database / re-export, sha256 of every file compared;
3. the collection's roles applied to localhost (provision.yml: cli, pg_backup, keys_cleanup, s3_replication)
   with every path under .demo/;
4. the service stand-in (real Baileys) under PM2, on PostgreSQL;
5. a backup exactly as the cron line runs it, replicated to S3;
6. PostgreSQL stopped; emergency_rollback (it picks the local backup); the stand-in healthy on files with the
   same counts; new keys written in file mode;
7. PostgreSQL back; return_to_postgres; the store holds the new keys; the stand-in back on PostgreSQL;
8. a final table: each step, seconds, counts, verified yes/no. Exit non-zero if anything is not verified.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, ".demo")
VENV_BIN = os.path.dirname(sys.executable)
sys.path[:0] = [os.path.join(ROOT, "tests"), os.path.join(ROOT, ".build", "collections")]

from support import journal_check  # noqa: E402
from support.authgen import generate, load_into  # noqa: E402
from support.pgserver import PgServer, free_port  # noqa: E402

from ansible_collections.baileys.resilience.plugins.module_utils import pgconn  # noqa: E402

MANIFEST = ".baileys-resilience-manifest.json"
PM2 = os.path.join(ROOT, "tests", "standin", "node_modules", ".bin", "pm2")
STANDIN = os.path.join(ROOT, "tests", "standin", "server.mjs")
COMPANY = "company-001"


class Demo:
    def __init__(self):
        self.rows = []
        self.server = None
        self.s3 = None
        self.pm2_home = os.path.join(DEMO, "pm2")
        self.service_port = free_port()

    # ------------------------------------------------------------------ helpers
    def step(self, name, seconds, counts, ok):
        self.rows.append((name, seconds, counts, "yes" if ok else "NO"))
        print("  %-44s %7.2fs  %-40s %s" % (name, seconds, counts, "ok" if ok else "NOT VERIFIED"), flush=True)

    def write_private(self, path, data):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(data)

    def playbook(self, name, extra, *args):
        varfile = os.path.join(DEMO, "vars-%s.json" % os.path.splitext(os.path.basename(name))[0])
        self.write_private(varfile, json.dumps(extra))
        env = dict(os.environ, ANSIBLE_STDOUT_CALLBACK="json", ANSIBLE_CONFIG=os.path.join(ROOT, "ansible.cfg"),
                   ANSIBLE_COLLECTIONS_PATH=os.path.join(ROOT, ".build", "collections"),
                   PATH=VENV_BIN + os.pathsep + os.environ.get("PATH", ""))
        started = time.monotonic()
        proc = subprocess.run([os.path.join(VENV_BIN, "ansible-playbook"), "-i",
                               os.path.join(ROOT, "inventories", "demo", "hosts.yml"),
                               os.path.join(ROOT, "playbooks", name), "-e", "@" + varfile, *args],
                              capture_output=True, text=True, env=env, cwd=ROOT, check=False)
        elapsed = time.monotonic() - started
        try:
            out = json.loads(proc.stdout[proc.stdout.index("{"):])
        except ValueError:
            out = {"plays": []}
        tasks = {}
        for play in out.get("plays", []):
            for task in play["tasks"]:
                tasks[task["task"]["name"]] = task["hosts"].get("localhost", {})
        if proc.returncode != 0:
            failed = [(n, r.get("msg")) for n, r in tasks.items() if r.get("failed")]
            sys.stderr.write("%s failed: %s\n%s\n" % (name, failed, proc.stderr[-3000:]))
            raise SystemExit("demo: %s failed" % name)
        return tasks, elapsed

    def health(self, timeout=30.0, mode=None):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen("http://127.0.0.1:%d/health" % self.service_port, timeout=2) as r:
                    last = json.loads(r.read())
                    if last.get("status") == "ok" and (mode is None or last.get("mode") == mode):
                        return last
            except Exception:  # noqa: BLE001 - not up yet
                pass
            time.sleep(0.2)
        raise SystemExit("demo: the stand-in did not become healthy (last answer: %s)" % last)

    def pm2(self, *args):
        env = dict(os.environ, PM2_HOME=self.pm2_home)
        return subprocess.run([PM2, *args], capture_output=True, text=True, env=env, check=False)

    def store_counts(self, db="whatsapp"):
        conn = pgconn.connect(self.server.params(db))
        try:
            creds = conn.execute("SELECT count(*) FROM whatsapp_auth").fetchone()[0]
            keys = conn.execute("SELECT count(*) FROM whatsapp_keys").fetchone()[0]
        finally:
            conn.close()
        return creds, keys

    # ------------------------------------------------------------------ the run
    def cleanup_previous(self):
        if os.path.exists(os.path.join(self.pm2_home, "pm2.pid")):
            self.pm2("kill")
        pg = PgServer(os.path.join(DEMO, "pg"))
        pg.stop("immediate")
        for pidfile in glob.glob(os.path.join(DEMO, "s3", "*.pid")):
            try:
                os.kill(int(open(pidfile).read()), 15)
            except (OSError, ValueError):
                pass
        shutil.rmtree(DEMO, ignore_errors=True)
        os.makedirs(DEMO, mode=0o755)

    def start_postgres(self):
        t = time.monotonic()
        self.server = PgServer(os.path.join(DEMO, "pg")).start()
        admin = pgconn.connect(self.server.params(), autocommit=True)
        for name in ("whatsapp", "whatsapp_restored"):
            admin.execute('CREATE DATABASE "%s"' % name)
            conn = pgconn.connect(self.server.params(name))
            pgconn.create_schema(conn, pgconn.Store())
            conn.commit()
            conn.close()
        admin.close()
        data = generate(1, seed=2026, form="mixed")
        conn = pgconn.connect(self.server.params("whatsapp"))
        load_into(conn, data)
        conn.close()
        self.n_keys = sum(len(k) for _c, k in data.values())
        self.step("PostgreSQL %s + generated auth state" % self.server.version.split()[2], time.monotonic() - t,
                  "1 company, %d keys" % self.n_keys, self.store_counts() == (1, self.n_keys))

    def start_s3(self):
        """A local S3 endpoint (moto) with two buckets standing for two regions."""
        from support import s3fixtures

        t = time.monotonic()
        os.makedirs(os.path.join(DEMO, "s3"), exist_ok=True)
        self.moto = s3fixtures.MotoServer(log_path=os.path.join(DEMO, "s3", "moto.log")).start()
        with open(os.path.join(DEMO, "s3", "moto.pid"), "w") as fh:
            fh.write(str(self.moto.proc.pid))
        self.buckets = [("eu", "eu-west-1", "demo-wa-backups-eu"), ("us", "us-east-1", "demo-wa-backups-us")]
        for _name, region, bucket in self.buckets:
            s3fixtures.create_bucket(self.moto.url, region, bucket)
        self.s3_targets = [
            {"name": name, "bucket": bucket, "region": region, "endpoint_url": self.moto.url, "prefix": "demo/",
             "access_key": s3fixtures.TEST_ACCESS_KEY, "secret_key": s3fixtures.TEST_SECRET_KEY,
             "configure_bucket": True, "sse": "AES256"}
            for name, region, bucket in self.buckets]
        self.step("local S3 endpoint, 2 buckets (2 regions)", time.monotonic() - t, self.moto.url, True)
        return True

    def s3_objects(self):
        from support import s3fixtures

        return {name: s3fixtures.list_keys(self.moto.url, bucket, region)
                for name, region, bucket in self.buckets}

    def db_vars(self, db):
        p = self.server.params(db)
        return {"baileys_db_host": p["login_host"], "baileys_db_port": p["login_port"],
                "baileys_db_user": p["login_user"], "baileys_db_password": p["login_password"],
                "baileys_db_name": db}

    def export_import(self):
        files_a = os.path.join(DEMO, "export")
        res, secs = self.playbook("export_auth_state.yml", dict(self.db_vars("whatsapp"),
                                                                baileys_sessions_dir=files_a))
        t = res["Export from PostgreSQL"]
        self.step("export (playbook)", secs, "%d files written" % t["totals"]["written"],
                  t["totals"]["keys"] == self.n_keys)
        res, secs = self.playbook("export_auth_state.yml", dict(self.db_vars("whatsapp"),
                                                                baileys_sessions_dir=files_a))
        t = res["Export from PostgreSQL"]
        self.step("re-export (no-op)", secs, "changed=%s, %d unchanged" % (t["changed"], t["totals"]["unchanged"]),
                  not t["changed"])
        res, secs = self.playbook("import_auth_state.yml", dict(self.db_vars("whatsapp_restored"),
                                                                baileys_sessions_dir=files_a))
        t = res["Import into PostgreSQL"]
        self.step("import into a 2nd database", secs, "%d inserted" % t["totals"]["inserted"],
                  t["totals"]["inserted"] == self.n_keys)
        files_b = os.path.join(DEMO, "export-restored")
        res, secs = self.playbook("export_auth_state.yml", dict(self.db_vars("whatsapp_restored"),
                                                                baileys_sessions_dir=files_b))
        a, b = checksums(files_a), checksums(files_b)
        same = a == b and len(a) == self.n_keys + 1
        self.step("re-export of the 2nd database", secs,
                  "%d files, sha256 %s" % (len(b), "match" if same else "DIFFER"), same)

    def provision(self):
        p = self.server.params("whatsapp")
        bindir = self.server.bindir
        self.v = {
            "cli_install_dir": os.path.join(DEMO, "opt"), "cli_bin": os.path.join(DEMO, "bin", "baileys-resilience"),
            "cli_config_dir": os.path.join(DEMO, "etc"), "cli_log_dir": os.path.join(DEMO, "log"),
            # the demo's command runs on this venv's Python (it has every library): no virtual environment of its
            # own, no package index; the probe on cron (a cron file under .demo/, as the other jobs), state under .demo/
            "cli_runtime": "system", "cli_python": sys.executable, "cli_manage_packages": False,
            "cli_state_dir": os.path.join(DEMO, "state"), "cli_probe_scheduler": "cron",
            "cli_probe_cron_file": os.path.join(DEMO, "cron.d", "baileys-resilience-probe"),
            "cli_db_host": p["login_host"], "cli_db_port": p["login_port"], "cli_db_user": p["login_user"],
            "cli_db_password": p["login_password"], "cli_db_name": "whatsapp", "cli_pg_bin_dir": bindir,
            "cli_backup_dir": os.path.join(DEMO, "backups"), "cli_textfile_dir": os.path.join(DEMO, "metrics"),
            "pg_backup_dir": os.path.join(DEMO, "backups"), "pg_backup_pg_bin_dir": bindir,
            "pg_backup_cron_file": os.path.join(DEMO, "cron.d", "baileys-resilience-backup"),
            "keys_cleanup_cron_file": os.path.join(DEMO, "cron.d", "baileys-resilience-cleanup"),
            "cli_health_cron_file": os.path.join(DEMO, "cron.d", "baileys-resilience-health"),
        }
        for d in ("bin", "cron.d", "metrics"):
            os.makedirs(os.path.join(DEMO, d), exist_ok=True)
        self.v.update({"s3_replication_targets": self.s3_targets,
                       "s3_replication_cron_file": os.path.join(DEMO, "cron.d", "baileys-resilience-s3"),
                       "s3_replication_credentials_dir": os.path.join(DEMO, "etc", "s3")})
        skip = "pg_client"
        _res, secs = self.playbook("provision.yml", self.v, "--skip-tags", skip)
        crons = sorted(os.listdir(os.path.join(DEMO, "cron.d")))
        self.step("roles applied to localhost", secs, "cron: %s" % ", ".join(c.split("-")[-1] for c in crons),
                  os.path.exists(self.v["cli_bin"]) and len(crons) == 5)

    def start_service(self):
        t = time.monotonic()
        service = os.path.join(DEMO, "service")
        os.makedirs(os.path.join(service, "sessions"), mode=0o700)
        p = self.server.params("whatsapp")
        env_lines = [
            "USE_REPOSITORY_PATTERN=true", "SESSIONS_DIR=%s" % os.path.join(service, "sessions"),
            "PORT=%d" % self.service_port, "PGHOST=%s" % p["login_host"], "PGPORT=%d" % p["login_port"],
            "PGUSER=%s" % p["login_user"], "PGPASSWORD=%s" % p["login_password"], "PGDATABASE=whatsapp",
        ]
        self.env_file = os.path.join(service, ".env")
        self.write_private(self.env_file, "\n".join(env_lines) + "\n")
        env = dict(os.environ, PM2_HOME=self.pm2_home, ENV_FILE=self.env_file)
        proc = subprocess.run([PM2, "start", STANDIN, "--name", "whatsapp", "--time"], capture_output=True,
                              text=True, env=env, check=False)
        if proc.returncode != 0:
            raise SystemExit("demo: pm2 start failed: %s" % proc.stderr[-2000:])
        h = self.health(mode="postgres")
        self.step("service stand-in under PM2 (PostgreSQL)", time.monotonic() - t,
                  "%d creds, %d keys loaded" % (h["creds"], h["keys"]), (h["creds"], h["keys"]) == (1, self.n_keys))

    def backup(self):
        with open(self.v["pg_backup_cron_file"]) as fh:
            line = next(x for x in fh if "baileys-resilience backup" in x and not x.startswith("#"))
        command = line.split(None, 6)[6].strip()  # m h dom mon dow user command
        t = time.monotonic()
        proc = subprocess.run(["/bin/sh", "-c", command], capture_output=True, text=True, check=False)
        manifests = sorted(glob.glob(os.path.join(self.v["pg_backup_dir"], "*.manifest.json")))
        ok = proc.returncode == 0 and len(manifests) == 1
        detail = "no backup"
        if manifests:
            m = json.load(open(manifests[-1]))
            dump = os.path.join(self.v["pg_backup_dir"], m["file"])
            sha = hashlib.sha256(open(dump, "rb").read()).hexdigest()
            ok = ok and sha == m["sha256"] and m["counts"] == {"auth": 1, "keys": self.n_keys}
            detail = "%s, %d KiB, sha256 ok" % (m["counts"], m["size"] // 1024)
        self.step("backup as the cron line runs it", time.monotonic() - t, detail, ok)
        objects = self.s3_objects()
        name = os.path.basename(manifests[-1])[: -len(".manifest.json")] if manifests else "?"
        replicated = all(any(k.endswith("/" + name) for k in keys)
                         and any(k.endswith("/" + name + ".manifest.json") for k in keys)
                         for keys in objects.values())
        self.step("  ... replicated to S3 (chained)", 0.0,
                  ", ".join("%s: %d objects" % (n, len(k)) for n, k in objects.items()), replicated)

    def rollback(self):
        self.server.stop("immediate")
        self.fv = {
            "failover_sessions_dir": os.path.join(DEMO, "service", "sessions"), "failover_env_file": self.env_file,
            "failover_db_host": "127.0.0.1", "failover_db_port": self.server.port, "failover_db_user": "postgres",
            "failover_db_password": self.server.params()["login_password"], "failover_db_name": "whatsapp",
            "failover_db_connect_params": {"connect_timeout": 3},
            "failover_backup_dir": self.v["pg_backup_dir"], "failover_pg_bin_dir": self.server.bindir,
            "failover_service_manager": "pm2", "failover_service_name": "whatsapp", "failover_pm2_bin": PM2,
            "failover_pm2_home": self.pm2_home,
            "failover_health_url": "http://127.0.0.1:%d/health" % self.service_port,
            "failover_health_verify_counts": True, "failover_health_timeout": 60,
        }
        # first what an operator runs when there is a minute to spare: --check --diff changes nothing
        env_before = open(self.env_file, "rb").read()
        sessions = self.fv["failover_sessions_dir"]
        before = sorted(os.listdir(sessions))
        res, secs = self.playbook("emergency_rollback.yml", self.fv, "--check", "--diff")
        would = next(r["failover_rollback_report"] for r in res.values() if "failover_rollback_report" in r)
        untouched = open(self.env_file, "rb").read() == env_before and sorted(os.listdir(sessions)) == before
        self.step("emergency_rollback --check --diff", secs,
                  "would export %s files from %s; nothing changed" % (would["files_written"], would["source"]),
                  untouched and would["source"] == "backup" and int(would["files_written"]) == self.n_keys + 1)
        # from here the stand-in's writer changes keys like a live session (about 20 writes a second) and journals
        # every acknowledged write; the rollback restarts the service, which reads its environment file
        self.journal = os.path.join(DEMO, "service", "journal.jsonl")
        with open(self.env_file, "a") as fh:
            fh.write("WRITER=on\nWRITER_RATE=20\nWRITER_JOURNAL=%s\n" % self.journal)
        res, secs = self.playbook("emergency_rollback.yml", self.fv)
        report = next(r["failover_rollback_report"] for r in res.values() if "failover_rollback_report" in r)
        h = self.health(mode="files")
        ok = report["source"] == "backup" and (h["creds"], h["keys"]) == (1, self.n_keys)
        self.rto = float(report["recovery_seconds"])
        self.step("PostgreSQL down -> emergency_rollback", secs,
                  "source %s, RTO %.1fs, %d keys on files" % (report["source"], self.rto, h["keys"]), ok)
        t = time.monotonic()
        req = urllib.request.Request("http://127.0.0.1:%d/keys?company=%s&count=5" % (self.service_port, COMPANY),
                                     method="POST")
        with urllib.request.urlopen(req, timeout=10) as r:
            self.added = json.loads(r.read())["ids"]
        time.sleep(2)  # the writer keeps writing on files
        self.step("new keys written in file mode", time.monotonic() - t, "%d pre-keys" % len(self.added),
                  len(self.added) == 5)

    def return_to_postgres(self):
        t = time.monotonic()
        self.server.start()
        self.step("PostgreSQL back", time.monotonic() - t, "", True)
        res, secs = self.playbook("return_to_postgres.yml", self.fv)
        h = self.health(mode="postgres")
        creds, keys = self.store_counts()
        env_back = "USE_REPOSITORY_PATTERN=true" in open(self.env_file).read()
        conn = pgconn.connect(self.server.params("whatsapp"))
        try:
            home = conn.execute("SELECT count(*) FROM whatsapp_keys WHERE key_type = 'pre-key' AND key_id = ANY(%s)",
                                (self.added,)).fetchone()[0]
        finally:
            conn.close()
        ok = home == 5 and h["creds"] == creds and env_back  # key counts move: the writer is on
        report = next(r["failover_return_report"] for r in res.values() if "failover_return_report" in r)
        self.step("return_to_postgres", secs, "%s inserted, %s deleted, store %d keys" % (
            report["inserted"], report["deleted"], keys), ok)
        # the writer goes on on PostgreSQL; then it is stopped (no write in flight) and its journal checked
        time.sleep(2)
        t = time.monotonic()
        self.pm2("stop", "whatsapp")
        check = journal_check.run(self.journal, pg=self.server.params("whatsapp"))
        self.step("journal check (writer, every ack'd write)", time.monotonic() - t,
                  "ops %d, lost %d, resurrected %d, wrong %d" % (check["ops"], check["lost"], check["resurrected"],
                                                                 check["wrong"]),
                  check["ops"] > 50 and (check["lost"], check["resurrected"], check["wrong"]) == (0, 0, 0))

    def run(self):
        t0 = time.monotonic()
        print("baileys.resilience demo (everything under %s)" % DEMO, flush=True)
        self.cleanup_previous()
        try:
            self.start_postgres()
            self.s3 = self.start_s3()
            self.export_import()
            self.provision()
            self.start_service()
            self.backup()
            self.rollback()
            self.return_to_postgres()
        finally:
            if os.path.exists(PM2):
                self.pm2("kill")
            if self.server:
                self.server.stop()
            if getattr(self, "moto", None):
                self.moto.stop()
        total = time.monotonic() - t0
        ok = all(r[3] == "yes" for r in self.rows)
        print()
        print("%-44s %8s  %-44s %s" % ("step", "seconds", "counts", "verified"))
        print("-" * 108)
        for step, secs, counts, verified in self.rows:
            print("%-44s %8.2f  %-44s %s" % (step, secs, counts, verified))
        print("-" * 108)
        print("%-44s %8.2f  %s" % ("total", total, "ALL VERIFIED" if ok else "FAILED"))
        return 0 if ok else 1


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


if __name__ == "__main__":
    sys.exit(Demo().run())
