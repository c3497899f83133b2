# -*- coding: utf-8 -*-
# Copyright: baileys.resilience contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Import: apply useMultiFileAuthState directories to the store (PostgreSQL), all companies in one transaction.

* :func:`import_auth_state`: find the company directories (:func:`_discover`), read them and
  apply them; :func:`import_states` applies states already read;
* the fast reader (:func:`_read_directory_fast`, :func:`_read_all_fast`: forked reader
  processes, ``READ_PROCESSES`` of authnames.py) hands each file's bytes to PostgreSQL as COPY
  rows (:class:`_CompanyData`); the strict reader (:func:`read_directory`) lists every bad file
  when the fast one meets anything it does not accept as is;
* :func:`_apply`: COPY into temporary tables (``br_import_keys``, ``br_import_auth``), or
  straight into the keys table when every company is new (:func:`_copy_directly`), then
  upsert, prune (``prune``) and count, in the caller's transaction; with guards
  (:class:`authguards.ImportGuards`) the checks of authguards.py run there before anything changes.

Guarantees: all companies are applied in one transaction, after every file was accepted: a
bad file (:class:`ValidationError`, which names every one), a refused guard or a database
error leaves the store as it was, and check mode always rolls back.  No Ansible import.
"""
from __future__ import absolute_import, division, print_function

import os
import re
import time

from . import authguards, authnames, authsource, errors
from . import baileys_codec as codec
from . import fsutil
from . import pgconn

__metaclass__ = type


class ValidationError(authnames.AuthStateError):
    def __init__(self, problems):
        self.problems = problems
        shown = problems[:50]
        more = "" if len(problems) <= 50 else "\n  ... and %d more" % (len(problems) - 50)
        authnames.AuthStateError.__init__(
            self, "refusing to import: %d file(s) failed validation, the database was not touched:\n  %s%s"
            % (len(problems), "\n  ".join(shown), more))


# --------------------------------------------------------------------------- reading the directories


def _discover(src, template, company_id=None, companies=None):
    """[(company_id, directory)] to import."""
    if not src or not os.path.isabs(src):
        raise authnames.AuthStateError("src must be an absolute path, got %r" % (src,))
    if not os.path.isdir(src):
        raise authnames.AuthStateError("src %s is not a directory" % src)
    if company_id:
        return [(authnames.check_company_id(company_id), src)]
    found = {}
    with os.scandir(src) as it:
        for entry in it:
            if not entry.is_dir(follow_symlinks=False) or entry.name.startswith(fsutil.TEMP_PREFIX):
                continue
            cid = template.company(entry.name)
            if cid is None:
                continue
            try:
                authnames.check_company_id(cid)
            except authnames.AuthStateError:
                continue
            found[cid] = entry.path
    if companies:
        missing = [c for c in companies if c not in found]
        if missing:
            raise authnames.AuthStateError("no directory under %s for compan%s %s" % (
                src, "y" if len(missing) == 1 else "ies", ", ".join(sorted(missing))))
        found = {c: found[c] for c in companies}
    if not found:
        raise authnames.AuthStateError("no company directories matching %r under %s" % (template.template, src))
    return sorted(found.items())


def read_directory(company_id, directory, encoding="base64", problems=None):
    """Read and validate one company directory into a :class:`authsource.CompanyState`."""
    problems = problems if problems is not None else []
    state = authsource.CompanyState(company_id)
    warnings = []
    ids = {}
    with os.scandir(directory) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        name = entry.name
        path = os.path.join(directory, name)
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            problems.append("%s: file name is not valid UTF-8" % authnames.display_name(path))
            continue
        if name == codec.MANIFEST_FILE:
            continue
        if name.startswith(fsutil.TEMP_PREFIX):
            warnings.append("ignoring leftover temporary file %s" % path)
            continue
        if not entry.is_file(follow_symlinks=False):
            problems.append("%s: not a regular file" % path)
            continue
        if name == codec.CREDS_FILE:
            key = None
        else:
            try:
                key = codec.parse_key_file_name(name)
            except codec.CodecError:
                problems.append("%s: unknown file name (not creds.json or <key type>-<id>.json)" % path)
                continue
            if key in ids:
                problems.append("%s: same key %s/%s as %s" % (path, key[0], key[1], ids[key]))
                continue
            ids[key] = name
        try:
            with open(path, "rb") as fh:
                raw = fh.read()
            text = raw.decode("utf-8")
            value = codec.loads_strict(text)
        except OSError as exc:
            problems.append("%s: unreadable: %s" % (path, exc.strerror or exc))
            continue
        except UnicodeDecodeError:
            problems.append("%s: not UTF-8" % path)
            continue
        except ValueError as exc:
            problems.append("%s: bad JSON: %s" % (path, exc))
            continue
        if key is None and not isinstance(value, dict):
            problems.append("%s: creds must be a JSON object" % path)
            continue
        if "\x00" in text:
            problems.append("%s: NUL character, which PostgreSQL jsonb cannot store" % path)
            continue
        needs = encoding != "base64" or codec._NEEDS_NORMALISE.search(text)
        if needs:
            try:
                normalised, converted = codec.normalise(value, encoding)
            except codec.CodecError as exc:
                problems.append("%s: %s" % (path, exc))
                continue
            if converted:
                text = codec.render(normalised)
        if key is None:
            state.creds = text
        else:
            state.keys.append((key[0], key[1], text))
    return state, warnings


# The happy path of an import reads each file's bytes and hands them to PostgreSQL,
# which parses them into the jsonb column of a temporary table while the next
# companies are read.  Python only parses a file that needs rewriting (a legacy
# Buffer form, or buffer_encoding=array).  When anything is not accepted as is
# (a bad name, not UTF-8, NUL, invalid JSON, creds not an object...), the
# transaction is rolled back and every file is read again by the strict
# reader, read_directory(), which lists each bad file.  The reader processes:
# authnames.READ_PROCESSES.

READ_AHEAD = 8  # companies read ahead of the one being copied
IMPORT_TEMP_BUFFERS = "256MB"  # the temporary tables stay in memory instead of spilling

_NEEDS_NORMALISE_BYTES = re.compile(codec._NEEDS_NORMALISE.pattern.encode("ascii"))
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_SIZE = 1 << 16


class _NeedsStrictRead(errors.BaileysResilienceError):
    """The fast reader met something it does not accept as is: read everything strictly."""


def _copy_field(data):
    """``data`` (bytes) escaped for COPY's text format."""
    if not (b"\\" in data or b"\n" in data or b"\t" in data or b"\r" in data):
        return data
    return data.replace(b"\\", b"\\\\").replace(b"\n", b"\\n").replace(b"\r", b"\\r").replace(b"\t", b"\\t")


class _CompanyData:
    """One company ready for COPY: key rows as COPY text, creds as JSON text."""

    __slots__ = ("company_id", "keys", "creds", "copy", "warnings")

    def __init__(self, company_id, keys, creds, copy, warnings=()):
        self.company_id = company_id
        self.keys = keys  # number of key files
        self.creds = creds  # JSON text or None
        self.copy = copy  # bytes: the rows for br_import_keys
        self.warnings = warnings

    # sent back from the reader processes (explicit for Pythons before 3.11 and __slots__)
    def __getstate__(self):
        return (self.company_id, self.keys, self.creds, self.copy, self.warnings)

    def __setstate__(self, state):
        self.company_id, self.keys, self.creds, self.copy, self.warnings = state


def _from_state(state):
    cid = _copy_field(state.company_id.encode("utf-8"))
    rows = [b"\t".join((cid, _copy_field(t.encode("utf-8")), _copy_field(i.encode("utf-8")),
                        _copy_field(v.encode("utf-8")))) for t, i, v in state.keys]
    rows.append(b"")
    return _CompanyData(state.company_id, len(state.keys), state.creds, b"\n".join(rows) if state.keys else b"")


def _read_rest(fd, data):
    """``data`` (a full first read of ``fd``) and the rest of the file.

    The fast reader reads once: a short read of a regular file is its end, only a full
    one can have more behind it.
    """
    chunks = [data]
    while data:
        data = os.read(fd, _READ_SIZE)
        chunks.append(data)
    return b"".join(chunks)


_KEY_NAMES = re.compile(r"^(%s)-(.+)\.json$" % "|".join(re.escape(t) for t in codec._TYPES_LONGEST_FIRST), re.M)


def _parse_key_names(names, joined):
    """``[(key_type, key_id)]`` for ``names`` (key file names), or None when one is not a key file name.

    ``joined`` is ``"\\n".join(names)``. One regex pass over all the names instead of one call
    per name: the same result as :func:`authnames._parse_key_name` on each.
    """
    if not names:
        return []
    if joined.count("\n") != len(names) - 1 or "\r" in joined:  # a name with a line break: one at a time
        try:
            return [authnames._parse_key_name(n) for n in names]
        except codec.CodecError:
            return None
    found = _KEY_NAMES.findall(joined)
    if len(found) != len(names):
        return None
    if "sender-key-" in joined or "app-state-sync-key-" in joined:
        found = [(t, i.replace("--", "::")) if t == "sender-key" else
                 (t, i.replace("__", "/")) if t == "app-state-sync-key" else (t, i) for t, i in found]
    return found


def _read_directory_fast(company_id, directory, encoding):
    """Read one company directory for COPY; raise :class:`_NeedsStrictRead` on anything unusual.

    Checks what PostgreSQL would not: file names, duplicate keys, UTF-8, NUL.
    JSON itself is checked by PostgreSQL during the COPY.
    """
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        raise _NeedsStrictRead()
    warnings = []
    try:
        names = []
        has_creds = False
        manifest, creds_file, temp_prefix = codec.MANIFEST_FILE, codec.CREDS_FILE, fsutil.TEMP_PREFIX
        with os.scandir(dir_fd) as it:
            for entry in it:
                name = entry.name
                if name == manifest:
                    continue
                if name.startswith(temp_prefix):
                    warnings.append("ignoring leftover temporary file %s" % os.path.join(directory, name))
                    continue
                if not entry.is_file(follow_symlinks=False):
                    raise _NeedsStrictRead()
                if name == creds_file:
                    has_creds = True
                else:
                    names.append(name)
        joined = "\n".join(names)
        keys = _parse_key_names(names, joined)
        if keys is None or len(set(keys)) != len(keys):  # an unknown name, or two names for one key
            raise _NeedsStrictRead()
        cid = _copy_field(company_id.encode("utf-8"))
        ids_plain = not ("\\" in joined or "\t" in joined or "\r" in joined or joined.count("\n") != len(names) - 1)
        rows = []
        creds = None
        needs_all = encoding != "base64"
        # this loop runs once per file: everything it calls is bound locally and the common
        # case (a short ASCII file needing neither normalisation nor COPY escapes) is inlined
        append = rows.append
        legacy, escape = _NEEDS_NORMALISE_BYTES.search, _copy_field
        open_, read, close, flags, size = os.open, os.read, os.close, _READ_FLAGS, _READ_SIZE
        types = {t: _copy_field(t.encode("ascii")) for t in codec.KEY_TYPES}
        if has_creds:
            names.append(creds_file)
            keys.append(None)
        for name, key in zip(names, keys):
            fd = open_(name, flags, dir_fd=dir_fd)
            try:
                raw = read(fd, size)
                if len(raw) == size:
                    raw = _read_rest(fd, raw)
            finally:
                close(fd)
            if not raw.isascii():
                raw.decode("utf-8")
            if b"\x00" in raw:
                raise _NeedsStrictRead()
            # both legacy Buffer forms need a '[' or a '"0"': the regex runs only then
            if needs_all or ((b"[" in raw or b'"0"' in raw) and legacy(raw) is not None):
                value = codec.loads_strict(raw.decode("utf-8"))
                if key is None and not isinstance(value, dict):
                    raise _NeedsStrictRead()
                normalised, converted = codec.normalise(value, encoding)
                if converted:
                    raw = codec.render(normalised).encode("utf-8")
            if key is None:
                creds = raw.decode("utf-8")
                continue
            if b"\\" in raw or b"\n" in raw or b"\t" in raw or b"\r" in raw:
                raw = escape(raw)
            key_id = key[1].encode("utf-8")
            append((key, b"%s\t%s\t%s\t%s" % (cid, types[key[0]], key_id if ids_plain else escape(key_id), raw)))
    except (OSError, ValueError, UnicodeError):  # CodecError, JSON and UTF-8 errors are ValueErrors
        raise _NeedsStrictRead()
    finally:
        os.close(dir_fd)
    # in primary key order: the index is then filled in order
    rows.sort(key=_first)
    lines = [row for _key, row in rows]
    if lines:
        lines.append(b"")
    warnings.sort()
    return _CompanyData(company_id, len(rows), creds, b"\n".join(lines), warnings)


def _first(item):
    return item[0]


def _read_all_fast(targets, encoding, processes=None):
    """Yield :class:`_CompanyData` for ``targets`` in order.

    Reading is mostly Python work per file, which threads would only take turns at (the GIL),
    so with several companies and CPUs forked worker processes read a few companies ahead
    while this process streams the rows to PostgreSQL.
    """
    processes = authnames.READ_PROCESSES if processes is None else processes
    if processes < 1 or len(targets) < 3:
        for cid, directory in targets:
            yield _read_directory_fast(cid, directory, encoding)
        return
    import collections
    import multiprocessing

    pool = multiprocessing.get_context("fork").Pool(processes)
    pending = collections.deque()
    todo = iter(targets)
    try:
        for cid, directory in todo:
            pending.append(pool.apply_async(_read_directory_fast, (cid, directory, encoding)))
            if len(pending) >= READ_AHEAD:
                break
        while pending:
            data = pending.popleft().get()
            for cid, directory in todo:
                pending.append(pool.apply_async(_read_directory_fast, (cid, directory, encoding)))
                break
            yield data
    finally:
        pool.terminate()
        pool.join()


# --------------------------------------------------------------------------- applying


def _copy_directly(cur, store, company_ids):
    """True when the key rows can be COPied straight into the keys table.

    That is when none of ``company_ids`` has a key row yet (a restore into an
    empty or new database) and the table fills ``created_at``/``updated_at``
    by default. A row written by someone else in the meantime makes the COPY
    fail with a unique violation; the caller then retries with the upsert.
    """
    cur.execute(
        "SELECT count(*) FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_class c ON c.oid = a.attrelid "
        "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s "
        "AND a.attname IN ('created_at', 'updated_at') AND a.atthasdef AND NOT a.attisdropped",
        (store.schema, store.keys_table))
    if cur.fetchone()[0] != 2:
        return False
    cur.execute(pgconn.sql.SQL(
        "SELECT 1 FROM unnest(%s::text[]) AS u(company_id) "
        "WHERE EXISTS (SELECT 1 FROM {} k WHERE k.company_id = u.company_id) LIMIT 1").format(store.keys),
        (list(company_ids),))
    return cur.fetchone() is None


def _apply(conn, store, companies, prune=False, check_mode=False, diff=False, check_creds=False,
           company_ids=None, guards=None):
    """COPY ``companies`` (an iterable of :class:`_CompanyData`) and apply them in the caller's transaction.

    With ``company_ids`` (every company that ``companies`` will yield), key rows of companies
    that have none in the store yet are COPied straight into the keys table (see
    :func:`_copy_directly`) instead of through a temporary table and an upsert.
    Returns ``(per-company counts, diff lines, the company data)``.
    """
    sql = pgconn.sql
    cur = conn.cursor()
    store.check_tables(cur)
    cur.execute("SET LOCAL lock_timeout = '30s'")
    direct = (bool(company_ids) and not (prune or check_mode or diff or guards) and
              _copy_directly(cur, store, company_ids))
    if not direct:
        cur.execute("CREATE TEMP TABLE br_import_keys (company_id text, key_type text, key_id text, value jsonb) "
                    "ON COMMIT DROP")
    cur.execute("CREATE TEMP TABLE br_import_auth (company_id text, creds jsonb) ON COMMIT DROP")
    done = []
    if direct:
        copy_sql = sql.SQL("COPY {} (company_id, key_type, key_id, value) FROM STDIN").format(store.keys)
    else:
        copy_sql = sql.SQL("COPY br_import_keys (company_id, key_type, key_id, value) FROM STDIN")
    with cur.copy(copy_sql) as copy:
        for data in companies:
            if data.copy:
                copy.write(data.copy)
            data.copy = None
            done.append(data)
    with cur.copy("COPY br_import_auth (company_id, creds) FROM STDIN") as copy:
        for data in done:
            if data.creds is not None:
                copy.write_row((data.company_id, data.creds))
    if check_creds:
        cur.execute("SELECT 1 FROM br_import_auth WHERE jsonb_typeof(creds) <> 'object' LIMIT 1")
        if cur.fetchone() is not None:
            raise _NeedsStrictRead()
    if prune or check_mode or guards:
        # the planner needs row counts and key statistics for the joins below; the values are never joined on
        cur.execute("ANALYZE br_import_keys (company_id, key_type, key_id)")
    company_ids = [d.company_id for d in done]
    guard_report, skip = None, set()
    if guards is not None:
        guard_report, skip = authguards._check_guards(cur, store, company_ids, guards, prune)
    per = {cid: {"company_id": cid, "inserted": 0, "updated": 0, "unchanged": 0, "deleted": 0,
                 "creds": "absent", "skipped": cid in skip} for cid in company_ids}
    company_ids = [cid for cid in company_ids if cid not in skip]
    diff_lines = []
    key_counts = None
    if direct:
        # every key row was new: the COPY inserted them
        key_changes = []
        key_counts = [(d.company_id, d.keys, 0) for d in done if d.keys]
    elif check_mode:
        cur.execute(sql.SQL(
            "SELECT t.company_id, t.key_type, t.key_id, CASE WHEN k.company_id IS NULL THEN 'insert' "
            "WHEN k.value IS DISTINCT FROM t.value THEN 'update' END "
            "FROM br_import_keys t LEFT JOIN {} k USING (company_id, key_type, key_id) "
            "WHERE k.company_id IS NULL OR k.value IS DISTINCT FROM t.value").format(store.keys))
        key_changes = cur.fetchall()
        cur.execute(sql.SQL(
            "SELECT t.company_id, CASE WHEN a.company_id IS NULL THEN 'insert' "
            "WHEN a.creds IS DISTINCT FROM t.creds THEN 'update' ELSE 'unchanged' END "
            "FROM br_import_auth t LEFT JOIN {} a USING (company_id)").format(store.auth))
        creds_changes = cur.fetchall()
    else:
        upsert = sql.SQL(
            "INSERT INTO {keys} AS k (company_id, key_type, key_id, value, created_at, updated_at) "
            "SELECT company_id, key_type, key_id, value, now(), now() FROM br_import_keys "
            "ON CONFLICT (company_id, key_type, key_id) DO UPDATE SET value = EXCLUDED.value, updated_at = now() "
            "WHERE k.value IS DISTINCT FROM EXCLUDED.value "
        ).format(keys=store.keys)
        if diff:
            cur.execute(upsert + sql.SQL(
                "RETURNING k.company_id, k.key_type, k.key_id, CASE WHEN xmax = 0 THEN 'insert' ELSE 'update' END"))
            key_changes = cur.fetchall()
        else:
            # only the counts travel back, not one row per key
            cur.execute(sql.SQL("WITH up AS (") + upsert + sql.SQL(
                "RETURNING k.company_id, xmax = 0 AS inserted) "
                "SELECT company_id, count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted) "
                "FROM up GROUP BY company_id"))
            key_changes = []
            key_counts = cur.fetchall()
    if not check_mode:
        cur.execute(sql.SQL(
            "WITH up AS (INSERT INTO {auth} AS a (company_id, creds, created_at, updated_at) "
            "SELECT company_id, creds, now(), now() FROM br_import_auth "
            "ON CONFLICT (company_id) DO UPDATE SET creds = EXCLUDED.creds, updated_at = now() "
            "WHERE a.creds IS DISTINCT FROM EXCLUDED.creds "
            "RETURNING a.company_id, CASE WHEN xmax = 0 THEN 'insert' ELSE 'update' END AS op) "
            "SELECT t.company_id, coalesce(up.op, 'unchanged') FROM br_import_auth t "
            "LEFT JOIN up USING (company_id)").format(auth=store.auth))
        creds_changes = cur.fetchall()
    for cid, inserted, updated in key_counts or ():
        per[cid]["inserted"] += inserted
        per[cid]["updated"] += updated
    for cid, key_type, key_id, op in key_changes:
        per[cid]["inserted" if op == "insert" else "updated"] += 1
        if diff and len(diff_lines) < authnames.DIFF_LIMIT:
            diff_lines.append("%s %s %s/%s" % ("+" if op == "insert" else "~", cid, key_type, key_id))
    for cid, op in creds_changes:
        per[cid]["creds"] = {"insert": "inserted", "update": "updated"}.get(op, "unchanged")
        if diff and op != "unchanged":
            diff_lines.append("%s %s creds" % ("+" if op == "insert" else "~", cid))
    if prune:
        missing = sql.SQL(
            "FROM {keys} k WHERE k.company_id = ANY(%s) AND NOT EXISTS (SELECT 1 FROM br_import_keys t "
            "WHERE t.company_id = k.company_id AND t.key_type = k.key_type AND t.key_id = k.key_id)"
        ).format(keys=store.keys)
        if check_mode:
            query = sql.SQL("SELECT k.company_id, k.key_type, k.key_id ") + missing
        else:
            query = sql.SQL("DELETE ") + missing + sql.SQL(" RETURNING k.company_id, k.key_type, k.key_id")
        cur.execute(query, (company_ids,))
        for cid, key_type, key_id in cur.fetchall():
            per[cid]["deleted"] += 1
            if diff and len(diff_lines) < authnames.DIFF_LIMIT:
                diff_lines.append("- %s %s/%s" % (cid, key_type, key_id))
    if guards is not None and guards.verify and not check_mode:
        for cid, fp in authguards._verify_mirror(cur, store, company_ids).items():
            guard_report["companies"][cid]["store_fingerprint_after"] = fp
    for d in done:
        c = per[d.company_id]
        c["files"] = d.keys + (1 if d.creds is not None else 0)
        c["keys"] = d.keys
        c["unchanged"] = 0 if c["skipped"] else d.keys - c["inserted"] - c["updated"]
        if guard_report is not None:
            c.update(guard_report["companies"].get(d.company_id, {}))
            c["replaced"] = guard_report["replaced"].get(d.company_id, [])
    cur.close()
    return per, diff_lines, done


def import_states(conn, store, states, prune=False, check_mode=False, diff=False):
    """Apply the states in the caller's transaction; return counts."""
    per, diff_lines, _done = _apply(conn, store, (_from_state(s) for s in states), prune, check_mode, diff)
    return per, diff_lines


def import_auth_state(conn_params, store_params, src, company_id=None, companies=None,
                      company_dir=authnames.DEFAULT_COMPANY_DIR, prune=False,
                      buffer_encoding=authnames.DEFAULT_BUFFER_ENCODING, check_mode=False, diff=False, guards=None):
    """Validate every file, then apply all companies in one transaction.

    Files stream into PostgreSQL as they are read; if any file is not accepted
    as is, the transaction is rolled back and the strict reader lists every
    bad file (:class:`ValidationError`): the database is not touched.
    """
    started = time.monotonic()
    if buffer_encoding not in ("base64", "array"):
        raise authnames.AuthStateError("buffer_encoding must be 'base64' or 'array'")
    template = authnames.DirTemplate(company_dir)
    targets = _discover(src, template, company_id, companies)
    store = pgconn.Store.from_params(store_params)
    conn = pgconn.connect(conn_params)
    warnings = []
    reader = None
    try:
        strict = None
        company_ids = [cid for cid, _directory in targets]
        while True:
            reader = _read_all_fast(targets, buffer_encoding)
            try:
                with conn.transaction():
                    # before this session's first temporary table, or it cannot change
                    conn.execute("SET LOCAL temp_buffers = '%s'" % IMPORT_TEMP_BUFFERS)
                    per, diff_lines, done = _apply(conn, store, reader, prune, check_mode, diff, check_creds=True,
                                                   company_ids=company_ids, guards=guards)
                    if check_mode:
                        raise _Rollback()
            except _Rollback:
                pass
            except _NeedsStrictRead:
                strict = True
            except pgconn.DataError as exc:  # invalid JSON (or text PostgreSQL cannot store)
                strict = exc
            except pgconn.UniqueViolation:
                if company_ids is None:
                    raise
                # keys were written for one of these companies since the check: upsert instead
                reader.close()
                company_ids = None
                continue
            break
        if strict is not None:
            problems, states = [], []
            for cid, directory in targets:
                state, warn = read_directory(cid, directory, buffer_encoding, problems)
                states.append(state)
                warnings.extend(warn)
            if problems:
                raise ValidationError(problems)
            # the strict reader accepts what the fast one did not: import what it read
            try:
                with conn.transaction():
                    per, diff_lines, done = _apply(conn, store, (_from_state(s) for s in states), prune,
                                                   check_mode, diff, guards=guards)
                    if check_mode:
                        raise _Rollback()
            except _Rollback:
                pass
        else:
            for d in done:
                warnings.extend(d.warnings)
    except pgconn.Error as exc:
        raise pgconn.PgError("import failed, nothing was changed (%s): %s" % (
            pgconn.describe(conn_params), pgconn._scrub(exc, conn_params)))
    finally:
        if reader is not None:
            reader.close()
        conn.close()
    companies_out = [per[d.company_id] for d in done]
    totals = {k: sum(c[k] for c in companies_out)
              for k in ("files", "keys", "inserted", "updated", "unchanged", "deleted")}
    totals["companies"] = len(companies_out)
    totals["creds_changed"] = sum(1 for c in companies_out if c["creds"] in ("inserted", "updated"))
    totals["skipped"] = sum(1 for c in companies_out if c["skipped"])
    changed = bool(totals["inserted"] or totals["updated"] or totals["deleted"] or totals["creds_changed"])
    out = {
        "changed": changed,
        "src": src,
        "companies": companies_out,
        "totals": totals,
        "warnings": warnings,
        "duration": round(time.monotonic() - started, 3),
    }
    if diff:
        out["diff"] = {"before": "", "after": "".join(line + "\n" for line in diff_lines)}
    return out


class _Rollback(errors.BaileysResilienceError):
    """Raised inside the transaction to roll back a check-mode run."""
