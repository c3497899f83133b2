# -*- coding: utf-8 -*-
# Copyright: baileys.resilience contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Key rotation: :func:`reencrypt` the retained backups on S3 to the current recipients.

Part of the S3 code (s3.py is the map).  After a recipient is added or removed, new backups are
sealed for the new set by replication; the objects already on the targets (the monthlies kept
longer than the local backups, among them) are re-encrypted here: each dump is streamed S3 ->
decrypt (an identity of the old set) -> encrypt (the new set) -> a 0600 ciphertext file in a
private directory -> S3, then its sealed manifest.  Plaintext objects are encrypted the same way
(turning encryption on for what is already there).  The ``baileys-resilience reencrypt`` command
calls it; imports agecrypt, backup_format, s3conf, s3objects and s3replicate (its upload and
verification).  No Ansible import.

Invariants
----------
* Plaintext never reaches a disk: it only passes through two pipes in memory.
* The plaintext is hashed on its way and must equal the manifest's sha256 before anything is
  uploaded; the new dump is verified on the target (HEAD: size and ciphertext sha256) before its
  manifest is replaced, and the manifest is verified too.
* Idempotent: an object pair whose metadata already names the current recipients is skipped
  without being read; a dump already re-encrypted whose manifest is not (an interrupted run) gets
  only its manifest.
"""
from __future__ import absolute_import, division, print_function

import hashlib
import os
import shutil
import tempfile
import time

from . import agecrypt, backup_format, s3conf, s3objects, s3replicate

__metaclass__ = type

META_RECIPIENTS = "age-recipients"


def _recipients_of(head):
    meta = {k.lower(): v for k, v in ((head or {}).get("Metadata") or {}).items()}
    return meta.get(META_RECIPIENTS) or ""


def _manifest_keys(listing, target, name_prefix):
    pattern = s3objects.backup_name_re(name_prefix)
    for key in sorted(listing):
        kind, _sep, base = key[len(target["prefix"]):].partition("/")
        if kind not in backup_format.KINDS or "/" in base:
            continue
        if not base.endswith(backup_format.DUMP_SUFFIX + backup_format.MANIFEST_SUFFIX):
            continue
        name = base[: -len(backup_format.MANIFEST_SUFFIX)]
        if pattern.match(name):
            yield key, name, s3objects.object_key(target, name, kind)


class _Rekey:
    def __init__(self, run, encryption, identities, work_dir, log):
        self.run = run
        self.enc = encryption
        self.identities = identities
        self.work_dir = work_dir
        self.log = log
        self.current = ",".join(encryption.fingerprints)
        self.meta = {META_RECIPIENTS: self.current}

    def read_manifest(self, key):
        t = self.run.t
        raw = bytearray()
        _sha, _size, meta = s3objects.stream_object(self.run.client, t["bucket"], key, self.run.policy,
                                                    sink=raw.extend)
        raw = bytes(raw)
        if not agecrypt.is_age(raw):
            return raw, backup_format.parse_manifest(raw), None
        made_for = [r for r in (meta.get(META_RECIPIENTS) or "").split(",") if r]
        plain = agecrypt.decrypt_bytes(raw, self.identities, made_for, "s3://%s/%s" % (t["bucket"], key))
        sealed, original, manifest = backup_format.open_sealed_manifest(plain)
        return original, manifest, sealed["encryption"]

    def rekey_dump(self, dump_key, name, manifest, old_enc):
        """Stream the dump through decrypt (when encrypted) and encrypt into a ciphertext file; upload it."""
        t = self.run.t
        ct_path = os.path.join(self.work_dir, name + ".age")
        fd = os.open(ct_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "wb", buffering=1024 * 1024) as out:
                encryptor = agecrypt.StreamEncryptor(out, self.enc)
                decryptor = None
                sink = encryptor.write
                if old_enc:
                    decryptor = agecrypt.StreamDecryptor(encryptor, self.identities, old_enc.get("recipients"),
                                                         "s3://%s/%s" % (t["bucket"], dump_key))
                    sink = decryptor.feed
                try:
                    s3objects.stream_object(self.run.client, t["bucket"], dump_key, self.run.policy, sink=sink,
                                            expected_size=old_enc["size"] if old_enc else manifest["size"])
                    if decryptor is not None:
                        decryptor.finish()
                    plain_sha, plain_size = encryptor.finish()
                except BaseException:
                    if decryptor is not None:
                        decryptor.abort()
                    encryptor.abort()
                    raise
                out.flush()
                os.fsync(out.fileno())
            if plain_sha != manifest["sha256"] or plain_size != manifest["size"]:
                raise s3conf.CorruptObject("plaintext of %s is %d bytes with sha256 %s; its manifest says %s, %s"
                                           % (dump_key, plain_size, plain_sha, manifest["size"], manifest["sha256"]))
            sha, size = backup_format.sha256_file(ct_path)
            checksum = self.run.upload_file(dump_key, ct_path, size, sha, self.meta)
            self.run.verify_after_upload(dump_key, size, sha, checksum)
            return {"recipients": self.enc.fingerprints, "sha256": sha, "size": size}
        finally:
            try:
                os.unlink(ct_path)
            except OSError:
                pass

    def put_manifest(self, man_key, raw, manifest, new_enc):
        plain = backup_format.sealed_manifest(raw, manifest, new_enc)
        data = agecrypt.encrypt_bytes(plain, self.enc)
        sha = hashlib.sha256(data).hexdigest()
        checksum = self.run.put_bytes(man_key, data, sha, self.meta)
        self.run.verify_after_upload(man_key, len(data), sha, checksum)

    def one(self, man_key, name, dump_key, out):
        run = self.run
        head_m = s3objects.head_object(run.client, run.t["bucket"], man_key, run.policy)
        head_d = s3objects.head_object(run.client, run.t["bucket"], dump_key, run.policy)
        if head_d is None:
            raise s3conf.VerifyError("dump object missing (manifest without dump)")
        if _recipients_of(head_m) == self.current and _recipients_of(head_d) == self.current:
            out["current"] += 1
            return
        raw, manifest, old_enc = self.read_manifest(man_key)
        problem = backup_format.manifest_problem(manifest, name)
        if problem:
            raise s3conf.VerifyError("manifest: %s" % problem)
        if _recipients_of(head_d) == self.current and old_enc is not None:
            # an interrupted run re-encrypted the dump: only the manifest is left to do
            meta = {k.lower(): v for k, v in (head_d.get("Metadata") or {}).items()}
            new_enc = {"recipients": self.enc.fingerprints, "sha256": meta.get(s3objects.META_SHA256),
                       "size": head_d.get("ContentLength")}
        else:
            new_enc = self.rekey_dump(dump_key, name, manifest, old_enc)
        self.put_manifest(man_key, raw, manifest, new_enc)
        out["reencrypted"].append(dump_key)


def reencrypt(targets, encryption, identities, settings=None, name_prefix=backup_format.DEFAULT_PREFIX,
              client_factory=s3conf.make_client, log=None, work_dir=None):
    """Re-encrypt every backup on the targets that is not for ``encryption``'s recipients.

    ``identities`` must open the old objects.  Returns ``ok``, ``changed``, ``recipients`` and per
    target ``reencrypted`` (dump keys), ``current`` (pairs already for the current recipients) and
    ``failed`` (``{"key", "error"}``).  Never raises for one object: the next is tried.
    """
    started = time.monotonic()
    settings = settings or s3conf.Settings()
    if not isinstance(encryption, agecrypt.Encryption):
        encryption = agecrypt.Encryption.from_options(encryption)
    if not encryption.enabled:
        raise agecrypt.AgeError("reencrypt needs the current recipients (s3.encryption.recipients)")
    if not identities:
        raise agecrypt.AgeError("reencrypt needs an identity that opens the existing objects (--identity-file)")
    targets = s3conf.normalize_targets(targets)
    s3conf.require_boto3()
    _log = log or (lambda _msg: None)
    results = []
    tmp = tempfile.mkdtemp(prefix="baileys-reencrypt-", dir=work_dir)
    try:
        os.chmod(tmp, 0o700)
        for t in targets:
            out = {"name": t["name"], "bucket": t["bucket"], "reencrypted": [], "current": 0, "failed": []}
            results.append(out)
            run = s3replicate._TargetRun(t, settings, client_factory, _log, encrypted=True)
            try:
                run.client = client_factory(t, settings)
                listing = s3objects.list_objects(run.client, t, run.policy)
            except (s3conf.BotoCoreError, s3conf.ClientError, OSError, s3conf.S3Error) as exc:
                out["failed"].append({"key": "(target)", "error": str(exc) if isinstance(exc, s3conf.S3Error)
                                      else s3conf.error_text(exc)})
                continue
            run.tm = s3conf.TransferManager(run.client, s3conf.TransferConfig(
                multipart_threshold=settings.multipart_threshold, multipart_chunksize=settings.multipart_chunksize,
                max_concurrency=settings.max_concurrency, use_threads=True))
            rekey = _Rekey(run, encryption, identities, tmp, _log)
            try:
                for man_key, name, dump_key in _manifest_keys(listing, t, name_prefix):
                    try:
                        rekey.one(man_key, name, dump_key, out)
                    except (s3conf.BotoCoreError, s3conf.ClientError, OSError, s3conf.S3Error, agecrypt.AgeError,
                            ValueError) as exc:
                        text = s3conf.error_text(exc) if isinstance(exc, (s3conf.BotoCoreError, s3conf.ClientError)) \
                            else str(exc)
                        out["failed"].append({"key": dump_key, "error": text})
                        _log("target %s: %s: %s" % (t["name"], dump_key, text))
            finally:
                run.tm.shutdown()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    failed = [dict(f, target=r["name"]) for r in results for f in r["failed"]]
    return {"ok": not failed, "changed": any(r["reencrypted"] for r in results), "recipients": encryption.fingerprints,
            "targets": results, "failures": failed, "reencrypted": sum(len(r["reencrypted"]) for r in results),
            "duration": round(time.monotonic() - started, 3)}
