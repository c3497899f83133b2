# -*- coding: utf-8 -*-
# Copyright: baileys.resilience contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""S3 settings and the pieces every S3 operation shares: options, errors, retries, clients.

Part of the S3 code (s3.py is the map).  Here are the option specs the modules turn into
argument specs (TARGET_OPTIONS, TRANSFER_ARGSPEC), the checks that turn user options into
complete target dicts (:func:`normalize_target`) and transfer :class:`Settings`, the errors
(:class:`S3Error` and its kinds), the classification of botocore errors, the retry loop
(:class:`RetryPolicy`) and the boto3 client of a target (:func:`make_client`).

Imports no other S3 room (only the standard library and, when present, boto3): the other
rooms import it.  No Ansible import.  Without boto3 the module still imports (stand-in
exception classes, ``HAS_BOTO3`` false); :func:`require_boto3` says what to install.

Guarantees
----------
* A target dict from :func:`normalize_target` has every TARGET_OPTIONS key, a ``name``
  (the bucket when none was given) and a ``prefix`` that is empty or ends with ``/``;
  contradictory options raise :class:`S3Error` naming the target (never a secret).
* :class:`Settings` refuses values S3 or the retry loop cannot work with (parts under
  5 MiB, concurrency or attempts under 1, negative delays).
* Retries: :meth:`RetryPolicy.call` is a loop with full-jitter exponential backoff around
  throttling (``SlowDown``, 429, 503), other 5xx and connection errors (refused, reset,
  timeouts, broken response streams); other errors are raised at once.  botocore's own
  retries are kept to a small ``standard`` mode count (``botocore_max_attempts``).
* :func:`error_text` describes an exception without secrets; credentials reach botocore
  in memory only and are never logged.
"""
from __future__ import absolute_import, division, print_function

import os
import random
import re
import stat
import threading
import time

from . import errors

__metaclass__ = type

try:
    import boto3
    import botocore.loaders
    import botocore.session
    # pylint: disable-next=unused-import  # re-exported: s3replicate uses s3conf.TransferConfig
    from boto3.s3.transfer import TransferConfig  # noqa: F401 - s3replicate's multipart uploads
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError, IncompleteReadError
    from botocore.exceptions import ConnectionError as BotoConnectionError
    # pylint: disable-next=unused-import  # re-exported: s3replicate uses s3conf.TransferManager
    from s3transfer.manager import TransferManager  # noqa: F401 - s3replicate's multipart uploads

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

MiB = 1024 * 1024
MIN_PART_SIZE = 5 * MiB
SSE_CHOICES = ("AES256", "aws:kms")
STORAGE_CLASSES = ("STANDARD", "REDUCED_REDUNDANCY", "STANDARD_IA", "ONEZONE_IA", "INTELLIGENT_TIERING",
                   "GLACIER", "DEEP_ARCHIVE", "GLACIER_IR", "EXPRESS_ONEZONE")

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


class S3Error(errors.BaileysResilienceError, RuntimeError):
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
