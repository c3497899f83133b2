# -*- coding: utf-8 -*-
# Copyright: baileys.resilience contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Encrypted ("sealed") copies of backups: what leaves the host when recipients are configured.

:func:`seal` makes, once per backup and recipient set, the age ciphertext of a local backup's dump
and of its sealed manifest (backup_format.sealed_manifest) under ``<backup_dir>/.sealed/``, with a
plaintext record of their hashes; replication (s3replicate.py) uploads only these files, so every
object it sends is ciphertext by construction.  :func:`decrypted_backup` is the other way: an
encrypted backup file (a sealed copy, or objects downloaded as they are) decrypted with an identity
into a private temporary directory, for ``auth_export source=backup`` and the restore test; without
an identity :func:`ciphertext_check` checks the ciphertext against its record.

Imports agecrypt, backup_format and fsutil.  No Ansible or boto3 import.

Guarantees
----------
* A sealed copy is made from a dump whose sha256 equals its manifest's (hashed before it is
  encrypted); its ciphertext starts with the age header and is hashed after it is written; the
  record is written last (atomically), so a record always describes complete files.
* A record is reused only when it names the current recipient fingerprints, the manifest's sha256
  and the manifest's exact bytes, and its files have the recorded sizes.
* No plaintext is written outside the backup directory's dump and the caller's destination.
"""
from __future__ import absolute_import, division, print_function

import contextlib
import hashlib
import json
import os
import shutil
import tempfile

from . import agecrypt, backup_format, fsutil

__metaclass__ = type

AgeError = agecrypt.AgeError


def _load_record(record_path):
    try:
        with open(record_path, "rb") as fh:
            record = json.loads(fh.read(1 << 20).decode("utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _record_matches(record, backup, encryption, dump_path, manifest_path):
    if not record or record.get("format") != backup_format.ENCRYPTION_FORMAT:
        return False
    if record.get("recipients") != encryption.fingerprints or record.get("plain_sha256") != backup["sha256"]:
        return False
    if record.get("plain_manifest_sha256") != hashlib.sha256(backup["manifest_bytes"]).hexdigest():
        return False
    try:
        return (os.path.getsize(dump_path) == record.get("size")
                and os.path.getsize(manifest_path) == record.get("manifest_size"))
    except OSError:
        return False


def sealed_copy(backup, record, paths):
    """The dict replication uses: ``path``, ``size``, ``sha256`` (ciphertext), ``manifest_bytes``,
    ``manifest_sha256`` (ciphertext), ``recipients``, ``plain_sha256``."""
    with open(paths[1], "rb") as fh:
        manifest_bytes = fh.read(backup_format.MAX_MANIFEST_SIZE + 1)
    if not agecrypt.is_age(manifest_bytes) or hashlib.sha256(manifest_bytes).hexdigest() != record["manifest_sha256"]:
        raise AgeError("sealed manifest %s does not match its record" % paths[1])
    return {"path": paths[0], "size": record["size"], "sha256": record["sha256"], "manifest_bytes": manifest_bytes,
            "manifest_sha256": record["manifest_sha256"], "recipients": record["recipients"],
            "plain_sha256": record["plain_sha256"]}


def current(backup_dir, backup, encryption):
    """The sealed copy of a backup when one for the current recipients exists (no hashing), else ``None``."""
    paths = backup_format.sealed_paths(backup_dir, backup["name"])
    record = _load_record(paths[2])
    if not _record_matches(record, backup, encryption, paths[0], paths[1]):
        return None
    try:
        return sealed_copy(backup, record, paths)
    except (OSError, AgeError):
        return None


def seal(backup_dir, backup, encryption):
    """The sealed copy of one local backup (a dict of s3replicate.scan_local_backups), made when missing.

    Returns ``(copy, problem)``: ``problem`` (a string) when the local dump does not hash to its
    manifest (nothing is sealed, nothing may be uploaded); else ``copy`` (:func:`sealed_copy`).
    """
    paths = backup_format.sealed_paths(backup_dir, backup["name"])
    record = _load_record(paths[2])
    if _record_matches(record, backup, encryption, paths[0], paths[1]):
        return sealed_copy(backup, record, paths), None
    problem = backup_format.checksum_problem(backup["path"], backup["manifest"])
    if problem:
        return None, problem
    try:
        os.mkdir(os.path.dirname(paths[0]), 0o700)
    except FileExistsError:
        pass
    fsutil._unlink_quiet(paths[2])  # the record goes first, comes back last
    agecrypt.encrypt_file(backup["path"], paths[0], encryption)
    sha, size = backup_format.sha256_file(paths[0])
    plain = backup_format.sealed_manifest(backup["manifest_bytes"], backup["manifest"], {
        "recipients": encryption.fingerprints, "sha256": sha, "size": size})
    manifest_ct = agecrypt.encrypt_bytes(plain, encryption)
    fsutil.atomic_write(paths[1], manifest_ct, mode=0o600)
    record = {"format": backup_format.ENCRYPTION_FORMAT, "file": backup["name"], "recipients": encryption.fingerprints,
              "sha256": sha, "size": size, "plain_sha256": backup["sha256"], "plain_size": backup["size"],
              "plain_manifest_sha256": hashlib.sha256(backup["manifest_bytes"]).hexdigest(),
              "manifest_sha256": hashlib.sha256(manifest_ct).hexdigest(), "manifest_size": len(manifest_ct)}
    fsutil.atomic_write(paths[2], (json.dumps(record, indent=2, sort_keys=True) + "\n").encode("utf-8"), mode=0o600)
    return sealed_copy(backup, record, paths), None


def prune(backup_dir, keep_names):
    """Remove sealed copies whose backup is gone (retention removed it); returns the names removed."""
    sealed_dir = os.path.join(backup_dir, backup_format.SEALED_DIR)
    try:
        names = os.listdir(sealed_dir)
    except FileNotFoundError:
        return []
    removed = set()
    for n in names:
        base = n
        for suffix in (backup_format.SEAL_RECORD_SUFFIX, backup_format.MANIFEST_SUFFIX, ".partial"):
            if base.endswith(suffix):
                base = base[: -len(suffix)]
                break
        if base not in keep_names:
            fsutil._unlink_quiet(os.path.join(sealed_dir, n))
            removed.add(base)
    return sorted(removed)


# --------------------------------------------------------------------------- reading encrypted backups


def read_sealed_manifest(manifest_path, identities, what=None):
    """``(sealed, original bytes, original parsed)`` of an encrypted manifest file."""
    with open(manifest_path, "rb") as fh:
        data = fh.read(backup_format.MAX_MANIFEST_SIZE + 1)
    plain = agecrypt.decrypt_bytes(data, identities, what=what or manifest_path)
    try:
        return backup_format.open_sealed_manifest(plain)
    except ValueError as exc:
        raise AgeError("%s is not a sealed manifest: %s" % (manifest_path, exc))


def is_encrypted_backup(backup_file):
    try:
        return agecrypt.file_is_age(backup_file)
    except OSError:
        return False


@contextlib.contextmanager
def decrypted_backup(backup_file, identities):
    """Yield the path of a plaintext copy of an encrypted backup (dump and manifest) in a private (0700)
    temporary directory, removed afterwards; the dump's sha256 is checked against the manifest."""
    manifest_path = backup_file + backup_format.MANIFEST_SUFFIX
    sealed, raw, manifest = read_sealed_manifest(manifest_path, identities)
    name = os.path.basename(backup_file)
    if manifest.get("file") != name:
        raise AgeError("sealed manifest %s is for %r, not %r" % (manifest_path, manifest.get("file"), name))
    made_for = sealed["encryption"]["recipients"]
    tmp = tempfile.mkdtemp(prefix="baileys-decrypted-")
    try:
        os.chmod(tmp, 0o700)
        dest = os.path.join(tmp, name)
        sha, size = agecrypt.decrypt_file(backup_file, dest, identities, made_for, what=backup_file)
        if sha != manifest.get("sha256") or size != manifest.get("size"):
            raise AgeError("%s decrypts to %d bytes with sha256 %s; its manifest says %s bytes, %s"
                           % (backup_file, size, sha, manifest.get("size"), manifest.get("sha256")))
        fsutil.atomic_write(dest + backup_format.MANIFEST_SUFFIX, raw, mode=0o600)
        yield dest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ciphertext_check(backup_file):
    """Integrity of an encrypted backup without an identity: its sha256 and size against the seal
    record beside it (``<file>.seal.json``).  Returns a result dict with ``decrypted: false``."""
    record = _load_record(backup_file + backup_format.SEAL_RECORD_SUFFIX)
    result = {"backup": backup_file, "decrypted": False, "encrypted": True, "ok": False}
    if record is None:
        result["msg"] = ("%s is age ciphertext and no identity was given; its seal record %s is missing, so not "
                         "even its integrity could be checked"
                         % (backup_file, backup_file + backup_format.SEAL_RECORD_SUFFIX))
        return result
    sha, size = backup_format.sha256_file(backup_file)
    result.update(sha256=sha, size=size, recipients=record.get("recipients"))
    if sha != record.get("sha256") or size != record.get("size"):
        result["msg"] = "%s: ciphertext sha256 %s (%d bytes) differs from its record's %s (%s bytes)" % (
            backup_file, sha, size, record.get("sha256"), record.get("size"))
        return result
    result["ok"] = True
    result["msg"] = ("ciphertext integrity verified (sha256 matches the seal record); NOT decrypted and NOT "
                     "restored: no identity was given (run the restore test where the identity lives)")
    return result
