"""Verify of the pitr scenario (testinfra on the backup host, after side_effect.yml).

What side_effect.yml recorded under the ephemeral directory's results/: barman check, the S3 objects the
barman-cloud hooks wrote, the T-1s import of the deleted company (playbooks/pitr_restore.yml) compared with the
writer's journal, the latest recovery after the server was SIGKILLed (lost acknowledged writes, the recovery
point), the slot dropped by pitr_state absent, and the hourly-dump fallback for a login that may not replicate.
"""

import json
import os
from pathlib import Path

from support.molecule_cron import cron_job, run, run_backup_job

testinfra_hosts = ["baileys_pitr"]

RECOVERY_POINT_GOAL = 5.0
VICTIM = "company-001"
VICTIM_KEYS = 1650


def _result(name):
    eph = os.environ.get("MOLECULE_EPHEMERAL_DIRECTORY")
    assert eph, "MOLECULE_EPHEMERAL_DIRECTORY is not set (run through molecule)"
    return json.loads((Path(eph) / "results" / name).read_text())


def test_barman_check_all_ok():
    checks = _result("check.json")["baileys"]
    failed = {name: c for name, c in checks.items() if c["status"] != "OK"}
    assert not failed, failed
    assert checks["receive_wal_running"]["status"] == "OK"
    assert checks["replication_slot"]["status"] == "OK"


def test_metrics_job_sees_streaming_and_the_slot():
    summary = _result("metrics.json")
    assert summary["ok"], summary
    assert summary["receive_wal"] == "OK" and summary["slot_exists"] and summary["slot_active"], summary
    assert isinstance(summary["slot_lag_bytes"], int) and summary["slot_lag_bytes"] >= 0, summary
    assert summary["failed_checks"] == [], summary


def test_import_at_t_minus_1s_brings_back_exactly_the_rows():
    data = _result("import.json")
    check, restore = data["check"], data["restore"]
    assert check["ok"], check
    assert check["expected_rows"] >= VICTIM_KEYS, check
    assert restore["companies"][VICTIM]["keys"] == check["expected_rows"]
    totals = restore["import"]["totals"]
    assert totals["companies"] == 1 and totals["inserted"] >= VICTIM_KEYS, totals
    assert list(restore["import"]["companies"]) == [VICTIM]
    assert restore["recovered_time"] and restore["wal_replayed_bytes"] > 0


def test_latest_after_kill_loses_at_most_a_few_seconds_and_no_other_company_changed():
    data = _result("latest.json")
    check = data["check"]
    assert check["ok"], check
    assert not check["others_differing"], check
    assert check["recovery_point_seconds"] is not None
    print("measured recovery point: %.3f s, %d acknowledged writes lost" % (
        check["recovery_point_seconds"], check["lost_acknowledged"]))
    assert check["recovery_point_seconds"] <= RECOVERY_POINT_GOAL, check


def test_absent_dropped_the_slot(host):
    assert _result("absent.json")["slots"] == 0
    assert not host.file("/etc/barman.d/baileys.conf").exists
    assert not host.file("/etc/cron.d/baileys-resilience-pitr").exists


def _backup_ids(data):
    """Every ``backup_id`` value anywhere in a Barman JSON listing."""
    if isinstance(data, dict):
        ids = {data["backup_id"]} if isinstance(data.get("backup_id"), str) else set()
        return ids.union(*(_backup_ids(v) for v in data.values()))
    if isinstance(data, list):
        return set().union(*(_backup_ids(v) for v in data))
    return set()


def test_cloud_hooks_copied_every_base_backup_and_the_wal_to_s3():
    data = _result("s3.json")
    keys = [o["key"] for o in data["objects"]]
    local, cloud = _backup_ids(data["local_backups"]), _backup_ids(data["cloud_backups"])
    assert len(local) >= 2, data["local_backups"]  # converge's first base backup and side_effect's
    assert local <= cloud, "base backups not in S3: %s" % sorted(local - cloud)
    for backup_id in local:
        assert any(k.startswith("prod/pitr/baileys/base/%s/" % backup_id) and k.endswith(".tar")
                   for k in keys), (backup_id, keys)
    wal = [o for o in data["objects"] if o["key"].startswith("prod/pitr/baileys/wals/")]
    assert wal, keys
    assert all(o["size"] > 0 for o in wal), wal


def test_fallback_without_replication_runs_hourly_dumps_and_configures_no_barman(host):
    fallback = _result("fallback.json")
    assert fallback["mode"] == "dumps", fallback
    codes = {p["code"] for p in fallback["preflight"]["problems"]}
    assert codes & {"no_replication_privilege", "replication_refused"}, fallback["preflight"]
    assert fallback["preflight"]["replication_allowed"] is False
    assert _result("fallback_slots.json")["slots"] == 0
    assert not host.file("/etc/barman.d/baileys.conf").exists
    assert not host.file("/etc/cron.d/baileys-resilience-pitr").exists
    _env, schedule, _user, _command = cron_job(host, "/etc/cron.d/baileys-resilience-backup",
                                               "baileys-resilience backup")
    assert schedule == "17 * * * *"
    # the hourly job, run as cron runs it, makes a verified dump
    result = run_backup_job(host, "/var/backups/baileys-resilience", "/etc/cron.d/baileys-resilience-backup")
    assert result.rc == 0, result.stdout + result.stderr
    dumps = run(host, "ls /var/backups/baileys-resilience").stdout.split()
    assert any(n.endswith(".dump") for n in dumps), dumps
    assert any(n.endswith(".dump.manifest.json") for n in dumps), dumps
