# -*- coding: utf-8 -*-
# Copyright: baileys.resilience contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The objects of a backup on an S3 target: their keys, and list, HEAD and read with retries.

Part of the S3 code (s3.py is the map).  Backups follow docs/backup-format.md (a dump and
its manifest; the names and checks live in backup_format.py).  On a target they keep their
base names under ``<prefix><kind>/`` (:func:`object_key`); every object carries its sha256
(hex) in the user metadata ``sha256`` (``x-amz-meta-sha256``, META_SHA256).

Replication (s3replicate.py) and fetch (s3fetch.py) both read objects through this room;
it imports s3conf and backup_format only.  No Ansible import.

Guarantees
----------
* Every request runs in the caller's :class:`s3conf.RetryPolicy`.
* :func:`head_object` returns ``None`` for a missing object (404, ``NoSuchKey``) and
  raises every other error; :func:`head_problem` accepts a HEAD only when it shows the
  expected size and ``sha256`` metadata (and, when both sides have one, the single-part
  ``ChecksumSHA256``).
* :func:`stream_object` hashes every byte it reads and hands each byte to the sink once
  and in order, resuming a broken stream with a Range request pinned to the first ETag;
  a short read raises :class:`s3conf.CorruptObject`.
"""
from __future__ import absolute_import, division, print_function

import base64
import hashlib

from . import backup_format, s3conf

__metaclass__ = type

META_SHA256 = "sha256"  # user metadata key of an object's sha256 (hex)
CHUNK = 1 * s3conf.MiB  # read size of a streamed GET


# --------------------------------------------------------------------------- names and keys


def backup_name_re(name_prefix):
    """The pattern of a dump's name with ``name_prefix`` (any prefix when it is empty)."""
    return backup_format.name_re(name_prefix or backup_format.ANY_PREFIX)


def object_key(target, name, kind="daily"):
    """``<prefix><kind>/<name>``: daily and monthly backups live under their own key prefix, so bucket
    lifecycle rules (which filter by prefix) can expire dailies and archive monthlies differently."""
    return "%s%s/%s" % (target["prefix"], kind, name)


def b64_of_hex(hex_digest):
    return base64.b64encode(bytes.fromhex(hex_digest)).decode("ascii")


# --------------------------------------------------------------------------- object operations (each retried)


def _client_status(exc):
    if isinstance(exc, s3conf.ClientError):
        return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return None


def _is_not_found(exc):
    if not isinstance(exc, s3conf.ClientError):
        return False
    code = exc.response.get("Error", {}).get("Code")
    return code in ("404", "NoSuchKey", "NotFound") or _client_status(exc) == 404


def list_objects(client, target, policy, on_retry=None):
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


def head_object(client, bucket, key, policy, on_retry=None):
    """The HEAD response, or ``None`` when the object does not exist."""
    def op():
        try:
            return client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
        except s3conf.ClientError as exc:
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


def stream_object(client, bucket, key, policy, sink=None, on_retry=None, expected_size=None):
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
            raise s3conf.IncompleteReadError(actual_bytes=state["offset"], expected_bytes=state["total"])

    policy.call(op, on_retry)
    if expected_size is not None and state["offset"] != expected_size:
        raise s3conf.CorruptObject("read %d bytes, expected %d" % (state["offset"], expected_size))
    return digest.hexdigest(), state["offset"], state["meta"] or {}
