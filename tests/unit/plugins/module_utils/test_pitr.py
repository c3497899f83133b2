"""pitr / pitrscratch without a server: targets, the choice of base backup, the replay report, checks, metrics."""
from __future__ import annotations

import json
import os
import time

import pytest

from ansible_collections.baileys.resilience.plugins.module_utils import errors, jobs, pitr, pitrscratch


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


class FakeBarman:
    """What collect_metrics asks Barman: check, backups, the streaming directory."""

    server = "baileys"

    def __init__(self, streaming):
        self.streaming = streaming

    def check(self):
        return {"receive_wal_running": {"status": "OK"}, "replication_slot": {"status": "OK"}}

    def backups(self):
        return BACKUPS

    def directories(self):
        if self.streaming is None:
            raise pitr.PitrError("barman show-servers baileys: no streaming_wals_directory")
        return {"streaming_wals_directory": str(self.streaming)}


def _metrics(monkeypatch, streaming, slot_row="t|16777216|reserved|-1"):
    """collect_metrics with a fake Barman and psql answering ``slot_row`` (``active|lag|wal_status|safe``)."""
    monkeypatch.setattr(pitr.pgtools, "find_bin_dir", lambda *a, **kw: "/nonexistent/bin")
    monkeypatch.setattr(pitr, "run_psql", lambda *a, **kw: (0, slot_row + "\n" if slot_row else "", ""))
    metrics, summary = pitr.collect_metrics(FakeBarman(streaming), {"login_db": "baileys"})
    values = {name: [s[1] for s in samples] for name, _help, _kind, samples in metrics}
    return values, summary, jobs.prom_text(metrics)


def test_metrics_wal_waiting_in_the_streaming_directory(tmp_path, monkeypatch):
    now = time.time()
    for name, age in (("000000010000000000000003", 1800), ("000000010000000000000004", 900),
                      ("00000002.history", 60), ("000000020000000000000005.partial", 7200),
                      ("barman_receive_wal.lock", 7200), ("00000001000000000000000G", 7200)):
        (tmp_path / name).write_bytes(b"")
        os.utime(tmp_path / name, (now - age, now - age))
    (tmp_path / "000000010000000000000002").mkdir()  # not a file
    values, summary, text = _metrics(monkeypatch, tmp_path)
    assert values["baileys_pitr_wal_waiting_files"] == [3]
    assert 1800 <= values["baileys_pitr_wal_waiting_oldest_age_seconds"][0] < 1900
    assert summary["wal_waiting_files"] == 3 and summary["streaming_wals_directory"] == str(tmp_path)
    assert 'baileys_pitr_wal_waiting_files{server="baileys"} 3\n' in text
    assert "wal_waiting_error" not in summary
    count, age = pitr.wal_waiting(str(tmp_path), now=now + 100)
    assert count == 3 and 1900 <= age < 2000


def test_metrics_nothing_waiting(tmp_path, monkeypatch):
    (tmp_path / "000000010000000000000007.partial").write_bytes(b"")
    values, summary, text = _metrics(monkeypatch, tmp_path)
    assert values["baileys_pitr_wal_waiting_files"] == [0]
    assert values["baileys_pitr_wal_waiting_oldest_age_seconds"] == [0]
    assert 'baileys_pitr_wal_waiting_oldest_age_seconds{server="baileys"} 0\n' in text


def test_metrics_streaming_directory_missing(tmp_path, monkeypatch):
    values, summary, text = _metrics(monkeypatch, tmp_path / "gone")
    assert values["baileys_pitr_wal_waiting_files"] == [None]
    assert values["baileys_pitr_wal_waiting_oldest_age_seconds"] == [None]
    assert "baileys_pitr_wal_waiting" not in text
    assert summary["wal_waiting_files"] is None
    assert "cannot read the streaming directory" in summary["wal_waiting_error"]
    assert "No such file or directory" in summary["wal_waiting_error"]
    values, summary, text = _metrics(monkeypatch, None)  # Barman does not say where it is
    assert "baileys_pitr_wal_waiting" not in text
    assert "no streaming directory" in summary["wal_waiting_error"]


def test_metrics_slot_lost(tmp_path, monkeypatch):
    values, summary, text = _metrics(monkeypatch, tmp_path)
    assert values["baileys_pitr_slot_lost"] == [0] and summary["slot_lost"] == 0
    assert 'baileys_pitr_slot_lost{server="baileys",slot="barman_baileys"} 0\n' in text
    values, summary, text = _metrics(monkeypatch, tmp_path, "f|-1|lost|-1")
    assert values["baileys_pitr_slot_lost"] == [1] and summary["slot_lost"] == 1
    assert summary["slot_wal_status"] == "lost" and values["baileys_pitr_slot_lag_bytes"] == [-1]
    values, summary, text = _metrics(monkeypatch, tmp_path, "")  # no slot: no verdict
    assert values["baileys_pitr_slot_lost"] == [None] and summary["slot_lost"] is None
    assert "baileys_pitr_slot_lost" not in text and values["baileys_pitr_slot_exists"] == [0]


def test_assess_names_each_problem():
    well = {"slot": "barman_baileys", "receive_wal": "OK", "slot_exists": True, "slot_lost": 0,
            "slot_lag_bytes": 16 << 20, "failed_checks": [], "wal_waiting_files": 1,
            "wal_waiting_oldest_age_seconds": 30.0}
    assert pitr.assess(well, 1 << 30) == []
    down = dict(well, receive_wal="FAILED", slot_lag_bytes=(1 << 30) + 5, slot_lost=None,
                failed_checks=["archiver_errors", "receive_wal_running", "replication_slot"],
                failed_check_hints={"archiver_errors": "3 errors"}, wal_waiting_files=7,
                wal_waiting_oldest_age_seconds=1800.5)
    problems = {p["name"]: p for p in pitr.assess(down, 1 << 30)}
    assert sorted(problems) == ["barman_check:archiver_errors", "receive_wal", "slot_lag", "wal_waiting"]
    assert {n: p["status"] for n, p in problems.items()} == {
        "receive_wal": "critical", "slot_lag": "critical", "barman_check:archiver_errors": "warning",
        "wal_waiting": "warning"}
    assert "5 bytes over the limit of 1073741824" in problems["slot_lag"]["detail"]
    assert problems["barman_check:archiver_errors"]["detail"] == "barman check archiver_errors FAILED (3 errors)"
    assert "7 WAL file(s) streamed but not archived, the oldest for 1800 s (limit 600 s)" \
        in problems["wal_waiting"]["detail"]
    assert [p["name"] for p in pitr.assess(down, None, None)] == ["receive_wal", "barman_check:archiver_errors"]
    # barman check did not answer; the server could not be asked; the slot lost
    odd = dict(well, receive_wal="FAILED", check_error="barman check: not JSON", failed_checks=["barman check"],
               slot_exists=False, slot_lag_bytes=None, slot_error="psql: connection refused")
    assert [(p["name"], p["detail"]) for p in pitr.assess(odd, 1 << 30)] == [
        ("receive_wal", "receive-wal state unknown: barman check: not JSON"),
        ("slot_missing", "cannot ask the database server about replication slot barman_baileys: psql: connection "
                         "refused")]
    lost = pitr.assess(dict(well, slot_lost=1, slot_lag_bytes=-1), 1 << 30)
    assert [(p["name"], p["status"]) for p in lost] == [("slot_lost", "critical")]


def test_the_older_entry_point_still_writes_the_textfile(tmp_path, monkeypatch, capsys):
    class Fake(FakeBarman):
        def __init__(self, *args):
            FakeBarman.__init__(self, tmp_path)

    monkeypatch.setattr(pitr, "Barman", Fake)
    monkeypatch.setattr(pitr.pgtools, "find_bin_dir", lambda *a, **kw: "/nonexistent/bin")
    monkeypatch.setattr(pitr, "run_psql", lambda *a, **kw: (0, "t|%d|reserved|-1\n" % (2 << 30), ""))
    config = tmp_path / "pitr.json"
    config.write_text('{"textfile_dir": "%s", "max_slot_lag_bytes": %d}' % (tmp_path, 1 << 30))
    assert pitr.main(["metrics", str(config)]) == 1  # lag over the limit
    summary = json.loads(capsys.readouterr().out)
    assert not summary["ok"] and [p["name"] for p in summary["problems"]] == ["slot_lag"]
    text = (tmp_path / pitr.TEXTFILE_NAME).read_text()
    assert 'baileys_resilience_job_success{job="pitr-metrics"} 0\n' in text and "baileys_pitr_slot_lag_bytes" in text
    config.write_text('{"textfile_dir": "%s"}' % tmp_path)
    assert pitr.main(["metrics", str(config)]) == 0
    assert pitr.main(["metrics"]) == 2
