# -*- coding: utf-8 -*-
# Copyright: baileys.resilience contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The guards of a mirroring import (the failover's way back to PostgreSQL).

:class:`ImportGuards` says what to check; authimport.py's ``_apply`` calls
:func:`_check_guards` after the files are in its temporary tables (``br_import_keys``,
``br_import_auth``) and before anything changes, and :func:`_verify_mirror` after the
changes.  A guard that refuses raises :class:`ImportRefused` (with ``details``: what it
found) inside that transaction, so nothing is changed.  The fingerprints are the formula of
authsource.py, computed over the store and over the files alike.

Reads the store and the temporary tables only; the one write is dropping the skipped
companies from the temporary tables.  No Ansible import.
"""
from __future__ import absolute_import, division, print_function

from . import authnames, authsource
from . import pgconn

__metaclass__ = type


class ImportRefused(authnames.AuthStateError):
    """A guard of a mirroring import refused; nothing was changed.  ``details`` says what it found."""

    def __init__(self, message, details=None):
        authnames.AuthStateError.__init__(self, message)
        self.details = details or {}


STORE_CHANGED_CHOICES = ("fail", "files", "store")
GUARD_LIST = 20  # rows listed per company in a guard's message


class ImportGuards:
    """What a mirroring import (``prune``) checks before it changes anything, in its transaction.

    * creds: a company directory without ``creds.json`` whose store has a creds row is refused
      (mirroring it would mean deleting the creds: the account);
    * ``max_delete_share``: a company whose store would lose more than this share of its key rows
      is refused (a half-empty directory is more likely a mistake than a truth);
    * ``handover`` (company id -> ``{"fingerprint", "creds_sha256"}``, what the store held when the
      service left it, from the failover state file) with ``handover_time``: a company whose store
      differs from it (another writer kept using the database) and does not already equal the
      files (a re-run after a committed import) is refused with the rows written since the
      handover, unless ``on_store_changed`` says which side wins: ``files`` (imported anyway) or
      ``store`` (the company is left as the store has it).
    * ``verify``: after the changes, the store's fingerprint and creds of every imported company
      must equal the files'; otherwise everything is rolled back.
    """

    def __init__(self, max_delete_share=None, handover=None, handover_time=None, on_store_changed="fail",
                 verify=True):
        if on_store_changed not in STORE_CHANGED_CHOICES:
            raise authnames.AuthStateError("on_store_changed must be one of %s" % ", ".join(STORE_CHANGED_CHOICES))
        if max_delete_share is not None and not 0 <= float(max_delete_share) <= 1:
            raise authnames.AuthStateError("max_delete_share must be between 0 and 1, got %r" % (max_delete_share,))
        self.max_delete_share = None if max_delete_share is None else float(max_delete_share)
        self.handover = handover or {}
        self.handover_time = handover_time
        self.on_store_changed = on_store_changed
        self.verify = verify


def _fingerprints(cur, table, company_ids):
    """``{company_id: fingerprint}`` of ``table``'s key rows (the :class:`authsource.DatabaseSource` formula)."""
    where, args = pgconn.company_filter(company_ids)
    fps = authsource.read_fingerprints(cur, table, where, args)
    return {cid: fps.get(cid, authsource.EMPTY_FINGERPRINT) for cid in company_ids}


def _creds_view(cur, store, company_ids):
    """``{company_id: (sha256 of the store's creds text or None, creds equal to the files' or None)}``."""
    cur.execute(pgconn.sql.SQL(
        "SELECT u.cid, a.creds::text, a.creds = t.creds FROM unnest(%s::text[]) AS u(cid) "
        "LEFT JOIN {} a ON a.company_id = u.cid LEFT JOIN br_import_auth t ON t.company_id = u.cid"
    ).format(store.auth), (list(company_ids),))
    return {cid: (authnames._sha(text.encode("utf-8")) if text is not None else None, same) for cid, text, same in
            cur.fetchall()}


def _check_guards(cur, store, company_ids, guards, prune):
    """Apply :class:`ImportGuards` before anything changes; return ``(report, companies to skip)``."""
    sql = pgconn.sql
    temp = sql.Identifier("br_import_keys")
    store_fp = _fingerprints(cur, store.keys, company_ids)
    files_fp = _fingerprints(cur, temp, company_ids)
    creds = _creds_view(cur, store, company_ids)
    report = {"companies": {}, "store_changed": [], "skipped": [], "replaced": {}}
    problems = []
    skip = set()
    for cid in company_ids:
        creds_sha, creds_same = creds[cid]
        already = store_fp[cid] == files_fp[cid] and creds_same is not False
        entry = {"store_fingerprint": store_fp[cid], "files_fingerprint": files_fp[cid], "already_equal": already}
        report["companies"][cid] = entry
        handed = guards.handover.get(cid)
        if handed is None or already:
            continue
        if handed.get("fingerprint") in (None, store_fp[cid]) and handed.get("creds_sha256") == creds_sha:
            continue
        rows = []
        if guards.handover_time:
            cur.execute(sql.SQL(
                "(SELECT 'creds', '', updated_at FROM {auth} WHERE company_id = %s AND updated_at > %s) UNION ALL "
                "(SELECT key_type, key_id, updated_at FROM {keys} WHERE company_id = %s AND updated_at > %s "
                "ORDER BY updated_at DESC LIMIT {n})").format(auth=store.auth, keys=store.keys,
                                                              n=sql.Literal(GUARD_LIST)),
                (cid, guards.handover_time, cid, guards.handover_time))
            rows = ["%s/%s (updated %s)" % (t, i, u.isoformat() if u else "?") for t, i, u in cur.fetchall()]
        entry["written_since_handover"] = rows
        report["store_changed"].append(cid)
        if guards.on_store_changed == "store":
            skip.add(cid)
            report["skipped"].append(cid)
        elif guards.on_store_changed == "fail":
            problems.append(
                "company %s: the store changed after the handover (fingerprint %s then, %s now; creds %s); "
                "another writer used the database while the service ran on files. Rows written since %s: %s. "
                "Say which side wins: on_store_changed=files (the files replace them) or store (this company "
                "is left as the store has it)" % (
                    cid, handed.get("fingerprint"), store_fp[cid],
                    "changed" if handed.get("creds_sha256") != creds_sha else "unchanged",
                    guards.handover_time or "the handover", ", ".join(rows) or "none listed (deletions only?)"))
    if prune:
        rest = [c for c in company_ids if c not in skip]
        cur.execute(sql.SQL(
            "SELECT u.cid, (SELECT count(*) FROM {keys} k WHERE k.company_id = u.cid), "
            "(SELECT count(*) FROM {keys} k WHERE k.company_id = u.cid AND NOT EXISTS (SELECT 1 FROM {temp} t "
            "WHERE t.company_id = k.company_id AND t.key_type = k.key_type AND t.key_id = k.key_id)), "
            "EXISTS (SELECT 1 FROM {auth} a WHERE a.company_id = u.cid), "
            "EXISTS (SELECT 1 FROM br_import_auth t WHERE t.company_id = u.cid) "
            "FROM unnest(%s::text[]) AS u(cid)").format(keys=store.keys, temp=temp, auth=store.auth), (rest,))
        for cid, total, doomed, store_creds, file_creds in cur.fetchall():
            report["companies"][cid].update(store_keys=total, would_delete=doomed)
            if store_creds and not file_creds:
                problems.append("company %s: the files have no creds.json but the store has a creds row; a "
                                "mirror would delete the account's creds" % cid)
            if guards.max_delete_share is not None and total and doomed > guards.max_delete_share * total:
                problems.append("company %s: the files would delete %d of the store's %d keys (%.0f%%, more than "
                                "max_delete_share %.0f%%)" % (cid, doomed, total, 100.0 * doomed / total,
                                                              100.0 * guards.max_delete_share))
        # what the store had that the files replace (the rows an operator may want to look at)
        cur.execute(sql.SQL(
            "SELECT k.company_id, k.key_type, k.key_id, CASE WHEN t.company_id IS NULL THEN 'deleted' "
            "ELSE 'replaced' END FROM {keys} k LEFT JOIN {temp} t USING (company_id, key_type, key_id) "
            "WHERE k.company_id = ANY(%s) AND (t.company_id IS NULL OR t.value IS DISTINCT FROM k.value) "
            "ORDER BY k.updated_at DESC LIMIT {n}").format(keys=store.keys, temp=temp,
                                                           n=sql.Literal(GUARD_LIST * 5)), (rest,))
        for cid, key_type, key_id, what in cur.fetchall():
            report["replaced"].setdefault(cid, []).append("%s %s/%s" % (what, key_type, key_id))
    if problems:
        raise ImportRefused("refusing to import, nothing was changed:\n  " + "\n  ".join(problems), report)
    if skip:
        cur.execute("DELETE FROM br_import_keys WHERE company_id = ANY(%s)", (list(skip),))
        cur.execute("DELETE FROM br_import_auth WHERE company_id = ANY(%s)", (list(skip),))
    return report, skip


def _verify_mirror(cur, store, company_ids):
    """Raise when the store's key rows or creds of ``company_ids`` differ from the files'."""
    store_fp = _fingerprints(cur, store.keys, company_ids)
    files_fp = _fingerprints(cur, pgconn.sql.Identifier("br_import_keys"), company_ids)
    creds = _creds_view(cur, store, company_ids)
    bad = ["%s (store %s, files %s%s)" % (cid, store_fp[cid], files_fp[cid],
                                          ", creds differ" if creds[cid][1] is False else "")
           for cid in company_ids if store_fp[cid] != files_fp[cid] or creds[cid][1] is False]
    if bad:
        raise ImportRefused("the store does not equal the files after the import, rolled back: " + "; ".join(bad))
    return store_fp
