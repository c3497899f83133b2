# -*- coding: utf-8 -*-
# Copyright: baileys.resilience contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Off-site copies of backups on S3-compatible targets: :func:`replicate`.

Part of the S3 code (s3.py is the map).  Finds the valid local backups
(:func:`scan_local_backups`, per backup_format.py), lists each target, HEADs the objects
the listing shows with the right size, and uploads (single part with a SHA256 checksum, or
multipart) and verifies what a target lacks.  The local work a backup needs before its upload
(its sealing with encryption on, else the hashing of its dump) runs on one thread ahead of the
upload workers (:class:`_Preparer`).  The module ``s3_replicate`` and the cron tool call it;
imports s3conf, s3objects and backup_format.  No Ansible import.

Invariants
----------
* An object counts as replicated only after a HEAD shows the expected size and
  ``sha256`` metadata (and, with ``verify_download``, after it was read back
  and hashed).
* A local dump is hashed against its manifest before it is uploaded; a backup that does
  not verify is uploaded nowhere and reported.
* A backup's manifest is uploaded only after its dump is verified on that
  target, so a remote manifest always implies a verified dump.
* With recipients (an enabled :class:`agecrypt.Encryption`), what is uploaded is the backup's
  sealed copy (backupseal.py: age ciphertext of the dump and of its sealed manifest, made once per
  recipient set from a dump that hashed to its manifest), never the local files; every body is
  checked for the age header before it is sent, and a body without it fails the object.
* A run reports success only when every valid local backup is verified on every
  target; otherwise the result lists each failed ``target/object``.  A target or object
  failure never raises.
"""
from __future__ import absolute_import, division, print_function

import collections
import hashlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from . import agecrypt, backup_format, backupseal, errors, s3conf, s3objects

__metaclass__ = type


# --------------------------------------------------------------------------- local backups


def scan_local_backups(backup_dir, name_prefix=backup_format.DEFAULT_PREFIX):
    """Local backups per the contract, cheap checks only (manifest, validation flags, size).

    Returns ``(backups, invalid)``: ``backups`` newest first, each a dict with
    ``name``, ``path``, ``manifest_path``, ``manifest``, ``manifest_bytes``,
    ``manifest_sha256``, ``size``, ``sha256``, ``created_at``; ``invalid`` a list
    of ``{"name", "reason"}``.  The dump's sha256 is checked by
    :func:`verify_local` before any upload.  ``*.partial`` files are ignored.
    """
    pattern = s3objects.backup_name_re(name_prefix)
    try:
        names = sorted(os.listdir(backup_dir))
    except OSError as exc:
        raise s3conf.S3Error("cannot list backup_dir %s: %s" % (backup_dir, exc.strerror or exc))
    present = set(names)
    backups, invalid = [], []
    for name in names:
        dump_name = name[: -len(backup_format.MANIFEST_SUFFIX)]
        if name.endswith(backup_format.DUMP_SUFFIX + backup_format.MANIFEST_SUFFIX) and pattern.match(dump_name):
            if dump_name not in present:
                invalid.append({"name": dump_name, "reason": "manifest without its dump"})
            continue
        if not pattern.match(name):
            continue
        path = os.path.join(backup_dir, name)
        manifest_path = path + backup_format.MANIFEST_SUFFIX
        try:
            raw, manifest = backup_format.load_manifest(manifest_path, backup_format.MAX_MANIFEST_SIZE + 1)
        except FileNotFoundError:
            invalid.append({"name": name, "reason": "no manifest"})
            continue
        except OSError as exc:
            invalid.append({"name": name, "reason": "unreadable manifest: %s" % (exc.strerror or exc)})
            continue
        except ValueError as exc:
            invalid.append({"name": name, "reason": "unparsable manifest: %s" % exc})
            continue
        problem = backup_format.manifest_problem(manifest, name) or backup_format.dump_problem(path, manifest)
        if problem:
            invalid.append({"name": name, "reason": problem})
            continue
        backups.append({
            "name": name, "path": path, "manifest_path": manifest_path, "manifest": manifest,
            "manifest_bytes": raw, "manifest_sha256": hashlib.sha256(raw).hexdigest(),
            "size": manifest["size"], "sha256": manifest["sha256"], "created_at": manifest["created_at"],
            "kind": manifest.get("kind", "daily"),
        })
    backups.sort(key=lambda b: (b["created_at"], b["name"]), reverse=True)
    return backups, invalid


def verify_local(backup):
    """Hash the local dump; ``None`` when it matches its manifest, else the reason."""
    return backup_format.checksum_problem(backup["path"], backup["manifest"])


# --------------------------------------------------------------------------- replicate


class _TargetRun:
    """One target's replication state and result."""

    def __init__(self, target, settings, client_factory, log, view=None, encrypted=False):
        self.t = target
        # what is uploaded for a backup (the backup itself, or its sealed copy; None: not sealed yet)
        self.view = view or (lambda b: b)
        self.encrypted = encrypted
        self.st = settings
        self.client_factory = client_factory
        self.log = log
        self.policy = settings.policy()
        self.client = None
        self.tm = None
        self.result = {
            "name": target["name"], "bucket": target["bucket"], "region": target["region"],
            "endpoint_url": target["endpoint_url"], "prefix": target["prefix"], "status": "ok",
            "uploaded": [], "verified_present": 0, "repaired": [], "failed": [], "bytes_uploaded": 0,
            "retries": 0, "seconds": 0.0,
        }
        if settings.check_mode:
            self.result["would_upload"] = []
        self._lock = threading.Lock()
        self._unreachable_error = None

    def add(self, field, value):
        """Record ``value`` in a list field, or add it to a counter (thread-safe)."""
        with self._lock:
            if isinstance(self.result[field], list):
                self.result[field].append(value)
            else:
                self.result[field] += value

    def on_retry(self, what):
        def cb(attempt, exc):
            self.log("target %s: %s: attempt %d failed (%s), retrying"
                     % (self.t["name"], what, attempt, s3conf.error_text(exc)))
        return cb

    def fail(self, key, error):
        self.add("failed", {"key": key, "error": error})

    # -- object operations (each retried)
    def head(self, key):
        return s3objects.head_object(self.client, self.t["bucket"], key, self.policy, self.on_retry("HEAD " + key))

    def extra_args(self, sha_hex, meta=None):
        extra = {"Metadata": dict(meta or {}, **{s3objects.META_SHA256: sha_hex})}
        if self.t["storage_class"]:
            extra["StorageClass"] = self.t["storage_class"]
        if self.t["sse"]:
            extra["ServerSideEncryption"] = self.t["sse"]
            if self.t["kms_key_id"]:
                extra["SSEKMSKeyId"] = self.t["kms_key_id"]
        return extra

    def _refuse_plaintext(self, key, head):
        if self.encrypted and not agecrypt.is_age(head):
            raise s3conf.S3Error("refusing to upload %s: encryption is on and the body is not age ciphertext" % key)

    def put_bytes(self, key, data, sha_hex, meta=None):
        self._refuse_plaintext(key, data)
        checksum = s3objects.b64_of_hex(sha_hex)

        def op():
            self.client.put_object(Bucket=self.t["bucket"], Key=key, Body=data, ContentLength=len(data),
                                   ChecksumAlgorithm="SHA256", ChecksumSHA256=checksum,
                                   **self.extra_args(sha_hex, meta))
        self.policy.call(op, self.on_retry("PUT " + key))
        return checksum

    def upload_file(self, key, path, size, sha_hex, meta=None):
        """Upload a file; returns the single-part base64 checksum sent (``None`` for multipart)."""
        if self.encrypted:
            with open(path, "rb") as fh:
                self._refuse_plaintext(key, fh.read(len(agecrypt.HEADER)))
        if size < self.st.multipart_threshold:
            checksum = s3objects.b64_of_hex(sha_hex)

            def op():
                with open(path, "rb") as fh:
                    self.client.put_object(Bucket=self.t["bucket"], Key=key, Body=fh, ContentLength=size,
                                           ChecksumAlgorithm="SHA256", ChecksumSHA256=checksum,
                                           **self.extra_args(sha_hex, meta))
            self.policy.call(op, self.on_retry("PUT " + key))
            return checksum

        def op_multipart():
            future = self.tm.upload(path, self.t["bucket"], key, extra_args=self.extra_args(sha_hex, meta))
            future.result()
        self.policy.call(op_multipart, self.on_retry("multipart upload " + key))
        return None

    def verify_after_upload(self, key, size, sha_hex, checksum):
        problem = s3objects.head_problem(self.head(key), size, sha_hex, checksum)
        if problem:
            raise s3conf.VerifyError("not verified after upload: %s" % problem)
        if self.st.verify_download:
            self.verify_by_download(key, size, sha_hex)

    def verify_by_download(self, key, size, sha_hex):
        got, got_size, _meta = s3objects.stream_object(self.client, self.t["bucket"], key, self.policy,
                                                       on_retry=self.on_retry("GET " + key))
        if got_size != size or got != sha_hex:
            raise s3conf.CorruptObject("read back %d bytes with sha256 %s, expected %d bytes with %s"
                                       % (got_size, got, size, sha_hex))

    def probe(self):
        """True when the target still answers (one attempt, no retries)."""
        try:
            self.client.list_objects_v2(Bucket=self.t["bucket"], Prefix=self.t["prefix"], MaxKeys=1)
            return True
        except (s3conf.BotoCoreError, s3conf.ClientError, OSError):
            return False

    # -- the run
    def run(self, backups, local_check, ahead=None):
        """``local_check(b)``: the local backup's problem or ``None`` (sealing it when encryption is on);
        ``ahead(backups)``, when given, is told which backups this run will ask that for, in order."""
        started = time.monotonic()
        try:
            self._run(backups, local_check, ahead)
        finally:
            self.result["retries"] = self.policy.retried
            self.result["seconds"] = round(time.monotonic() - started, 3)
            if self.tm is not None:
                self.tm.shutdown()
        if self.result["failed"] and self.result["status"] == "ok":
            self.result["status"] = "failed"
        return self.result

    def _all_keys(self, backups):
        for b in backups:
            yield s3objects.object_key(self.t, b["name"], b["kind"])
            yield s3objects.object_key(self.t, b["name"] + backup_format.MANIFEST_SUFFIX, b["kind"])

    def _abandon(self, backups, status, error):
        self.result["status"] = status
        for key in self._all_keys(backups):
            self.fail(key, error)
        if not backups:  # nothing to copy, but a target that cannot be used is still a failure
            self.fail("(target)", error)

    def _run(self, backups, local_check, ahead):
        try:
            self.client = self.client_factory(self.t, self.st)
        except s3conf.S3Error as exc:
            self._abandon(backups, "failed", str(exc))
            return
        try:
            listing = s3objects.list_objects(self.client, self.t, self.policy, self.on_retry("LIST"))
        except (s3conf.BotoCoreError, s3conf.ClientError, OSError) as exc:
            status = "unreachable" if s3conf.is_connection_error(exc) else "failed"
            self._abandon(backups, status, "target not usable (listing s3://%s/%s failed): %s"
                          % (self.t["bucket"], self.t["prefix"], s3conf.error_text(exc)))
            return
        if not self.st.check_mode:
            self.tm = s3conf.TransferManager(self.client, s3conf.TransferConfig(
                multipart_threshold=self.st.multipart_threshold, multipart_chunksize=self.st.multipart_chunksize,
                max_concurrency=self.st.max_concurrency, use_threads=True))

        # HEAD, in parallel, every object the listing shows with the right size
        wanted = {}
        for b in backups:
            v = self.view(b)
            if v is None:  # not sealed for the current recipients yet: its objects are sealed and sent
                continue
            wanted[s3objects.object_key(self.t, b["name"], b["kind"])] = (v["size"], v["sha256"])
            wanted[s3objects.object_key(self.t, b["name"] + backup_format.MANIFEST_SUFFIX, b["kind"])] = (
                len(v["manifest_bytes"]), v["manifest_sha256"])
        to_head = [k for k, (size, _sha) in wanted.items() if listing.get(k) == size]
        state = {k: "missing" if k not in listing else "differs" for k in self._all_keys(backups)}
        if to_head:
            with ThreadPoolExecutor(max_workers=min(self.st.head_concurrency, len(to_head))) as pool:
                futures = {k: pool.submit(self.head, k) for k in to_head}
            for k, fut in futures.items():
                try:
                    head = fut.result()
                except (s3conf.BotoCoreError, s3conf.ClientError, OSError) as exc:
                    state[k] = "error: %s" % s3conf.error_text(exc)
                    continue
                size, sha = wanted[k]
                problem = s3objects.head_problem(head, size, sha)
                state[k] = "ok" if problem is None else problem

        if ahead is not None:  # sealed (or hashed) in this order on one thread, ahead of the uploads below
            ahead([b for b in backups if self._needs_local_check(b, state)])
        # several backups in flight at once (newest first): hides per-request latency
        workers = min(self.st.backup_concurrency, len(backups)) or 1
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for fut in [pool.submit(self._one_backup, b, state, local_check) for b in backups]:
                fut.result()
        # keep the listing order stable (newest first) whatever the completion order
        order = {k: i for i, k in enumerate(self._all_keys(backups))}
        for field in ("uploaded", "would_upload", "repaired"):
            if field in self.result:
                self.result[field].sort(key=lambda k: order.get(k, 0))
        self.result["failed"].sort(key=lambda f: order.get(f["key"], 0))

    def _needs_local_check(self, b, state):
        """Whether :meth:`_replicate_backup` will ask ``local_check`` for ``b`` (its dump is to be sent, or
        its manifest is and it has no sealed copy yet)."""
        dump_state = state[s3objects.object_key(self.t, b["name"], b["kind"])]
        if dump_state.startswith("error: "):
            return False
        man_state = state[s3objects.object_key(self.t, b["name"] + backup_format.MANIFEST_SUFFIX, b["kind"])]
        return dump_state != "ok" or (man_state != "ok" and not self.st.check_mode and self.view(b) is None)

    def _one_backup(self, b, state, local_check):
        dump_key = s3objects.object_key(self.t, b["name"], b["kind"])
        man_key = s3objects.object_key(self.t, b["name"] + backup_format.MANIFEST_SUFFIX, b["kind"])
        if self._unreachable_error:
            self.fail(dump_key, self._unreachable_error)
            self.fail(man_key, self._unreachable_error)
            return
        try:
            self._replicate_backup(b, dump_key, man_key, state, local_check)
        except _ObjectFailure as exc:
            self.fail(exc.key, exc.text)
            if exc.key == dump_key:
                self.fail(man_key, "not uploaded: its dump is not verified on this target")
            if exc.cause is not None and s3conf.is_connection_error(exc.cause) and not self.probe():
                with self._lock:
                    self._unreachable_error = "not attempted: target became unreachable (%s)" % exc.text
                    self.result["status"] = "unreachable"

    def _replicate_backup(self, b, dump_key, man_key, state, local_check):
        dump_state = state[dump_key]
        if dump_state.startswith("error: "):
            raise _ObjectFailure(dump_key, "HEAD failed: %s" % dump_state[len("error: "):])
        v = self.view(b)
        try:
            if dump_state == "ok" and self.st.verify_existing and not self.st.check_mode:
                try:
                    self.verify_by_download(dump_key, v["size"], v["sha256"])
                except s3conf.CorruptObject as exc:
                    self.log("target %s: %s is corrupted (%s); uploading it again" % (self.t["name"], dump_key, exc))
                    self.add("repaired", dump_key)
                    dump_state = "corrupted"
            if dump_state == "ok":
                self.add("verified_present", 1)
            else:
                if local_check(b):  # not a valid local backup: uploaded nowhere, reported by the caller
                    return
                v = self.view(b)  # sealed by local_check when encryption is on
                if self.st.check_mode:
                    self.add("would_upload", dump_key)
                else:
                    checksum = self.upload_file(dump_key, v["path"], v["size"], v["sha256"], v.get("meta"))
                    self.verify_after_upload(dump_key, v["size"], v["sha256"], checksum)
                    self.add("uploaded", dump_key)
                    self.add("bytes_uploaded", v["size"])
        except (s3conf.BotoCoreError, s3conf.ClientError, OSError, s3conf.S3Error, agecrypt.AgeError) as exc:
            raise _ObjectFailure(dump_key, exc)
        # the manifest only after the dump is verified on this target
        if state[man_key] == "ok":
            self.add("verified_present", 1)
            return
        if self.st.check_mode:
            self.add("would_upload", man_key)
            return
        try:
            if v is None and local_check(b):
                raise s3conf.S3Error("not uploaded: the local backup is not valid")
            v = self.view(b)
            checksum = self.put_bytes(man_key, v["manifest_bytes"], v["manifest_sha256"], v.get("meta"))
            self.verify_after_upload(man_key, len(v["manifest_bytes"]), v["manifest_sha256"], checksum)
        except (s3conf.BotoCoreError, s3conf.ClientError, OSError, s3conf.S3Error, agecrypt.AgeError) as exc:
            raise _ObjectFailure(man_key, exc)
        self.add("uploaded", man_key)
        self.add("bytes_uploaded", len(v["manifest_bytes"]))


class _Preparer:
    """Runs ``check`` (replicate's ``local_check``: the sealing of a backup, or the hashing of its dump) for
    the backups the target runs will ask it for, in their order, on one thread ahead of the upload workers:
    the CPU and disk work for backup N+1 overlaps the upload of backup N, instead of each worker doing both
    in turn.  At most ``ahead`` backups are prepared and not yet asked for.  A worker that asks for one not
    prepared yet runs ``check`` itself (``check`` is serialised per backup and keeps its first result), so
    no worker ever waits for this thread, and an error in it is met again by the worker that asks."""

    def __init__(self, check, ahead):
        self._check = check
        self._ahead = max(1, ahead)
        self._cond = threading.Condition()
        self._queue = collections.deque()
        self._seen, self._ready, self._asked = set(), set(), set()
        self._stopped = False
        self._thread = None

    def ahead_of(self, backups):
        with self._cond:
            for b in backups:
                if b["name"] not in self._seen:
                    self._seen.add(b["name"])
                    self._queue.append(b)
            if self._thread is None and self._queue and not self._stopped:
                self._thread = threading.Thread(target=self._run, name="s3replicate-prepare", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def check(self, b):
        with self._cond:
            self._asked.add(b["name"])
            self._ready.discard(b["name"])
            self._cond.notify_all()
        return self._check(b)

    def _run(self):
        while True:
            with self._cond:
                while not self._stopped and (not self._queue or len(self._ready) >= self._ahead):
                    self._cond.wait()
                if self._stopped:
                    return
                b = self._queue.popleft()
                if b["name"] in self._asked:
                    continue
            try:
                self._check(b)
            except Exception:  # noqa: BLE001 - the worker that asks for it runs it again and meets the error
                pass
            with self._cond:
                if b["name"] not in self._asked:
                    self._ready.add(b["name"])

    def stop(self):
        """Stop after the backup in hand (nothing is left half-made: ``check`` finishes it) and wait."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()


class _ObjectFailure(errors.BaileysResilienceError):
    """One object could not be replicated and verified."""

    def __init__(self, key, cause):
        self.key = key
        if isinstance(cause, str):
            self.cause, self.text = None, cause
        else:
            self.cause = cause
            self.text = str(cause) if isinstance(cause, s3conf.S3Error) else s3conf.error_text(cause)
        errors.BaileysResilienceError.__init__(self, "%s: %s" % (key, self.text))


def replicate(backup_dir, targets, settings=None, name_prefix=backup_format.DEFAULT_PREFIX,
              client_factory=s3conf.make_client, log=None, encryption=None):
    """Upload every valid local backup (dump, then manifest) that a target lacks, and verify it there.

    ``targets``: list of dicts (see TARGET_OPTIONS).  Returns a dict:
    ``changed``, ``ok``, ``backups`` (local names considered), ``invalid_local``,
    ``targets`` (per-target results), ``uploaded`` (count), ``failed``
    (``[{"target", "key", "error"}]``), ``warnings``, ``duration``.  In check
    mode nothing is uploaded and each target lists ``would_upload``.
    Never raises for a target or object failure: those are in ``failed``.

    ``encryption``: an :class:`agecrypt.Encryption` (or its options as a dict, checked before
    anything is read or uploaded); with recipients, only sealed copies are uploaded (see the
    invariants) and the result has ``encrypted: true`` and the recipient fingerprints.
    """
    started = time.monotonic()
    settings = settings or s3conf.Settings()
    if not isinstance(encryption, agecrypt.Encryption):
        encryption = agecrypt.Encryption.from_options(encryption)
    targets = s3conf.normalize_targets(targets)
    s3conf.require_boto3()
    warnings = []
    lock = threading.Lock()

    def _log(msg):
        if log is not None:
            with lock:
                log(msg)

    for t in targets:
        w = s3conf.credentials_file_warning(t)
        if w:
            warnings.append(w)
    backups, invalid = scan_local_backups(backup_dir, name_prefix)
    local_checked = {}
    sealed, name_locks = {}, {b["name"]: threading.Lock() for b in backups}
    if encryption.enabled:
        backupseal.prune(backup_dir, {b["name"] for b in backups} | {e["name"] for e in invalid})
        for b in backups:
            sealed[b["name"]] = backupseal.current(backup_dir, b, encryption)

    def local_check(b):
        with name_locks[b["name"]]:
            if b["name"] not in local_checked:
                if encryption.enabled and not settings.check_mode:
                    try:
                        copy, problem = backupseal.prepare(backup_dir, b, encryption)
                    except (OSError, agecrypt.AgeError) as exc:
                        copy, problem = None, "cannot encrypt: %s" % (getattr(exc, "strerror", None) or exc)
                    if copy is not None:
                        copy["meta"] = {"age-recipients": ",".join(copy["recipients"])}
                    sealed[b["name"]] = copy
                else:
                    problem = backupseal.local_problem(b, encryption)
                local_checked[b["name"]] = problem
                if problem:
                    invalid.append({"name": b["name"], "reason": problem})
            return local_checked[b["name"]]

    def view(b):
        if not encryption.enabled:
            return b
        copy = sealed.get(b["name"])
        if copy is not None and "meta" not in copy:
            copy["meta"] = {"age-recipients": ",".join(copy["recipients"])}
        return copy

    results = []
    preparer = _Preparer(local_check, settings.backup_concurrency)
    try:
        for t in targets:
            results.append(_TargetRun(t, settings, client_factory, _log, view, encryption.enabled)
                           .run(backups, preparer.check, preparer.ahead_of))
    finally:
        preparer.stop()
    if not backups:
        warnings.append("no valid backup named %s-<stamp>.dump in %s" % (name_prefix or "<prefix>", backup_dir))
    for entry in invalid:
        warnings.append("local backup %s is not valid and was not replicated: %s" % (entry["name"], entry["reason"]))
    failed = [{"target": r["name"], "key": f["key"], "error": f["error"]} for r in results for f in r["failed"]]
    for r in results:
        if r["status"] == "unreachable":
            warnings.append("target %s is unreachable" % r["name"])
    uploaded = sum(len(r["uploaded"]) for r in results)
    would = sum(len(r.get("would_upload", [])) for r in results)
    return {
        "changed": bool(uploaded or would),
        "ok": not failed,
        "check_mode": settings.check_mode,
        "encrypted": encryption.enabled,
        "recipients": encryption.fingerprints,
        "backup_dir": backup_dir,
        "backups": [b["name"] for b in backups if not local_checked.get(b["name"])],
        "invalid_local": invalid,
        "targets": results,
        "uploaded": uploaded,
        "failures": failed,
        "warnings": warnings,
        "duration": round(time.monotonic() - started, 3),
    }


def failure_message(result, limit=50):
    """One message naming every failed target/object (up to ``limit``)."""
    failed = result["failures"]
    lines = ["%s: %s: %s" % (f["target"], f["key"], f["error"]) for f in failed[:limit]]
    if len(failed) > limit:
        lines.append("... and %d more" % (len(failed) - limit))
    targets = sorted({f["target"] for f in failed})
    objects = sum(1 for f in failed if f["key"] != "(target)")
    return "S3 replication incomplete (%d object(s) not replicated and verified) on target(s) %s: %s" % (
        objects, ", ".join(targets), "; ".join(lines))
