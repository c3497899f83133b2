# -*- coding: utf-8 -*-
# Copyright: baileys.resilience contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Move a Baileys auth state between PostgreSQL and useMultiFileAuthState files.

No Ansible import: the modules ``auth_export``/``auth_import`` and the
``baileys-resilience`` command-line tool both call :func:`export_auth_state`
and :func:`import_auth_state`.
"""
from __future__ import absolute_import, division, print_function

import errno
import fcntl
import grp
import hashlib
import itertools
import json
import os
import pwd
import queue
import re
import shutil
import stat
import threading
import time

from . import baileys_codec as codec
from . import fsutil
from . import pgconn

__metaclass__ = type

MANIFEST_FORMAT = 1
DIFF_LIMIT = 2000  # file names listed per company in diff output
STAGING_PREFIX = fsutil.TEMP_PREFIX + "dir-"  # a new company directory while it is being written
_staging_serial = itertools.count(1)
FETCH_ROWS = 5000  # key rows per round trip when reading the store


class AuthStateError(RuntimeError):
    """An error an operator can act on; the message says what and where."""


class InvalidCompanyId(AuthStateError):
    """A company id that cannot name a directory; an export reports it and goes on with the others."""


# --------------------------------------------------------------------------- names


def check_company_id(company_id):
    """Refuse ids that could leave ``dest`` or hide as dot files."""
    if not isinstance(company_id, str) or not company_id:
        raise InvalidCompanyId("invalid company id %r: empty" % (company_id,))
    try:
        company_id.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidCompanyId("refusing company id %s: not valid UTF-8" % display_name(company_id))
    bad = [c for c in ("/", "\\", "\x00") if c in company_id]
    if bad or ".." in company_id or company_id.startswith(".") or len(company_id.encode("utf-8", "replace")) > 200:
        raise InvalidCompanyId(
            "refusing company id %r: it must not contain '/', '\\', NUL or '..', start with '.', "
            "or be longer than 200 bytes" % (company_id,)
        )
    return company_id


def display_name(name):
    """``name`` (a str from the file system, perhaps with undecodable bytes) as printable text."""
    return os.fsencode(name).decode("utf-8", "backslashreplace") if isinstance(name, str) else repr(name)


class DirTemplate:
    """``company_dir``: a template with exactly one ``{company_id}``."""

    def __init__(self, template):
        if template.count("{company_id}") != 1 or "/" in template or template.startswith("."):
            raise AuthStateError(
                "company_dir %r must contain '{company_id}' exactly once, no '/', and not start with '.'" % (template,)
            )
        self.template = template
        prefix, suffix = template.split("{company_id}")
        self._re = re.compile("^%s(.+)%s$" % (re.escape(prefix), re.escape(suffix)), re.S)

    def name(self, company_id):
        return self.template.replace("{company_id}", check_company_id(company_id))

    def company(self, dir_name):
        m = self._re.match(dir_name)
        return m.group(1) if m else None


def resolve_owner(owner=None, group=None):
    uid = gid = -1
    if owner not in (None, ""):
        try:
            uid = int(owner) if str(owner).isdigit() else pwd.getpwnam(owner).pw_uid
        except KeyError:
            raise AuthStateError("owner %r does not exist" % (owner,))
    if group not in (None, ""):
        try:
            gid = int(group) if str(group).isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise AuthStateError("group %r does not exist" % (group,))
    return uid, gid


def parse_mode(mode, default):
    if mode in (None, ""):
        return default
    if isinstance(mode, int):
        return mode
    text = str(mode)
    if not re.match(r"^0?[0-7]{3,4}$", text):
        raise AuthStateError("mode %r must be octal, like '0600'" % (mode,))
    return int(text, 8)


def _sha(data):
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- reading the store


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


def _where_companies(companies):
    if companies is None:
        return pgconn.sql.SQL(""), ()
    return pgconn.sql.SQL(" WHERE company_id = ANY(%s)"), (list(companies),)


class DatabaseSource:
    """The store read in one snapshot: the creds, a fingerprint of each company's key rows,
    and the key rows of the companies asked for.

    The caller owns the transaction: it must be REPEATABLE READ so that the creds, the
    fingerprints and the keys agree (see :func:`snapshot_transaction`).  An export keeps
    every company whose directory's manifest holds the same fingerprint and whose files are
    as that export left them (:func:`verify_directory`), and reads the key rows of the
    others only (:meth:`states`).  The fingerprint is computed by the server from the stored
    ``jsonb`` (no rendering to text, nothing sent but one row per company), so it equates
    values that ``jsonb`` equates (``1`` and ``1.0``), as the import's upsert does.
    """

    def __init__(self, conn, store, companies=None, server_version_num=None):
        self.conn = conn
        self.store = store
        self.companies = list(companies) if companies else None
        self._filter = _where_companies(self.companies)
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
                cur.execute(pgconn.sql.SQL(_FINGERPRINT_SQL).format(self.store.keys, where), args)
                self._fingerprints = {
                    company_id: "%d:%d:%s" % (FINGERPRINT_VERSION, count, total)
                    for company_id, count, total in cur.fetchall()
                }
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
        return self.fingerprints.get(company_id, "%d:0:0" % FINGERPRINT_VERSION)

    def states(self, company_ids=None):
        """Yield full :class:`CompanyState` (key rows read) for ``company_ids`` (default: all)."""
        self.wait()
        if company_ids is None:
            where, args = self._filter
            rest = self.company_ids if self.fingerprinted else sorted(self.creds)
        else:
            rest = sorted(set(company_ids))
            where, args = _where_companies([c for c in rest if c in self.fingerprints])
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


# --------------------------------------------------------------------------- export


def _load_manifest(dir_fd):
    try:
        fd = os.open(codec.MANIFEST_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return {}
    try:
        with os.fdopen(fd, "rb") as fh:
            data = json.loads(fh.read().decode("utf-8"))
        files = data.get("files")
        if data.get("format") == MANIFEST_FORMAT and isinstance(files, dict) and all(
                isinstance(record, dict) for record in files.values()):
            return data
    except (ValueError, OSError, UnicodeDecodeError, AttributeError):
        pass
    return {}


def _read_file(dir_fd, name):
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    with os.fdopen(fd, "rb") as fh:
        return fh.read()


class ExportOptions:
    def __init__(self, dest, company_dir="{company_id}", prune=True, owner=None, group=None, mode="0600",
                 directory_mode="0700", check_mode=False, diff=False, source_label="database"):
        self.dest = dest
        self.template = DirTemplate(company_dir)
        self.prune = prune
        self.uid, self.gid = resolve_owner(owner, group)
        self.mode = parse_mode(mode, 0o600)
        self.directory_mode = parse_mode(directory_mode, 0o700)
        self.check_mode = check_mode
        self.diff = diff
        self.source_label = source_label


def _meta_ok(st, opts, mode):
    """True when ``st`` has ``mode`` (``opts.mode`` or ``opts.directory_mode``) and opts' owner and group."""
    return (
        stat.S_IMODE(st.st_mode) == mode
        and (opts.uid == -1 or st.st_uid == opts.uid)
        and (opts.gid == -1 or st.st_gid == opts.gid)
    )


def _fix_meta(dir_fd, name, opts):
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        os.fchmod(fd, opts.mode)
        if opts.uid != -1 or opts.gid != -1:
            os.fchown(fd, opts.uid, opts.gid)
    finally:
        os.close(fd)


def _wanted_files(state, warnings):
    """{file name: source text} for one company, checking names are unique."""
    wanted = {}
    if state.creds is not None:
        wanted[codec.CREDS_FILE] = state.creds
    owners = {}
    for key_type, key_id, text in state.keys:
        if key_type in _KEY_TYPES and key_id and not (
                "/" in key_id or ":" in key_id or "-" in key_id or "_" in key_id):
            # nothing for fixFileName to change, and the name reads back as the same key
            name = "%s-%s.json" % (key_type, key_id)
        else:
            try:
                name = codec.key_file_name(key_type, key_id)
            except codec.CodecError as exc:
                raise AuthStateError("company %r: %s" % (state.company_id, exc))
            if _round_trip_name(name) != (key_type, key_id):
                warnings.append(
                    "company %r: %s id %r is written as %s, which reads back as a different id on import"
                    % (state.company_id, key_type, key_id, name)
                )
        if name in owners:
            raise AuthStateError(
                "company %r: keys %r and %r map to the same Baileys file %s; Baileys itself could not keep both"
                % (state.company_id, owners[name], (key_type, key_id), name)
            )
        owners[name] = (key_type, key_id)
        wanted[name] = text
    return wanted


_KEY_TYPES = frozenset(codec.KEY_TYPES)


def _round_trip_name(name):
    """What an import reads back from file ``name`` (codec.round_trips, with one regex match)."""
    try:
        return _parse_key_name(name)
    except codec.CodecError:
        return None


def _file_text(source_text):
    """codec.file_text, skipping its regex when neither legacy form can be there (both need '[' or '"0"')."""
    if "[" not in source_text and '"0"' not in source_text:
        return source_text
    return codec.file_text(source_text)[0]


def _company_result(company_id, directory, creds, keys, warnings):
    """The result of one company before anything is compared (``warnings`` is kept and added to)."""
    if not creds:
        warnings.append("company %r has keys but no creds row; creds.json is not written" % (company_id,))
    return {
        "company_id": company_id,
        "directory": directory,
        "creds": creds,
        "keys": keys,
        "written": 0,
        "unchanged": 0,
        "removed": 0,
        "metadata_fixed": 0,
        "ignored": [],
        "warnings": warnings,
        "created": False,
    }


def mirror_company(dest_fd, state, opts, snapshot, publisher):
    """Make ``dest/<company dir>`` mirror one company's state.  Returns a result dict.

    A new company directory is handed to ``publisher`` (a :class:`_Publisher`; None only in
    check mode), which makes it durable and renames it into place.
    """
    company_id = check_company_id(state.company_id)
    dir_name = opts.template.name(company_id)
    warnings = []
    wanted = _wanted_files(state, warnings)
    name_warnings = list(warnings)  # kept in the manifest: a verified directory reports them again
    result = _company_result(company_id, os.path.join(opts.dest, dir_name), state.creds is not None,
                             len(state.keys), warnings)
    result["fingerprint"] = state.fingerprint
    result["creds_sha256"] = _sha(state.creds.encode("utf-8")) if state.creds is not None else None
    staging = None
    dir_fd, created = None, True
    if dest_fd is not None:  # None: check mode, and dest does not exist yet
        try:
            dir_fd, created = fsutil.open_dir(dir_name, parent_fd=dest_fd)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise AuthStateError("cannot open %s: %s" % (result["directory"], exc.strerror or exc))
    result["created"] = created
    to_write, to_remove, meta_fix = [], [], []
    try:
        if dir_fd is None and not opts.check_mode:
            # A new company directory is built under a temporary name and renamed into place whole:
            # a reader sees no directory or a complete one, so its files need no temporary names.
            staging = "%s%d-%d" % (STAGING_PREFIX, os.getpid(), next(_staging_serial))
            os.mkdir(staging, opts.directory_mode, dir_fd=dest_fd)
            dir_fd = fsutil.open_dir(staging, parent_fd=dest_fd)[0]
        if dir_fd is not None:
            try:
                fcntl.flock(dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise AuthStateError("%s is locked by another export or import; try again" % result["directory"])
            if created or not opts.check_mode:
                if not _meta_ok(os.fstat(dir_fd), opts, opts.directory_mode):
                    os.fchmod(dir_fd, opts.directory_mode)
                    if opts.uid != -1 or opts.gid != -1:
                        os.fchown(dir_fd, opts.uid, opts.gid)
                    result["metadata_fixed"] += 0 if created else 1
        if staging is not None:
            manifest, old_files, existing = {}, {}, {}
        elif dir_fd is not None:
            manifest = _load_manifest(dir_fd)
            old_files = manifest.get("files", {})
            existing = {}
            with os.scandir(dir_fd) as it:
                for entry in it:
                    if not opts.check_mode and entry.name.startswith(fsutil.TEMP_PREFIX) and entry.is_file(
                            follow_symlinks=False):
                        # left behind by an interrupted run
                        fsutil._unlink_quiet(entry.name, dir_fd=dir_fd)
                        continue
                    existing[entry.name] = entry
        else:
            old_files, existing = {}, {}

        new_files = {}
        # the loop below runs once per key: names bound locally, cheapest comparisons first
        sha256, s_isreg, want_mode, uid, gid = hashlib.sha256, stat.S_ISREG, opts.mode, opts.uid, opts.gid
        unchanged = 0
        for name, source_text in wanted.items():
            source_bytes = source_text.encode("utf-8")
            src_sha = sha256(source_bytes).hexdigest()
            old = old_files.get(name)
            entry = existing.get(name)
            st = None
            if entry is not None:
                st = entry.stat(follow_symlinks=False)
                if (
                    old is not None and old.get("mtime_ns") == st.st_mtime_ns and old.get("size") == st.st_size
                    and s_isreg(st.st_mode) and (old.get("src") or old.get("sha256")) == src_sha
                ):
                    new_files[name] = old
                    if (st.st_mode & 0o7777) == want_mode and (uid == -1 or st.st_uid == uid) and (
                            gid == -1 or st.st_gid == gid):
                        unchanged += 1
                    else:
                        meta_fix.append(name)
                    continue
            text = _file_text(source_text)
            data = text.encode("utf-8") if text is not source_text else source_bytes
            sha = src_sha if text is source_text else _sha(data)
            record = {"sha256": sha, "size": len(data)}
            if sha != src_sha:
                record["src"] = src_sha
            if st is not None and stat.S_ISREG(st.st_mode) and st.st_size == len(data) and dir_fd is not None:
                # present but not (or no longer) in the manifest: compare the bytes
                if _read_file(dir_fd, name) == data:
                    record["mtime_ns"] = st.st_mtime_ns
                    new_files[name] = record
                    if _meta_ok(st, opts, opts.mode):
                        result["unchanged"] += 1
                    else:
                        meta_fix.append(name)
                    continue
            new_files[name] = record
            to_write.append((name, data))
        result["unchanged"] += unchanged

        for name, entry in existing.items():
            if name in wanted or name == codec.MANIFEST_FILE or name.startswith(fsutil.TEMP_PREFIX):
                continue
            action = _leftover(name, opts.prune)
            if action == "ignore":
                result["ignored"].append(name)
            elif action == "remove" and (entry.is_file(follow_symlinks=False) or entry.is_symlink()):
                to_remove.append(name)
        result["ignored"].sort()

        result["written"] = len(to_write)
        result["removed"] = len(to_remove)
        result["metadata_fixed"] += len(meta_fix)
        manifest_body = {
            "format": MANIFEST_FORMAT,
            "company_id": company_id,
            "source": opts.source_label,
            "snapshot_time": snapshot.get("snapshot_time"),
            "counts": _counts(state),
            "files": new_files,
        }
        if state.fingerprint is not None:
            manifest_body["fingerprint"] = state.fingerprint
        if name_warnings:
            manifest_body["warnings"] = name_warnings
        if not opts.check_mode and dir_fd is not None:
            for name in meta_fix:
                _fix_meta(dir_fd, name, opts)
            for name in to_remove:
                os.unlink(name, dir_fd=dir_fd)
            # One flush for the files and the manifest; the manifest is renamed into place last.
            writer = fsutil.BatchWriter(dir_fd, opts.mode, opts.uid, opts.gid, in_place=staging is not None)
            try:
                for name, data in to_write:
                    writer.stage(name, data)
                    new_files[name]["mtime_ns"] = writer.mtime_ns[name]
                if to_write or to_remove or _manifest_differs(manifest, manifest_body):
                    data = (json.dumps(manifest_body, sort_keys=True, separators=(",", ":")) + "\n").encode("utf-8")
                    writer.stage(codec.MANIFEST_FILE, data)
                    result["manifest_written"] = True
                if staging is None:
                    if len(writer):
                        writer.commit()
                    elif to_remove:
                        os.fsync(dir_fd)
            except BaseException:
                writer.abort()
                raise
            if staging is not None:
                # flushed and renamed into place by the publisher while the next company is written
                publisher.submit(dir_fd, staging, dir_name, result["directory"])
                dir_fd = staging = None  # the publisher owns them now
                publisher.check()
        result["changed"] = bool(to_write or to_remove or result["metadata_fixed"] or created
                                 or result.get("manifest_written"))
        if opts.diff:
            result["diff"] = {
                "before_header": result["directory"],
                "after_header": result["directory"],
                "before": "".join("%s\n" % n for n in sorted([n for n, _ in to_write if n in existing]
                                                             + to_remove)[:DIFF_LIMIT]),
                "after": "".join("%s\n" % n for n, _ in sorted(to_write)[:DIFF_LIMIT]),
            }
        return result
    finally:
        if dir_fd is not None:
            os.close(dir_fd)
        if staging is not None:  # failed before it was renamed into place
            shutil.rmtree(os.path.join(opts.dest, staging), ignore_errors=True)


def _leftover(name, prune):
    """What an export does with a file of a company directory that the source does not have
    (not the manifest, not a temporary file): "remove", "ignore" (reported) or None (left alone)."""
    if not prune:
        return "ignore"
    try:
        codec.parse_key_file_name(name)
    except codec.CodecError:
        return None if name == codec.CREDS_FILE else "ignore"
    return "remove"


def verify_directory(dest_fd, company_id, creds_sha, opts):
    """``(fingerprint, result)`` for a company directory that an export left as it is, or None.

    The directory counts as mirrored when its manifest was written by an export of the same
    source (``opts.source_label``) with the same creds (``creds_sha``: the sha256 of their JSON
    text, None when the company has no creds row), and every file is
    still as that export left it: same size, mtime, type, mode and owner, none missing, no
    temporary file, nothing to prune.  ``fingerprint`` is the store's fingerprint of the key
    rows that export wrote (in the manifest): when the store still has the same one,
    ``result`` is what :func:`mirror_company` would return, without reading a key row.
    Anything else (None) sends the company through :func:`mirror_company`, which reads its
    rows and compares file by file.  Nothing is written either way.
    """
    company_id = check_company_id(company_id)
    dir_name = opts.template.name(company_id)
    try:
        dir_fd = os.open(dir_name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dest_fd)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(dir_fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return None  # being written: mirror_company reports the lock
        if not _meta_ok(os.fstat(dir_fd), opts, opts.directory_mode):
            return None
        manifest = _load_manifest(dir_fd)
        files = manifest.get("files")
        counts = manifest.get("counts")
        if (not files or not isinstance(manifest.get("fingerprint"), str)
                or manifest.get("source") != opts.source_label or manifest.get("company_id") != company_id
                or not isinstance(counts, dict) or not isinstance(manifest.get("warnings", []), list)):
            return None
        record = files.get(codec.CREDS_FILE)
        if creds_sha is None:
            if record is not None:
                return None
        elif record is None or (record.get("src") or record.get("sha256")) != creds_sha:
            return None
        if counts.get("keys") != len(files) - (record is not None) or counts.get("creds") != (record is not None):
            return None
        ignored = []
        present = 0
        # the loop below runs once per file: _meta_ok inlined, names bound locally
        s_isreg, temp_prefix, manifest_file = stat.S_ISREG, fsutil.TEMP_PREFIX, codec.MANIFEST_FILE
        uid, gid, want_mode = opts.uid, opts.gid, opts.mode
        with os.scandir(dir_fd) as it:
            for entry in it:
                name = entry.name
                record = files.get(name)
                if record is None:
                    if name == manifest_file:
                        continue
                    if name.startswith(temp_prefix):
                        return None  # left by an interrupted run: mirror_company removes it
                    action = _leftover(name, opts.prune)
                    if action == "ignore":
                        ignored.append(name)
                    elif action == "remove" and (entry.is_file(follow_symlinks=False) or entry.is_symlink()):
                        return None
                    continue
                st = entry.stat(follow_symlinks=False)
                if (record.get("mtime_ns") != st.st_mtime_ns or record.get("size") != st.st_size
                        or not s_isreg(st.st_mode) or (st.st_mode & 0o7777) != want_mode
                        or (uid != -1 and st.st_uid != uid) or (gid != -1 and st.st_gid != gid)):
                    return None
                present += 1
        if present != len(files):
            return None
    finally:
        os.close(dir_fd)
    directory = os.path.join(opts.dest, dir_name)
    result = _company_result(company_id, directory, creds_sha is not None, counts["keys"],
                             list(manifest.get("warnings") or ()))
    result.update(unchanged=present, ignored=sorted(ignored), changed=False, fingerprint=manifest["fingerprint"],
                  creds_sha256=creds_sha)
    if opts.diff:
        result["diff"] = {"before_header": directory, "after_header": directory, "before": "", "after": ""}
    return manifest["fingerprint"], result


def _verify_task(task):
    dest_fd, company_id, creds_sha, opts = task
    try:
        return company_id, verify_directory(dest_fd, company_id, creds_sha, opts)
    except (OSError, AuthStateError):  # mirror_company meets it again and says what it is
        return company_id, None


def _verify_directories(dest_fd, source, opts):
    """Split ``source``'s companies into verified results and the ids whose rows must be read.

    The directories are checked (:func:`verify_directory`: a stat per file, which is syscall
    time) by forked worker processes while the server computes the fingerprints; the
    workers are forked before any thread of this export starts.
    """
    processes = READ_PROCESSES
    try:
        present = set(os.listdir(dest_fd))
    except OSError:  # unreadable dest: mirror_company says so
        present = set()
    found = {}
    tasks = []
    for company_id, text in sorted(source.creds.items()):
        try:
            if opts.template.name(check_company_id(company_id)) in present:
                tasks.append((dest_fd, company_id, _sha(text.encode("utf-8")), opts))
                continue
        except AuthStateError:
            pass  # mirror_company refuses it
        found[company_id] = None
    if processes >= 1 and len(tasks) >= 3:
        import multiprocessing

        pool = multiprocessing.get_context("fork").Pool(min(processes, len(tasks)))
        try:
            source.start()
            found.update(pool.imap_unordered(_verify_task, tasks, chunksize=max(1, len(tasks) // (processes * 8))))
        finally:
            pool.terminate()
            pool.join()
    else:
        source.start()
        found.update(_verify_task(task) for task in tasks)
    results, stale = [], []
    for company_id in source.company_ids:
        if company_id not in found:  # keys but no creds row
            found[company_id] = _verify_task((dest_fd, company_id, None, opts))[1]
        verified = found[company_id]
        if verified is not None and verified[0] == source.fingerprint(company_id):
            results.append(verified[1])
        else:
            stale.append(company_id)
    return results, stale


class _Publisher:
    """Flush new company directories and rename them into place, in a background thread.

    ``submit`` hands over a staging directory whose files are written but not yet flushed.
    The thread takes every directory submitted so far, makes them durable with one
    ``syncfs`` (which covers the files and the directories), renames each into place
    (never over an existing one) and fsyncs ``dest``: while the disk works, the caller
    writes the next company. ``close`` waits for all of it and raises the first error;
    a directory that could not be published is removed.
    """

    def __init__(self, dest, dest_fd):
        self.dest = dest
        self.dest_fd = dest_fd
        self.error = None
        self._queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="br-publish", daemon=True)
        self._thread.start()

    def submit(self, dir_fd, staging, final, directory):
        self._queue.put((dir_fd, staging, final, directory))

    def check(self):
        """Raise the first error of the thread, if any."""
        if self.error is not None:
            raise self.error

    def close(self, abort=False):
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        if not abort:
            self.check()

    def _run(self):
        while True:
            batch = [self._queue.get()]
            while batch[-1] is not None:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            items = [item for item in batch if item is not None]
            if items:
                self._publish(items)
            if batch[-1] is None:
                return

    def _publish(self, items):
        done = 0
        try:
            if self.error is None:
                if not fsutil.syncfs(items[0][0]):  # no syncfs: the files were fsynced as they were written
                    for dir_fd, _staging, _final, _directory in items:
                        os.fsync(dir_fd)
                for _dir_fd, staging, final, directory in items:
                    try:
                        fsutil.rename_noreplace(staging, final, self.dest_fd)
                    except OSError as exc:
                        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                            raise AuthStateError("%s appeared while it was being exported (another export?); "
                                                 "nothing in it was touched, run again" % directory)
                        raise
                    done += 1
                os.fsync(self.dest_fd)
        except BaseException as exc:  # noqa: BLE001 - reported by check()/close() in the caller's thread
            if self.error is None:
                self.error = exc
        finally:
            for n, (dir_fd, staging, _final, _directory) in enumerate(items):
                os.close(dir_fd)
                if n >= done:
                    shutil.rmtree(os.path.join(self.dest, staging), ignore_errors=True)


def _remove_stale_staging(dest, dest_fd):
    """Remove staging directories that interrupted exports left in ``dest``."""
    with os.scandir(dest_fd) as it:
        names = [e.name for e in it if e.name.startswith(STAGING_PREFIX) and e.is_dir(follow_symlinks=False)]
    for name in names:
        pid = name[len(STAGING_PREFIX):].split("-")[0]
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                os.kill(int(pid), 0)
                continue  # its export may still be running
            except ProcessLookupError:
                pass
            except OSError:
                continue
        shutil.rmtree(os.path.join(dest, name), ignore_errors=True)


def _manifest_differs(old, new):
    if not old:
        return True
    keys = ("company_id", "counts", "files", "source", "fingerprint", "warnings")
    return any(old.get(k) != new.get(k) for k in keys)


def _counts(state):
    by_type = {}
    for key_type, _key_id, _text in state.keys:
        by_type[key_type] = by_type.get(key_type, 0) + 1
    return {"creds": 1 if state.creds is not None else 0, "keys": len(state.keys), "by_type": by_type}


def export_states(states, opts, snapshot):
    """Mirror every company yielded by ``states`` under ``opts.dest``."""
    started = time.monotonic()
    dest = opts.dest
    if not dest or not os.path.isabs(dest):
        raise AuthStateError("dest must be an absolute path, got %r" % (dest,))
    dest_created = False
    dest_fd = None
    try:
        dest_fd, dest_created = fsutil.open_dir(dest, create=not opts.check_mode, mode=opts.directory_mode)
    except FileNotFoundError:
        if not opts.check_mode:
            raise AuthStateError("cannot create dest %s: its parent directory does not exist" % dest)
        dest_created = True
    except OSError as exc:
        raise AuthStateError("cannot open dest %s: %s" % (dest, exc.strerror or exc))
    if dest_fd is not None and not opts.check_mode and not os.access(dest, os.W_OK):
        os.close(dest_fd)
        raise AuthStateError("dest %s is not writable by uid %d" % (dest, os.geteuid()))
    if dest_fd is not None and dest_created and (opts.uid != -1 or opts.gid != -1):
        os.fchown(dest_fd, opts.uid, opts.gid)  # created for the service user, who must read it
    companies = []
    refused = []
    publisher = None
    try:
        if isinstance(states, DatabaseSource) and states.fingerprinted and dest_fd is not None:
            # A directory that its manifest proves mirrored needs none of its key rows read.
            companies, stale = _verify_directories(dest_fd, states, opts)
            states = states.states(stale) if stale else ()
        if dest_fd is not None and not opts.check_mode:
            if not dest_created:
                _remove_stale_staging(dest, dest_fd)
            publisher = _Publisher(dest, dest_fd)
        try:
            for state in states:
                try:
                    companies.append(mirror_company(dest_fd, state, opts, snapshot, publisher))
                except InvalidCompanyId as exc:
                    # one bad row must not take every company down: the others are exported, the caller
                    # fails at the end naming this one
                    refused.append({"company_id": state.company_id, "error": str(exc)})
            if publisher is not None:
                publisher.close()
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC):
                raise AuthStateError("cannot write under %s: %s" % (dest, exc))
            raise
    finally:
        if publisher is not None:
            publisher.close(abort=True)
        if dest_fd is not None:
            os.close(dest_fd)
    companies.sort(key=lambda c: c["company_id"])
    totals = {k: sum(c[k] for c in companies) for k in ("keys", "written", "unchanged", "removed", "metadata_fixed")}
    totals["companies"] = len(companies)
    totals["creds"] = sum(1 for c in companies if c["creds"])
    changed = dest_created or any(c["changed"] for c in companies)
    return {
        "changed": changed,
        "dest": dest,
        "snapshot_time": snapshot.get("snapshot_time"),
        "source": opts.source_label,
        "companies": companies,
        "refused": refused,
        "totals": totals,
        "warnings": [w for c in companies for w in c["warnings"]],
        "duration": round(time.monotonic() - started, 3),
    }


def export_from_database(conn_params, store_params, opts, companies=None):
    """Export from PostgreSQL.  Nothing under dest is touched if the connection fails."""
    started = time.monotonic()
    store = pgconn.Store.from_params(store_params)
    conn = pgconn.connect(conn_params)
    snapshot = {}
    try:
        with snapshot_transaction(conn) as snap:
            snapshot.update(snap)
            with conn.cursor() as cur:
                store.check_tables(cur)
            if companies:
                for company_id in companies:
                    check_company_id(company_id)
            source = DatabaseSource(conn, store, companies, snapshot.get("server_version_num"))
            try:
                result = export_states(source, opts, snapshot)
            finally:
                source.close()
    except pgconn.psycopg.Error as exc:
        raise pgconn.PgError("export failed while reading %s: %s" % (pgconn.describe(conn_params),
                                                                     pgconn._scrub(exc, conn_params)))
    finally:
        conn.close()
    result["server_version_num"] = snapshot.get("server_version_num")
    result["duration"] = round(time.monotonic() - started, 3)
    return result


# --------------------------------------------------------------------------- import


class ValidationError(AuthStateError):
    def __init__(self, problems):
        self.problems = problems
        shown = problems[:50]
        more = "" if len(problems) <= 50 else "\n  ... and %d more" % (len(problems) - 50)
        AuthStateError.__init__(
            self, "refusing to import: %d file(s) failed validation, the database was not touched:\n  %s%s"
            % (len(problems), "\n  ".join(shown), more))


def _discover(src, template, company_id=None, companies=None):
    """[(company_id, directory)] to import."""
    if not src or not os.path.isabs(src):
        raise AuthStateError("src must be an absolute path, got %r" % (src,))
    if not os.path.isdir(src):
        raise AuthStateError("src %s is not a directory" % src)
    if company_id:
        return [(check_company_id(company_id), src)]
    found = {}
    with os.scandir(src) as it:
        for entry in it:
            if not entry.is_dir(follow_symlinks=False) or entry.name.startswith(fsutil.TEMP_PREFIX):
                continue
            cid = template.company(entry.name)
            if cid is None:
                continue
            try:
                check_company_id(cid)
            except AuthStateError:
                continue
            found[cid] = entry.path
    if companies:
        missing = [c for c in companies if c not in found]
        if missing:
            raise AuthStateError("no directory under %s for compan%s %s" % (
                src, "y" if len(missing) == 1 else "ies", ", ".join(sorted(missing))))
        found = {c: found[c] for c in companies}
    if not found:
        raise AuthStateError("no company directories matching %r under %s" % (template.template, src))
    return sorted(found.items())


def read_directory(company_id, directory, encoding="base64", problems=None):
    """Read and validate one company directory into a :class:`CompanyState`."""
    problems = problems if problems is not None else []
    state = CompanyState(company_id)
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
            problems.append("%s: file name is not valid UTF-8" % display_name(path))
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
        if key is None and type(value) is not dict:
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
# reader, read_directory(), which lists each bad file.

READ_PROCESSES = min(4, max(2, os.cpu_count() or 1))  # reader processes (their reads also overlap on a cold cache)
READ_AHEAD = 8  # companies read ahead of the one being copied
IMPORT_TEMP_BUFFERS = "256MB"  # the temporary tables stay in memory instead of spilling

_NEEDS_NORMALISE_BYTES = re.compile(codec._NEEDS_NORMALISE.pattern.encode("ascii"))
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_SIZE = 1 << 16


class _NeedsStrictRead(Exception):
    """The fast reader met something it does not accept as is: read everything strictly."""


_KEY_NAME = re.compile(r"(%s)-(.+)\.json\Z" % "|".join(re.escape(t) for t in codec._TYPES_LONGEST_FIRST), re.S)


def _parse_key_name(name):
    """codec.parse_key_file_name, with one regex match instead of a loop over the key types."""
    m = _KEY_NAME.match(name)
    if m is None:
        return codec.parse_key_file_name(name)  # raises CodecError
    key_type, key_id = m.groups()
    if key_type == "sender-key":
        key_id = key_id.replace("--", "::")
    elif key_type == "app-state-sync-key":
        key_id = key_id.replace("__", "/")
    return key_type, key_id


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
    per name: the same result as :func:`_parse_key_name` on each.
    """
    if not names:
        return []
    if joined.count("\n") != len(names) - 1 or "\r" in joined:  # a name with a line break: one at a time
        try:
            return [_parse_key_name(n) for n in names]
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
                if key is None and type(value) is not dict:
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
    processes = READ_PROCESSES if processes is None else processes
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


class ImportRefused(AuthStateError):
    """A guard of a mirroring import refused; nothing was changed.  ``details`` says what it found."""

    def __init__(self, message, details=None):
        AuthStateError.__init__(self, message)
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
            raise AuthStateError("on_store_changed must be one of %s" % ", ".join(STORE_CHANGED_CHOICES))
        if max_delete_share is not None and not 0 <= float(max_delete_share) <= 1:
            raise AuthStateError("max_delete_share must be between 0 and 1, got %r" % (max_delete_share,))
        self.max_delete_share = None if max_delete_share is None else float(max_delete_share)
        self.handover = handover or {}
        self.handover_time = handover_time
        self.on_store_changed = on_store_changed
        self.verify = verify


def _fingerprints(cur, table, company_ids):
    """``{company_id: fingerprint}`` of ``table``'s key rows (the :class:`DatabaseSource` formula)."""
    where, args = _where_companies(company_ids)
    cur.execute(pgconn.sql.SQL(_FINGERPRINT_SQL).format(table, where), args)
    fps = {cid: "%d:%d:%s" % (FINGERPRINT_VERSION, n, total) for cid, n, total in cur.fetchall()}
    return {cid: fps.get(cid, "%d:0:0" % FINGERPRINT_VERSION) for cid in company_ids}


def _creds_view(cur, store, company_ids):
    """``{company_id: (sha256 of the store's creds text or None, creds equal to the files' or None)}``."""
    cur.execute(pgconn.sql.SQL(
        "SELECT u.cid, a.creds::text, a.creds = t.creds FROM unnest(%s::text[]) AS u(cid) "
        "LEFT JOIN {} a ON a.company_id = u.cid LEFT JOIN br_import_auth t ON t.company_id = u.cid"
    ).format(store.auth), (list(company_ids),))
    return {cid: (_sha(text.encode("utf-8")) if text is not None else None, same) for cid, text, same in
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
        guard_report, skip = _check_guards(cur, store, company_ids, guards, prune)
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
        if diff and len(diff_lines) < DIFF_LIMIT:
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
            if diff and len(diff_lines) < DIFF_LIMIT:
                diff_lines.append("- %s %s/%s" % (cid, key_type, key_id))
    if guards is not None and guards.verify and not check_mode:
        for cid, fp in _verify_mirror(cur, store, company_ids).items():
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


def import_auth_state(conn_params, store_params, src, company_id=None, companies=None, company_dir="{company_id}",
                      prune=False, buffer_encoding="base64", check_mode=False, diff=False, guards=None):
    """Validate every file, then apply all companies in one transaction.

    Files stream into PostgreSQL as they are read; if any file is not accepted
    as is, the transaction is rolled back and the strict reader lists every
    bad file (:class:`ValidationError`): the database is not touched.
    """
    started = time.monotonic()
    if buffer_encoding not in ("base64", "array"):
        raise AuthStateError("buffer_encoding must be 'base64' or 'array'")
    template = DirTemplate(company_dir)
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
            except pgconn.psycopg.DataError as exc:  # invalid JSON (or text PostgreSQL cannot store)
                strict = exc
            except pgconn.psycopg.errors.UniqueViolation:
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
    except pgconn.psycopg.Error as exc:
        raise pgconn.PgError("import failed, nothing was changed (%s): %s" % (
            pgconn.describe(conn_params), pgconn._scrub(exc, conn_params)))
    finally:
        if reader is not None:
            reader.close()
        conn.close()
    companies_out = [per[d.company_id] for d in done]
    totals = {k: sum(c[k] for c in companies_out) for k in ("files", "keys", "inserted", "updated", "unchanged",
                                                          "deleted")}
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


class _Rollback(Exception):
    """Raised inside the transaction to roll back a check-mode run."""
