# -*- coding: utf-8 -*-
# Copyright: baileys.resilience contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Health of the auth-state store and of its backups.

No Ansible import: the ``auth_state_info`` module and ``baileys-resilience health`` call
:func:`collect`.  Read only: nothing in the database or in the backup directory is changed.

Collected: per company key counts (by type); old keys split by the cleanup's retention rules
(cleanup.RULES, docs/key-retention.md) into *stale* (``stale_keys``: not updated for
``stale_key_days``; ``expired_keys``: past ``expires_at``; both only keys the rules let go, the only
ones checked against thresholds) and *old but live* (``old_live_keys``: kept by a rule, such as
unconsumed pre-keys); the live pre-key count (uploaded, not consumed: the server-side supply Baileys
relies on); ``updated_at`` age buckets; table and index sizes; probe query latency (p50/p95/p99 of
``probes`` primary-key lookups, the query Baileys runs most); and the newest backup read from the
manifests in ``backup_dir`` (docs/backup-format.md; the names and checks come from backup_format.py,
this module does not depend on the backup*.py or the s3*.py rooms).
Each check is ``ok``, ``warning`` or ``critical`` against :data:`DEFAULT_THRESHOLDS`; the overall status is
the worst one, and :data:`EXIT_CODES` maps it to 0/1/2.
"""
from __future__ import absolute_import, division, print_function

import datetime
import os
import time

from . import backup_format, cleanup, errors, pgconn

__metaclass__ = type

STATUSES = ("ok", "warning", "critical")
EXIT_CODES = {"ok": 0, "warning": 1, "critical": 2}
BUCKETS = ("0-1d", "1-7d", "7-14d", "14-30d", ">30d")
DEFAULT_PROBES = 20  # primary-key lookups for the latency percentiles
DEFAULT_THRESHOLDS = {
    "latency_p95_warning_ms": 100.0,
    "latency_p95_critical_ms": 1000.0,
    "backup_age_warning_hours": 26.0,
    "backup_age_critical_hours": 50.0,
    # deletable keys older than this many days (by updated_at) mean cleanup is not running; None disables
    "stale_key_days": 30,
    "stale_keys_warning": None,
    "expired_keys_warning": None,
}


class HealthError(errors.BaileysResilienceError, ValueError):
    pass


def _worst(statuses):
    worst = "ok"
    for status in statuses:
        if STATUSES.index(status) > STATUSES.index(worst):
            worst = status
    return worst


def percentile(sorted_values, q):
    """Nearest-rank percentile of an ascending list (q in 0..100)."""
    if not sorted_values:
        return None
    rank = max(1, int(-(-q * len(sorted_values) // 100)))  # ceil(q/100 * n)
    return sorted_values[min(rank, len(sorted_values)) - 1]


def thresholds_from(overrides):
    merged = dict(DEFAULT_THRESHOLDS)
    for key, value in (overrides or {}).items():
        if key not in DEFAULT_THRESHOLDS:
            raise HealthError("unknown health threshold %r (known: %s)" % (key, ", ".join(sorted(DEFAULT_THRESHOLDS))))
        merged[key] = value
    return merged


# --------------------------------------------------------------------------- backups


def inspect_backup(backup_dir, manifest_name, verify_checksum=False):
    """One backup's manifest, checked against docs/backup-format.md.  ``problems`` empty means valid."""
    path = os.path.join(backup_dir, manifest_name)
    entry = {"manifest": path, "file": None, "created_at": None, "size": None, "kind": None, "problems": []}
    problems = entry["problems"]
    try:
        _raw, manifest = backup_format.load_manifest(path, backup_format.MAX_MANIFEST_SIZE)
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        problems.append("manifest unreadable: %s" % exc)
        return entry
    dump_name = manifest_name[: -len(backup_format.MANIFEST_SUFFIX)]
    entry.update(file=os.path.join(backup_dir, dump_name), created_at=manifest.get("created_at"),
                 size=manifest.get("size"), kind=manifest.get("kind"), counts=manifest.get("counts"))
    problems.extend(backup_format.backup_problems(entry["file"], manifest, verify_checksum))
    return entry


def backup_status(backup_dir, prefix=backup_format.DEFAULT_PREFIX, verify_checksum=False, now=None, thresholds=None):
    """Newest backup (valid or not) and newest valid backup in ``backup_dir``, with a status."""
    t = thresholds or DEFAULT_THRESHOLDS
    now = now or datetime.datetime.now(datetime.timezone.utc)
    out = {"dir": backup_dir, "prefix": prefix, "count": 0, "valid_count": 0, "newest": None, "newest_valid": None,
           "age_seconds": None, "size": None, "status": "critical", "detail": ""}
    pattern = backup_format.name_re(prefix, backup_format.MANIFEST_SUFFIX)
    try:
        names = sorted((n for n in os.listdir(backup_dir) if pattern.match(n)), reverse=True)
    except OSError as exc:
        out["detail"] = "cannot read backup directory %s: %s" % (backup_dir, exc.strerror or exc)
        return out
    out["count"] = len(names)
    for name in names:  # the name carries the UTC time: newest first
        entry = inspect_backup(backup_dir, name, verify_checksum and out["newest_valid"] is None)
        if out["newest"] is None:
            out["newest"] = entry
        if not entry["problems"]:
            out["valid_count"] += 1
            if out["newest_valid"] is None:
                out["newest_valid"] = entry
    valid = out["newest_valid"]
    if valid is None:
        out["detail"] = "no valid backup in %s" % backup_dir
        return out
    age = (now - backup_format.parse_created_at(valid["created_at"])).total_seconds()
    out["age_seconds"] = round(age, 1)
    out["size"] = valid["size"]
    hours = age / 3600.0
    if hours >= float(t["backup_age_critical_hours"]):
        out["status"] = "critical"
    elif hours >= float(t["backup_age_warning_hours"]):
        out["status"] = "warning"
    else:
        out["status"] = "ok"
    out["detail"] = "newest valid backup %s is %.1f h old" % (os.path.basename(valid["file"]), hours)
    newest = out["newest"]
    if newest is not valid:
        out["status"] = _worst([out["status"], "warning"])
        out["detail"] += "; newer backup %s is invalid: %s" % (
            os.path.basename(newest["file"] or newest["manifest"]), "; ".join(newest["problems"]))
    return out


# --------------------------------------------------------------------------- database


def _new_company(cid):
    return {"company_id": cid, "creds": False, "keys": 0, "by_type": {}, "expired_keys": 0, "stale_keys": 0,
            "old_live_keys": 0, "old_live_by_type": {}, "live_pre_keys": None, "unuploaded_pre_keys": None}


def _store_stats(conn, store, thresholds, companies=None):
    """Per company and in total: keys by type; ``stale_keys`` (``updated_at`` older than
    ``stale_key_days``) and ``expired_keys`` (``expires_at`` passed) counting only keys the cleanup rules
    let go; ``old_live_keys`` (old by either measure but kept by a rule, such as unconsumed pre-keys);
    ``live_pre_keys`` and ``unuploaded_pre_keys`` (cleanup.pre_key_supply)."""
    sql = pgconn.sql
    cur = conn.cursor()
    store.check_tables(cur)
    cur.execute(
        "SELECT 1 FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_class c ON c.oid = a.attrelid "
        "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s "
        "AND a.attname = 'expires_at' AND NOT a.attisdropped", (store.schema, store.keys_table))
    has_expires = cur.fetchone() is not None
    expired = sql.SQL("k.expires_at < now()") if has_expires else sql.SQL("FALSE")
    stale_days = int(thresholds.get("stale_key_days") or 30)
    old = sql.SQL("k.updated_at < now() - make_interval(days => {})").format(sql.Literal(stale_days))
    deletable = cleanup.deletable_sql()
    companies = list(companies) if companies else None
    where, args = pgconn.company_filter(companies, "k")
    cur.execute(
        sql.SQL(
            "SELECT k.company_id, k.key_type, count(*), "
            "count(*) FILTER (WHERE ({expired}) AND {deletable}), "
            "count(*) FILTER (WHERE {old} AND {deletable}), "
            "count(*) FILTER (WHERE (({expired}) OR {old}) AND NOT {deletable}), "
            "count(*) FILTER (WHERE k.updated_at > now() - interval '1 day'), "
            "count(*) FILTER (WHERE k.updated_at <= now() - interval '1 day' "
            "AND k.updated_at > now() - interval '7 days'), "
            "count(*) FILTER (WHERE k.updated_at <= now() - interval '7 days' "
            "AND k.updated_at > now() - interval '14 days'), "
            "count(*) FILTER (WHERE k.updated_at <= now() - interval '14 days' "
            "AND k.updated_at > now() - interval '30 days'), "
            "count(*) FILTER (WHERE k.updated_at <= now() - interval '30 days') "
            "FROM {keys} k{where} GROUP BY 1, 2 ORDER BY 1, 2"
        ).format(expired=expired, old=old, deletable=deletable, keys=store.keys, where=where),
        args,
    )
    per = {}
    buckets = dict.fromkeys(BUCKETS, 0)
    for cid, key_type, n, n_expired, n_stale, n_old_live, *b in cur.fetchall():
        c = per.setdefault(cid, _new_company(cid))
        c["keys"] += n
        c["by_type"][key_type] = n
        c["expired_keys"] += n_expired
        c["stale_keys"] += n_stale
        c["old_live_keys"] += n_old_live
        if n_old_live:
            c["old_live_by_type"][key_type] = n_old_live
        for name, value in zip(BUCKETS, b):
            buckets[name] += value
    auth_where, _args = pgconn.company_filter(companies)
    cur.execute(
        sql.SQL(
            "SELECT company_id, updated_at, CASE WHEN jsonb_typeof(creds->'nextPreKeyId') = 'number' "
            "THEN ((creds->>'nextPreKeyId')::numeric - 1)::bigint::text END FROM {auth}{where}"
        ).format(auth=store.auth, where=auth_where),
        args,
    )
    creds_rows = cur.fetchall()
    supply = cleanup.pre_key_supply(cur, store, companies)
    for cid, updated_at, highest in creds_rows:
        c = per.setdefault(cid, _new_company(cid))
        c["creds"] = True
        c["creds_updated_at"] = updated_at.isoformat() if updated_at else None
        c.update(supply.get(cid, {}))
        c["highest_pre_key_present"] = None
        if highest is not None:
            cur.execute(sql.SQL("SELECT EXISTS (SELECT 1 FROM {} WHERE company_id = %s AND key_type = 'pre-key' "
                                "AND key_id = %s)").format(store.keys), (cid, highest))
            c["highest_pre_key_present"] = cur.fetchone()[0]
    sizes = {}
    for label, table in (("auth", store.auth_table), ("keys", store.keys_table)):
        cur.execute(
            "SELECT pg_catalog.pg_table_size(c.oid), pg_catalog.pg_indexes_size(c.oid), "
            "pg_catalog.pg_total_relation_size(c.oid), c.reltuples::bigint FROM pg_catalog.pg_class c "
            "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s",
            (store.schema, table))
        row = cur.fetchone()
        sizes[label] = {"table": "%s.%s" % (store.schema, table), "table_bytes": row[0], "index_bytes": row[1],
                        "total_bytes": row[2]}
    companies_out = [per[k] for k in sorted(per)]
    totals = {
        "companies": len(companies_out),
        "companies_with_creds": sum(1 for c in companies_out if c["creds"]),
        "keys": sum(c["keys"] for c in companies_out),
        "expired_keys": sum(c["expired_keys"] for c in companies_out),
        "stale_keys": sum(c["stale_keys"] for c in companies_out),
        "old_live_keys": sum(c["old_live_keys"] for c in companies_out),
        "live_pre_keys": sum(c["live_pre_keys"] or 0 for c in companies_out),
    }
    cur.close()
    return companies_out, totals, buckets, sizes, has_expires


def probe_latency(conn, store, probes=DEFAULT_PROBES):
    """Milliseconds of ``probes`` primary-key lookups of one existing key (or of an empty lookup)."""
    sql = pgconn.sql
    cur = conn.cursor()
    cur.execute(sql.SQL("SELECT company_id, key_type, key_id FROM {} LIMIT 1").format(store.keys))
    sample = cur.fetchone() or ("", "pre-key", "")
    query = sql.SQL("SELECT value FROM {} WHERE company_id = %s AND key_type = %s AND key_id = %s").format(store.keys)
    timings = []
    for _probe in range(max(1, int(probes))):
        t0 = time.perf_counter()
        cur.execute(query, sample, prepare=True)
        cur.fetchall()
        timings.append((time.perf_counter() - t0) * 1000.0)
    cur.close()
    timings.sort()
    return {
        "probes": len(timings),
        "p50": round(percentile(timings, 50), 3),
        "p95": round(percentile(timings, 95), 3),
        "p99": round(percentile(timings, 99), 3),
        "max": round(timings[-1], 3),
    }


def collect(conn_params, store_params, backup_dir=None, backup_prefix=backup_format.DEFAULT_PREFIX,
            probes=DEFAULT_PROBES, thresholds=None, verify_checksum=False, companies=None, now=None):
    """Everything above plus ``status`` and ``exit_code``.  Never raises for a database failure:
    an unreachable store is a ``critical`` check."""
    t = thresholds_from(thresholds)
    started = time.monotonic()
    now = now or datetime.datetime.now(datetime.timezone.utc)
    checks = []
    out = {
        "collected_at": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "thresholds": t,
        "database": {"reachable": False, "target": pgconn.describe(conn_params)},
        "companies": [],
        "totals": {},
        "age_buckets": dict.fromkeys(BUCKETS, 0),
        "table_sizes": {},
        "latency_ms": None,
        "backup": None,
    }
    store = pgconn.Store.from_params(store_params)
    conn = None
    try:
        conn = pgconn.connect(conn_params, autocommit=True)
        out["database"]["reachable"] = True
        out["database"]["server_version_num"] = pgconn.server_version_num(conn)
        companies_out, totals, buckets, sizes, has_expires = _store_stats(conn, store, t, companies)
        out.update(companies=companies_out, totals=totals, age_buckets=buckets, table_sizes=sizes)
        out["database"]["has_expires_at"] = has_expires
        checks.append({"name": "database", "status": "ok",
                       "detail": "%d companies, %d keys" % (totals["companies"], totals["keys"])})
        lat = probe_latency(conn, store, probes)
        out["latency_ms"] = lat
        if lat["p95"] >= float(t["latency_p95_critical_ms"]):
            status = "critical"
        elif lat["p95"] >= float(t["latency_p95_warning_ms"]):
            status = "warning"
        else:
            status = "ok"
        checks.append({"name": "latency", "status": status, "detail": "probe p50 %.2f ms, p95 %.2f ms, p99 %.2f ms"
                       % (lat["p50"], lat["p95"], lat["p99"])})
        missing_creds = [c["company_id"] for c in companies_out if not c["creds"]]
        if missing_creds:
            checks.append({"name": "creds", "status": "warning", "detail": "keys without a creds row for %s"
                           % ", ".join(missing_creds[:10])})
        for name, key in (("stale_keys", "stale_keys_warning"), ("expired_keys", "expired_keys_warning")):
            limit = t.get(key)
            if limit is not None:
                n = totals[name]
                # only keys the retention rules let go; old but live keys (unconsumed pre-keys...) never alert
                checks.append({"name": name, "status": "warning" if n > int(limit) else "ok",
                               "detail": "%d %s the cleanup may delete (warning above %d; %d old but live keys "
                                         "kept by rule not counted)"
                                         % (n, name.replace("_", " "), int(limit), totals["old_live_keys"])})
    except (pgconn.PgError, pgconn.Error) as exc:
        checks.append({"name": "database", "status": "critical",
                       "detail": pgconn._scrub(exc, conn_params)})
        out["database"]["error"] = pgconn._scrub(exc, conn_params)
    finally:
        if conn is not None:
            conn.close()
    if backup_dir:
        b = backup_status(backup_dir, backup_prefix, verify_checksum, now, t)
        out["backup"] = b
        checks.append({"name": "backup", "status": b["status"], "detail": b["detail"]})
    out["checks"] = checks
    out["status"] = _worst(c["status"] for c in checks)
    out["exit_code"] = EXIT_CODES[out["status"]]
    out["duration"] = round(time.monotonic() - started, 3)
    return out


def prom_metrics(h):
    """Metrics (for jobs.prom_text) from a :func:`collect` result."""
    m = [
        ("baileys_resilience_health_status", "Overall health: 0 ok, 1 warning, 2 critical.", "gauge",
         [({}, h["exit_code"])]),
        ("baileys_resilience_database_up", "1 if the auth-state store answered.", "gauge",
         [({}, int(h["database"]["reachable"]))]),
    ]
    if h.get("totals"):
        m.append(("baileys_resilience_keys", "Signal keys in the store.", "gauge", [({}, h["totals"]["keys"])]))
        m.append(("baileys_resilience_expired_keys", "Keys past expires_at that the retention rules let go.",
                  "gauge", [({}, h["totals"]["expired_keys"])]))
        m.append(("baileys_resilience_stale_keys", "Keys not updated for stale_key_days that the retention rules "
                  "let go (what the cleanup deletes).", "gauge", [({}, h["totals"]["stale_keys"])]))
        m.append(("baileys_resilience_old_live_keys", "Old keys kept by a retention rule (unconsumed pre-keys, "
                  "app-state keys...); never alerted on.", "gauge", [({}, h["totals"]["old_live_keys"])]))
        m.append(("baileys_resilience_live_pre_keys", "Uploaded, unconsumed one-time pre-keys per company "
                  "(the server-side supply Baileys relies on).", "gauge",
                  [({"company_id": c["company_id"]}, c.get("live_pre_keys")) for c in h["companies"]]))
        m.append(("baileys_resilience_companies", "Companies in the store.", "gauge",
                  [({}, h["totals"]["companies"])]))
        m.append(("baileys_resilience_keys_by_age", "Keys per updated_at age bucket.", "gauge",
                  [({"age": b}, n) for b, n in h["age_buckets"].items()]))
    if h.get("table_sizes"):
        m.append(("baileys_resilience_table_size_bytes", "Total size (with indexes) of the auth-state tables.",
                  "gauge", [({"table": v["table"]}, v["total_bytes"]) for v in h["table_sizes"].values()]))
    if h.get("latency_ms"):
        m.append(("baileys_resilience_probe_latency_seconds", "Probe query latency quantiles.", "gauge",
                  [({"quantile": q}, h["latency_ms"][k] / 1000.0)
                   for q, k in (("0.5", "p50"), ("0.95", "p95"), ("0.99", "p99"))]))
    b = h.get("backup")
    if b:
        m.append(("baileys_resilience_backup_age_seconds", "Age of the newest valid backup.", "gauge",
                  [({}, b["age_seconds"])]))
        m.append(("baileys_resilience_backup_size_bytes", "Size of the newest valid backup.", "gauge",
                  [({}, b["size"])]))
        m.append(("baileys_resilience_backup_valid", "1 if the newest backup is valid.", "gauge",
                  [({}, int(b["newest"] is not None and not b["newest"]["problems"]))]))
        m.append(("baileys_resilience_backups_valid", "Valid backups in the backup directory.", "gauge",
                  [({}, b["valid_count"])]))
    return m


def render_text(h):
    """A human summary of :func:`collect`."""
    lines = ["status: %s" % h["status"].upper()]
    for c in h["checks"]:
        lines.append("  %-12s %-8s %s" % (c["name"], c["status"], c["detail"]))
    if h.get("totals"):
        t = h["totals"]
        lines.append("companies: %d (with creds %d)  keys: %d  may be deleted: stale %d, expired %d  "
                     "old but live (kept by rule): %d  live pre-keys: %d" % (
                         t["companies"], t["companies_with_creds"], t["keys"], t["stale_keys"], t["expired_keys"],
                         t["old_live_keys"], t["live_pre_keys"]))
        lines.append("age buckets: " + "  ".join("%s=%d" % kv for kv in h["age_buckets"].items()))
        for c in h["companies"][:50]:
            live = c.get("live_pre_keys")
            lines.append("  %-30s creds=%s keys=%d stale=%d expired=%d old-live=%d live-pre-keys=%s %s" % (
                c["company_id"], "yes" if c["creds"] else "NO", c["keys"], c["stale_keys"], c["expired_keys"],
                c["old_live_keys"], "?" if live is None else live,
                " ".join("%s=%d" % kv for kv in sorted(c["by_type"].items()))))
    for label, s in (h.get("table_sizes") or {}).items():
        lines.append("table %s (%s): table %d B, indexes %d B, total %d B" % (
            label, s["table"], s["table_bytes"], s["index_bytes"], s["total_bytes"]))
    return "\n".join(lines) + "\n"
