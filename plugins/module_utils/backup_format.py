# -*- coding: utf-8 -*-
# Copyright: baileys.resilience contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The backup file rules of docs/backup-format.md, in one place.

A backup is ``<prefix>-<YYYYmmdd>T<HHMMSS>Z.dump`` with ``<name>.manifest.json`` beside it.  Here
are those names, the manifest format version, the sha256 of a dump, reading a manifest and the
checks that decide whether a manifest (and its dump) is a valid backup.  The backup rooms
(backup.py making, backupfiles.py listing and retention, backupcheck.py verifying and restoring),
the S3 rooms (s3replicate.py, s3fetch.py, s3objects.py: replicating, fetching) and health.py
(reporting) take them from here.

Standard library only: no Ansible, psycopg or boto3 import, so any of them can import it.
"""
from __future__ import absolute_import, division, print_function

import datetime
import hashlib
import json
import os
import re
import stat

__metaclass__ = type

FORMAT = 1
DEFAULT_PREFIX = "baileys-auth"
DUMP_SUFFIX = ".dump"
MANIFEST_SUFFIX = ".manifest.json"
PARTIAL_SUFFIX = ".partial"
KINDS = ("daily", "monthly")
MAX_MANIFEST_SIZE = 1024 * 1024
STAMP_FORMAT = "%Y%m%dT%H%M%SZ"
CREATED_AT_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
PREFIX_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_STAMP_PATTERN = r"\d{8}T\d{6}Z"
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1024 * 1024
ANY_PREFIX = object()  # for name_pattern and name_re: any prefix of PREFIX_PATTERN
# encrypted copies (docs/encryption.md): the sealed copies of a backup directory live in SEALED_DIR
SEALED_DIR = ".sealed"
SEAL_RECORD_SUFFIX = ".seal.json"
ENCRYPTION_FORMAT = "age-v1"
# a backup encrypted on the host (encrypt_local): its ciphertext is written as <name>.age.partial, then renamed
ENCRYPTING_SUFFIX = ".age" + PARTIAL_SUFFIX


# --------------------------------------------------------------------------- names


def backup_name(prefix, when):
    """``<prefix>-<YYYYmmdd>T<HHMMSS>Z.dump`` for a UTC datetime."""
    return "%s-%s%s" % (prefix, when.strftime(STAMP_FORMAT), DUMP_SUFFIX)


def name_pattern(prefix, suffix=""):
    """Regex text (not anchored) of ``<prefix>-<stamp>.dump<suffix>``; group 1 is the stamp.

    ``prefix`` :data:`ANY_PREFIX` stands for any prefix of letters, digits, ``.``, ``_`` and ``-``.
    """
    return "%s-(%s)%s" % (PREFIX_PATTERN if prefix is ANY_PREFIX else re.escape(prefix), _STAMP_PATTERN,
                          re.escape(DUMP_SUFFIX + suffix))


def name_re(prefix, suffix=""):
    """:func:`name_pattern` compiled, matching a whole name."""
    return re.compile("^%s$" % name_pattern(prefix, suffix))


def stamp_iso(stamp):
    """'20261124T030000Z' -> '2026-11-24T03:00:00Z' (a manifest's ``created_at``)."""
    return "%s-%s-%sT%s:%s:%sZ" % (stamp[0:4], stamp[4:6], stamp[6:8], stamp[9:11], stamp[11:13], stamp[13:15])


def parse_created_at(text):
    """A manifest's ``created_at`` as an aware UTC datetime, or ``None`` when it is not one."""
    try:
        return datetime.datetime.strptime(text, CREATED_AT_FORMAT).replace(tzinfo=datetime.timezone.utc)
    except (TypeError, ValueError):
        return None


# --------------------------------------------------------------------------- files


def sha256_file(path):
    """``(hex sha256, size)`` of a file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while True:
            n = fh.readinto(buf)
            if not n:
                break
            digest.update(view[:n])
            size += n
    return digest.hexdigest(), size


def load_manifest(manifest_path, limit=None):
    """``(raw bytes, parsed JSON)`` of a manifest file, reading at most ``limit`` bytes when given.

    Raises ``OSError`` (``FileNotFoundError`` when absent) or ``ValueError`` (not UTF-8 JSON);
    the callers word these their own way.  The parsed value may be any JSON value.
    """
    with open(manifest_path, "rb") as fh:
        raw = fh.read() if limit is None else fh.read(limit)
    return raw, parse_manifest(raw)


def parse_manifest(raw):
    """The JSON value of a manifest's bytes; raises ``ValueError`` when they are not UTF-8 JSON."""
    return json.loads(raw.decode("utf-8"))


def manifest_bytes(manifest):
    """The bytes of a manifest file as a backup writes them (indented UTF-8 JSON, a final newline)."""
    return (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


# --------------------------------------------------------------------------- checks


def is_validated(manifest):
    """Whether the manifest records that ``pg_restore --list`` and the row counts passed."""
    validated = manifest.get("validated") or {}
    return (isinstance(validated, dict) and validated.get("restore_list") is True
            and validated.get("row_counts") is True)


def _identity_problem(manifest, name):
    if manifest.get("format") != FORMAT:
        return "manifest format %r is not %d" % (manifest.get("format"), FORMAT)
    if manifest.get("file") != name:
        return "manifest is for %r, not %r" % (manifest.get("file"), name)
    return None


def _validation_problem(manifest):
    return None if is_validated(manifest) else "manifest does not record a successful validation"


def _fields_problem(manifest):
    if not isinstance(manifest.get("sha256"), str) or not _SHA_RE.match(manifest["sha256"]):
        return "manifest has no valid sha256"
    size = manifest.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        return "manifest has no valid size"
    if not isinstance(manifest.get("created_at"), str):
        return "manifest has no created_at"
    if manifest.get("kind", "daily") not in KINDS:
        return "manifest kind %r is not one of %s" % (manifest.get("kind"), ", ".join(KINDS))
    return None


def manifest_problem(manifest, name):
    """Why a parsed manifest does not describe a valid backup ``name``, or ``None``.

    No file access (for a manifest in S3, or before the dump is looked at): every field a copy
    needs (``sha256``, ``size``, ``created_at``, ``kind``) must be well formed, and so must the
    ``encryption`` block of a backup encrypted on the host (:func:`local_encryption_problem`).
    """
    if not isinstance(manifest, dict):
        return "manifest is not a JSON object"
    return (_identity_problem(manifest, name) or _fields_problem(manifest) or _validation_problem(manifest)
            or _local_problem(manifest))


def checksum_problem(dump_path, manifest):
    """Hash the dump: ``None`` when its size and sha256 are the manifest's, else the reason.

    The manifest's ``sha256`` is the plaintext's: for a dump encrypted on the host (a manifest with an
    ``encryption`` block) this is the reason, since its plaintext cannot be hashed without an identity;
    :func:`dump_problem` checks such a file against its ciphertext hashes.
    """
    if local_encryption(manifest) is not None:
        return ("the dump is age ciphertext (encrypted on the host, encrypt_local): its plaintext cannot be hashed "
                "without an identity (replication uploads it as it is only with encryption recipients set)")
    return _digest_problem(dump_path, manifest)


def _digest_problem(dump_path, manifest):
    try:
        sha, size = sha256_file(dump_path)
    except OSError as exc:
        return "dump unreadable: %s" % (exc.strerror or exc)
    if size != manifest.get("size"):
        return "size %d differs from the manifest's %r" % (size, manifest.get("size"))
    if sha != manifest.get("sha256"):
        return "sha256 %s differs from the manifest's %s" % (sha, manifest.get("sha256"))
    return None


def dump_problem(dump_path, manifest, verify_checksum=False):
    """Why the dump file does not match its manifest (a regular file of its size; with
    ``verify_checksum`` also its sha256), or ``None``."""
    try:
        st = os.stat(dump_path, follow_symlinks=False)
    except OSError as exc:
        return "dump unreadable: %s" % (exc.strerror or exc)
    if not stat.S_ISREG(st.st_mode):
        return "dump is not a regular file"
    stored = stored_file(manifest)
    if st.st_size != stored.get("size"):
        return "size %d differs from the manifest's %r%s" % (st.st_size, stored.get("size"), _ct(manifest))
    if not verify_checksum:
        return None
    problem = _digest_problem(dump_path, stored)
    return problem + _ct(manifest) if problem else None


def _ct(manifest):
    return " (the ciphertext's)" if local_encryption(manifest) is not None else ""


def backup_problem(dump_path, manifest, verify_checksum=False):
    """Why a dump and its parsed manifest (a dict) are not a valid backup, or ``None``.

    The manifest must be for this dump and record a successful validation; the dump must be a
    regular file of the manifest's size (and, with ``verify_checksum``, sha256).
    """
    return (_identity_problem(manifest, os.path.basename(dump_path)) or _validation_problem(manifest)
            or _local_problem(manifest) or dump_problem(dump_path, manifest, verify_checksum))


def backup_problems(dump_path, manifest, verify_checksum=False):
    """Every reason, in the health report's words, why a dump and its parsed manifest (a dict) are
    not a valid backup: a list, empty when valid.

    Besides what :func:`backup_problem` checks, ``created_at`` must parse; the dump's size is
    taken through a symlink.
    """
    name = os.path.basename(dump_path)
    problems = []
    if manifest.get("format") != FORMAT:
        problems.append("unknown manifest format %r" % (manifest.get("format"),))
    if manifest.get("file") != name:
        problems.append("manifest names %r, expected %r" % (manifest.get("file"), name))
    if not is_validated(manifest):
        problems.append("not validated (restore_list/row_counts)")
    local = _local_problem(manifest)
    if local:
        problems.append(local)
    stored = stored_file(manifest)
    try:
        st = os.stat(dump_path)
        if st.st_size != stored.get("size"):
            problems.append("size %d differs from manifest %r%s" % (st.st_size, stored.get("size"), _ct(manifest)))
        elif verify_checksum and sha256_file(dump_path)[0] != stored.get("sha256"):
            problems.append("sha256 differs from manifest%s" % _ct(manifest))
    except OSError as exc:
        problems.append("dump file missing: %s" % (exc.strerror or exc))
    if parse_created_at(manifest.get("created_at")) is None:
        problems.append("bad created_at %r" % (manifest.get("created_at"),))
    return problems


# --------------------------------------------------------------------------- encrypted copies


def sealed_paths(backup_dir, name):
    """``(dump, manifest, record)`` paths of the encrypted copy of backup ``name`` of ``backup_dir``:
    ``<backup_dir>/.sealed/<name>`` (age ciphertext of the dump), ``<name>.manifest.json`` (age
    ciphertext of the sealed manifest) and ``<name>.seal.json`` (plaintext record: hashes and
    recipient fingerprints, no secret)."""
    base = os.path.join(backup_dir, SEALED_DIR, name)
    return base, base + MANIFEST_SUFFIX, base + SEAL_RECORD_SUFFIX


def sealed_manifest(manifest_raw, manifest, encryption):
    """The plaintext of an encrypted copy's manifest object: the manifest's fields, an ``encryption``
    block (``format``, ``recipients`` fingerprints, ``sha256``/``size`` of the ciphertext dump) and
    ``plain_manifest``, the manifest file's exact text (written back on a decrypting fetch)."""
    sealed = dict(manifest)
    sealed["encryption"] = dict(encryption, format=ENCRYPTION_FORMAT)
    sealed["plain_manifest"] = manifest_raw.decode("utf-8")
    return (json.dumps(sealed, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _block_problem(enc):
    if not isinstance(enc, dict):
        return "manifest has no encryption block"
    if enc.get("format") != ENCRYPTION_FORMAT:
        return "encryption format %r is not %s" % (enc.get("format"), ENCRYPTION_FORMAT)
    if not isinstance(enc.get("sha256"), str) or not _SHA_RE.match(enc["sha256"]):
        return "encryption block has no valid sha256"
    if not isinstance(enc.get("size"), int) or isinstance(enc.get("size"), bool) or enc["size"] < 0:
        return "encryption block has no valid size"
    if not isinstance(enc.get("recipients"), list) or not enc["recipients"]:
        return "encryption block names no recipient"
    return None


def encryption_problem(manifest):
    """Why a sealed manifest's ``encryption`` block is not usable, or ``None``."""
    problem = _block_problem(manifest.get("encryption"))
    if problem is None and not isinstance(manifest.get("plain_manifest"), str):
        return "sealed manifest has no plain_manifest"
    return problem


def open_sealed_manifest(plain):
    """``(sealed manifest dict, the original manifest bytes, the original parsed)`` from the decrypted
    manifest object; ``ValueError`` when it is not one."""
    sealed = parse_manifest(plain)
    if not isinstance(sealed, dict):
        raise ValueError("sealed manifest is not a JSON object")
    problem = encryption_problem(sealed)
    if problem:
        raise ValueError(problem)
    raw = sealed["plain_manifest"].encode("utf-8")
    return sealed, raw, parse_manifest(raw)


# --------------------------------------------------------------------------- backups encrypted on the host
#
# With encrypt_local the backup job encrypts the validated dump itself: ``<name>.dump`` is age ciphertext and its
# manifest stays plaintext JSON (readable without an identity: listing, retention, integrity, health) with the
# manifest's usual fields (``sha256``/``size``: the plaintext dump's) and, last, an ``encryption`` block:
# ``format``, ``recipients`` (fingerprints), ``sha256``/``size`` of the ciphertext file, ``plain_manifest_sha256``
# (the manifest without the block, as :func:`manifest_bytes` writes it: the exact file a decrypting reader or fetch
# gives back) and ``sealed_manifest`` (base64 of the age ciphertext of :func:`sealed_manifest`, made once with the
# dump: the manifest object replication uploads) with its ``sealed_manifest_sha256``.


def local_encryption(manifest):
    """The ``encryption`` block of a local manifest whose dump is age ciphertext (encrypt_local), or ``None``."""
    return manifest.get("encryption") if isinstance(manifest, dict) else None


def plain_manifest(manifest):
    """A local manifest without its ``encryption`` block: the manifest of the plaintext dump."""
    return {k: v for k, v in manifest.items() if k != "encryption"}


def stored_file(manifest):
    """What the dump file on disk must hash to (a dict with ``sha256`` and ``size``): the ciphertext's for a
    dump encrypted on the host, else the manifest's own fields."""
    enc = local_encryption(manifest)
    return enc if isinstance(enc, dict) else manifest


def local_encryption_problem(manifest):
    """Why the ``encryption`` block of a local manifest (encrypt_local) is not usable, or ``None``."""
    enc = manifest.get("encryption")
    problem = _block_problem(enc)
    if problem:
        return problem
    for key in ("plain_manifest_sha256", "sealed_manifest_sha256"):
        if not isinstance(enc.get(key), str) or not _SHA_RE.match(enc[key]):
            return "encryption block has no valid %s" % key
    if not isinstance(enc.get("sealed_manifest"), str) or not enc["sealed_manifest"]:
        return "encryption block has no sealed_manifest"
    if hashlib.sha256(manifest_bytes(plain_manifest(manifest))).hexdigest() != enc["plain_manifest_sha256"]:
        return "the manifest's fields differ from the ones recorded when the dump was encrypted"
    return None


def _local_problem(manifest):
    return None if local_encryption(manifest) is None else local_encryption_problem(manifest)
