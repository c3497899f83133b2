# -*- coding: utf-8 -*-
# Copyright: baileys.resilience contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Reading the auth-state store (PostgreSQL) for an export.

* :class:`CompanyState`: one company's auth state as text, whatever the source (this
  store, or a backup: backupsource.py yields the same objects);
* :class:`snapshot_transaction`: one read-only REPEATABLE READ snapshot for a whole run;
* :class:`DatabaseSource`: the creds, the fingerprint of each company's key rows and the
  key rows of the companies asked for, all from that snapshot; the key rows in batches of
  ``FETCH_ROWS`` through a server-side cursor, the next batch fetched while the caller works;
* the fingerprint formula (``FINGERPRINT_VERSION``, ``_FINGERPRINT_SQL``; the company filter
  is ``pgconn.company_filter``): computed by the server from the stored ``jsonb``; the import guards
  (authguards.py) compute the same formula over the files they import.

Reads only: nothing here writes to the store.  Imports pgconn, no other auth-state room,
no Ansible.
"""
from __future__ import absolute_import, division, print_function

import queue
import threading

from . import pgconn

__metaclass__ = type

FETCH_ROWS = 5000  # key rows per round trip when reading the store


class CompanyState:
    """One company's auth state as text read from a source."""

    __slots__ = ("company_id", "creds", "keys", "fingerprint")

    def __init__(self, company_id, creds=None, keys=None, fingerprint=None):
        self.company_id = company_id
        self.creds = creds  # JSON text or None
        self.keys = keys if keys is not None else []  # [(key_type, key_id, JSON text)]
        self.fingerprint = fingerprint  # the store's fingerprint of the key rows, or None


FINGERPRINT_VERSION = 1
# Per key row, a 64-bit hash of (key_type, key_id, value) computed by the server from the stored jsonb
# (no text rendering, no transfer); per company, the row count and the sum of the row hashes.  The cast
# costs nothing on a jsonb column and keeps stores whose value column is json working.
_FINGERPRINT_SQL = (
    "SELECT company_id, count(*), "
    "sum(hashtextextended(key_type, hashtextextended(key_id, jsonb_hash_extended(value::jsonb, 0))))::text "
    "FROM {}{} GROUP BY company_id"
)


EMPTY_FINGERPRINT = "%d:0:0" % FINGERPRINT_VERSION  # a company without key rows


def read_fingerprints(cur, table, where, args):
    """``{company_id: fingerprint}`` of ``table``'s key rows (``where``/``args``: a company filter)."""
    cur.execute(pgconn.sql.SQL(_FINGERPRINT_SQL).format(table, where), args)
    return {company_id: "%d:%d:%s" % (FINGERPRINT_VERSION, count, total) for company_id, count, total in cur.fetchall()}


class DatabaseSource:
    """The store read in one snapshot: the creds, a fingerprint of each company's key rows,
    and the key rows of the companies asked for.

    The caller owns the transaction: it must be REPEATABLE READ so that the creds, the
    fingerprints and the keys agree (see :func:`snapshot_transaction`).  An export keeps
    every company whose directory's manifest holds the same fingerprint and whose files are
    as that export left them (:func:`authexport.verify_directory`), and reads the key rows of the
    others only (:meth:`states`).  The fingerprint is computed by the server from the stored
    ``jsonb`` (no rendering to text, nothing sent but one row per company), so it equates
    values that ``jsonb`` equates (``1`` and ``1.0``), as the import's upsert does.
    """

    def __init__(self, conn, store, companies=None, server_version_num=None):
        self.conn = conn
        self.store = store
        self.companies = list(companies) if companies else None
        self._filter = pgconn.company_filter(self.companies)
        with conn.cursor() as cur:
            cur.execute(pgconn.sql.SQL("SELECT company_id, creds::text FROM {}").format(store.auth) + self._filter[0],
                        self._filter[1])
            self.creds = dict(cur.fetchall())
        # jsonb_hash_extended is in PostgreSQL 11+; without it every company's rows are read
        self.fingerprinted = server_version_num is None or server_version_num >= 110000
        self._fingerprints = {}
        self._error = None
        self._thread = None

    def start(self):
        """Have the server compute the fingerprints while the caller goes on (a thread waits for them)."""
        if self.fingerprinted and self._thread is None:
            self._thread = threading.Thread(target=self._read_fingerprints, name="br-fingerprints", daemon=True)
            self._thread.start()

    def _read_fingerprints(self):
        where, args = self._filter
        try:
            with self.conn.cursor() as cur:
                self._fingerprints = read_fingerprints(cur, self.store.keys, where, args)
        except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread by wait()
            self._error = exc

    def close(self):
        """Wait for the fingerprint thread if it still runs (before the transaction ends); raise nothing."""
        if self._thread is not None:
            self._thread.join()

    def wait(self):
        """Wait for the fingerprints; raise the error that reading them met."""
        self.start()
        self.close()
        if self._error is not None:
            raise self._error

    @property
    def fingerprints(self):
        self.wait()
        return self._fingerprints

    @property
    def company_ids(self):
        """Every company, sorted; None without fingerprints (companies with keys but no creds
        row are then only known from the key rows)."""
        if not self.fingerprinted:
            return None
        return sorted(set(self.creds) | set(self.fingerprints))

    def fingerprint(self, company_id):
        if not self.fingerprinted:
            return None
        return self.fingerprints.get(company_id, EMPTY_FINGERPRINT)

    def states(self, company_ids=None):
        """Yield full :class:`CompanyState` (key rows read) for ``company_ids`` (default: all)."""
        self.wait()
        if company_ids is None:
            where, args = self._filter
            rest = self.company_ids if self.fingerprinted else sorted(self.creds)
        else:
            rest = sorted(set(company_ids))
            where, args = pgconn.company_filter([c for c in rest if c in self.fingerprints])
        seen = set()
        if company_ids is None or args[0]:
            query = pgconn.sql.SQL(
                "SELECT company_id, key_type, key_id, value::text FROM {}{} ORDER BY company_id"
            ).format(self.store.keys, where)
            current = None
            # A server-side cursor read in batches (psycopg hands COPY rows over one at a time, which
            # costs about twice the client CPU), the next batch fetched while this one is written out.
            with self.conn.cursor(name="br_read_keys") as cur:
                cur.execute(query, args)
                for batch in _prefetch(cur, FETCH_ROWS):
                    for company_id, key_type, key_id, value in batch:
                        if current is None or current.company_id != company_id:
                            if current is not None:
                                yield current
                            current = CompanyState(company_id, self.creds.get(company_id),
                                                   fingerprint=self.fingerprint(company_id))
                            seen.add(company_id)
                        current.keys.append((key_type, key_id, value))
            if current is not None:
                yield current
        for company_id in rest:
            if company_id not in seen and (company_id in self.creds or company_id in self.fingerprints):
                yield CompanyState(company_id, self.creds.get(company_id), fingerprint=self.fingerprint(company_id))

    def __iter__(self):
        return self.states()


def _prefetch(cur, size):
    """Yield ``cur.fetchmany(size)`` batches; a thread fetches the next batch while the caller works."""
    batches = queue.Queue(maxsize=2)
    stop = threading.Event()

    def fetch():
        try:
            while not stop.is_set():
                batch = cur.fetchmany(size)
                batches.put(batch)
                if not batch:
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            batches.put(exc)

    worker = threading.Thread(target=fetch, name="br-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            batch = batches.get()
            if isinstance(batch, BaseException):
                raise batch
            if not batch:
                return
            yield batch
    finally:
        stop.set()
        while worker.is_alive():  # unblock a put() if the caller stopped early
            try:
                batches.get(timeout=0.05)
            except queue.Empty:
                pass
        worker.join()


class snapshot_transaction:
    """A read-only REPEATABLE READ transaction: one snapshot for the whole run."""

    def __init__(self, conn):
        self.conn = conn

    def __enter__(self):
        self.conn.autocommit = True
        self.conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        row = self.conn.execute("SELECT now(), current_setting('server_version_num')::int").fetchone()
        return {"snapshot_time": row[0].isoformat(), "server_version_num": row[1]}

    def __exit__(self, *exc):
        try:
            self.conn.execute("ROLLBACK")
        except Exception:  # noqa: BLE001 - the connection may already be gone
            pass
        return False
