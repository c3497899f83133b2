# -*- coding: utf-8 -*-
# Copyright: baileys.resilience contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Atomic, durable file writes.

A file is written to a temporary name in the same directory, flushed to disk,
then renamed over the final name, and the directory is fsynced: a reader sees
the old file or the new one, never half of either, and after a crash the
rename is either there with its data or not there at all.

Writing thousands of small files with one fsync each is slow, so
:class:`BatchWriter` writes every temporary file of a directory first, flushes
them all with a single ``syncfs`` (falling back to one fsync per file where
``syncfs`` is missing), and only then renames them.  The guarantee is the
same: no final name ever points at data that is not on disk.
"""
from __future__ import absolute_import, division, print_function

import ctypes
import ctypes.util
import errno
import os
import stat

from . import errors

__metaclass__ = type

TEMP_PREFIX = ".baileys-resilience-tmp-"

_libc = None
_syncfs = None
_renameat2 = None
try:  # pragma: no branch
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    _syncfs = getattr(_libc, "syncfs", None)
    _renameat2 = getattr(_libc, "renameat2", None)  # glibc 2.28+
except OSError:  # pragma: no cover
    _syncfs = None
_RENAME_NOREPLACE = 1


class FsError(errors.BaileysResilienceError, OSError):
    pass


def fsync_dir(path_or_fd):
    fd = path_or_fd if isinstance(path_or_fd, int) else os.open(path_or_fd, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        if not isinstance(path_or_fd, int):
            os.close(fd)


def syncfs(fd):
    """Flush the whole filesystem holding ``fd``; False if unavailable."""
    if _syncfs is None:
        return False
    if _syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return True


def atomic_write(path, data, mode=0o600, uid=-1, gid=-1):
    """Write ``data`` (bytes) to ``path`` atomically and durably."""
    directory = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    tmp = os.path.join(directory, "%s%d-%s" % (TEMP_PREFIX, os.getpid(), name))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
        if uid != -1 or gid != -1:
            os.fchown(fd, uid, gid)
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink_quiet(tmp)
        raise
    os.close(fd)
    try:
        os.rename(tmp, path)
    except BaseException:
        _unlink_quiet(tmp)
        raise
    fsync_dir(directory)


def rename_noreplace(src, dst, dir_fd):
    """Rename ``src`` to ``dst`` (both in ``dir_fd``), failing with EEXIST when ``dst`` exists.

    Uses ``renameat2(RENAME_NOREPLACE)``; where the C library or the filesystem lacks it,
    checks first and renames (a plain rename would replace an empty directory).
    """
    if _renameat2 is not None:
        ret = _renameat2(dir_fd, os.fsencode(src), dir_fd, os.fsencode(dst), _RENAME_NOREPLACE)
        if ret == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS):
            raise OSError(err, os.strerror(err), dst)
    try:
        os.lstat(dst, dir_fd=dir_fd)
    except FileNotFoundError:
        os.rename(src, dst, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        return
    raise OSError(errno.EEXIST, os.strerror(errno.EEXIST), dst)


def _unlink_quiet(path, dir_fd=None):
    try:
        os.unlink(path, dir_fd=dir_fd)
    except OSError:
        pass


def open_dir(path, create=False, mode=0o700, parent_fd=None):
    """Open a directory without following a symlink at its last component.

    With ``create``, make it (mode ``mode``) when absent.  Returns
    ``(fd, created)``.
    """
    created = False
    if create:
        try:
            os.mkdir(path, mode, dir_fd=parent_fd)
            created = True
        except OSError as exc:
            if exc.errno != errno.EEXIST:
                raise
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
    return fd, created


class BatchWriter:
    """Stage many files in one directory; commit them with one flush.

    ``stage(name, data)`` writes a temporary file; ``commit()`` makes every
    staged file durable, renames them into place in the order they were
    staged and fsyncs the directory.  ``abort()`` removes the temporary files.
    ``mtime_ns[name]`` is the modification time of each staged file, taken
    before it is closed: the rename keeps it.

    With ``in_place``, files are written under their final names: only for a
    staging directory that no reader can see yet and that is itself renamed
    into place once committed (see :func:`rename_noreplace`).
    """

    def __init__(self, dir_fd, mode=0o600, uid=-1, gid=-1, in_place=False):
        self.dir_fd = dir_fd
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.in_place = in_place
        self.mtime_ns = {}
        self._staged = []  # (tmp, final)
        self._serial = 0
        self._pid = os.getpid()

    def stage(self, name, data):
        self._serial += 1
        tmp = name if self.in_place else "%s%d-%d" % (TEMP_PREFIX, self._pid, self._serial)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, self.mode,
                     dir_fd=self.dir_fd)
        try:
            self._staged.append((tmp, name))
            if self.uid != -1 or self.gid != -1:
                os.fchown(fd, self.uid, self.gid)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            st = os.fstat(fd)
            if stat.S_IMODE(st.st_mode) != self.mode:
                # the umask (or a default ACL) narrowed the mode at creation; chmod keeps the mtime
                os.fchmod(fd, self.mode)
            self.mtime_ns[name] = st.st_mtime_ns
            if _syncfs is None:
                os.fsync(fd)
        finally:
            os.close(fd)

    def __len__(self):
        return len(self._staged)

    def commit(self):
        if not self._staged:
            return []
        syncfs(self.dir_fd)  # one flush for all staged files (no-op fallback: fsynced at stage)
        done = []
        for tmp, final in self._staged:
            if tmp != final:
                os.rename(tmp, final, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
            done.append(final)
        self._staged = []
        os.fsync(self.dir_fd)
        return done

    def abort(self):
        for tmp, _final in self._staged:
            _unlink_quiet(tmp, dir_fd=self.dir_fd)
        self._staged = []
