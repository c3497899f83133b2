# -*- coding: utf-8 -*-
# Copyright: baileys.resilience contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The PostgreSQL driver seam: psycopg 3 or psycopg2, whichever is installed.

The core is written against the part of psycopg 3's API it uses (``conn.execute``,
``cursor().execute(...)`` returning the cursor, named server-side cursors, ``conn.transaction()``,
``cursor.copy(...)`` with ``write``/``write_row`` for ``COPY ... FROM STDIN``, ``psycopg.sql``).
With psycopg 3 the connection is psycopg's own, untouched.  With psycopg2 (``psycopg2-binary``, the
package the collection's design names) the connection is wrapped in :class:`Psycopg2Connection`,
which gives it those few methods with psycopg 3's meaning:

* ``conn.transaction()``: a transaction in autocommit mode or outside one, a savepoint inside one;
  commit on success, roll back on an exception (psycopg 3's rules).
* ``cursor.copy(statement)``: ``COPY FROM STDIN`` streamed through ``copy_expert`` running in a
  thread that reads what the caller writes from a bounded queue: no temporary file, memory flat.
  An exception in the ``with`` block aborts the COPY (the server sees CopyFail), as psycopg 3 does.
* ``sql``: ``psycopg2.sql`` has the same composition API (``SQL``, ``Identifier``, ``Literal``,
  ``Placeholder``, ``Composed``) as ``psycopg.sql``.

Which driver: psycopg 3 when both are installed, unless the environment variable
``BAILEYS_RESILIENCE_PG_DRIVER`` says ``psycopg2`` (or ``psycopg``), which the tests use to run
the core under each driver.  Standard library only besides the drivers; no Ansible import.
"""
from __future__ import absolute_import, division, print_function

import os
import queue
import threading
from contextlib import contextmanager

from . import errors

__metaclass__ = type

ENV_VAR = "BAILEYS_RESILIENCE_PG_DRIVER"
NAMES = ("psycopg", "psycopg2")


class Driver:
    """One loaded driver: its name, version, ``sql`` module, error classes and ``connect``."""

    name = None
    version = None
    sql = None
    Error = None
    DataError = None
    UniqueViolation = None

    def connect(self, autocommit=False, **kwargs):  # pragma: no cover - overridden
        raise NotImplementedError


class Psycopg3(Driver):
    name = "psycopg"

    def __init__(self):
        import psycopg
        from psycopg import errors, sql

        self._psycopg = psycopg
        self.version = psycopg.__version__
        self.sql = sql
        self.Error = psycopg.Error
        self.DataError = psycopg.DataError
        self.UniqueViolation = errors.UniqueViolation

    def connect(self, autocommit=False, **kwargs):
        return self._psycopg.connect(autocommit=autocommit, **kwargs)


class Psycopg2(Driver):
    name = "psycopg2"

    def __init__(self):
        import psycopg2
        import psycopg2.errors
        import psycopg2.extensions
        from psycopg2 import sql

        self._psycopg2 = psycopg2
        self.version = psycopg2.__version__.split(" ")[0]
        self.sql = sql
        self.Error = psycopg2.Error
        self.DataError = psycopg2.DataError
        self.UniqueViolation = psycopg2.errors.UniqueViolation

    def connect(self, autocommit=False, **kwargs):
        raw = self._psycopg2.connect(**kwargs)
        raw.autocommit = autocommit
        return Psycopg2Connection(raw)


def load(preferred=None):
    """The driver to use: ``preferred`` (or the environment's choice), else the first importable.

    Returns ``(driver or None, import error or None)``; a named driver that cannot be imported is
    not replaced by the other one (the caller asked for it, so its absence is the error).
    """
    choice = (preferred if preferred is not None else os.environ.get(ENV_VAR, "")).strip().lower()
    if choice and choice not in NAMES:
        return None, ImportError("%s=%r: expected one of %s" % (ENV_VAR, choice, ", ".join(NAMES)))
    order = (choice,) if choice else NAMES
    errors = []
    for name in order:
        try:
            return (Psycopg3() if name == "psycopg" else Psycopg2()), None
        except ImportError as exc:
            errors.append("%s: %s" % (name, exc))
    return None, ImportError("; ".join(errors))


# --- psycopg2 with psycopg 3's manners ---------------------------------------------------------

class Psycopg2Connection:
    """A psycopg2 connection with the psycopg 3 methods the core uses (see the module docstring)."""

    def __init__(self, raw):
        self.raw = raw

    @property
    def autocommit(self):
        return self.raw.autocommit

    @autocommit.setter
    def autocommit(self, value):
        self.raw.autocommit = value

    @property
    def info(self):
        return self.raw.info

    @property
    def closed(self):
        return bool(self.raw.closed)

    def cursor(self, name=None):
        return Psycopg2NamedCursor(self.raw, name) if name else Psycopg2Cursor(self.raw.cursor())

    def execute(self, query, params=None):
        cur = self.cursor()
        cur.execute(query, params)
        return cur

    def commit(self):
        self.raw.commit()

    def rollback(self):
        self.raw.rollback()

    def close(self):
        self.raw.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):  # psycopg 3: commit or roll back, then close
        try:
            if not self.raw.closed and not self.raw.autocommit:
                if exc_type is None:
                    self.raw.commit()
                else:
                    self.raw.rollback()
        finally:
            self.raw.close()

    @contextmanager
    def transaction(self):
        import psycopg2.extensions as ext

        raw = self.raw
        if raw.autocommit or raw.get_transaction_status() == ext.TRANSACTION_STATUS_IDLE:
            was_autocommit = raw.autocommit
            raw.autocommit = False
            try:
                yield self
            except BaseException:
                raw.rollback()
                raise
            else:
                raw.commit()
            finally:
                raw.autocommit = was_autocommit
            return
        # inside a transaction already: a savepoint, as psycopg 3 does
        with raw.cursor() as cur:
            cur.execute("SAVEPOINT baileys_resilience_sp")
        try:
            yield self
        except BaseException:
            with raw.cursor() as cur:
                cur.execute("ROLLBACK TO SAVEPOINT baileys_resilience_sp")
            raise
        else:
            with raw.cursor() as cur:
                cur.execute("RELEASE SAVEPOINT baileys_resilience_sp")


class Psycopg2Cursor:
    """A psycopg2 cursor whose ``execute`` returns itself and which has ``copy``."""

    def __init__(self, raw):
        self.raw = raw

    def execute(self, query, params=None, prepare=None):  # noqa: ARG002 - psycopg2 has no prepared statements
        self.raw.execute(query, params)
        return self

    def executemany(self, query, params_seq):
        self.raw.executemany(query, params_seq)
        return self

    def fetchone(self):
        return self.raw.fetchone()

    def fetchall(self):
        return self.raw.fetchall()

    def fetchmany(self, size=None):
        return self.raw.fetchmany(size) if size is not None else self.raw.fetchmany()

    @property
    def rowcount(self):
        return self.raw.rowcount

    @property
    def description(self):
        return self.raw.description

    def close(self):
        self.raw.close()

    def __iter__(self):
        return iter(self.raw)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.raw.close()

    def copy(self, statement):
        return _CopyIn(self.raw, statement)


class Psycopg2NamedCursor(Psycopg2Cursor):
    """A server-side cursor as psycopg 3 makes one: ``DECLARE`` / ``FETCH`` / ``CLOSE`` on the wire.

    psycopg2's own named cursors refuse to run on an autocommit connection even inside a transaction
    opened with an explicit ``BEGIN`` (which the export's snapshot uses); psycopg 3's work there.
    """

    def __init__(self, raw_conn, name):
        from psycopg2 import sql

        super().__init__(raw_conn.cursor())
        self._sql = sql
        self.name = sql.Identifier(name)
        self.declared = False

    def execute(self, query, params=None, prepare=None):  # noqa: ARG002
        sql = self._sql
        body = query if isinstance(query, sql.Composable) else sql.SQL(query)
        self.raw.execute(sql.SQL("DECLARE {} NO SCROLL CURSOR FOR ").format(self.name) + body, params)
        self.declared = True
        return self

    def _fetch(self, how):
        self.raw.execute(self._sql.SQL("FETCH %s FROM {}" % how).format(self.name))
        return self.raw.fetchall()

    def fetchone(self):
        rows = self._fetch("NEXT")
        return rows[0] if rows else None

    def fetchmany(self, size=None):
        return self._fetch("FORWARD %d" % int(size or 1))

    def fetchall(self):
        return self._fetch("ALL")

    def __iter__(self):
        while True:
            rows = self.fetchmany(1000)
            if not rows:
                return
            yield from rows

    def close(self):
        try:
            if self.declared and not self.raw.connection.closed:
                import psycopg2.extensions as ext

                if self.raw.connection.get_transaction_status() == ext.TRANSACTION_STATUS_INTRANS:
                    self.raw.execute(self._sql.SQL("CLOSE {}").format(self.name))
        finally:
            self.declared = False
            self.raw.close()

    def __exit__(self, exc_type, exc, tb):
        self.close()


_ESCAPES = {ord("\\"): "\\\\", ord("\t"): "\\t", ord("\n"): "\\n", ord("\r"): "\\r"}


def copy_text_row(row):
    """One row in COPY's text format (what psycopg 3's ``write_row`` sends for text values)."""
    fields = []
    for value in row:
        if value is None:
            fields.append("\\N")
        elif isinstance(value, bytes):
            fields.append(value.decode("utf-8").translate(_ESCAPES))
        else:
            fields.append(str(value).translate(_ESCAPES))
    return ("\t".join(fields) + "\n").encode("utf-8")


class _Abort(errors.BaileysResilienceError):
    """Raised inside psycopg2's read of the COPY data: the ``with`` block failed."""


class _QueueReader:
    """The file psycopg2's ``copy_expert`` reads: chunks from a queue, ``b""`` at the end."""

    def __init__(self, chunks):
        self.chunks = chunks

    def read(self, size=-1):  # the chunk as written: copy_expert sends whatever read returns
        chunk = self.chunks.get()
        if chunk is None:
            return b""
        if chunk is _Abort:
            raise _Abort("the COPY was abandoned by its writer")
        return chunk

    readline = read


class _CopyIn:
    """``COPY ... FROM STDIN`` for psycopg2, fed while it runs (see the module docstring)."""

    BATCH = 1 << 20  # bytes gathered before a chunk is handed over (fewer queue round trips)

    def __init__(self, raw_cursor, statement):
        self.raw = raw_cursor
        self.statement = statement
        self.chunks = queue.Queue(maxsize=8)
        self.pending = []
        self.pending_size = 0
        self.error = None
        self.thread = None

    def __enter__(self):
        statement = self.statement
        if not isinstance(statement, str):
            statement = statement.as_string(self.raw)
        self.statement = statement
        self.thread = threading.Thread(target=self._run, name="baileys-resilience-copy", daemon=True)
        self.thread.start()
        return self

    def _run(self):
        try:
            self.raw.copy_expert(self.statement, _QueueReader(self.chunks), size=self.BATCH)
        except BaseException as exc:  # noqa: BLE001 - handed to the writer, whose next put sees it
            self.error = exc

    def _put(self, chunk):
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.chunks.put(chunk, timeout=0.5)
                return
            except queue.Full:
                continue

    def _flush(self):
        if self.pending:
            data = b"".join(self.pending)
            self.pending = []
            self.pending_size = 0
            self._put(data)

    def write(self, data):
        if isinstance(data, str):
            data = data.encode("utf-8")
        elif not isinstance(data, bytes):
            data = bytes(data)
        if not data:
            return
        self.pending.append(data)
        self.pending_size += len(data)
        if self.pending_size >= self.BATCH:
            self._flush()

    def write_row(self, row):
        self.write(copy_text_row(row))

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self._flush()
                self._put(None)
            else:
                self.pending = []
                try:
                    self._put(_Abort)
                except BaseException:  # noqa: BLE001, S110 - the COPY already failed: the caller's exception matters
                    pass
        finally:
            self.thread.join()
        if exc_type is None and self.error is not None:
            raise self.error
        return False
