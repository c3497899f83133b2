# -*- coding: utf-8 -*-
# Copyright: baileys.resilience contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Disaster recovery: :func:`fetch` the newest backup that verifies, failing over across targets.

Part of the S3 code (s3.py is the map).  Lists every target, reads and checks the remote
manifests (backup_format.py), orders the candidates (``selection``: SELECTIONS) and
downloads the first one that verifies; :func:`restore_fetched` hands the result to a
restore callable.  The module ``s3_fetch`` and the cron tool call it; imports s3conf,
s3objects, backup_format and fsutil.  No Ansible import.

Invariants
----------
* A target that cannot be listed is skipped with a warning; a candidate that is missing,
  does not match its manifest or cannot be read is reported and the next one is tried.
* Downloads go to a temporary file in the destination directory, are hashed
  while written, flushed to disk, compared with the manifest (and the object's
  ``sha256`` metadata), and only then renamed into place (mode 0600); the manifest is
  written beside the dump after it.
* A backup already in the destination that verifies is not downloaded again; check mode
  downloads and writes nothing.
* Encrypted backups (age, docs/encryption.md) need identities: the manifest object is decrypted
  in memory, the dump is decrypted while it downloads into the same temporary file (0600), the
  ciphertext is checked against the sealed manifest's ``encryption`` block and the plaintext
  against the manifest; the manifest written beside the dump is the original's exact bytes.  An
  identity that does not match fails the candidate with the recipient fingerprints it was made
  for, and leaves no file.
"""
from __future__ import absolute_import, division, print_function

import os
import time

from . import agecrypt, backup_format, fsutil, s3conf, s3objects

__metaclass__ = type

SELECTIONS = ("newest", "target_order")  # candidate orders, see _order_candidates


# --------------------------------------------------------------------------- candidates


def _open_manifest(raw, meta, identities, target, key, locked):
    """``(manifest, manifest bytes for dest_dir, encryption block or None)``, or ``None`` (with
    ``locked`` told why) for an encrypted manifest that cannot be opened."""
    if not agecrypt.is_age(raw):
        return backup_format.parse_manifest(raw), raw, None
    made_for = [r for r in (meta.get("age-recipients") or "").split(",") if r]
    what = "s3://%s/%s on target %s" % (target["bucket"], key, target["name"])
    if not identities:
        locked.append("%s is age-encrypted (to %s): give identity_file or identity to fetch it"
                      % (what, ", ".join(made_for) or "recipients not recorded"))
        return None
    try:
        plain = agecrypt.decrypt_bytes(raw, identities, made_for, what)
    except agecrypt.AgeError as exc:
        locked.append(str(exc))
        return None
    sealed, original, manifest = backup_format.open_sealed_manifest(plain)
    return manifest, original, sealed["encryption"]


def _list_candidates(client, target, policy, name_prefix, backup_name, on_retry, warnings, identities=None,
                     locked=None):
    """Remote backups on one target (manifests read and checked), newest first."""
    locked = [] if locked is None else locked
    pattern = s3objects.backup_name_re(name_prefix)
    listing = s3objects.list_objects(client, target, policy, on_retry)
    found = []
    for key in sorted(listing):
        kind, _sep, base = key[len(target["prefix"]):].partition("/")
        if (kind not in backup_format.KINDS or "/" in base
                or not base.endswith(backup_format.DUMP_SUFFIX + backup_format.MANIFEST_SUFFIX)):
            continue
        name = base[: -len(backup_format.MANIFEST_SUFFIX)]
        if not pattern.match(name) or (backup_name and name != backup_name):
            continue
        if listing[key] > backup_format.MAX_MANIFEST_SIZE:
            warnings.append("target %s: manifest %s is too large, ignored" % (target["name"], key))
            continue
        raw = bytearray()
        try:
            _sha, _size, meta = s3objects.stream_object(client, target["bucket"], key, policy, sink=raw.extend,
                                                        on_retry=on_retry)
            opened = _open_manifest(bytes(raw), meta, identities, target, key, locked)
            if opened is None:
                continue
            manifest, manifest_bytes, encryption = opened
        except (ValueError, UnicodeDecodeError) as exc:
            warnings.append("target %s: manifest %s unparsable (%s), ignored" % (target["name"], key, exc))
            continue
        problem = backup_format.manifest_problem(manifest, name)
        if problem:
            warnings.append("target %s: manifest %s ignored: %s" % (target["name"], key, problem))
            continue
        dump_key = s3objects.object_key(target, name, kind)
        found.append({"name": name, "key": dump_key, "manifest_key": key, "encryption": encryption,
                      "manifest": manifest, "manifest_bytes": manifest_bytes, "created_at": manifest["created_at"],
                      "dump_listed": dump_key in listing})
    found.sort(key=lambda c: (c["created_at"], c["name"]), reverse=True)
    return found


def _order_candidates(per_target, selection):
    """Candidate order.

    ``newest``: every backup from newest to oldest (by ``created_at``); for one
    backup, the targets in the order given.  So a corrupted newest copy on the
    first target is followed by the same backup on the next target, and only
    then by older backups.
    ``target_order``: the first target's backups newest to oldest, then the
    next target's, and so on.
    """
    flat = []
    for ti, cands in enumerate(per_target):
        for c in cands:
            flat.append((ti, c))
    if selection == "target_order":
        flat.sort(key=lambda x: (x[0], _neg(x[1]["created_at"]), _neg(x[1]["name"])))
    else:
        flat.sort(key=lambda x: (_neg(x[1]["created_at"]), _neg(x[1]["name"]), x[0]))
    return flat


def _neg(text):
    """Sort key that orders strings descending inside an ascending sort."""
    return tuple(-ord(c) for c in text) + (1,)


def _download_to(client, target, cand, dest_dir, policy, on_retry, identities=None):
    """Download a candidate's dump into a temp file in ``dest_dir``; return (temp path, sha, size, meta).

    For an encrypted candidate the file gets the plaintext (decrypted while downloading): ``sha`` and
    ``size`` are then the plaintext's, and ``meta`` gets ``_ciphertext`` (its sha256 and size)."""
    tmp = os.path.join(dest_dir, "%s%d-%s" % (fsutil.TEMP_PREFIX, os.getpid(), cand["name"]))
    fsutil._unlink_quiet(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb", buffering=0, closefd=False) as fh:
            def sink(chunk):
                view = memoryview(chunk)
                while view:
                    view = view[fh.write(view):]
            if cand.get("encryption"):
                what = "s3://%s/%s on target %s" % (target["bucket"], cand["key"], target["name"])
                dec = agecrypt.StreamDecryptor(fh, identities, cand["encryption"].get("recipients"), what)
                try:
                    ct_sha, ct_size, meta = s3objects.stream_object(client, target["bucket"], cand["key"], policy,
                                                                    sink=dec.feed, on_retry=on_retry)
                except BaseException:
                    dec.abort()
                    raise
                sha, size = dec.finish()
                meta = dict(meta, _ciphertext=(ct_sha, ct_size))
            else:
                sha, size, meta = s3objects.stream_object(client, target["bucket"], cand["key"], policy, sink=sink,
                                                          on_retry=on_retry)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        fsutil._unlink_quiet(tmp)
        raise
    os.close(fd)
    return tmp, sha, size, meta


# --------------------------------------------------------------------------- fetch (disaster recovery)


def fetch(dest_dir, targets, settings=None, name_prefix=backup_format.DEFAULT_PREFIX, backup_name=None,
          selection="newest", client_factory=s3conf.make_client, log=None, identities=None):
    """Download the newest backup whose sha256 verifies, with failover across targets.

    Every target is listed (a target that cannot be listed is skipped with a
    warning); candidates are tried in the order of :func:`_order_candidates`.
    A candidate whose bytes do not hash to the manifest's sha256 (or whose
    ``sha256`` metadata disagrees with the manifest) is reported in
    ``warnings`` and the next one is tried.  The verified dump is renamed into
    ``dest_dir`` (0600) and its manifest written beside it.  When the same
    backup is already there and verifies, nothing is downloaded
    (``changed=false``).  Check mode picks the candidate (manifest read, dump
    HEAD checked) and downloads nothing.  Raises :class:`s3conf.S3Error` when no
    candidate verifies.

    ``identities`` (agecrypt.load_identities) open encrypted backups; without them an encrypted
    backup is not a candidate, and the error says so.
    """
    started = time.monotonic()
    settings = settings or s3conf.Settings()
    targets = s3conf.normalize_targets(targets)
    s3conf.require_boto3()
    if selection not in SELECTIONS:
        raise s3conf.S3Error("selection must be one of %s" % ", ".join(SELECTIONS))
    if backup_name and not s3objects.backup_name_re(name_prefix).match(backup_name):
        raise s3conf.S3Error("backup_name %r is not a backup name with prefix %r" % (backup_name, name_prefix))
    warnings = []
    tried = []
    _log = log or (lambda _msg: None)
    dest_dir = os.path.abspath(dest_dir)
    if not os.path.isdir(dest_dir):
        if settings.check_mode:
            pass
        else:
            try:
                os.mkdir(dest_dir, 0o700)
            except OSError as exc:
                raise s3conf.S3Error("cannot create dest_dir %s: %s" % (dest_dir, exc.strerror or exc))

    for t in targets:
        w = s3conf.credentials_file_warning(t)
        if w:
            warnings.append(w)
    clients, policies, per_target, locked = [], [], [], []
    for t in targets:
        policy = settings.policy()
        policies.append(policy)

        def on_retry(attempt, exc, t=t):
            _log("target %s: attempt %d failed (%s), retrying" % (t["name"], attempt, s3conf.error_text(exc)))
        try:
            client = client_factory(t, settings)
            cands = _list_candidates(client, t, policy, name_prefix, backup_name, on_retry, warnings, identities,
                                     locked)
        except (s3conf.BotoCoreError, s3conf.ClientError, OSError, s3conf.S3Error) as exc:
            text = str(exc) if isinstance(exc, s3conf.S3Error) else s3conf.error_text(exc)
            warnings.append("target %s skipped: %s" % (s3conf.describe_target(t), text))
            tried.append({"target": t["name"], "key": None, "outcome": "unreachable" if s3conf.is_connection_error(exc)
                          else "error", "error": text})
            clients.append(None)
            per_target.append([])
            continue
        clients.append(client)
        per_target.append(cands)

    result = {"changed": False, "check_mode": settings.check_mode, "dest_dir": dest_dir, "path": None,
              "manifest_path": None, "manifest": None, "target": None, "bucket": None, "key": None,
              "tried": tried, "warnings": warnings, "seconds": 0.0, "downloaded_bytes": 0}
    for ti, cand in _order_candidates(per_target, selection):
        t, client, policy = targets[ti], clients[ti], policies[ti]
        m = cand["manifest"]
        entry = {"target": t["name"], "key": cand["key"], "created_at": cand["created_at"], "outcome": None,
                 "error": None}
        tried.append(entry)
        final = os.path.join(dest_dir, cand["name"])
        final_manifest = final + backup_format.MANIFEST_SUFFIX

        def on_retry(attempt, exc, t=t, key=cand["key"]):
            _log("target %s: GET %s attempt %d failed (%s), retrying"
                 % (t["name"], key, attempt, s3conf.error_text(exc)))
        try:
            if not cand["dump_listed"]:
                raise s3conf.VerifyError("dump object missing (manifest without dump)")
            head = s3objects.head_object(client, t["bucket"], cand["key"], policy, on_retry)
            enc = cand["encryption"]
            problem = s3objects.head_problem(head, *((enc["size"], enc["sha256"]) if enc else (m["size"], m["sha256"])))
            if problem:
                raise s3conf.VerifyError("object does not match its manifest: %s" % problem)
            local_ok = _local_matches(final, m)
            if settings.check_mode:
                entry["outcome"] = "present" if local_ok else "would_fetch"
                result.update(changed=not local_ok or not _manifest_matches(final_manifest, cand["manifest_bytes"]))
            elif local_ok:
                entry["outcome"] = "present"
                if not _manifest_matches(final_manifest, cand["manifest_bytes"]):
                    fsutil.atomic_write(final_manifest, cand["manifest_bytes"], mode=0o600)
                    result["changed"] = True
            else:
                tmp, sha, size, meta = _download_to(client, t, cand, dest_dir, policy, on_retry, identities)
                result["downloaded_bytes"] = size
                bad = None
                if enc:
                    ct_sha, ct_size = meta["_ciphertext"]
                    if ct_size != enc["size"] or ct_sha != enc["sha256"]:
                        bad = "ciphertext %d bytes with sha256 %s, manifest says %d, %s" % (
                            ct_size, ct_sha, enc["size"], enc["sha256"])
                    meta = {}
                if bad:
                    pass
                elif size != m["size"]:
                    bad = "%d bytes, manifest says %d" % (size, m["size"])
                elif sha != m["sha256"]:
                    bad = "sha256 %s, manifest says %s" % (sha, m["sha256"])
                elif meta.get(s3objects.META_SHA256) and meta[s3objects.META_SHA256] != m["sha256"]:
                    bad = "sha256 metadata %s, manifest says %s" % (meta[s3objects.META_SHA256], m["sha256"])
                if bad:
                    fsutil._unlink_quiet(tmp)
                    raise s3conf.CorruptObject(bad)
                os.rename(tmp, final)
                fsutil.fsync_dir(dest_dir)
                fsutil.atomic_write(final_manifest, cand["manifest_bytes"], mode=0o600)
                entry["outcome"] = "fetched"
                result["changed"] = True
        except s3conf.CorruptObject as exc:
            entry.update(outcome="corrupt", error=str(exc))
            warnings.append("corrupted object s3://%s/%s on target %s: %s; trying the next candidate"
                            % (t["bucket"], cand["key"], t["name"], exc))
            continue
        except agecrypt.AgeError as exc:
            entry.update(outcome="wrong_identity" if isinstance(exc, agecrypt.WrongIdentity) else "undecryptable",
                         error=str(exc))
            warnings.append("%s; trying the next candidate" % exc)
            continue
        except s3conf.VerifyError as exc:
            entry.update(outcome="invalid", error=str(exc))
            warnings.append("s3://%s/%s on target %s: %s; trying the next candidate"
                            % (t["bucket"], cand["key"], t["name"], exc))
            continue
        except (s3conf.BotoCoreError, s3conf.ClientError, OSError) as exc:
            entry.update(outcome="error", error=s3conf.error_text(exc))
            warnings.append("s3://%s/%s on target %s failed: %s; trying the next candidate"
                            % (t["bucket"], cand["key"], t["name"], s3conf.error_text(exc)))
            continue
        result.update(path=final, manifest_path=final_manifest, manifest=m, target=t["name"], bucket=t["bucket"],
                      key=cand["key"], name=cand["name"], decrypted=bool(enc),
                      recipients=enc["recipients"] if enc else [])
        result["seconds"] = round(time.monotonic() - started, 3)
        return result
    result["seconds"] = round(time.monotonic() - started, 3)
    summary = "; ".join("%s %s: %s%s" % (e["target"], e["key"] or "(listing)", e["outcome"],
                                         " (%s)" % e["error"] if e["error"] else "") for e in tried)
    if locked:
        summary = "; ".join(([summary] if summary else []) + sorted(set(locked)))
    raise s3conf.FetchError("no backup%s could be fetched and verified from any target: %s" % (
        " %s" % backup_name if backup_name else "", summary or "no backups found under the targets' prefixes"),
        result)


def _local_matches(path, manifest):
    if backup_format.dump_problem(path, manifest):
        return False
    sha, _size = backup_format.sha256_file(path)
    return sha == manifest["sha256"]


def _manifest_matches(path, data):
    try:
        with open(path, "rb") as fh:
            return fh.read(backup_format.MAX_MANIFEST_SIZE + 1) == data
    except OSError:
        return False


def restore_fetched(fetch_result, restore):
    """Optional DR step: hand the fetched dump to ``restore(dump_path, manifest)`` (e.g. a pg_restore wrapper).

    The callable does the database work (for instance
    ``backup.restore_backup`` or ``backup.verify_backup`` bound to connection
    parameters); this only checks that the fetch produced a verified file.
    """
    if not fetch_result.get("path") or fetch_result.get("check_mode"):
        raise s3conf.S3Error("nothing fetched to restore")
    return restore(fetch_result["path"], fetch_result["manifest"])
