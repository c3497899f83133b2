# -*- coding: utf-8 -*-
# Copyright: baileys.resilience contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Delete old signal keys from the auth-state store, in short batches, never the ones Baileys needs.

No Ansible import: the ``keys_cleanup`` module and ``baileys-resilience cleanup`` call
:func:`cleanup_keys`.

A key is a candidate when it is old: by ``updated_at`` (older than ``older_than_days``), by
``expires_at`` (``expires_at < now()``), or ``auto`` (``expires_at < now()`` where it is set, the
``updated_at`` age otherwise).  Never deleted, whatever their age:

* creds (the auth table is never touched);
* ``app-state-sync-key`` and ``app-state-sync-version`` rows (losing them breaks app-state sync);
* the pre-key the creds' signed pre-key points at (``creds.signedPreKey.keyId``) and the highest
  pre-key (``creds.nextPreKeyId - 1``): Baileys re-uploads pre-keys when that one is missing;
* any pre-key of a company whose creds row is missing or whose pointers are not numbers (we cannot
  tell which pre-keys are live, so none is deleted).

Deletion runs in batches (``batch_size`` rows per transaction, selected by primary key with
``FOR UPDATE SKIP LOCKED`` and re-checked in the ``DELETE``), so no long lock is held on the table
Baileys writes to.  A run whose candidates exceed ``max_delete`` deletes nothing unless
``confirm_large_delete`` is set.
"""
from __future__ import absolute_import, division, print_function

import time

from . import pgconn

__metaclass__ = type

PROTECTED_TYPES = ("app-state-sync-key", "app-state-sync-version")
AGE_COLUMNS = ("auto", "updated_at", "expires_at")
BUCKETS = ("0-1d", "1-7d", "7-14d", "14-30d", ">30d")


class CleanupError(RuntimeError):
    """A cleanup that must not go on; ``result`` holds what was found."""

    def __init__(self, message, result=None):
        RuntimeError.__init__(self, message)
        self.result = result or {}


class LargeDeleteRefused(CleanupError):
    """More candidates than ``max_delete`` and no confirmation."""


BUCKET_SQL = (
    "CASE WHEN {col} > now() - interval '1 day' THEN '0-1d' "
    "WHEN {col} > now() - interval '7 days' THEN '1-7d' "
    "WHEN {col} > now() - interval '14 days' THEN '7-14d' "
    "WHEN {col} > now() - interval '30 days' THEN '14-30d' ELSE '>30d' END"
)


def _has_column(cur, store, column):
    cur.execute(
        "SELECT 1 FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_class c ON c.oid = a.attrelid "
        "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = %s AND a.attname = %s AND a.attnum > 0 AND NOT a.attisdropped",
        (store.schema, store.keys_table, column),
    )
    return cur.fetchone() is not None


def sizes(cur, store):
    """Table, index and total bytes of the keys table."""
    cur.execute(
        "SELECT pg_catalog.pg_table_size(c.oid), pg_catalog.pg_indexes_size(c.oid), "
        "pg_catalog.pg_total_relation_size(c.oid) FROM pg_catalog.pg_class c "
        "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s",
        (store.schema, store.keys_table),
    )
    row = cur.fetchone()
    return {"table_bytes": row[0], "index_bytes": row[1], "total_bytes": row[2]}


def age_buckets(cur, store, where=None, args=()):
    """Keys per ``updated_at`` age bucket (all five buckets present)."""
    sql = pgconn.sql
    query = sql.SQL("SELECT " + BUCKET_SQL.format(col="updated_at") + " AS b, count(*) FROM {}").format(store.keys)
    if where is not None:
        query += sql.SQL(" WHERE ") + where
    cur.execute(query + sql.SQL(" GROUP BY b"), args)
    out = dict.fromkeys(BUCKETS, 0)
    out.update({b: n for b, n in cur.fetchall()})
    return out


def _predicates(store, age_column, older_than_days, has_expires):
    """(age predicate, deletable predicate) as SQL over the keys row ``k``."""
    sql = pgconn.sql
    by_update = sql.SQL("k.updated_at < now() - make_interval(days => {})").format(sql.Literal(int(older_than_days)))
    if age_column == "updated_at":
        age = by_update
    elif age_column == "expires_at":
        age = sql.SQL("(k.expires_at IS NOT NULL AND k.expires_at < now())")
    elif has_expires:  # auto
        age = sql.SQL("(CASE WHEN k.expires_at IS NOT NULL THEN k.expires_at < now() ELSE {} END)").format(by_update)
    else:
        age = by_update
    # Pointers are compared as text: Baileys stores pre-key ids as decimal strings.
    signed = sql.SQL(
        "CASE WHEN jsonb_typeof(a.creds->'signedPreKey'->'keyId') = 'number' "
        "THEN ((a.creds->'signedPreKey'->>'keyId')::numeric)::bigint::text END")
    highest = sql.SQL(
        "CASE WHEN jsonb_typeof(a.creds->'nextPreKeyId') = 'number' "
        "THEN ((a.creds->>'nextPreKeyId')::numeric - 1)::bigint::text END")
    deletable = sql.SQL(
        "k.key_type <> ALL({types}) AND (k.key_type <> 'pre-key' OR EXISTS (SELECT 1 FROM {auth} a "
        "WHERE a.company_id = k.company_id AND ({signed}) IS NOT NULL AND ({highest}) IS NOT NULL "
        "AND k.key_id <> ({signed}) AND k.key_id <> ({highest})))"
    ).format(types=sql.Literal(list(PROTECTED_TYPES)), signed=signed, highest=highest, auth=store.auth)
    return age, deletable


def cleanup_keys(conn_params, store_params, older_than_days=30, age_column="auto", batch_size=1000, max_delete=1000,
                 confirm_large_delete=False, companies=None, vacuum=True, check_mode=False, log=None,
                 lock_timeout_ms=5000):
    """Delete old keys; return a result dict (see the ``keys_cleanup`` module's RETURN)."""
    started = time.monotonic()
    if age_column not in AGE_COLUMNS:
        raise CleanupError("age_column must be one of %s" % ", ".join(AGE_COLUMNS))
    if older_than_days is None or int(older_than_days) < 1:
        raise CleanupError("older_than_days must be at least 1")
    if int(batch_size) < 1 or int(batch_size) > 100000:
        raise CleanupError("batch_size must be between 1 and 100000")
    if max_delete is None or int(max_delete) < 0:
        raise CleanupError("max_delete must be 0 or more")
    sql = pgconn.sql
    store = pgconn.Store.from_params(store_params)
    conn = pgconn.connect(conn_params, autocommit=True)
    result = {
        "changed": False,
        "check_mode": bool(check_mode),
        "older_than_days": int(older_than_days),
        "age_column": age_column,
        "batch_size": int(batch_size),
        "max_delete": int(max_delete),
        "deleted": 0,
        "would_delete": 0,
        "batches": 0,
        "stopped": False,
        "warnings": [],
    }
    try:
        cur = conn.cursor()
        store.check_tables(cur)
        cur.execute("SET lock_timeout = %s" % int(lock_timeout_ms))
        has_expires = _has_column(cur, store, "expires_at")
        if age_column == "expires_at" and not has_expires:
            raise CleanupError("age_column=expires_at but %s.%s has no expires_at column"
                               % (store.schema, store.keys_table))
        result["age_column_used"] = age_column if (age_column != "auto" or has_expires) else "updated_at"
        age, deletable = _predicates(store, age_column, older_than_days, has_expires)
        scope = sql.SQL("TRUE")
        scope_args = ()
        if companies:
            scope = sql.SQL("k.company_id = ANY(%s)")
            scope_args = (list(companies),)
        base = sql.SQL("FROM {keys} k WHERE {scope}").format(keys=store.keys, scope=scope)

        result["sizes_before"] = sizes(cur, store)
        result["age_buckets"] = age_buckets(cur, store)
        # One pass: candidates per type and bucket, and the old keys that are protected.
        cur.execute(
            sql.SQL("SELECT k.key_type, " + BUCKET_SQL.format(col="k.updated_at")
                    + ", ({deletable}), count(*) ").format(deletable=deletable) + base
            + sql.SQL(" AND {age} GROUP BY 1, 2, 3").format(age=age),
            scope_args,
        )
        by_type = {}
        cand_buckets = dict.fromkeys(BUCKETS, 0)
        protected = {"pre-key": 0, "app-state": 0}
        for key_type, bucket, ok, n in cur.fetchall():
            if ok:
                by_type[key_type] = by_type.get(key_type, 0) + n
                cand_buckets[bucket] += n
            elif key_type in PROTECTED_TYPES:
                protected["app-state"] += n
            else:
                protected["pre-key"] += n
        candidates = sum(by_type.values())
        result.update(would_delete=candidates, candidates_by_type=by_type, candidate_age_buckets=cand_buckets,
                      protected_old_keys=protected)
        if log is not None:
            log.emit("cleanup_scan", "ok", candidates=candidates, protected_pre_keys=protected["pre-key"],
                     protected_app_state=protected["app-state"])

        if candidates > int(max_delete) and not confirm_large_delete:
            result["stopped"] = True
            result["sizes_after"] = result["sizes_before"]
            result["duration"] = round(time.monotonic() - started, 3)
            raise LargeDeleteRefused(
                "refusing to delete %d keys: more than max_delete=%d; nothing was deleted. Check the age buckets, "
                "then run again with confirm_large_delete=true (--confirm-large-delete) or a higher max_delete"
                % (candidates, int(max_delete)), result)

        if check_mode:
            result["changed"] = candidates > 0
            result["sizes_after"] = result["sizes_before"]
            result["duration"] = round(time.monotonic() - started, 3)
            return result

        batch = sql.SQL(
            "WITH doomed AS (SELECT k.company_id, k.key_type, k.key_id {base} AND {age} AND {deletable} "
            "LIMIT %s FOR UPDATE OF k SKIP LOCKED) "
            "DELETE FROM {keys} k USING doomed x "
            "WHERE k.company_id = x.company_id AND k.key_type = x.key_type AND k.key_id = x.key_id "
            "AND {age} AND {deletable} RETURNING k.key_type"
        ).format(base=base, age=age, deletable=deletable, keys=store.keys)
        deleted_by_type = {}
        deleted = 0
        # Without confirmation never delete more than the limit, even if keys age during the run.
        limit_total = None if confirm_large_delete else int(max_delete)
        while True:
            size = int(batch_size)
            if limit_total is not None:
                size = min(size, limit_total - deleted)
                if size <= 0:
                    break
            t0 = time.monotonic()
            with conn.transaction():
                cur.execute(batch, scope_args + (size,))
                rows = cur.fetchall()
            if not rows:
                break
            result["batches"] += 1
            deleted += len(rows)
            for (key_type,) in rows:
                deleted_by_type[key_type] = deleted_by_type.get(key_type, 0) + 1
            if log is not None:
                log.emit("cleanup_batch", "ok", time.monotonic() - t0, batch=result["batches"], deleted=len(rows))
            if len(rows) < size:
                break
        result["deleted"] = deleted
        result["deleted_by_type"] = deleted_by_type
        result["changed"] = deleted > 0
        if deleted and vacuum:
            try:
                cur.execute(sql.SQL("VACUUM (ANALYZE) {}").format(store.keys))
                result["vacuumed"] = True
            except pgconn.psycopg.Error as exc:
                result["vacuumed"] = False
                result["warnings"].append("VACUUM of %s.%s failed: %s" % (
                    store.schema, store.keys_table, pgconn._scrub(exc, conn_params)))
        result["sizes_after"] = sizes(cur, store)
        result["age_buckets_after"] = age_buckets(cur, store)
    except pgconn.psycopg.Error as exc:
        raise pgconn.PgError("cleanup failed on %s after deleting %d keys: %s" % (
            pgconn.describe(conn_params), result["deleted"], pgconn._scrub(exc, conn_params)))
    finally:
        conn.close()
    result["duration"] = round(time.monotonic() - started, 3)
    return result
