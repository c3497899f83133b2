"""Verify of the backup scenario, part 2: the cron backup, its artefacts, and retention."""

import base64
import datetime
import json
import shlex

import pytest
from scenario import (APP, BACKUP_CRON, BACKUP_DIR, BIN18, DUMP_RE, PREFIX, SEED, TOOL, listing, log_records, manifest,
                      run, run_backup_job, run_like_cron, sha256)

testinfra_hosts = [APP]


@pytest.fixture(scope="module")
def cron_backup(host):
    """Empty the backup directory, then run the daily backup job exactly as cron would."""
    return run_backup_job(host, BACKUP_DIR, BACKUP_CRON)


def _stamp(name):
    return datetime.datetime.strptime(DUMP_RE.match(name).group(1), "%Y%m%dT%H%M%SZ").replace(
        tzinfo=datetime.timezone.utc)


def _dumps(names):
    return sorted(n for n in names if DUMP_RE.match(n))


def test_cron_backup_succeeds(host, cron_backup):
    log = host.file("/var/log/baileys-resilience/backup.log").content_string
    assert cron_backup.rc == 0, log
    records = log_records(host, "backup.log")
    finish = [r for r in records if r["step"] == "finish"]
    assert finish and finish[-1]["status"] == "ok" and finish[-1]["exit_code"] == 0, log
    assert "baileys-resilience backup: backup %s-" % PREFIX in log


def test_backup_files_and_modes(host, cron_backup):
    names = listing(host)
    dumps = _dumps(names)
    assert len(dumps) == 1, names
    assert names == [dumps[0], dumps[0] + ".manifest.json"], names  # no .partial, nothing else
    age = datetime.datetime.now(datetime.timezone.utc) - _stamp(dumps[0])
    assert datetime.timedelta(0) <= age < datetime.timedelta(minutes=10), dumps[0]
    assert host.file(BACKUP_DIR).mode == 0o700
    for name in names:
        f = host.file("%s/%s" % (BACKUP_DIR, name))
        assert f.user == "root" and f.group == "root" and f.mode == 0o600, (name, oct(f.mode))


def test_manifest_checksum_and_counts(host, cron_backup):
    name = _dumps(listing(host))[0]
    m = manifest(host, name)
    path = "%s/%s" % (BACKUP_DIR, name)
    assert m["format"] == 1 and m["file"] == name and m["kind"] == "monthly"  # first backup of the month
    assert m["created_at"] == _stamp(name).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert sha256(host, path) == m["sha256"]
    assert host.file(path).size == m["size"]
    assert m["counts"] == SEED["counts"] == {"auth": 2, "keys": 1690}
    assert m["companies"] == SEED["companies"] == 2
    assert m["validated"] == {"restore_list": True, "row_counts": True}
    assert m["database"] == "whatsapp" and m["compression"] == "zstd:3"
    assert m["client_major"] == 18 and m["server_version"].startswith("18.")
    listing_out = run(host, "%s/pg_restore --list %s" % (BIN18, path)).stdout
    assert "TABLE DATA public whatsapp_keys" in listing_out and "TABLE DATA public whatsapp_auth" in listing_out


def test_second_run_the_same_day_makes_no_new_backup(host, cron_backup):
    before = listing(host)
    result, _command = run_like_cron(host, BACKUP_CRON, "baileys-resilience backup")
    assert result.rc == 0
    assert listing(host) == before
    assert "a valid backup of" in host.file("/var/log/baileys-resilience/backup.log").content_string


def _fabricated(real_stamp):
    """Older backups around the real one: the 12 days before it, the 1st and 15th of the 6 months before."""
    day = real_stamp.replace(hour=3, minute=0, second=0)
    when = {day - datetime.timedelta(days=i) for i in range(1, 13)}
    first = day.replace(day=1)
    for _month in range(6):
        first = (first - datetime.timedelta(days=1)).replace(day=1)
        when.update({first, first.replace(day=15)})
    return sorted(when)


def expected_retention(entries, keep_daily=7, keep_monthly=4):
    """docs/backup-format.md's rule: the newest; the newest of each of the 7 newest days; for each of the
    4 newest months its monthly backup (the oldest marked monthly), else its oldest. -> (daily, monthly)."""
    entries = sorted(entries, key=lambda e: e[0], reverse=True)  # (stamp, name, kind), newest first
    daily = {}
    for stamp, name, _kind in entries:
        day = stamp.date()
        if day not in daily:
            if len(daily) == keep_daily:
                break
            daily[day] = name
    months = {}
    for stamp, name, kind in entries:
        months.setdefault(stamp.strftime("%Y-%m"), []).append((kind == "monthly", stamp, name))
    monthly = {}
    for month in sorted(months, reverse=True)[:keep_monthly]:
        marked = [e for e in months[month] if e[0]] or months[month]
        monthly[month] = min(marked, key=lambda e: e[1])[2]
    return daily, monthly


def test_retention_keeps_7_daily_and_4_monthly(host, cron_backup):
    real = _dumps(listing(host))[0]
    real_manifest = manifest(host, real)
    real_stamp = _stamp(real)
    # fabricate valid older backups: copies of the real dump, manifests with their own file/created_at/kind
    # (the first backup of each month is monthly), every other field as the real manifest has it
    stamps = _fabricated(real_stamp)
    kinds = {}
    seen_months = set()
    for stamp in stamps:
        month = stamp.strftime("%Y-%m")
        kinds[stamp] = "daily" if month in seen_months else "monthly"
        seen_months.add(month)
    script = ["set -e", "cd %s" % BACKUP_DIR]
    fabricated = []
    for stamp in stamps:
        name = "%s-%s.dump" % (PREFIX, stamp.strftime("%Y%m%dT%H%M%SZ"))
        m = dict(real_manifest, file=name, kind=kinds[stamp], created_at=stamp.strftime("%Y-%m-%dT%H:%M:%SZ"))
        data = base64.b64encode((json.dumps(m, indent=2) + "\n").encode()).decode()
        script.append("cp -p %s %s && echo %s | base64 -d > %s.manifest.json && chmod 0600 %s.manifest.json"
                      % (real, name, data, name, name))
        fabricated.append((stamp, name, kinds[stamp]))
    script.append("sleep 1")  # the forced backup must not share the real one's second (same name)
    run(host, "/bin/sh -c %s" % shlex.quote("\n".join(script)))
    assert len(_dumps(listing(host))) == len(stamps) + 1

    out = run(host, "%s backup --force --json" % TOOL)
    result = json.loads(out.stdout)
    new = result["backup"].rsplit("/", 1)[1]
    assert result["changed"] is True and new not in [n for _s, n, _k in fabricated] and new != real
    new_manifest = manifest(host, new)
    assert new_manifest["kind"] == "daily" and new_manifest["counts"] == SEED["counts"]
    assert sha256(host, "%s/%s" % (BACKUP_DIR, new)) == new_manifest["sha256"]

    entries = fabricated + [(real_stamp, real, real_manifest["kind"]), (_stamp(new), new, "daily")]
    daily, monthly = expected_retention(entries)
    keep = set(daily.values()) | set(monthly.values())
    remaining = _dumps(listing(host))
    print("kept %d: daily %s, monthly %s" % (len(remaining), sorted(daily.values()), sorted(monthly.values())))
    assert len(daily) == 7 and len(monthly) == 4
    assert remaining[-1] == new and daily[_stamp(new).date()] == new  # the newest is kept
    assert set(remaining) == keep, (sorted(set(remaining) - keep), sorted(keep - set(remaining)))
    if not set(daily.values()) & set(monthly.values()):  # days 1-7 of a month: this month's monthly is a daily
        assert len(remaining) == 11
    assert sorted(result["deleted"]) == sorted({n for _s, n, _k in entries} - keep)
    if real_manifest["kind"] == "monthly" and monthly.get(real_stamp.strftime("%Y-%m")) == real:
        # run on the first day of a month: the real backup is that month's first, kept as its monthly
        assert real not in result["deleted"] and real in remaining
    else:
        assert real in result["deleted"]  # same day as the new backup, not the newest of the day
    names = listing(host)
    assert names == sorted(remaining + [n + ".manifest.json" for n in remaining]), names
    for name in names:
        assert host.file("%s/%s" % (BACKUP_DIR, name)).mode == 0o600, name
