# -*- coding: utf-8 -*-
# Copyright: baileys.resilience contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Encrypted ("sealed") copies of backups: what leaves the host when recipients are configured.

:func:`seal` makes, once per backup and recipient set, the age ciphertext of a local backup's dump
and of its sealed manifest (backup_format.sealed_manifest) under ``<backup_dir>/.sealed/``, with a
plaintext record of their hashes; replication (s3replicate.py) uploads only these files, so every
object it sends is ciphertext by construction.  :func:`decrypted_backup` is the other way: an
encrypted backup file (a sealed copy, objects downloaded as they are, or a backup encrypted on the
host) decrypted with an identity into a private temporary directory, for ``auth_export
source=backup``, the restore test and a restore; without an identity :func:`ciphertext_check` checks
the ciphertext against its record.

With ``encrypt_local`` the backup job (backup.py) encrypts the validated dump itself
(:func:`encrypt_local_dump`): the local ``<name>.dump`` is then age ciphertext, its manifest plaintext
with an ``encryption`` block (backup_format.py).  Such a backup is its own sealed copy
(:func:`local_copy`): replication uploads it as it is (:func:`prepare`, :func:`current`).

Imports agecrypt, backup_format and fsutil.  No Ansible or boto3 import.

Guarantees
----------
* A sealed copy is made from a dump whose sha256 equals its manifest's: the dump is read once,
  hashed as it is encrypted, and a mismatch leaves no sealed file; its ciphertext starts with the
  age header and is hashed as it is written; the record is written last (atomically), so a record
  always describes complete files.
* A record is reused only when it names the current recipient fingerprints, the manifest's sha256
  and the manifest's exact bytes, and its files have the recorded sizes.
* No plaintext is written outside the backup directory's dump and the caller's destination.
* A backup encrypted on the host is the ciphertext of exactly the bytes that were validated (hashed
  while they are encrypted and compared with the manifest); it is uploaded only after its ciphertext
  hashed to its manifest's ``encryption`` block.
"""
from __future__ import absolute_import, division, print_function

import base64
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
    """The sealed copy of a backup when one for the current recipients exists (no hashing), else ``None``.

    A backup the backup job encrypted itself (encrypt_local) is its own sealed copy (:func:`local_copy`),
    whatever the current recipients: it cannot be encrypted again on this host (no identity here)."""
    if backup_format.local_encryption(backup["manifest"]) is not None:
        try:
            return local_copy(backup)
        except AgeError:
            return None
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
    try:
        src = open(backup["path"], "rb", buffering=0)
    except OSError as exc:
        return None, "dump unreadable: %s" % (exc.strerror or exc)
    with src:
        try:
            os.mkdir(os.path.dirname(paths[0]), 0o700)
        except FileExistsError:
            pass
        fsutil._unlink_quiet(paths[2])  # the record goes first, comes back last
        # one read of the dump: hashed as it is encrypted, the ciphertext hashed as it is written; a dump that
        # does not hash to its manifest leaves no sealed file
        try:
            info = agecrypt.encrypt_file(src, paths[0], encryption, expect=(backup["sha256"], backup["size"]))
        except agecrypt.PlaintextMismatch as exc:
            if exc.size != backup["manifest"].get("size"):
                return None, "size %d differs from the manifest's %r" % (exc.size, backup["manifest"].get("size"))
            return None, "sha256 %s differs from the manifest's %s" % (exc.sha256, backup["manifest"].get("sha256"))
    sha, size = info["sha256"], info["size"]
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


# --------------------------------------------------------------------------- backups encrypted on the host


def encrypt_local_dump(plain_path, partial, manifest, encryption):
    """encrypt_local: encrypt a validated plaintext dump as a stream into ``partial`` (0600, fsynced; the
    caller renames it over the backup's name and removes ``plain_path``) and return the manifest's
    ``encryption`` block (backup_format, "backups encrypted on the host").

    ``manifest`` is the plaintext dump's manifest (no ``encryption`` block yet); the bytes encrypted must
    hash to its ``sha256``/``size`` (hashed while they are read), else nothing is left and
    :class:`AgeError` says so.  The sealed manifest (what replication uploads as the manifest object) is
    encrypted here, once: age is randomized, so one made later would differ and be uploaded again.
    """
    try:
        info = agecrypt.encrypt_file_hashed(plain_path, partial, encryption)
        if info["plain_sha256"] != manifest["sha256"] or info["plain_size"] != manifest["size"]:
            raise AgeError("%s changed after it was validated (%d bytes, sha256 %s; validated: %s bytes, %s): "
                           "not encrypted" % (plain_path, info["plain_size"], info["plain_sha256"],
                                              manifest["size"], manifest["sha256"]))
        plain_raw = backup_format.manifest_bytes(manifest)
        block = {"recipients": encryption.fingerprints, "sha256": info["sha256"], "size": info["size"]}
        sealed = agecrypt.encrypt_bytes(backup_format.sealed_manifest(plain_raw, manifest, block), encryption)
    except BaseException:
        fsutil._unlink_quiet(partial)
        raise
    return dict(block, format=backup_format.ENCRYPTION_FORMAT,
                plain_manifest_sha256=hashlib.sha256(plain_raw).hexdigest(),
                sealed_manifest=base64.b64encode(sealed).decode("ascii"),
                sealed_manifest_sha256=hashlib.sha256(sealed).hexdigest())


def local_copy(backup):
    """The copy replication uploads for a backup encrypted on the host (a dict of
    s3replicate.scan_local_backups whose manifest has an ``encryption`` block): the local ciphertext file
    itself and the sealed manifest its manifest carries, as :func:`sealed_copy`'s dict; ``None`` for a
    plaintext backup.  Raises :class:`AgeError` when the block is not usable.  No hashing of the dump."""
    manifest = backup["manifest"]
    enc = backup_format.local_encryption(manifest)
    if enc is None:
        return None
    problem = backup_format.local_encryption_problem(manifest)
    if problem:
        raise AgeError("%s: %s" % (backup["name"], problem))
    try:
        manifest_bytes = base64.b64decode(enc["sealed_manifest"], validate=True)
    except (ValueError, TypeError):
        manifest_bytes = b""
    if not agecrypt.is_age(manifest_bytes) or hashlib.sha256(manifest_bytes).hexdigest() != enc[
            "sealed_manifest_sha256"]:
        raise AgeError("%s: the sealed manifest in its manifest does not match its sha256" % backup["name"])
    return {"path": backup["path"], "size": enc["size"], "sha256": enc["sha256"], "manifest_bytes": manifest_bytes,
            "manifest_sha256": enc["sealed_manifest_sha256"], "recipients": enc["recipients"],
            "plain_sha256": manifest["sha256"], "local": True}


def prepare(backup_dir, backup, encryption):
    """What replication uploads for one local backup when recipients are set: ``(copy, problem)`` as
    :func:`seal` returns them.  A backup encrypted on the host is uploaded as it is (:func:`local_copy`,
    after its ciphertext hashed to its manifest's ``encryption`` block): no second encryption, no
    ``.sealed/`` copy; any other backup is sealed (:func:`seal`)."""
    if backup_format.local_encryption(backup["manifest"]) is None:
        return seal(backup_dir, backup, encryption)
    try:
        copy = local_copy(backup)
    except AgeError as exc:
        return None, str(exc)
    problem = backup_format.dump_problem(backup["path"], backup["manifest"], verify_checksum=True)
    return (None, problem) if problem else (copy, None)


def local_problem(backup, encryption):
    """Why a local backup may not be uploaded where no copy is prepared (replication without recipients, or
    check mode), or ``None``: the dump hashed against its manifest.  A backup encrypted on the host is
    checked against its ciphertext hashes when recipients are set, and refused without them: its only
    copy is ciphertext, and a run without recipients would send it as a plaintext backup."""
    if backup_format.local_encryption(backup["manifest"]) is None:
        return backup_format.checksum_problem(backup["path"], backup["manifest"])
    if not encryption.enabled:
        made_for = backup_format.stored_file(backup["manifest"]).get("recipients")
        return ("it was encrypted on this host (encrypt_local, to %s): replication without encryption recipients "
                "does not upload it (set the encryption recipients)"
                % (", ".join(str(r) for r in made_for) if isinstance(made_for, list) else "?"))
    problem = backup_format.local_encryption_problem(backup["manifest"])
    return problem or backup_format.dump_problem(backup["path"], backup["manifest"], verify_checksum=True)


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
    local = _local_manifest(manifest_path)
    if local is None:
        sealed, raw, manifest = read_sealed_manifest(manifest_path, identities)
        made_for = sealed["encryption"]["recipients"]
    else:  # encrypted on the host: the manifest is plaintext, the plaintext dump's manifest is it without the block
        problem = backup_format.local_encryption_problem(local)
        if problem:
            raise AgeError("%s: %s" % (manifest_path, problem))
        manifest = backup_format.plain_manifest(local)
        raw = backup_format.manifest_bytes(manifest)
        made_for = local["encryption"]["recipients"]
    name = os.path.basename(backup_file)
    if manifest.get("file") != name:
        raise AgeError("%s %s is for %r, not %r" % ("manifest" if local else "sealed manifest", manifest_path,
                                                    manifest.get("file"), name))
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


def _local_manifest(manifest_path):
    """The parsed manifest of a backup encrypted on the host (plaintext JSON with an ``encryption`` block), or
    ``None`` when the manifest is age ciphertext (a sealed copy, objects downloaded as they are) or absent."""
    try:
        with open(manifest_path, "rb") as fh:
            data = fh.read(backup_format.MAX_MANIFEST_SIZE + 1)
    except OSError:
        return None
    if agecrypt.is_age(data):
        return None
    try:
        manifest = backup_format.parse_manifest(data)
    except ValueError as exc:
        raise AgeError("manifest %s is neither age ciphertext nor JSON: %s" % (manifest_path, exc))
    if not isinstance(manifest, dict) or backup_format.local_encryption(manifest) is None:
        raise AgeError("manifest %s is plaintext without an encryption block, but its dump is age ciphertext"
                       % manifest_path)
    return manifest


@contextlib.contextmanager
def opened_backup(backup_file, identities, what="read"):
    """Yield the path of a plaintext backup: ``backup_file`` itself when it is not age ciphertext, else a
    decrypted copy (:func:`decrypted_backup`); an encrypted one without ``identities`` raises
    :class:`AgeError` saying that an identity is needed."""
    if not is_encrypted_backup(backup_file):
        yield backup_file
        return
    if not identities:
        raise AgeError("%s is age-encrypted: give identity_file or identity to %s it" % (backup_file, what))
    with decrypted_backup(backup_file, identities) as plain:
        yield plain


def ciphertext_check(backup_file):
    """Integrity of an encrypted backup without an identity: its sha256 and size against the seal
    record beside it (``<file>.seal.json``), or, for a backup encrypted on the host, against its
    plaintext manifest's ``encryption`` block (the manifest is checked as for any backup).  Returns a
    result dict with ``decrypted: false``."""
    result = {"backup": backup_file, "decrypted": False, "encrypted": True, "ok": False}
    try:
        local = _local_manifest(backup_file + backup_format.MANIFEST_SUFFIX)
    except AgeError as exc:
        result["msg"] = "%s is age ciphertext and no identity was given; %s" % (backup_file, exc)
        return result
    if local is not None:
        problem = backup_format.backup_problem(backup_file, local, verify_checksum=True)
        enc = backup_format.stored_file(local)
        result.update(manifest=local, recipients=enc.get("recipients"), sha256=enc.get("sha256"),
                      size=enc.get("size"))
        if problem:
            result["msg"] = "%s is not a valid backup: %s" % (backup_file, problem)
            return result
        result["ok"] = True
        result["msg"] = ("ciphertext integrity verified (sha256 matches the manifest's encryption block); NOT "
                         "decrypted and NOT restored: no identity was given (run the restore test where the "
                         "identity lives)")
        return result
    record = _load_record(backup_file + backup_format.SEAL_RECORD_SUFFIX)
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
