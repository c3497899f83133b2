# -*- coding: utf-8 -*-
# Copyright: baileys.resilience contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Off-site copies of backups on S3-compatible storage, and disaster-recovery fetch.

No Ansible import: the same code runs in the modules (``s3_replicate``,
``s3_fetch``) and in the cron tool.

Backups follow docs/backup-format.md (a dump and its manifest; the names and
checks live in backup_format.py).  On a target they keep their base names
under the target's ``prefix``; every object carries its sha256 (hex) in the
user metadata ``sha256`` (``x-amz-meta-sha256``).

Invariants
----------
* An object counts as replicated only after a HEAD shows the expected size and
  ``sha256`` metadata (and, with ``verify_download``, after it was read back
  and hashed).
* A backup's manifest is uploaded only after its dump is verified on that
  target, so a remote manifest always implies a verified dump.
* A run reports success only when every valid local backup is verified on every
  target; otherwise the result lists each failed ``target/object``.
* Downloads go to a temporary file in the destination directory, are hashed
  while written, flushed to disk, compared with the manifest (and the object's
  ``sha256`` metadata), and only then renamed into place (mode 0600).

Retries: every object operation runs in :meth:`RetryPolicy.call`, a loop with
full-jitter exponential backoff around throttling (``SlowDown``, 429, 503),
other 5xx and connection errors (refused, reset, timeouts, broken response
streams); botocore's own retries are kept to a small ``standard`` mode count.
"""
from __future__ import absolute_import, division, print_function

import base64
import hashlib
import os
import random
import re
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from . import backup_format, fsutil

__metaclass__ = type

try:
    import boto3
    import botocore.loaders
    import botocore.session
    from boto3.s3.transfer import TransferConfig
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError, IncompleteReadError
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from s3transfer.manager import TransferManager

    HAS_BOTO3 = True
    BOTO3_IMPORT_ERROR = None
except ImportError as exc:  # pragma: no cover - exercised on hosts without boto3
    boto3 = None
    HAS_BOTO3 = False
    BOTO3_IMPORT_ERROR = exc

    class BotoCoreError(Exception):
        pass

    class ClientError(Exception):
        pass

    class BotoConnectionError(BotoCoreError):
        pass

    class HTTPClientError(BotoCoreError):
        pass

    class IncompleteReadError(BotoCoreError):
        pass

# the backup file rules live in backup_format; these names stay importable from here
DEFAULT_PREFIX = backup_format.DEFAULT_PREFIX
DUMP_SUFFIX = backup_format.DUMP_SUFFIX
MANIFEST_SUFFIX = backup_format.MANIFEST_SUFFIX
MAX_MANIFEST_SIZE = backup_format.MAX_MANIFEST_SIZE
KINDS = backup_format.KINDS
manifest_problem = backup_format.manifest_problem
sha256_file = backup_format.sha256_file
META_SHA256 = "sha256"
MiB = 1024 * 1024
MIN_PART_SIZE = 5 * MiB
CHUNK = 1 * MiB
SSE_CHOICES = ("AES256", "aws:kms")
STORAGE_CLASSES = ("STANDARD", "REDUCED_REDUNDANCY", "STANDARD_IA", "ONEZONE_IA", "INTELLIGENT_TIERING",
                   "GLACIER", "DEEP_ARCHIVE", "GLACIER_IR", "EXPRESS_ONEZONE")
SELECTIONS = ("newest", "target_order")

RETRYABLE_CODES = frozenset((
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestThrottledException", "TooManyRequestsException", "RequestLimitExceeded", "ProvisionedThroughputExceeded",
    "BandwidthLimitExceeded", "RequestTimeout", "RequestTimeoutException", "PriorRequestNotComplete",
    "InternalError", "ServiceUnavailable", "EC2ThrottledException", "TransactionInProgressException",
))

# --------------------------------------------------------------------------- option specs (plain data)
# Turned into Ansible argument specs by the modules; the same names are accepted by :func:`normalize_target`.

TARGET_OPTIONS = dict(
    name=dict(type="str"),
    bucket=dict(type="str", required=True),
    region=dict(type="str"),
    endpoint_url=dict(type="str"),
    prefix=dict(type="str", default=""),
    access_key=dict(type="str", no_log=True, aliases=["aws_access_key_id"]),
    secret_key=dict(type="str", no_log=True, aliases=["aws_secret_access_key"]),
    session_token=dict(type="str", no_log=True, aliases=["aws_session_token"]),
    profile=dict(type="str"),
    credentials_file=dict(type="path"),
    storage_class=dict(type="str", choices=list(STORAGE_CLASSES)),
    sse=dict(type="str", choices=list(SSE_CHOICES)),
    kms_key_id=dict(type="str"),
    addressing_style=dict(type="str", default="auto", choices=["auto", "path", "virtual"]),
)

TRANSFER_ARGSPEC = dict(
    retries=dict(type="int", default=5),
    retry_delay=dict(type="float", default=0.5),
    retry_max_delay=dict(type="float", default=20.0),
    botocore_max_attempts=dict(type="int", default=2),
    connect_timeout=dict(type="float", default=10.0),
    read_timeout=dict(type="float", default=60.0),
    max_concurrency=dict(type="int", default=8),
    validate_certs=dict(type="bool", default=True),
    ca_bundle=dict(type="path"),
)


class S3Error(RuntimeError):
    """A failure an operator can act on; the message says what and where (never a secret)."""


class VerifyError(S3Error):
    """An object does not match what it should hold (size or sha256)."""


class CorruptObject(VerifyError):
    """A downloaded object's bytes do not hash to the expected sha256."""


class FetchError(S3Error):
    """No candidate could be fetched and verified; ``result`` holds what was tried."""

    def __init__(self, message, result):
        S3Error.__init__(self, message)
        self.result = result


def require_boto3():
    if not HAS_BOTO3:
        raise S3Error("the Python packages 'boto3' and 'botocore' are required on the host that runs this: "
                      "install python3-boto3 or 'pip install boto3' (%s)" % BOTO3_IMPORT_ERROR)


# --------------------------------------------------------------------------- small helpers


def parse_size(value):
    """Bytes from an int or a string like ``64MiB``, ``16M``, ``1GB``, ``5242880`` (K/M/G are binary)."""
    if isinstance(value, bool):
        raise S3Error("invalid size %r" % (value,))
    if isinstance(value, int):
        return value
    m = re.match(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$", str(value), re.IGNORECASE)
    if not m:
        raise S3Error("invalid size %r (expected bytes or a number with K, M, G, T, e.g. '64MiB')" % (value,))
    mult = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m.group(2).upper()]
    return int(float(m.group(1)) * mult)


def b64_of_hex(hex_digest):
    return base64.b64encode(bytes.fromhex(hex_digest)).decode("ascii")


def object_key(target, name, kind="daily"):
    """``<prefix><kind>/<name>``: daily and monthly backups live under their own key prefix, so bucket
    lifecycle rules (which filter by prefix) can expire dailies and archive monthlies differently."""
    return "%s%s/%s" % (target["prefix"], kind, name)


def describe_target(target):
    where = target["endpoint_url"] or "AWS"
    return "%s (s3://%s/%s at %s%s)" % (target["name"], target["bucket"], target["prefix"], where,
                                       ", region %s" % target["region"] if target["region"] else "")


def error_text(exc):
    """A short, secret-free description of an exception."""
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = err.get("Code") or status
        msg = err.get("Message") or ""
        return ("%s (HTTP %s)%s" % (code, status, ": " + msg if msg and msg != str(code) else "")).strip()
    text = str(exc) or type(exc).__name__
    return "%s: %s" % (type(exc).__name__, text) if type(exc).__name__ not in text else text


def is_retryable(exc):
    """Throttling, 5xx, timeouts and broken connections are worth another attempt."""
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        if err.get("Code") in RETRYABLE_CODES:
            return True
        return status == 429 or status >= 500
    if isinstance(exc, (BotoConnectionError, HTTPClientError, IncompleteReadError)):
        return True
    if isinstance(exc, (ConnectionError, TimeoutError)):  # builtin: reset, refused, aborted
        return True
    return False


def is_connection_error(exc):
    if isinstance(exc, (BotoConnectionError, ConnectionError, TimeoutError)):
        return True
    return isinstance(exc, HTTPClientError)


def _client_status(exc):
    if isinstance(exc, ClientError):
        return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return None


def _is_not_found(exc):
    if not isinstance(exc, ClientError):
        return False
    code = exc.response.get("Error", {}).get("Code")
    return code in ("404", "NoSuchKey", "NotFound") or _client_status(exc) == 404


class RetryPolicy:
    """Full-jitter exponential backoff around one operation.

    Attempt ``n`` (1-based) that fails with a retryable error sleeps a uniform
    random time in ``[0, min(max_delay, base_delay * 2 ** (n - 1))]``; after
    ``max_attempts`` attempts the last error is raised.  Non-retryable errors
    are raised at once.
    """

    def __init__(self, max_attempts=5, base_delay=0.5, max_delay=20.0, sleep=time.sleep, rand=random.random):
        if max_attempts < 1:
            raise S3Error("retries must be at least 1 (the number of attempts per operation)")
        if base_delay < 0 or max_delay < 0:
            raise S3Error("retry delays must not be negative")
        self.max_attempts = max_attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.sleep = sleep
        self.rand = rand
        self.retried = 0
        self._lock = threading.Lock()

    def delay(self, attempt):
        return self.rand() * min(self.max_delay, self.base_delay * (2 ** (attempt - 1)))

    def call(self, fn, on_retry=None):
        attempt = 0
        while True:
            attempt += 1
            try:
                return fn()
            except (BotoCoreError, ClientError, OSError) as exc:
                if attempt >= self.max_attempts or not is_retryable(exc):
                    raise
                with self._lock:
                    self.retried += 1
                if on_retry is not None:
                    on_retry(attempt, exc)
                self.sleep(self.delay(attempt))


class Settings:
    """Transfer settings shared by replicate and fetch (plain values; see TRANSFER_ARGSPEC)."""

    def __init__(self, retries=5, retry_delay=0.5, retry_max_delay=20.0, botocore_max_attempts=2,
                 connect_timeout=10.0, read_timeout=60.0, max_concurrency=8, validate_certs=True, ca_bundle=None,
                 multipart_threshold=64 * MiB, multipart_chunksize=16 * MiB, verify_download=False,
                 verify_existing=False, head_concurrency=16, backup_concurrency=4, check_mode=False,
                 sleep=time.sleep):
        self.retries = retries
        self.retry_delay = retry_delay
        self.retry_max_delay = retry_max_delay
        self.botocore_max_attempts = botocore_max_attempts
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_concurrency = max_concurrency
        self.validate_certs = validate_certs
        self.ca_bundle = ca_bundle
        self.multipart_threshold = parse_size(multipart_threshold)
        self.multipart_chunksize = parse_size(multipart_chunksize)
        self.verify_download = verify_download
        self.verify_existing = verify_existing
        self.head_concurrency = head_concurrency
        self.backup_concurrency = backup_concurrency
        self.check_mode = check_mode
        self.sleep = sleep
        if self.multipart_chunksize < MIN_PART_SIZE:
            raise S3Error("multipart_chunksize must be at least 5 MiB (S3's minimum part size)")
        if self.multipart_threshold < MIN_PART_SIZE:
            raise S3Error("multipart_threshold must be at least 5 MiB")
        if max_concurrency < 1 or head_concurrency < 1 or backup_concurrency < 1:
            raise S3Error("max_concurrency and backup_concurrency must be at least 1")
        if botocore_max_attempts < 1:
            raise S3Error("botocore_max_attempts must be at least 1")
        RetryPolicy(retries, retry_delay, retry_max_delay)  # validates

    @classmethod
    def from_params(cls, params, **extra):
        kwargs = {k: params[k] for k in TRANSFER_ARGSPEC if k in params and params[k] is not None}
        kwargs.update(extra)
        return cls(**kwargs)

    def policy(self):
        return RetryPolicy(self.retries, self.retry_delay, self.retry_max_delay, sleep=self.sleep)


# --------------------------------------------------------------------------- targets and clients


def normalize_target(spec, index=0):
    """A complete target dict from user options; raises :class:`S3Error` on contradictions."""
    t = {k: spec.get(k) for k in TARGET_OPTIONS}
    for alias_key, key in (("aws_access_key_id", "access_key"), ("aws_secret_access_key", "secret_key"),
                           ("aws_session_token", "session_token")):
        if t.get(key) is None and spec.get(alias_key) is not None:
            t[key] = spec[alias_key]
    unknown = set(spec) - set(TARGET_OPTIONS) - {"aws_access_key_id", "aws_secret_access_key", "aws_session_token"}
    if unknown:
        raise S3Error("target %d: unknown option(s) %s" % (index + 1, ", ".join(sorted(unknown))))
    if not t["bucket"]:
        raise S3Error("target %d: bucket is required" % (index + 1))
    t["name"] = t["name"] or t["bucket"]
    prefix = (t["prefix"] or "").lstrip("/")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    t["prefix"] = prefix
    t["addressing_style"] = t["addressing_style"] or "auto"
    label = "target %r" % t["name"]
    if bool(t["access_key"]) != bool(t["secret_key"]):
        raise S3Error("%s: access_key and secret_key go together" % label)
    if t["session_token"] and not t["access_key"]:
        raise S3Error("%s: session_token needs access_key and secret_key" % label)
    if t["access_key"] and t["profile"]:
        raise S3Error("%s: give either access_key/secret_key or profile, not both" % label)
    if t["sse"] and t["sse"] not in SSE_CHOICES:
        raise S3Error("%s: sse must be one of %s" % (label, ", ".join(SSE_CHOICES)))
    if t["kms_key_id"] and t["sse"] != "aws:kms":
        raise S3Error("%s: kms_key_id needs sse: aws:kms" % label)
    if t["storage_class"] and t["storage_class"] not in STORAGE_CLASSES:
        raise S3Error("%s: unknown storage_class %r" % (label, t["storage_class"]))
    if t["credentials_file"] and not os.path.isfile(t["credentials_file"]):
        raise S3Error("%s: credentials_file %s does not exist" % (label, t["credentials_file"]))
    return t


def normalize_targets(specs):
    if not specs:
        raise S3Error("at least one target is required")
    targets = [normalize_target(spec, i) for i, spec in enumerate(specs)]
    names = [t["name"] for t in targets]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise S3Error("target names must be unique (duplicated: %s)" % ", ".join(dupes))
    return targets


def credentials_file_warning(target):
    """A warning when the target's credentials file is readable by group or others."""
    path = target.get("credentials_file")
    if not path:
        return None
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return "credentials_file %s of target %r has mode %04o; it should be 0600" % (
            path, target["name"], stat.S_IMODE(mode))
    return None


_LOADER = []


def _shared_loader():
    if not _LOADER:
        _LOADER.append(botocore.loaders.create_loader())
    return _LOADER[0]


def make_client(target, settings):
    """A boto3 S3 client for ``target``.

    Credentials: ``access_key``/``secret_key`` (+ ``session_token``) when given;
    otherwise boto3's default chain (environment, ``profile`` in the shared
    credentials/config files, ``credentials_file`` when given, container or
    instance role).  Nothing is logged; secrets only reach botocore in memory.
    """
    require_boto3()
    bsession = botocore.session.Session()
    bsession.register_component("data_loader", _shared_loader())  # parsed service models kept across clients
    if target.get("credentials_file"):
        bsession.set_config_variable("credentials_file", target["credentials_file"])
    try:
        session = boto3.session.Session(
            aws_access_key_id=target.get("access_key") or None,
            aws_secret_access_key=target.get("secret_key") or None,
            aws_session_token=target.get("session_token") or None,
            region_name=target.get("region") or None,
            botocore_session=bsession,
            profile_name=target.get("profile") or None,
        )
    except BotoCoreError as exc:
        raise S3Error("target %r: %s" % (target["name"], error_text(exc)))
    pool = max(settings.max_concurrency + settings.backup_concurrency, settings.head_concurrency) + 4
    config = Config(
        region_name=target.get("region") or None,
        retries={"mode": "standard", "total_max_attempts": settings.botocore_max_attempts},
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        max_pool_connections=pool,
        s3={"addressing_style": target.get("addressing_style") or "auto"},
        user_agent_extra="baileys-resilience",
    )
    verify = settings.ca_bundle if settings.ca_bundle else settings.validate_certs
    try:
        client = session.client("s3", endpoint_url=target.get("endpoint_url") or None, config=config, verify=verify)
    except (BotoCoreError, ValueError) as exc:
        raise S3Error("target %r: cannot create an S3 client: %s" % (target["name"], error_text(exc)))
    if session.get_credentials() is None:
        raise S3Error("target %r: no AWS credentials found (give access_key/secret_key, a profile, a "
                      "credentials_file, the AWS_* environment, or run where an instance role is available)"
                      % target["name"])
    return client


def _list(client, target, policy, on_retry=None):
    """``{key: size}`` of every object under the target's prefix."""
    found = {}
    token = None
    while True:
        kwargs = {"Bucket": target["bucket"], "Prefix": target["prefix"]}
        if token:
            kwargs["ContinuationToken"] = token
        page = policy.call(lambda kw=kwargs: client.list_objects_v2(**kw), on_retry)
        for obj in page.get("Contents", []) or []:
            found[obj["Key"]] = obj["Size"]
        if not page.get("IsTruncated"):
            return found
        token = page.get("NextContinuationToken")
        if not token:
            return found


def _head(client, bucket, key, policy, on_retry=None):
    """The HEAD response, or ``None`` when the object does not exist."""
    def op():
        try:
            return client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
        except ClientError as exc:
            if _is_not_found(exc):
                return None
            raise
    return policy.call(op, on_retry)


def head_problem(head, size, sha_hex, checksum_b64=None):
    """Why a HEAD response does not show the expected object, or ``None``."""
    if head is None:
        return "missing"
    if head.get("ContentLength") != size:
        return "size %s, expected %d" % (head.get("ContentLength"), size)
    meta = {k.lower(): v for k, v in (head.get("Metadata") or {}).items()}
    if meta.get(META_SHA256) != sha_hex:
        return "sha256 metadata %s, expected %s" % (meta.get(META_SHA256) or "(none)", sha_hex)
    remote_ck = head.get("ChecksumSHA256")
    if checksum_b64 and remote_ck and "-" not in remote_ck and remote_ck != checksum_b64:
        return "ChecksumSHA256 %s, expected %s" % (remote_ck, checksum_b64)
    return None


def _stream_object(client, bucket, key, policy, sink=None, on_retry=None, expected_size=None):
    """Read an object, hashing it; resumes with a Range request after a broken stream.

    ``sink(bytes)`` receives the data in order (no byte twice).  Returns
    ``(hex sha256, size, metadata)``.
    """
    digest = hashlib.sha256()
    state = {"offset": 0, "etag": None, "meta": None, "total": None}

    def op():
        kwargs = {"Bucket": bucket, "Key": key}
        if state["offset"]:
            if state["total"] is not None and state["offset"] >= state["total"]:
                return
            kwargs["Range"] = "bytes=%d-" % state["offset"]
            if state["etag"]:
                kwargs["IfMatch"] = state["etag"]
        resp = client.get_object(**kwargs)
        if state["etag"] is None:
            state["etag"] = resp.get("ETag")
            state["meta"] = {k.lower(): v for k, v in (resp.get("Metadata") or {}).items()}
            state["total"] = resp.get("ContentLength")
        body = resp["Body"]
        try:
            for chunk in body.iter_chunks(CHUNK):
                if sink is not None:
                    sink(chunk)
                digest.update(chunk)
                state["offset"] += len(chunk)
        finally:
            body.close()
        if state["total"] is not None and state["offset"] < state["total"]:
            raise IncompleteReadError(actual_bytes=state["offset"], expected_bytes=state["total"])

    policy.call(op, on_retry)
    if expected_size is not None and state["offset"] != expected_size:
        raise CorruptObject("read %d bytes, expected %d" % (state["offset"], expected_size))
    return digest.hexdigest(), state["offset"], state["meta"] or {}


# --------------------------------------------------------------------------- local backups


def _name_re(name_prefix):
    return backup_format.name_re(name_prefix or backup_format.ANY_PREFIX)


def scan_local_backups(backup_dir, name_prefix=DEFAULT_PREFIX):
    """Local backups per the contract, cheap checks only (manifest, validation flags, size).

    Returns ``(backups, invalid)``: ``backups`` newest first, each a dict with
    ``name``, ``path``, ``manifest_path``, ``manifest``, ``manifest_bytes``,
    ``manifest_sha256``, ``size``, ``sha256``, ``created_at``; ``invalid`` a list
    of ``{"name", "reason"}``.  The dump's sha256 is checked by
    :func:`verify_local` before any upload.  ``*.partial`` files are ignored.
    """
    pattern = _name_re(name_prefix)
    try:
        names = sorted(os.listdir(backup_dir))
    except OSError as exc:
        raise S3Error("cannot list backup_dir %s: %s" % (backup_dir, exc.strerror or exc))
    present = set(names)
    backups, invalid = [], []
    for name in names:
        if name.endswith(DUMP_SUFFIX + MANIFEST_SUFFIX) and pattern.match(name[: -len(MANIFEST_SUFFIX)]):
            if name[: -len(MANIFEST_SUFFIX)] not in present:
                invalid.append({"name": name[: -len(MANIFEST_SUFFIX)], "reason": "manifest without its dump"})
            continue
        if not pattern.match(name):
            continue
        path = os.path.join(backup_dir, name)
        manifest_path = path + MANIFEST_SUFFIX
        try:
            raw, manifest = backup_format.load_manifest(manifest_path, MAX_MANIFEST_SIZE + 1)
        except FileNotFoundError:
            invalid.append({"name": name, "reason": "no manifest"})
            continue
        except OSError as exc:
            invalid.append({"name": name, "reason": "unreadable manifest: %s" % (exc.strerror or exc)})
            continue
        except ValueError as exc:
            invalid.append({"name": name, "reason": "unparsable manifest: %s" % exc})
            continue
        problem = manifest_problem(manifest, name) or backup_format.dump_problem(path, manifest)
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

    def __init__(self, target, settings, client_factory, log):
        self.t = target
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
            self.log("target %s: %s: attempt %d failed (%s), retrying" % (self.t["name"], what, attempt,
                                                                          error_text(exc)))
        return cb

    def fail(self, key, error):
        self.add("failed", {"key": key, "error": error})

    # -- object operations (each retried)
    def head(self, key):
        return _head(self.client, self.t["bucket"], key, self.policy, self.on_retry("HEAD " + key))

    def extra_args(self, sha_hex):
        extra = {"Metadata": {META_SHA256: sha_hex}}
        if self.t["storage_class"]:
            extra["StorageClass"] = self.t["storage_class"]
        if self.t["sse"]:
            extra["ServerSideEncryption"] = self.t["sse"]
            if self.t["kms_key_id"]:
                extra["SSEKMSKeyId"] = self.t["kms_key_id"]
        return extra

    def put_bytes(self, key, data, sha_hex):
        checksum = b64_of_hex(sha_hex)

        def op():
            self.client.put_object(Bucket=self.t["bucket"], Key=key, Body=data, ContentLength=len(data),
                                   ChecksumAlgorithm="SHA256", ChecksumSHA256=checksum, **self.extra_args(sha_hex))
        self.policy.call(op, self.on_retry("PUT " + key))
        return checksum

    def upload_file(self, key, path, size, sha_hex):
        """Upload a file; returns the single-part base64 checksum sent (``None`` for multipart)."""
        if size < self.st.multipart_threshold:
            checksum = b64_of_hex(sha_hex)

            def op():
                with open(path, "rb") as fh:
                    self.client.put_object(Bucket=self.t["bucket"], Key=key, Body=fh, ContentLength=size,
                                           ChecksumAlgorithm="SHA256", ChecksumSHA256=checksum,
                                           **self.extra_args(sha_hex))
            self.policy.call(op, self.on_retry("PUT " + key))
            return checksum

        def op_multipart():
            future = self.tm.upload(path, self.t["bucket"], key, extra_args=self.extra_args(sha_hex))
            future.result()
        self.policy.call(op_multipart, self.on_retry("multipart upload " + key))
        return None

    def verify_after_upload(self, key, size, sha_hex, checksum):
        problem = head_problem(self.head(key), size, sha_hex, checksum)
        if problem:
            raise VerifyError("not verified after upload: %s" % problem)
        if self.st.verify_download:
            self.verify_by_download(key, size, sha_hex)

    def verify_by_download(self, key, size, sha_hex):
        got, got_size, _meta = _stream_object(self.client, self.t["bucket"], key, self.policy,
                                              on_retry=self.on_retry("GET " + key))
        if got_size != size or got != sha_hex:
            raise CorruptObject("read back %d bytes with sha256 %s, expected %d bytes with %s"
                                % (got_size, got, size, sha_hex))

    def probe(self):
        """True when the target still answers (one attempt, no retries)."""
        try:
            self.client.list_objects_v2(Bucket=self.t["bucket"], Prefix=self.t["prefix"], MaxKeys=1)
            return True
        except (BotoCoreError, ClientError, OSError):
            return False

    # -- the run
    def run(self, backups, local_check):
        started = time.monotonic()
        try:
            self._run(backups, local_check)
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
            yield object_key(self.t, b["name"], b["kind"])
            yield object_key(self.t, b["name"] + MANIFEST_SUFFIX, b["kind"])

    def _abandon(self, backups, status, error):
        self.result["status"] = status
        for key in self._all_keys(backups):
            self.fail(key, error)
        if not backups:  # nothing to copy, but a target that cannot be used is still a failure
            self.fail("(target)", error)

    def _run(self, backups, local_check):
        try:
            self.client = self.client_factory(self.t, self.st)
        except S3Error as exc:
            self._abandon(backups, "failed", str(exc))
            return
        try:
            listing = _list(self.client, self.t, self.policy, self.on_retry("LIST"))
        except (BotoCoreError, ClientError, OSError) as exc:
            status = "unreachable" if is_connection_error(exc) else "failed"
            self._abandon(backups, status, "target not usable (listing s3://%s/%s failed): %s"
                          % (self.t["bucket"], self.t["prefix"], error_text(exc)))
            return
        if not self.st.check_mode:
            self.tm = TransferManager(self.client, TransferConfig(
                multipart_threshold=self.st.multipart_threshold, multipart_chunksize=self.st.multipart_chunksize,
                max_concurrency=self.st.max_concurrency, use_threads=True))

        # HEAD, in parallel, every object the listing shows with the right size
        wanted = {}
        for b in backups:
            wanted[object_key(self.t, b["name"], b["kind"])] = (b["size"], b["sha256"])
            wanted[object_key(self.t, b["name"] + MANIFEST_SUFFIX, b["kind"])] = (
                len(b["manifest_bytes"]), b["manifest_sha256"])
        to_head = [k for k, (size, _sha) in wanted.items() if listing.get(k) == size]
        state = {k: "missing" if k not in listing else "differs" for k in wanted}
        if to_head:
            with ThreadPoolExecutor(max_workers=min(self.st.head_concurrency, len(to_head))) as pool:
                futures = {k: pool.submit(self.head, k) for k in to_head}
            for k, fut in futures.items():
                try:
                    head = fut.result()
                except (BotoCoreError, ClientError, OSError) as exc:
                    state[k] = "error: %s" % error_text(exc)
                    continue
                size, sha = wanted[k]
                problem = head_problem(head, size, sha)
                state[k] = "ok" if problem is None else problem

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

    def _one_backup(self, b, state, local_check):
        dump_key = object_key(self.t, b["name"], b["kind"])
        man_key = object_key(self.t, b["name"] + MANIFEST_SUFFIX, b["kind"])
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
            if exc.cause is not None and is_connection_error(exc.cause) and not self.probe():
                with self._lock:
                    self._unreachable_error = "not attempted: target became unreachable (%s)" % exc.text
                    self.result["status"] = "unreachable"

    def _replicate_backup(self, b, dump_key, man_key, state, local_check):
        dump_state = state[dump_key]
        if dump_state.startswith("error: "):
            raise _ObjectFailure(dump_key, "HEAD failed: %s" % dump_state[len("error: "):])
        try:
            if dump_state == "ok" and self.st.verify_existing and not self.st.check_mode:
                try:
                    self.verify_by_download(dump_key, b["size"], b["sha256"])
                except CorruptObject as exc:
                    self.log("target %s: %s is corrupted (%s); uploading it again" % (self.t["name"], dump_key, exc))
                    self.add("repaired", dump_key)
                    dump_state = "corrupted"
            if dump_state == "ok":
                self.add("verified_present", 1)
            else:
                if local_check(b):  # not a valid local backup: uploaded nowhere, reported by the caller
                    return
                if self.st.check_mode:
                    self.add("would_upload", dump_key)
                else:
                    checksum = self.upload_file(dump_key, b["path"], b["size"], b["sha256"])
                    self.verify_after_upload(dump_key, b["size"], b["sha256"], checksum)
                    self.add("uploaded", dump_key)
                    self.add("bytes_uploaded", b["size"])
        except (BotoCoreError, ClientError, OSError, S3Error) as exc:
            raise _ObjectFailure(dump_key, exc)
        # the manifest only after the dump is verified on this target
        if state[man_key] == "ok":
            self.add("verified_present", 1)
            return
        if self.st.check_mode:
            self.add("would_upload", man_key)
            return
        try:
            checksum = self.put_bytes(man_key, b["manifest_bytes"], b["manifest_sha256"])
            self.verify_after_upload(man_key, len(b["manifest_bytes"]), b["manifest_sha256"], checksum)
        except (BotoCoreError, ClientError, OSError, S3Error) as exc:
            raise _ObjectFailure(man_key, exc)
        self.add("uploaded", man_key)
        self.add("bytes_uploaded", len(b["manifest_bytes"]))


class _ObjectFailure(Exception):
    """One object could not be replicated and verified."""

    def __init__(self, key, cause):
        self.key = key
        if isinstance(cause, str):
            self.cause, self.text = None, cause
        else:
            self.cause = cause
            self.text = str(cause) if isinstance(cause, S3Error) else error_text(cause)
        Exception.__init__(self, "%s: %s" % (key, self.text))


def replicate(backup_dir, targets, settings=None, name_prefix=DEFAULT_PREFIX, client_factory=make_client, log=None):
    """Upload every valid local backup (dump, then manifest) that a target lacks, and verify it there.

    ``targets``: list of dicts (see TARGET_OPTIONS).  Returns a dict:
    ``changed``, ``ok``, ``backups`` (local names considered), ``invalid_local``,
    ``targets`` (per-target results), ``uploaded`` (count), ``failed``
    (``[{"target", "key", "error"}]``), ``warnings``, ``duration``.  In check
    mode nothing is uploaded and each target lists ``would_upload``.
    Never raises for a target or object failure: those are in ``failed``.
    """
    started = time.monotonic()
    settings = settings or Settings()
    targets = normalize_targets(targets)
    require_boto3()
    warnings = []
    lock = threading.Lock()

    def _log(msg):
        if log is not None:
            with lock:
                log(msg)

    for t in targets:
        w = credentials_file_warning(t)
        if w:
            warnings.append(w)
    backups, invalid = scan_local_backups(backup_dir, name_prefix)
    local_checked = {}

    def local_check(b):
        if b["name"] not in local_checked:
            local_checked[b["name"]] = verify_local(b)
            if local_checked[b["name"]]:
                invalid.append({"name": b["name"], "reason": local_checked[b["name"]]})
        return local_checked[b["name"]]

    results = []
    for t in targets:
        results.append(_TargetRun(t, settings, client_factory, _log).run(backups, local_check))
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


# --------------------------------------------------------------------------- fetch (disaster recovery)


def _list_candidates(client, target, policy, name_prefix, backup_name, on_retry, warnings):
    """Remote backups on one target (manifests read and checked), newest first."""
    pattern = _name_re(name_prefix)
    listing = _list(client, target, policy, on_retry)
    found = []
    for key in sorted(listing):
        kind, _sep, base = key[len(target["prefix"]):].partition("/")
        if kind not in KINDS or "/" in base or not base.endswith(DUMP_SUFFIX + MANIFEST_SUFFIX):
            continue
        name = base[: -len(MANIFEST_SUFFIX)]
        if not pattern.match(name) or (backup_name and name != backup_name):
            continue
        if listing[key] > MAX_MANIFEST_SIZE:
            warnings.append("target %s: manifest %s is too large, ignored" % (target["name"], key))
            continue
        raw = bytearray()
        try:
            _stream_object(client, target["bucket"], key, policy, sink=raw.extend, on_retry=on_retry)
            manifest = backup_format.parse_manifest(bytes(raw))
        except (ValueError, UnicodeDecodeError) as exc:
            warnings.append("target %s: manifest %s unparsable (%s), ignored" % (target["name"], key, exc))
            continue
        problem = manifest_problem(manifest, name)
        if problem:
            warnings.append("target %s: manifest %s ignored: %s" % (target["name"], key, problem))
            continue
        dump_key = object_key(target, name, kind)
        found.append({"name": name, "key": dump_key, "manifest_key": key,
                      "manifest": manifest, "manifest_bytes": bytes(raw), "created_at": manifest["created_at"],
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


def _download_to(client, target, cand, dest_dir, policy, on_retry):
    """Download a candidate's dump into a temp file in ``dest_dir``; return (temp path, sha, size, meta)."""
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
            sha, size, meta = _stream_object(client, target["bucket"], cand["key"], policy, sink=sink,
                                             on_retry=on_retry)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        fsutil._unlink_quiet(tmp)
        raise
    os.close(fd)
    return tmp, sha, size, meta


def fetch(dest_dir, targets, settings=None, name_prefix=DEFAULT_PREFIX, backup_name=None, selection="newest",
          client_factory=make_client, log=None):
    """Download the newest backup whose sha256 verifies, with failover across targets.

    Every target is listed (a target that cannot be listed is skipped with a
    warning); candidates are tried in the order of :func:`_order_candidates`.
    A candidate whose bytes do not hash to the manifest's sha256 (or whose
    ``sha256`` metadata disagrees with the manifest) is reported in
    ``warnings`` and the next one is tried.  The verified dump is renamed into
    ``dest_dir`` (0600) and its manifest written beside it.  When the same
    backup is already there and verifies, nothing is downloaded
    (``changed=false``).  Check mode picks the candidate (manifest read, dump
    HEAD checked) and downloads nothing.  Raises :class:`S3Error` when no
    candidate verifies.
    """
    started = time.monotonic()
    settings = settings or Settings()
    targets = normalize_targets(targets)
    require_boto3()
    if selection not in SELECTIONS:
        raise S3Error("selection must be one of %s" % ", ".join(SELECTIONS))
    if backup_name and not _name_re(name_prefix).match(backup_name):
        raise S3Error("backup_name %r is not a backup name with prefix %r" % (backup_name, name_prefix))
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
                raise S3Error("cannot create dest_dir %s: %s" % (dest_dir, exc.strerror or exc))

    for t in targets:
        w = credentials_file_warning(t)
        if w:
            warnings.append(w)
    clients, policies, per_target = [], [], []
    for t in targets:
        policy = settings.policy()
        policies.append(policy)

        def on_retry(attempt, exc, t=t):
            _log("target %s: attempt %d failed (%s), retrying" % (t["name"], attempt, error_text(exc)))
        try:
            client = client_factory(t, settings)
            cands = _list_candidates(client, t, policy, name_prefix, backup_name, on_retry, warnings)
        except (BotoCoreError, ClientError, OSError, S3Error) as exc:
            text = str(exc) if isinstance(exc, S3Error) else error_text(exc)
            warnings.append("target %s skipped: %s" % (describe_target(t), text))
            tried.append({"target": t["name"], "key": None, "outcome": "unreachable" if is_connection_error(exc)
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
        final_manifest = final + MANIFEST_SUFFIX

        def on_retry(attempt, exc, t=t, key=cand["key"]):
            _log("target %s: GET %s attempt %d failed (%s), retrying" % (t["name"], key, attempt, error_text(exc)))
        try:
            if not cand["dump_listed"]:
                raise VerifyError("dump object missing (manifest without dump)")
            head = _head(client, t["bucket"], cand["key"], policy, on_retry)
            problem = head_problem(head, m["size"], m["sha256"])
            if problem:
                raise VerifyError("object does not match its manifest: %s" % problem)
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
                tmp, sha, size, meta = _download_to(client, t, cand, dest_dir, policy, on_retry)
                result["downloaded_bytes"] = size
                bad = None
                if size != m["size"]:
                    bad = "%d bytes, manifest says %d" % (size, m["size"])
                elif sha != m["sha256"]:
                    bad = "sha256 %s, manifest says %s" % (sha, m["sha256"])
                elif meta.get(META_SHA256) and meta[META_SHA256] != m["sha256"]:
                    bad = "sha256 metadata %s, manifest says %s" % (meta[META_SHA256], m["sha256"])
                if bad:
                    fsutil._unlink_quiet(tmp)
                    raise CorruptObject(bad)
                os.rename(tmp, final)
                fsutil.fsync_dir(dest_dir)
                fsutil.atomic_write(final_manifest, cand["manifest_bytes"], mode=0o600)
                entry["outcome"] = "fetched"
                result["changed"] = True
        except CorruptObject as exc:
            entry.update(outcome="corrupt", error=str(exc))
            warnings.append("corrupted object s3://%s/%s on target %s: %s; trying the next candidate"
                            % (t["bucket"], cand["key"], t["name"], exc))
            continue
        except VerifyError as exc:
            entry.update(outcome="invalid", error=str(exc))
            warnings.append("s3://%s/%s on target %s: %s; trying the next candidate"
                            % (t["bucket"], cand["key"], t["name"], exc))
            continue
        except (BotoCoreError, ClientError, OSError) as exc:
            entry.update(outcome="error", error=error_text(exc))
            warnings.append("s3://%s/%s on target %s failed: %s; trying the next candidate"
                            % (t["bucket"], cand["key"], t["name"], error_text(exc)))
            continue
        result.update(path=final, manifest_path=final_manifest, manifest=m, target=t["name"], bucket=t["bucket"],
                      key=cand["key"], name=cand["name"])
        result["seconds"] = round(time.monotonic() - started, 3)
        return result
    result["seconds"] = round(time.monotonic() - started, 3)
    summary = "; ".join("%s %s: %s%s" % (e["target"], e["key"] or "(listing)", e["outcome"],
                                          " (%s)" % e["error"] if e["error"] else "") for e in tried)
    raise FetchError("no backup%s could be fetched and verified from any target: %s" % (
        " %s" % backup_name if backup_name else "", summary or "no backups found under the targets' prefixes"),
        result)


def _local_matches(path, manifest):
    if backup_format.dump_problem(path, manifest):
        return False
    sha, _size = sha256_file(path)
    return sha == manifest["sha256"]


def _manifest_matches(path, data):
    try:
        with open(path, "rb") as fh:
            return fh.read(MAX_MANIFEST_SIZE + 1) == data
    except OSError:
        return False


def restore_fetched(fetch_result, restore):
    """Optional DR step: hand the fetched dump to ``restore(dump_path, manifest)`` (e.g. a pg_restore wrapper).

    The callable does the database work (for instance
    ``backup.restore_backup`` or ``backup.verify_backup`` bound to connection
    parameters); this only checks that the fetch produced a verified file.
    """
    if not fetch_result.get("path") or fetch_result.get("check_mode"):
        raise S3Error("nothing fetched to restore")
    return restore(fetch_result["path"], fetch_result["manifest"])
