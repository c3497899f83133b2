# -*- coding: utf-8 -*-
# Copyright: baileys.resilience contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Delete old signal keys from the auth-state store, in short batches, never one Baileys may still need.

No Ansible import: the ``keys_cleanup`` module and ``baileys-resilience cleanup`` call
:func:`cleanup_keys`; the health report (health.py) counts with the same rules.

Which keys may go is decided by :data:`RULES`, one entry per key type, each with its reason and the
Baileys 7.0.0-rc14 source it rests on (docs/key-retention.md has the long form).  In short:

* creds are never touched (the cleanup deletes from the keys table only);
* ``pre-key``: never, whatever the age.  An uploaded, unconsumed one-time pre-key is live on
  WhatsApp's server until a new contact uses it; Baileys deletes it from the store itself when it is
  consumed.  One generated but not uploaded yet (id at or above ``creds.firstUnuploadedPreKeyId``) is
  read back by the next upload;
* ``app-state-sync-key``, ``app-state-sync-version``: never;
* ``identity-key``, ``lid-mapping`` and any type not listed: never (Baileys cannot get them back, or
  nothing in its source shows that it can);
* ``session``, ``sender-key``, ``sender-key-memory``, ``device-list``: by age; Baileys rebuilds them
  (a retry receipt or a pre-key bundle fetch re-establishes a session, a sender key is re-sent);
* ``tctoken``: by age, and only once Baileys itself would treat the token as expired; never the
  ``__index`` row.

A key is old by ``updated_at`` (older than ``older_than_days``), by ``expires_at`` (``expires_at <
now()``), or ``auto`` (``expires_at < now()`` where it is set, the ``updated_at`` age otherwise).  A
key is deleted only when it is old *and* its rule lets it go.

Deletion runs in batches (``batch_size`` rows per transaction, selected by primary key with
``FOR UPDATE SKIP LOCKED``; the ``DELETE`` re-checks age and rule at delete time), so no long lock is
held on the table Baileys writes to.  A run whose candidates exceed ``max_delete`` deletes nothing
unless ``confirm_large_delete`` is set.
"""
from __future__ import absolute_import, division, print_function

import time

from . import errors, pgconn

__metaclass__ = type

AGE_COLUMNS = ("auto", "updated_at", "expires_at")
# the defaults of cleanup_keys, which the host tool (clijobs.py) takes from here
DEFAULT_OLDER_THAN_DAYS = 30
DEFAULT_AGE_COLUMN = "auto"
DEFAULT_BATCH_SIZE = 1000
DEFAULT_MAX_DELETE = 1000
BUCKETS = ("0-1d", "1-7d", "7-14d", "14-30d", ">30d")

# What a rule does with an old key: keep it; let it go; let it go once the privacy token it holds is
# expired by Baileys' isTcTokenExpired (its ``timestamp`` and ``senderTimestamp``), never the index row.
NEVER = "never"
BY_AGE = "by_age"
BY_AGE_ONCE_EXPIRED = "by_age_once_expired"

# Utils/tc-token-utils.js: TC_TOKEN_BUCKET_DURATION (7 days), TC_TOKEN_NUM_BUCKETS (4), TC_TOKEN_INDEX_KEY.
TC_TOKEN_BUCKET_SECONDS = 604800
TC_TOKEN_BUCKETS = 4
TC_TOKEN_INDEX_KEY = "__index"


class Rule:
    """One retention rule: the key types it covers, what it does with an old key, why, and where in
    Baileys (7.0.0-rc14, ``lib/``; libsignal 6.0.0 ``src/``) the reason can be read."""

    __slots__ = ("name", "types", "deletes", "reason", "source")

    def __init__(self, name, types, deletes, reason, source):
        self.name = name
        self.types = tuple(types)
        self.deletes = deletes
        self.reason = reason
        self.source = source

    def as_dict(self):
        return {"name": self.name, "types": list(self.types), "deletes": self.deletes, "reason": self.reason,
                "source": self.source}


RULES = (
    Rule("pre-key", ["pre-key"], NEVER,
         "one-time pre-keys are uploaded in batches (812 when the server holds none, 5 more when it runs low) "
         "and stay on WhatsApp's server until a new contact consumes one; Baileys deletes a pre-key from the "
         "store when it is consumed, so one still in the store is live whatever its age, and the first message "
         "of a new contact handed a deleted one fails to decrypt ('Invalid PreKey ID'). Ids at or above "
         "creds.firstUnuploadedPreKeyId are generated but not uploaded and are read back by the next upload",
         "Defaults/index.js:120-121 MIN_PREKEY_COUNT/INITIAL_PREKEY_COUNT; Socket/socket.js:355-399 "
         "uploadPreKeys, 409-440 uploadPreKeysToServerIfRequired; Socket/messages-recv.js:549-571 "
         "handleEncryptNotification; Utils/signal.js:18-40 getPreKeys/generateOrGetPreKeys, 171-200 "
         "getNextPreKeys/getNextPreKeysNode; Signal/libsignal.js:390-400 loadPreKey/removePreKey; libsignal "
         "src/session_builder.js:55-81 initIncoming, src/session_cipher.js:189-214 "
         "decryptPreKeyWhisperMessage"),
    Rule("app-state", ["app-state-sync-key", "app-state-sync-version"], NEVER,
         "app-state sync keys arrive only in a key share from the primary phone, and a patch whose key is "
         "missing fails to decode ('failed to find key'); the versions hold the state each collection's "
         "next patch is applied to",
         "Utils/process-message.js:280-290 (appStateSyncKeyShare); Utils/chat-utils.js:231-237 "
         "decodeSyncdPatch; Socket/chats.js:62-63 getAppStateSyncKey, 438-445, 491"),
    Rule("identity-key", ["identity-key"], NEVER,
         "the identity key pinned on first use for each contact device; without it the next pkmsg pins "
         "whatever key arrives, so an identity change goes undetected. It is trust state, not a cache",
         "Signal/libsignal.js:86-95 decryptMessage, 371-389 saveIdentity"),
    Rule("lid-mapping", ["lid-mapping"], NEVER,
         "a missing PN->LID row is fetched again by USync, but a missing '<lid>_reverse' row is not: "
         "getPNsForLIDs has no fallback, and storeLIDPNMappings does not rewrite the pair while the PN row "
         "is unchanged; safety cannot be shown, so both are kept",
         "Signal/lid-mapping.js:57-65 storeLIDPNMappings, 139-196 _getLIDsForPNsImpl, 248-266 "
         "_getPNsForLIDsImpl"),
    Rule("session", ["session"], BY_AGE,
         "a message from a contact whose session is gone fails to decrypt; Baileys answers with a retry "
         "receipt that carries a fresh pre-key bundle from the second retry on, and the contact starts a new "
         "session; to send, Baileys fetches the contact's bundle when no session exists",
         "Utils/decode-wa-message.js:288-297; Socket/messages-recv.js:387-517 sendRetryRequest (keys at "
         "496-513), 1379; Socket/messages-send.js:296-341 assertSessions"),
    Rule("sender-key", ["sender-key"], BY_AGE,
         "a missing group sender key makes a group message fail to decrypt, and the retry receipt makes the "
         "sender re-send it with its sender-key distribution message; our own missing sender key is "
         "recreated on the next group send (it is written on every send, like sender-key-memory, so both "
         "age together) and a member that cannot decrypt gets it through the same retry path",
         "Signal/libsignal.js:43-52 ensureSenderKeyAndCreateSkdm, 124-130 encryptGroupMessage; "
         "Socket/messages-send.js:554-584; Socket/messages-recv.js:1040-1136 sendMessagesAgain"),
    Rule("sender-key-memory", ["sender-key-memory"], BY_AGE,
         "which devices already hold our sender key for a group; a missing row only makes Baileys send the "
         "sender-key distribution message to every device again (Baileys deletes it itself on a retry)",
         "Socket/messages-send.js:514, 554-584; Socket/messages-recv.js:1136"),
    Rule("device-list", ["device-list"], BY_AGE,
         "a record of the devices a USync query returned, read only to migrate PN sessions to LID; without "
         "it nothing is migrated and a LID session is fetched with assertSessions",
         "Socket/messages-send.js:253-262 getUSyncDevices; Signal/libsignal.js:204-218 migrateSession"),
    Rule("tctoken", ["tctoken"], BY_AGE_ONCE_EXPIRED,
         "a valid privacy token is needed to message a contact (error 463, which Baileys does not retry); "
         "tokens expire after the 4 x 7-day window of isTcTokenExpired and Baileys prunes expired ones "
         "itself, so a row goes only when both its timestamp and senderTimestamp are expired by that rule; "
         "the '__index' row (Baileys' prune list) is kept",
         "Utils/tc-token-utils.js:23-26, 56-67 isTcTokenExpired, 99-128 buildTcTokenFromJid; "
         "Socket/messages-recv.js:1513-1545, 1701-1761 pruneExpiredTcTokens"),
)
# Any other type: kept.  Nothing in Baileys' source says it can be rebuilt.
OTHER = Rule("other", [], NEVER, "a key type these rules do not know; kept until its safety is shown", "")
_BY_TYPE = {key_type: rule for rule in RULES for key_type in rule.types}
_BY_NAME = {rule.name: rule for rule in RULES + (OTHER,)}


def rule_for(key_type):
    """The :class:`Rule` that decides about ``key_type`` (:data:`OTHER` for unknown types)."""
    return _BY_TYPE.get(key_type, OTHER)


def _types(deletes):
    return [t for rule in RULES if rule.deletes == deletes for t in rule.types]


def _tc_expired(field):
    """Baileys' isTcTokenExpired on ``k.value->>field``: absent is expired; a value that is not a plain
    integer is treated as live (parseInt might read a prefix of it)."""
    sql = pgconn.sql
    text = sql.SQL("(k.value->>{})").format(sql.Literal(field))
    cutoff = sql.SQL("((floor(extract(epoch FROM now()) / {bucket}) - {keep}) * {bucket})").format(
        bucket=sql.Literal(TC_TOKEN_BUCKET_SECONDS), keep=sql.Literal(TC_TOKEN_BUCKETS - 1))
    return sql.SQL("(CASE WHEN {t} IS NULL THEN TRUE WHEN {t} ~ {pattern} THEN {t}::bigint < {cutoff} "
                   "ELSE FALSE END)").format(t=text, pattern=sql.Literal("^[0-9]{1,15}$"), cutoff=cutoff)


def deletable_sql():
    """SQL boolean over a keys row aliased ``k``: true when :data:`RULES` let the row go once it is old.

    Never NULL.  This is the only place the rules become SQL: the cleanup's scan, its ``DELETE``
    re-check and the health report's stale / old-but-live counts all use it.
    """
    sql = pgconn.sql
    return sql.SQL(
        "(k.key_type = ANY({by_age}) OR (k.key_type = ANY({once_expired}) AND k.key_id <> {index} "
        "AND {ts} AND {sender_ts}))"
    ).format(by_age=sql.Literal(_types(BY_AGE)), once_expired=sql.Literal(_types(BY_AGE_ONCE_EXPIRED)),
             index=sql.Literal(TC_TOKEN_INDEX_KEY), ts=_tc_expired("timestamp"),
             sender_ts=_tc_expired("senderTimestamp"))


def pre_key_supply(cur, store, companies=None):
    """Per company with a creds row: ``{company_id: {"live_pre_keys": n, "unuploaded_pre_keys": n}}``.

    Live: pre-key rows with a numeric id below ``creds.firstUnuploadedPreKeyId``, i.e. uploaded and not
    consumed yet: the server-side supply Baileys relies on (the server can hold no more of ours than
    these).  Unuploaded: ids at or above it, read back by the next upload.  Both are ``None`` when the
    creds hold no numeric ``firstUnuploadedPreKeyId``.
    """
    sql = pgconn.sql
    first = sql.SQL("CASE WHEN jsonb_typeof(a.creds::jsonb->'firstUnuploadedPreKeyId') = 'number' "
                    "THEN (a.creds::jsonb->>'firstUnuploadedPreKeyId')::numeric END")
    key_id = sql.SQL("CASE WHEN k.key_id ~ {} THEN k.key_id::numeric END").format(sql.Literal("^[0-9]{1,15}$"))
    where, args = pgconn.company_filter(companies or None, "a")
    cur.execute(
        sql.SQL("SELECT a.company_id, ({first}) IS NOT NULL, count(*) FILTER (WHERE ({id}) < ({first})), "
                "count(*) FILTER (WHERE ({id}) >= ({first})) FROM {auth} a LEFT JOIN {keys} k "
                "ON k.company_id = a.company_id AND k.key_type = 'pre-key'{where} GROUP BY 1, 2").format(
            first=first, id=key_id, auth=store.auth, keys=store.keys, where=where),
        args)
    out = {}
    for cid, known, live, unuploaded in cur.fetchall():
        out[cid] = {"live_pre_keys": live if known else None, "unuploaded_pre_keys": unuploaded if known else None}
    return out


class CleanupError(errors.BaileysResilienceError, RuntimeError):
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
    out.update(cur.fetchall())
    return out


def _age_sql(age_column, older_than_days, has_expires):
    """The age predicate over the keys row ``k`` (whether a key is old, whatever its type)."""
    sql = pgconn.sql
    by_update = sql.SQL("k.updated_at < now() - make_interval(days => {})").format(sql.Literal(int(older_than_days)))
    if age_column == "updated_at":
        return by_update
    if age_column == "expires_at":
        return sql.SQL("(k.expires_at IS NOT NULL AND k.expires_at < now())")
    if has_expires:  # auto
        return sql.SQL("(CASE WHEN k.expires_at IS NOT NULL THEN k.expires_at < now() ELSE {} END)").format(by_update)
    return by_update


def _rule_report(kept_by_type, candidates_by_type):
    """Per rule (in :data:`RULES` order, then ``other``): what it keeps and what it lets go."""
    report = []
    for rule in RULES + (OTHER,):
        entry = rule.as_dict()
        entry["kept_old"] = _count_for(rule, kept_by_type)
        entry["candidates"] = _count_for(rule, candidates_by_type)
        if rule is OTHER:
            entry["types"] = sorted(t for t in set(kept_by_type) | set(candidates_by_type) if rule_for(t) is OTHER)
        report.append(entry)
    return report


def rules_text(rules):
    """The ``rules`` of a cleanup result, one line per rule: what it keeps and what it deletes (or, before
    the delete ran, would delete)."""
    lines = []
    for r in rules:
        done = "deleted" in r
        lines.append("  %-17s %-19s keeps %d old, %s %d  [%s]" % (
            r["name"], r["deletes"], r["kept_old"], "deleted" if done else "would delete",
            r["deleted"] if done else r["candidates"], ", ".join(r["types"]) or "-"))
    return "\n".join(lines)


def _count_for(rule, counts_by_type):
    return sum(n for key_type, n in counts_by_type.items() if rule_for(key_type) is rule)


def cleanup_keys(conn_params, store_params, older_than_days=DEFAULT_OLDER_THAN_DAYS, age_column=DEFAULT_AGE_COLUMN,
                 batch_size=DEFAULT_BATCH_SIZE, max_delete=DEFAULT_MAX_DELETE, confirm_large_delete=False,
                 companies=None, vacuum=True, check_mode=False, log=None, lock_timeout_ms=5000):
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
        age = _age_sql(age_column, older_than_days, has_expires)
        deletable = deletable_sql()
        scope, scope_args = pgconn.company_filter(companies or None, "k", keyword="")
        base = sql.SQL("FROM {keys} k WHERE {scope}").format(keys=store.keys,
                                                             scope=scope if scope_args else sql.SQL("TRUE"))

        result["sizes_before"] = sizes(cur, store)
        result["age_buckets"] = age_buckets(cur, store)
        # One pass over the old keys: per type and bucket, whether the rules let them go.
        cur.execute(
            sql.SQL("SELECT k.key_type, " + BUCKET_SQL.format(col="k.updated_at")
                    + ", ({deletable}), count(*) ").format(deletable=deletable) + base
            + sql.SQL(" AND {age} GROUP BY 1, 2, 3").format(age=age),
            scope_args,
        )
        by_type = {}
        kept_by_type = {}
        cand_buckets = dict.fromkeys(BUCKETS, 0)
        for key_type, bucket, ok, n in cur.fetchall():
            if ok:
                by_type[key_type] = by_type.get(key_type, 0) + n
                cand_buckets[bucket] += n
            else:
                kept_by_type[key_type] = kept_by_type.get(key_type, 0) + n
        candidates = sum(by_type.values())
        rules = _rule_report(kept_by_type, by_type)
        protected = {r["name"]: r["kept_old"] for r in rules if r["deletes"] != BY_AGE}
        result.update(would_delete=candidates, candidates_by_type=by_type, candidate_age_buckets=cand_buckets,
                      protected_old_keys=protected, kept_old_by_type=kept_by_type, rules=rules)
        if log is not None:
            log.emit("cleanup_scan", "ok", candidates=candidates, kept_old=sum(kept_by_type.values()),
                     protected_pre_keys=protected["pre-key"], protected_app_state=protected["app-state"])

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
        for entry in result["rules"]:
            entry["deleted"] = _count_for(_BY_NAME[entry["name"]], deleted_by_type)
        result["changed"] = deleted > 0
        if deleted and vacuum:
            try:
                cur.execute(sql.SQL("VACUUM (ANALYZE) {}").format(store.keys))
                result["vacuumed"] = True
            except pgconn.Error as exc:
                result["vacuumed"] = False
                result["warnings"].append("VACUUM of %s.%s failed: %s" % (
                    store.schema, store.keys_table, pgconn._scrub(exc, conn_params)))
        result["sizes_after"] = sizes(cur, store)
        result["age_buckets_after"] = age_buckets(cur, store)
    except pgconn.Error as exc:
        raise pgconn.PgError("cleanup failed on %s after deleting %d keys: %s" % (
            pgconn.describe(conn_params), result["deleted"], pgconn._scrub(exc, conn_params)))
    finally:
        conn.close()
    result["duration"] = round(time.monotonic() - started, 3)
    return result
