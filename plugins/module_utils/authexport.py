# -*- coding: utf-8 -*-
# Copyright: baileys.resilience contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Export: mirror the auth state of the store (or of a backup) into useMultiFileAuthState directories.

* :func:`export_from_database`: the whole export from PostgreSQL, in one snapshot
  (authsource.py); nothing under ``dest`` is touched if the connection fails;
* :func:`export_states`: mirror every company of any source of :class:`authsource.CompanyState`
  (the store, a backup) under ``dest``, as :class:`ExportOptions` says;
* :func:`mirror_company`: one company directory, compared file by file with the source; its
  manifest (``.baileys-resilience-manifest.json``, ``MANIFEST_FORMAT``) records what it wrote;
* :func:`verify_directory` / :func:`_verify_directories`: a directory whose manifest proves it
  mirrored (same fingerprint, every file as the export left it) needs none of its key rows read;
* :class:`_Publisher`: new company directories are built under a temporary name
  (``STAGING_PREFIX``), made durable and renamed into place whole, never over an existing one.

Guarantees: a new company directory appears whole or not at all; in an existing one the
manifest is written last, in the same flush as the files it lists; a directory that another
export or import holds (flock) is refused, not shared; a company id that cannot name a
directory is reported and the other companies are still exported.  No Ansible import.
"""
from __future__ import absolute_import, division, print_function

import errno
import fcntl
import hashlib
import itertools
import json
import os
import queue
import shutil
import stat
import threading
import time

from . import authnames, authsource
from . import baileys_codec as codec
from . import fsutil
from . import pgconn

__metaclass__ = type

MANIFEST_FORMAT = 1
STAGING_PREFIX = fsutil.TEMP_PREFIX + "dir-"  # a new company directory while it is being written
_staging_serial = itertools.count(1)


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
    def __init__(self, dest, company_dir=authnames.DEFAULT_COMPANY_DIR, prune=True, owner=None, group=None,
                 mode=authnames.DEFAULT_FILE_MODE, directory_mode=authnames.DEFAULT_DIRECTORY_MODE, check_mode=False,
                 diff=False, source_label="database"):
        self.dest = dest
        self.template = authnames.DirTemplate(company_dir)
        self.prune = prune
        self.uid, self.gid = authnames.resolve_owner(owner, group)
        self.mode = authnames.parse_mode(mode, 0o600)
        self.directory_mode = authnames.parse_mode(directory_mode, 0o700)
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
                raise authnames.AuthStateError("company %r: %s" % (state.company_id, exc))
            if _round_trip_name(name) != (key_type, key_id):
                warnings.append(
                    "company %r: %s id %r is written as %s, which reads back as a different id on import"
                    % (state.company_id, key_type, key_id, name)
                )
        if name in owners:
            raise authnames.AuthStateError(
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
        return authnames._parse_key_name(name)
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
    company_id = authnames.check_company_id(state.company_id)
    dir_name = opts.template.name(company_id)
    warnings = []
    wanted = _wanted_files(state, warnings)
    name_warnings = list(warnings)  # kept in the manifest: a verified directory reports them again
    result = _company_result(company_id, os.path.join(opts.dest, dir_name), state.creds is not None,
                             len(state.keys), warnings)
    result["fingerprint"] = state.fingerprint
    result["creds_sha256"] = authnames._sha(state.creds.encode("utf-8")) if state.creds is not None else None
    staging = None
    dir_fd, created = None, True
    if dest_fd is not None:  # None: check mode, and dest does not exist yet
        try:
            dir_fd, created = fsutil.open_dir(dir_name, parent_fd=dest_fd)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise authnames.AuthStateError("cannot open %s: %s" % (result["directory"], exc.strerror or exc))
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
                raise authnames.AuthStateError("%s is locked by another export or import; try again"
                                               % result["directory"])
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
            sha = src_sha if text is source_text else authnames._sha(data)
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
                "before": "".join("%s\n" % n for n in sorted([n for n, _data in to_write if n in existing]
                                                             + to_remove)[:authnames.DIFF_LIMIT]),
                "after": "".join("%s\n" % n for n, _data in sorted(to_write)[:authnames.DIFF_LIMIT]),
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
    company_id = authnames.check_company_id(company_id)
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
    except (OSError, authnames.AuthStateError):  # mirror_company meets it again and says what it is
        return company_id, None


def _verify_directories(dest_fd, source, opts):
    """Split ``source``'s companies into verified results and the ids whose rows must be read.

    The directories are checked (:func:`verify_directory`: a stat per file, which is syscall
    time) by forked worker processes while the server computes the fingerprints; the
    workers are forked before any thread of this export starts.
    """
    processes = authnames.READ_PROCESSES
    try:
        present = set(os.listdir(dest_fd))
    except OSError:  # unreadable dest: mirror_company says so
        present = set()
    found = {}
    tasks = []
    for company_id, text in sorted(source.creds.items()):
        try:
            if opts.template.name(authnames.check_company_id(company_id)) in present:
                tasks.append((dest_fd, company_id, authnames._sha(text.encode("utf-8")), opts))
                continue
        except authnames.AuthStateError:
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
                            raise authnames.AuthStateError("%s appeared while it was being exported (another export?); "
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
        raise authnames.AuthStateError("dest must be an absolute path, got %r" % (dest,))
    dest_created = False
    dest_fd = None
    try:
        dest_fd, dest_created = fsutil.open_dir(dest, create=not opts.check_mode, mode=opts.directory_mode)
    except FileNotFoundError:
        if not opts.check_mode:
            raise authnames.AuthStateError("cannot create dest %s: its parent directory does not exist" % dest)
        dest_created = True
    except OSError as exc:
        raise authnames.AuthStateError("cannot open dest %s: %s" % (dest, exc.strerror or exc))
    if dest_fd is not None and not opts.check_mode and not os.access(dest, os.W_OK):
        os.close(dest_fd)
        raise authnames.AuthStateError("dest %s is not writable by uid %d" % (dest, os.geteuid()))
    if dest_fd is not None and dest_created and (opts.uid != -1 or opts.gid != -1):
        os.fchown(dest_fd, opts.uid, opts.gid)  # created for the service user, who must read it
    companies = []
    refused = []
    publisher = None
    try:
        if isinstance(states, authsource.DatabaseSource) and states.fingerprinted and dest_fd is not None:
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
                except authnames.InvalidCompanyId as exc:
                    # one bad row must not take every company down: the others are exported, the caller
                    # fails at the end naming this one
                    refused.append({"company_id": state.company_id, "error": str(exc)})
            if publisher is not None:
                publisher.close()
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC):
                raise authnames.AuthStateError("cannot write under %s: %s" % (dest, exc))
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
        with authsource.snapshot_transaction(conn) as snap:
            snapshot.update(snap)
            with conn.cursor() as cur:
                store.check_tables(cur)
            if companies:
                for company_id in companies:
                    authnames.check_company_id(company_id)
            source = authsource.DatabaseSource(conn, store, companies, snapshot.get("server_version_num"))
            try:
                result = export_states(source, opts, snapshot)
            finally:
                source.close()
    except pgconn.Error as exc:
        raise pgconn.PgError("export failed while reading %s: %s" % (pgconn.describe(conn_params),
                                                                     pgconn._scrub(exc, conn_params)))
    finally:
        conn.close()
    result["server_version_num"] = snapshot.get("server_version_num")
    result["duration"] = round(time.monotonic() - started, 3)
    return result
