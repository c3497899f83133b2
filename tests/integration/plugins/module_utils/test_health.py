"""Health (core, CLI, auth_state_info module) against a real PostgreSQL and real backup manifests."""
from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
import subprocess

import pytest
import yaml

from ansible_collections.baileys.resilience.plugins.module_utils import cleanup, cli, health, jobs

from support import authgen, baileys_node, pgserver


STORE = {"schema": "public", "auth_table": "whatsapp_auth", "keys_table": "whatsapp_keys"}
MIX = {"pre-key": 10, "session": 8, "app-state-sync-key": 2, "lid-mapping": 4}
NOW = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)


@pytest.fixture
def loaded(db, dbconn):
    companies = authgen.generate(2, seed=5, form="base64", mix=MIX)
    authgen.load_into(dbconn, companies)
    # company-001: 4 sessions expired, 3 lid-mappings 10 days old, 2 pre-keys 40 days old
    dbconn.execute("UPDATE whatsapp_keys SET expires_at = now() - interval '1 minute' WHERE company_id = 'company-001' "
                   "AND key_type = 'session' AND key_id IN (SELECT key_id FROM whatsapp_keys WHERE company_id = "
                   "'company-001' AND key_type = 'session' ORDER BY key_id LIMIT 4)")
    dbconn.execute("UPDATE whatsapp_keys SET updated_at = now() - interval '10 days' WHERE company_id = 'company-001' "
                   "AND key_type = 'lid-mapping' AND key_id IN (SELECT key_id FROM whatsapp_keys WHERE company_id = "
                   "'company-001' AND key_type = 'lid-mapping' ORDER BY key_id LIMIT 3)")
    dbconn.execute("UPDATE whatsapp_keys SET updated_at = now() - interval '40 days' WHERE company_id = 'company-001' "
                   "AND key_type = 'pre-key' AND key_id IN ('2', '3')")
    # company-002 lost its highest pre-key (nextPreKeyId - 1 = 10)
    dbconn.execute("DELETE FROM whatsapp_keys WHERE company_id = 'company-002' AND key_type = 'pre-key' "
                   "AND key_id = '10'")
    dbconn.commit()
    return companies


def make_backup(backup_dir, created, prefix="baileys-auth", corrupt=None, validated=True, data=b"PGDMP-fake"):
    stamp = created.strftime("%Y%m%dT%H%M%SZ")
    name = "%s-%s.dump" % (prefix, stamp)
    os.makedirs(backup_dir, mode=0o700, exist_ok=True)
    with open(os.path.join(backup_dir, name), "wb") as fh:
        fh.write(data)
    manifest = {"format": 1, "file": name, "kind": "daily", "created_at": created.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "compression": "gzip",
                "counts": {"auth": 2, "keys": 47}, "companies": 2,
                "validated": {"restore_list": validated, "row_counts": validated}}
    if corrupt == "size":
        manifest["size"] += 1
    if corrupt == "sha":
        manifest["sha256"] = "0" * 64
    with open(os.path.join(backup_dir, name + ".manifest.json"), "w") as fh:
        json.dump(manifest, fh)
    return os.path.join(backup_dir, name)


def test_collect_content(db, loaded):
    h = health.collect(db, STORE, probes=25)
    assert h["status"] == "ok" and h["exit_code"] == 0
    names = {c["name"]: c["status"] for c in h["checks"]}
    assert names["database"] == "ok" and names["latency"] == "ok"
    by_company = {c["company_id"]: c for c in h["companies"]}
    c1, c2 = by_company["company-001"], by_company["company-002"]
    assert c1["keys"] == sum(MIX.values()) and c2["keys"] == sum(MIX.values()) - 1
    assert c1["by_type"] == MIX and c2["by_type"]["pre-key"] == 9
    assert c1["expired_keys"] == 4 and c2["expired_keys"] == 0
    # the two 40-day-old pre-keys are unconsumed, so live on the server: old but live, not stale
    assert c1["stale_keys"] == 0 and c1["old_live_keys"] == 2 and c1["old_live_by_type"] == {"pre-key": 2}
    assert c1["live_pre_keys"] == 10 and c2["live_pre_keys"] == 9
    assert c1["unuploaded_pre_keys"] == c2["unuploaded_pre_keys"] == 0
    assert c1["creds"] is True and c1["highest_pre_key_present"] is True
    assert c2["highest_pre_key_present"] is False
    assert h["totals"] == {"companies": 2, "companies_with_creds": 2, "keys": 2 * sum(MIX.values()) - 1,
                           "expired_keys": 4, "stale_keys": 0, "old_live_keys": 2, "live_pre_keys": 19}
    assert h["age_buckets"] == {"0-1d": 2 * sum(MIX.values()) - 1 - 5, "1-7d": 0, "7-14d": 3, "14-30d": 0,
                                ">30d": 2}
    assert h["table_sizes"]["keys"]["total_bytes"] >= h["table_sizes"]["keys"]["index_bytes"] > 0
    assert h["table_sizes"]["auth"]["table"] == "public.whatsapp_auth"
    lat = h["latency_ms"]
    assert lat["probes"] == 25 and 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert h["backup"] is None
    json.dumps(h)  # serialisable
    assert pgserver.SUPERUSER_PASSWORD not in json.dumps(h)


def test_missing_creds_and_thresholds(db, loaded, dbconn):
    h = health.collect(db, STORE, probes=3)
    assert h["status"] == "ok" and h["exit_code"] == 0, h["checks"]
    dbconn.execute("DELETE FROM whatsapp_auth WHERE company_id = 'company-002'")
    dbconn.commit()
    h = health.collect(db, STORE, probes=3)
    assert h["status"] == "warning" and h["exit_code"] == 1
    assert [c for c in h["checks"] if c["name"] == "creds"][0]["detail"].endswith("company-002")
    h = health.collect(db, STORE, probes=3, companies=["company-001"], thresholds={"expired_keys_warning": 3})
    assert [c["company_id"] for c in h["companies"]] == ["company-001"]
    assert [c for c in h["checks"] if c["name"] == "expired_keys"][0]["status"] == "warning"
    h = health.collect(db, STORE, probes=3, companies=["company-001"], thresholds={"latency_p95_critical_ms": 0})
    assert h["status"] == "critical" and h["exit_code"] == 2
    with pytest.raises(health.HealthError):
        health.collect(db, STORE, thresholds={"latency": 1})


@pytest.mark.compat
def test_new_account_pre_keys_are_live_not_stale(node, db, dbconn, tmp_path):
    """A new account's 812 pre-keys written by Baileys, 12 consumed through removePreKey, 3 not uploaded,
    everything 40 days old (pre-keys also past an expires_at): the pre-keys are counted as live, never as
    stale or expired, and only the keys the cleanup may delete raise the stale-key warning."""
    creds, _keys, info = baileys_node.new_account(node, 12, 3)
    _c, other = authgen.generate(1, seed=4, form="base64", mix={"session": 6, "device-list": 2,
                                                                "app-state-sync-key": 2})["company-001"]
    authgen.load_into(dbconn, {"acme": (creds, {**_keys, **other})})
    dbconn.execute("UPDATE whatsapp_keys SET updated_at = now() - interval '40 days'")
    dbconn.execute("UPDATE whatsapp_keys SET expires_at = now() - interval '1 day' WHERE key_type = 'pre-key'")
    dbconn.commit()
    live = len(info["uploaded"]) - len(info["consumed"])
    assert live == 800
    thresholds = {"stale_keys_warning": 0, "expired_keys_warning": 0}
    h = health.collect(db, STORE, probes=3, thresholds=thresholds)
    (acme,) = h["companies"]
    assert acme["live_pre_keys"] == live and acme["unuploaded_pre_keys"] == 3
    # stale: Baileys' 12 sessions, 6 more sessions, 2 device lists
    assert acme["stale_keys"] == 12 + 6 + 2 and acme["expired_keys"] == 0
    assert acme["old_live_by_type"] == {"pre-key": live + 3, "identity-key": 12, "app-state-sync-key": 2}
    checks = {c["name"]: c for c in h["checks"]}
    assert checks["stale_keys"]["status"] == "warning" and checks["expired_keys"]["status"] == "ok"
    assert h["status"] == "warning"
    prom = jobs.prom_text(health.prom_metrics(h))
    assert 'baileys_resilience_live_pre_keys{company_id="acme"} %d' % live in prom
    assert "baileys_resilience_stale_keys 20" in prom and "baileys_resilience_expired_keys 0" in prom
    assert "baileys_resilience_old_live_keys %d" % (live + 3 + 12 + 2) in prom
    text = health.render_text(h)
    assert "may be deleted: stale 20, expired 0" in text and "old but live (kept by rule): 817" in text
    assert "live pre-keys: 800" in text and "live-pre-keys=800" in text

    # once the cleanup has run only live keys are old: nothing alerts, the supply is untouched
    cleanup.cleanup_keys(db, STORE, confirm_large_delete=True, vacuum=False)
    h = health.collect(db, STORE, probes=3, thresholds=thresholds)
    assert h["status"] == "ok", h["checks"]
    (acme,) = h["companies"]
    assert (acme["stale_keys"], acme["expired_keys"], acme["live_pre_keys"]) == (0, 0, live)
    assert acme["old_live_keys"] == live + 3 + 12 + 2


def test_unreachable_database_is_critical(db):
    h = health.collect(dict(db, login_port=1), STORE, probes=2)
    assert h["status"] == "critical" and h["database"]["reachable"] is False
    assert "cannot connect" in h["database"]["error"]
    assert pgserver.SUPERUSER_PASSWORD not in json.dumps(h)


def test_backup_status(tmp_path):
    d = str(tmp_path / "b")
    assert health.backup_status(d)["status"] == "critical"  # directory missing
    make_backup(d, NOW - datetime.timedelta(hours=2))
    b = health.backup_status(d, now=NOW)
    assert b["status"] == "ok" and b["valid_count"] == 1 and b["age_seconds"] == 7200 and b["size"] == 10
    assert health.backup_status(d, now=NOW + datetime.timedelta(hours=25))["status"] == "warning"
    assert health.backup_status(d, now=NOW + datetime.timedelta(hours=49))["status"] == "critical"
    # a newer but broken backup: warning, the older valid one still counts
    make_backup(d, NOW - datetime.timedelta(hours=1), corrupt="size")
    b = health.backup_status(d, now=NOW)
    assert b["status"] == "warning" and b["count"] == 2 and b["valid_count"] == 1
    assert "invalid" in b["detail"] and "size" in b["detail"]
    assert b["newest_valid"]["created_at"] == (NOW - datetime.timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    # unvalidated and checksum-mismatched backups are not valid; the checksum only when asked
    e = str(tmp_path / "e")
    make_backup(e, NOW - datetime.timedelta(hours=3), validated=False)
    assert health.backup_status(e, now=NOW)["valid_count"] == 0
    f = str(tmp_path / "f")
    make_backup(f, NOW - datetime.timedelta(hours=3), corrupt="sha")
    assert health.backup_status(f, now=NOW)["status"] == "ok"
    assert health.backup_status(f, now=NOW, verify_checksum=True)["status"] == "critical"
    # partials and other prefixes are ignored
    open(os.path.join(f, "baileys-auth-20990101T000000Z.dump.partial"), "w").close()
    make_backup(f, NOW, prefix="other")
    assert health.backup_status(f, now=NOW)["count"] == 1


def write_config(path, conn, **extra):
    cfg = dict(conn)
    cfg.update(extra)
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        yaml.safe_dump(cfg, fh)
    return str(path)


def run(args):
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(args, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def test_cli_health_json_exit_codes_and_textfile(db, loaded, tmp_path):
    backup_dir = str(tmp_path / "backups")
    make_backup(backup_dir, datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(hours=1))
    prom_dir = tmp_path / "prom"
    prom_dir.mkdir()
    cfg = write_config(tmp_path / "c.yml", db, lock_dir=str(tmp_path), backup_dir=backup_dir,
                       textfile_dir=str(prom_dir), health={"probes": 5})
    code, out, err = run(["--config", cfg, "health", "--json"])
    assert code == 0, out
    h = json.loads(out)
    assert h["status"] == "ok" and h["backup"]["valid_count"] == 1 and h["latency_ms"]["probes"] == 5
    assert h["totals"]["keys"] == 2 * sum(MIX.values()) - 1
    prom = (prom_dir / "baileys_resilience_health.prom").read_text()
    assert "baileys_resilience_health_status 0" in prom
    assert "baileys_resilience_backup_size_bytes 10" in prom
    assert 'baileys_resilience_probe_latency_seconds{quantile="0.95"}' in prom
    assert 'baileys_resilience_job_success{job="health"} 1' in prom
    assert os.listdir(prom_dir) == ["baileys_resilience_health.prom"]  # no temp left behind
    # warning: thresholds from the config
    cfg = write_config(tmp_path / "w.yml", db, lock_dir=str(tmp_path), backup_dir=backup_dir,
                       health={"probes": 3, "thresholds": {"backup_age_warning_hours": 0.5}})
    code, out, _err = run(["--config", cfg, "health"])
    assert code == 1 and "status: WARNING" in out and "backup" in out
    # critical: database down
    cfg = write_config(tmp_path / "x.yml", dict(db, login_port=1), lock_dir=str(tmp_path), textfile_dir=str(prom_dir))
    code, out, err = run(["--config", cfg, "health", "--json"])
    assert code == 2 and json.loads(out)["status"] == "critical"
    assert pgserver.SUPERUSER_PASSWORD not in out + err
    prom = (prom_dir / "baileys_resilience_health.prom").read_text()
    assert "baileys_resilience_health_status 2" in prom and "baileys_resilience_database_up 0" in prom


def test_cli_health_watch(db, loaded, tmp_path):
    cfg = write_config(tmp_path / "c.yml", db, lock_dir=str(tmp_path), health={"probes": 2})
    code, out, _err = run(["--config", cfg, "health", "--watch", "--interval", "0.1", "--count", "3", "--json"])
    assert code == 0
    rounds = [json.loads(line) for line in out.splitlines()]
    assert len(rounds) == 3 and all(r["status"] == "ok" for r in rounds)


def test_auth_state_info_through_ansible(pg, db, loaded, tmp_path, ansible_env):
    backup_dir = str(tmp_path / "backups")
    make_backup(backup_dir, datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(hours=30))
    args = dict(pg.socket_params(db["login_db"]), backup_dir=backup_dir, probes=5)
    env = dict(ansible_env, ANSIBLE_LOAD_CALLBACK_PLUGINS="1", ANSIBLE_STDOUT_CALLBACK="ansible.builtin.json")

    def ansible(a, check=False):
        cmd = ["ansible", "localhost", "-c", "local", "-m", "baileys.resilience.auth_state_info", "-a", json.dumps(a)]
        proc = subprocess.run(cmd + (["--check"] if check else []), capture_output=True, text=True, env=env,
                              timeout=120, check=False)
        return proc.returncode, json.loads(proc.stdout)["plays"][0]["tasks"][0]["hosts"]["localhost"]

    rc, res = ansible(args)
    assert rc == 0 and res["changed"] is False
    assert res["status"] == "warning" and res["exit_code"] == 1  # the backup is 30 h old
    assert res["totals"]["keys"] == 2 * sum(MIX.values()) - 1 and res["backup"]["valid_count"] == 1
    assert {c["company_id"] for c in res["companies"]} == {"company-001", "company-002"}
    rc, res = ansible(dict(args, fail_on="warning"), check=True)
    assert rc != 0 and res["failed"] is True and "backup" in res["msg"] and res["changed"] is False
