"""s3replicate._Preparer: the local checks (sealing, or hashing) run in order on one thread ahead of the upload
workers, at most ``ahead`` not yet asked for; a worker that asks first runs the check itself, an error in the
thread is met again by the worker that asks, and stop() leaves no thread behind."""
from __future__ import annotations

import threading
import time

import pytest

from ansible_collections.baileys.resilience.plugins.module_utils import s3replicate


class Check:
    """Like replicate's local_check: serialised per backup, the first result kept."""

    def __init__(self, names, fail=(), gate=None):
        self.locks = {n: threading.Lock() for n in names}
        self.done = {}
        self.calls = []
        self.fail = set(fail)
        self.gate = gate

    def __call__(self, b):
        with self.locks[b["name"]]:
            if b["name"] not in self.done:
                self.calls.append((b["name"], threading.current_thread().name))
                if self.gate is not None:
                    self.gate.wait(5)
                if b["name"] in self.fail:
                    raise RuntimeError("boom %s" % b["name"])
                self.done[b["name"]] = "problem of %s" % b["name"]
            return self.done[b["name"]]


def backups(n):
    return [{"name": "b%d" % i} for i in range(n)]


def wait_for(cond, timeout=5):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("not reached in %ss" % timeout)
        time.sleep(0.005)


def test_checks_run_in_order_ahead_and_no_further_than_allowed():
    bs = backups(6)
    check = Check([b["name"] for b in bs])
    p = s3replicate._Preparer(check, ahead=2)
    try:
        p.ahead_of(bs)
        wait_for(lambda: len(check.calls) == 2)
        time.sleep(0.05)
        assert [n for n, _t in check.calls] == ["b0", "b1"]  # two ready, nobody asked: it waits
        assert p.check(bs[0]) == "problem of b0"  # asked: one more may be prepared
        wait_for(lambda: len(check.calls) == 3)
        for b in bs[1:]:
            assert p.check(b) == "problem of %s" % b["name"]
        assert [n for n, _t in check.calls] == ["b0", "b1", "b2", "b3", "b4", "b5"]
        assert {t for _n, t in check.calls[:3]} == {"s3replicate-prepare"}
    finally:
        p.stop()
    assert not [t for t in threading.enumerate() if t.name == "s3replicate-prepare"]


def test_a_worker_that_asks_first_runs_the_check_and_the_thread_skips_it():
    bs = backups(3)
    gate = threading.Event()
    check = Check([b["name"] for b in bs], gate=gate)
    p = s3replicate._Preparer(check, ahead=4)
    try:
        p.ahead_of(bs)
        wait_for(lambda: len(check.calls) == 1)  # the thread is in b0, held at the gate
        worker = threading.Thread(target=p.check, args=(bs[2],), name="worker")
        worker.start()
        wait_for(lambda: len(check.calls) == 2)
        gate.set()
        worker.join(5)
        assert p.check(bs[1]) == "problem of b1"
        by = dict(check.calls)
        assert len(check.calls) == 3  # each backup checked once
        assert by["b0"] == "s3replicate-prepare" and by["b2"] == "worker"
        assert by["b1"] in ("s3replicate-prepare", "MainThread")  # whoever came first
    finally:
        gate.set()
        p.stop()


def test_an_error_in_the_thread_is_met_by_the_worker_that_asks():
    bs = backups(2)
    check = Check([b["name"] for b in bs], fail={"b0"})
    p = s3replicate._Preparer(check, ahead=2)
    try:
        p.ahead_of(bs)
        wait_for(lambda: len(check.calls) == 2)
        with pytest.raises(RuntimeError, match="boom b0"):
            p.check(bs[0])
        assert p.check(bs[1]) == "problem of b1"
    finally:
        p.stop()


def test_backups_already_queued_by_an_earlier_target_are_not_queued_again():
    bs = backups(3)
    check = Check([b["name"] for b in bs])
    p = s3replicate._Preparer(check, ahead=8)
    try:
        p.ahead_of(bs[:2])
        p.ahead_of(bs)
        wait_for(lambda: len(check.calls) == 3)
        time.sleep(0.05)
        assert [n for n, _t in check.calls] == ["b0", "b1", "b2"]
    finally:
        p.stop()


def test_stop_waits_for_the_backup_in_hand_and_starts_no_other():
    bs = backups(3)
    gate = threading.Event()
    check = Check([b["name"] for b in bs], gate=gate)
    p = s3replicate._Preparer(check, ahead=8)
    p.ahead_of(bs)
    wait_for(lambda: len(check.calls) == 1)
    threading.Timer(0.1, gate.set).start()
    p.stop()
    assert check.done == {"b0": "problem of b0"} and len(check.calls) == 1
    p.ahead_of(bs)  # after stop: no new thread
    assert not [t for t in threading.enumerate() if t.name == "s3replicate-prepare"]
