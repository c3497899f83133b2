"""pitr / pitrscratch without a server: targets, the choice of base backup, the replay report, checks."""
from __future__ import annotations

import pytest

from ansible_collections.baileys.resilience.plugins.module_utils import errors, pitr, pitrscratch


def test_parse_target():
    assert pitrscratch.parse_target("latest") == ("latest", None, None)
    assert pitrscratch.parse_target("name:failover-rollback-1")[:2] == ("name", "failover-rollback-1")
    kind, value, epoch = pitrscratch.parse_target("2026-03-01T14:04:59Z")
    assert kind == "time" and value == "2026-03-01T14:04:59+00:00" and epoch == 1772373899.0
    assert pitrscratch.parse_target("time:2026-03-01T14:04:59+01:00")[2] == 1772373899.0 - 3600
    with pytest.raises(pitrscratch.RecoveryError, match="no time zone"):
        pitrscratch.parse_target("2026-03-01T14:04:59")
    with pytest.raises(pitrscratch.RecoveryError, match="use latest"):
        pitrscratch.parse_target("yesterday")
    with pytest.raises(pitr.PitrError):
        pitrscratch.parse_target("name:x; DROP")
    assert issubclass(pitrscratch.RecoveryError, errors.BaileysResilienceError)


BACKUPS = [
    {"backup_id": "20260301T020000", "status": "DONE", "end_time_timestamp": "1772330500"},
    {"backup_id": "20260222T020000", "status": "DONE", "end_time_timestamp": "1771725700"},
    {"backup_id": "20260302T020000", "status": "FAILED", "end_time_timestamp": "1772416900"},
]


def test_choose_backup():
    assert pitrscratch.choose_backup(BACKUPS, "latest", None)["backup_id"] == "20260301T020000"
    assert pitrscratch.choose_backup(BACKUPS, "time", 1772330000)["backup_id"] == "20260222T020000"
    assert pitrscratch.choose_backup(BACKUPS, "time", 1772373899)["backup_id"] == "20260301T020000"
    with pytest.raises(pitrscratch.RecoveryError, match="no base backup ended before"):
        pitrscratch.choose_backup(BACKUPS, "time", 1700000000)
    with pytest.raises(pitrscratch.RecoveryError, match="no DONE backup"):
        pitrscratch.choose_backup(BACKUPS, "latest", None, backup_id="20260302T020000")
    with pytest.raises(pitrscratch.RecoveryError, match="take one"):
        pitrscratch.choose_backup([], "latest", None)


def test_replay_report():
    log = ("LOG:  redo starts at 0/E000028\n"
           'LOG:  restored log file "00000001000000000000000E" from archive\n'
           "LOG:  recovery stopping before commit of transaction 1841, time 2026-12-01 02:39:01.712148+00\n"
           "LOG:  redo done at 0/F0048B0 system usage: CPU: user: 0.00 s\n"
           "LOG:  last completed transaction was at log time 2026-12-01 02:38:59.309432+00\n")
    out = pitrscratch.replay_report(log)
    assert out["wal_replayed_bytes"] == 0xF0048B0 - 0xE000028
    assert out["last_transaction_time"] == "2026-12-01 02:38:59.309432+00"
    assert out["stopped"] == "before transaction 1841 at 2026-12-01 02:39:01.712148+00"
    assert out["restored_segments"] == 1
    assert pitrscratch.lsn_int("1/0") == 1 << 32


def test_failed_checks_and_names():
    checks = {"receive_wal_running": {"status": "OK"}, "replication_slot": {"status": "FAILED", "hint": "x"}}
    assert pitr.failed_checks(checks) == ["replication_slot"]
    assert pitr.check_slot_name("barman_baileys") == "barman_baileys"
    for bad in ("Barman", "a-b", "", "x" * 64):
        with pytest.raises(pitr.PitrError):
            pitr.check_slot_name(bad)
    assert pitr._epoch({"end_time_timestamp": "12"}) == 12.0
    assert pitr._epoch({"end_time": "Tue Dec  1 02:36:20 2026"}) == 1796092580.0


def test_recover_refuses_before_touching_anything():
    barman = pitr.Barman("/nonexistent/barman")
    with pytest.raises(pitrscratch.RecoveryError, match="needs the companies"):
        pitrscratch.recover(barman, action="import")
    with pytest.raises(pitrscratch.RecoveryError, match="failover state is files"):
        pitrscratch.recover(barman, action="import", companies=["acme"], prod_conn_params={"login_db": "x"},
                            failover_mode="files")
    with pytest.raises(pitrscratch.RecoveryError, match="export_dest"):
        pitrscratch.recover(barman, action="export", companies=["acme"])


def test_directories_from_the_config_files(tmp_path):
    (tmp_path / "barman.d").mkdir()
    (tmp_path / "barman.conf").write_text(
        "[barman]\nbarman_home = /var/lib/barman\nconfiguration_files_directory = %s\n" % (tmp_path / "barman.d"))
    (tmp_path / "barman.d" / "baileys.conf").write_text("[baileys]\nbackup_method = postgres\n")
    barman = pitr.Barman("/nonexistent/barman", str(tmp_path / "barman.conf"), "baileys")
    assert barman.directories() == {"backup_directory": "/var/lib/barman/baileys",
                                    "streaming_wals_directory": "/var/lib/barman/baileys/streaming"}
    (tmp_path / "barman.d" / "baileys.conf").write_text("[baileys]\nstreaming_wals_directory = /srv/stream\n")
    assert barman.directories()["streaming_wals_directory"] == "/srv/stream"
