# -*- coding: utf-8 -*-
# Copyright: baileys.resilience contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Move a Baileys auth state between PostgreSQL and useMultiFileAuthState files.

No Ansible import: the modules ``auth_export``/``auth_import`` and the
``baileys-resilience`` command-line tool both call :func:`export_auth_state`
and :func:`import_auth_state`.
"""
from __future__ import absolute_import, division, print_function

import datetime
import errno
import fcntl
import grp
import hashlib
import json
import os
import pwd
import re
import stat
import time

from . import baileys_codec as codec
from . import fsutil
from . import pgconn

__metaclass__ = type

MANIFEST_FORMAT = 1
DIFF_LIMIT = 2000  # file names listed per company in diff output


class AuthStateError(RuntimeError):
    """An error an operator can act on; the message says what and where."""


# --------------------------------------------------------------------------- names


def check_company_id(company_id):
    """Refuse ids that could leave ``dest`` or hide as dot files."""
    if not isinstance(company_id, str) or not company_id:
        raise AuthStateError("invalid company id %r: empty" % (company_id,))
    bad = [c for c in ("/", "\\", "\x00") if c in company_id]
    if bad or ".." in company_id or company_id.startswith(".") or len(company_id.encode("utf-8")) > 200:
        raise AuthStateError(
            "refusing company id %r: it must not contain '/', '\\', NUL or '..', start with '.', "
            "or be longer than 200 bytes" % (company_id,)
        )
    return company_id


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

    __slots__ = ("company_id", "creds", "keys")

    def __init__(self, company_id, creds=None, keys=None):
        self.company_id = company_id
        self.creds = creds  # JSON text or None
        self.keys = keys if keys is not None else []  # [(key_type, key_id, JSON text)]


def read_database(conn, store, companies=None):
    """Yield :class:`CompanyState` for every company, from one snapshot.

    The caller owns the transaction: it must be REPEATABLE READ so that the
    creds and keys agree (see :func:`snapshot_transaction`).
    """
    where = pgconn.sql.SQL("")
    args = ()
    if companies:
        where = pgconn.sql.SQL(" WHERE company_id = ANY(%s)")
        args = (list(companies),)
    with conn.cursor() as cur:
        cur.execute(pgconn.sql.SQL("SELECT company_id, creds::text FROM {}").format(store.auth) + where, args)
        creds = dict(cur.fetchall())
    seen = set()
    query = pgconn.sql.SQL(
        "COPY (SELECT company_id, key_type, key_id, value::text FROM {}{} ORDER BY company_id) TO STDOUT"
    ).format(store.keys, where)
    current = None
    with conn.cursor() as cur:
        with cur.copy(query, args) as copy:
            for company_id, key_type, key_id, value in copy.rows():
                if current is None or current.company_id != company_id:
                    if current is not None:
                        yield current
                    current = CompanyState(company_id, creds.get(company_id))
                    seen.add(company_id)
                current.keys.append((key_type, key_id, value))
    if current is not None:
        yield current
    for company_id in sorted(set(creds) - seen):
        yield CompanyState(company_id, creds[company_id])


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
        if data.get("format") == MANIFEST_FORMAT and isinstance(data.get("files"), dict):
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


def _meta_ok(st, opts):
    return (
        stat.S_IMODE(st.st_mode) == opts.mode
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
        try:
            name = codec.key_file_name(key_type, key_id)
        except codec.CodecError as exc:
            raise AuthStateError("company %r: %s" % (state.company_id, exc))
        if name in owners:
            raise AuthStateError(
                "company %r: keys %r and %r map to the same Baileys file %s; Baileys itself could not keep both"
                % (state.company_id, owners[name], (key_type, key_id), name)
            )
        owners[name] = (key_type, key_id)
        if not codec.round_trips(key_type, key_id):
            warnings.append(
                "company %r: %s id %r is written as %s, which reads back as a different id on import"
                % (state.company_id, key_type, key_id, name)
            )
        wanted[name] = text
    return wanted


def mirror_company(dest_fd, state, opts, snapshot):
    """Make ``dest/<company dir>`` mirror one company's state.  Returns a result dict."""
    company_id = check_company_id(state.company_id)
    dir_name = opts.template.name(company_id)
    warnings = []
    wanted = _wanted_files(state, warnings)
    result = {
        "company_id": company_id,
        "directory": os.path.join(opts.dest, dir_name),
        "creds": state.creds is not None,
        "keys": len(state.keys),
        "written": 0,
        "unchanged": 0,
        "removed": 0,
        "metadata_fixed": 0,
        "ignored": [],
        "warnings": warnings,
        "created": False,
    }
    if state.creds is None:
        warnings.append("company %r has keys but no creds row; creds.json is not written" % (company_id,))
    try:
        dir_fd, created = fsutil.open_dir(dir_name, create=not opts.check_mode, mode=opts.directory_mode,
                                          parent_fd=dest_fd)
    except FileNotFoundError:
        if not opts.check_mode:
            raise
        dir_fd, created = None, True
    except OSError as exc:
        raise AuthStateError("cannot open %s: %s" % (result["directory"], exc.strerror or exc))
    result["created"] = created
    to_write, to_remove, meta_fix = [], [], []
    try:
        if dir_fd is not None:
            try:
                fcntl.flock(dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise AuthStateError("%s is locked by another export or import; try again" % result["directory"])
            if created or not opts.check_mode:
                dst = os.fstat(dir_fd)
                if stat.S_IMODE(dst.st_mode) != opts.directory_mode or (
                    (opts.uid != -1 and dst.st_uid != opts.uid) or (opts.gid != -1 and dst.st_gid != opts.gid)
                ):
                    os.fchmod(dir_fd, opts.directory_mode)
                    if opts.uid != -1 or opts.gid != -1:
                        os.fchown(dir_fd, opts.uid, opts.gid)
                    result["metadata_fixed"] += 0 if created else 1
            if not opts.check_mode:
                fsutil.remove_stale_temps(dir_fd)
            manifest = _load_manifest(dir_fd)
            old_files = manifest.get("files", {})
            existing = {}
            with os.scandir(dir_fd) as it:
                for entry in it:
                    existing[entry.name] = entry
        else:
            old_files, existing = {}, {}

        new_files = {}
        for name, source_text in wanted.items():
            source_bytes = source_text.encode("utf-8")
            src_sha = _sha(source_bytes)
            old = old_files.get(name)
            entry = existing.get(name)
            st = entry.stat(follow_symlinks=False) if entry is not None else None
            if (
                old is not None and st is not None and stat.S_ISREG(st.st_mode)
                and old.get("src", old.get("sha256")) == src_sha
                and old.get("size") == st.st_size and old.get("mtime_ns") == st.st_mtime_ns
            ):
                new_files[name] = old
                if _meta_ok(st, opts):
                    result["unchanged"] += 1
                else:
                    meta_fix.append(name)
                continue
            text, _converted = codec.file_text(source_text)
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
                    if _meta_ok(st, opts):
                        result["unchanged"] += 1
                    else:
                        meta_fix.append(name)
                    continue
            new_files[name] = record
            to_write.append((name, data))

        if opts.prune:
            for name, entry in existing.items():
                if name in wanted or name == codec.MANIFEST_FILE or name.startswith(fsutil.TEMP_PREFIX):
                    continue
                try:
                    codec.parse_key_file_name(name)
                except codec.CodecError:
                    if name != codec.CREDS_FILE:
                        result["ignored"].append(name)
                    continue
                if entry.is_file(follow_symlinks=False) or entry.is_symlink():
                    to_remove.append(name)
        else:
            result["ignored"] = sorted(n for n in existing if n not in wanted and n != codec.MANIFEST_FILE
                                       and not n.startswith(fsutil.TEMP_PREFIX))

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
        if not opts.check_mode and dir_fd is not None:
            writer = fsutil.BatchWriter(dir_fd, opts.mode, opts.uid, opts.gid)
            try:
                for name, data in to_write:
                    writer.stage(name, data)
                written = writer.commit()
            except BaseException:
                writer.abort()
                raise
            for name in written:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                new_files[name]["mtime_ns"] = st.st_mtime_ns
            for name in meta_fix:
                _fix_meta(dir_fd, name, opts)
            for name in to_remove:
                os.unlink(name, dir_fd=dir_fd)
            if to_remove:
                os.fsync(dir_fd)
            if to_write or to_remove or _manifest_differs(manifest, manifest_body):
                data = (json.dumps(manifest_body, sort_keys=True, separators=(",", ":")) + "\n").encode("utf-8")
                _write_manifest(dir_fd, data, opts)
                result["manifest_written"] = True
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


def _manifest_differs(old, new):
    if not old:
        return True
    keys = ("company_id", "counts", "files", "source")
    return any(old.get(k) != new.get(k) for k in keys)


def _write_manifest(dir_fd, data, opts):
    writer = fsutil.BatchWriter(dir_fd, opts.mode, opts.uid, opts.gid)
    writer.stage(codec.MANIFEST_FILE, data)
    writer.commit()


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
    companies = []
    try:
        for state in states:
            try:
                companies.append(mirror_company(dest_fd, state, opts, snapshot))
            except OSError as exc:
                if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC):
                    raise AuthStateError("cannot write under %s: %s" % (dest, exc))
                raise
    finally:
        if dest_fd is not None:
            os.close(dest_fd)
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
            result = export_states(read_database(conn, store, companies), opts, snapshot)
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
            if not entry.is_dir(follow_symlinks=False):
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


def _copy_rows(cur, table_sql, rows):
    with cur.copy(table_sql) as copy:
        for row in rows:
            copy.write_row(row)


def import_states(conn, store, states, prune=False, check_mode=False, diff=False):
    """Apply the states in the caller's transaction; return counts."""
    sql = pgconn.sql
    cur = conn.cursor()
    store.check_tables(cur)
    cur.execute("SET LOCAL lock_timeout = '30s'")
    cur.execute("CREATE TEMP TABLE br_import_keys (company_id text, key_type text, key_id text, value jsonb) "
                "ON COMMIT DROP")
    cur.execute("CREATE TEMP TABLE br_import_auth (company_id text, creds jsonb) ON COMMIT DROP")
    company_ids = [s.company_id for s in states]
    _copy_rows(cur, "COPY br_import_keys (company_id, key_type, key_id, value) FROM STDIN",
               ((s.company_id, t, i, v) for s in states for (t, i, v) in s.keys))
    _copy_rows(cur, "COPY br_import_auth (company_id, creds) FROM STDIN",
               ((s.company_id, s.creds) for s in states if s.creds is not None))
    cur.execute("ANALYZE br_import_keys")
    per = {cid: {"company_id": cid, "inserted": 0, "updated": 0, "unchanged": 0, "deleted": 0,
                 "creds": "absent"} for cid in company_ids}
    diff_lines = []
    if check_mode:
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
        cur.execute(sql.SQL(
            "INSERT INTO {keys} AS k (company_id, key_type, key_id, value, created_at, updated_at) "
            "SELECT company_id, key_type, key_id, value, now(), now() FROM br_import_keys "
            "ON CONFLICT (company_id, key_type, key_id) DO UPDATE SET value = EXCLUDED.value, updated_at = now() "
            "WHERE k.value IS DISTINCT FROM EXCLUDED.value "
            "RETURNING k.company_id, k.key_type, k.key_id, CASE WHEN xmax = 0 THEN 'insert' ELSE 'update' END"
        ).format(keys=store.keys))
        key_changes = cur.fetchall()
        cur.execute(sql.SQL(
            "WITH up AS (INSERT INTO {auth} AS a (company_id, creds, created_at, updated_at) "
            "SELECT company_id, creds, now(), now() FROM br_import_auth "
            "ON CONFLICT (company_id) DO UPDATE SET creds = EXCLUDED.creds, updated_at = now() "
            "WHERE a.creds IS DISTINCT FROM EXCLUDED.creds "
            "RETURNING a.company_id, CASE WHEN xmax = 0 THEN 'insert' ELSE 'update' END AS op) "
            "SELECT t.company_id, coalesce(up.op, 'unchanged') FROM br_import_auth t "
            "LEFT JOIN up USING (company_id)").format(auth=store.auth))
        creds_changes = cur.fetchall()
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
    for s in states:
        c = per[s.company_id]
        c["files"] = len(s.keys) + (1 if s.creds is not None else 0)
        c["keys"] = len(s.keys)
        c["unchanged"] = len(s.keys) - c["inserted"] - c["updated"]
    cur.close()
    return per, diff_lines


def import_auth_state(conn_params, store_params, src, company_id=None, companies=None, company_dir="{company_id}",
                      prune=False, buffer_encoding="base64", check_mode=False, diff=False):
    """Validate every file, then apply all companies in one transaction."""
    started = time.monotonic()
    if buffer_encoding not in ("base64", "array"):
        raise AuthStateError("buffer_encoding must be 'base64' or 'array'")
    template = DirTemplate(company_dir)
    targets = _discover(src, template, company_id, companies)
    problems, warnings, states = [], [], []
    for cid, directory in targets:
        state, warn = read_directory(cid, directory, buffer_encoding, problems)
        states.append(state)
        warnings.extend(warn)
    if problems:
        raise ValidationError(problems)
    store = pgconn.Store.from_params(store_params)
    conn = pgconn.connect(conn_params)
    try:
        with conn.transaction():
            per, diff_lines = import_states(conn, store, states, prune, check_mode, diff)
            if check_mode:
                raise _Rollback()
    except _Rollback:
        pass
    except pgconn.psycopg.Error as exc:
        raise pgconn.PgError("import failed, nothing was changed (%s): %s" % (
            pgconn.describe(conn_params), pgconn._scrub(exc, conn_params)))
    finally:
        conn.close()
    companies_out = [per[s.company_id] for s in states]
    totals = {k: sum(c[k] for c in companies_out) for k in ("files", "keys", "inserted", "updated", "unchanged",
                                                          "deleted")}
    totals["companies"] = len(companies_out)
    totals["creds_changed"] = sum(1 for c in companies_out if c["creds"] in ("inserted", "updated"))
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


def utcnow_iso():
    return datetime.datetime.now(datetime.timezone.utc).isoformat()
