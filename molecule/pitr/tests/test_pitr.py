"""Verify of the pitr scenario (testinfra on the backup host, after side_effect.yml).

What side_effect.yml recorded under the ephemeral directory's results/: barman check, the T-1s import of the
deleted company compared with the writer's journal, the latest recovery after the server was SIGKILLed (lost
acknowledged writes, the recovery point) and the slot dropped by pitr_state absent.
"""

import json
import os
from pathlib import Path

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
