"""Unit tests of module_utils/s3.py pieces that need no S3 endpoint (retry loop, classification, parsing)."""
from __future__ import annotations

import pytest
from botocore.exceptions import ClientError, ConnectionClosedError, EndpointConnectionError, ReadTimeoutError

from ansible_collections.baileys.resilience.plugins.module_utils import s3


def client_error(code, status, op="PutObject"):
    return ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, op)


@pytest.mark.parametrize("exc, retry", [
    (client_error("SlowDown", 503), True),
    (client_error("503", 503, "HeadObject"), True),
    (client_error("InternalError", 500), True),
    (client_error("TooManyRequestsException", 429), True),
    (client_error("RequestTimeout", 400), True),
    (client_error("AccessDenied", 403), False),
    (client_error("NoSuchBucket", 404), False),
    (client_error("InvalidAccessKeyId", 403), False),
    (EndpointConnectionError(endpoint_url="http://x"), True),
    (ConnectionClosedError(endpoint_url="http://x"), True),
    (ReadTimeoutError(endpoint_url="http://x"), True),
    (ConnectionResetError(104, "reset"), True),
    (FileNotFoundError(2, "gone"), False),
])
def test_retryable_classification(exc, retry):
    assert s3.is_retryable(exc) is retry


def test_retry_loop_full_jitter_and_attempt_limit():
    sleeps = []
    policy = s3.RetryPolicy(max_attempts=4, base_delay=1.0, max_delay=3.0, sleep=sleeps.append, rand=lambda: 1.0)
    calls = []

    def always_throttled():
        calls.append(1)
        raise client_error("SlowDown", 503)

    with pytest.raises(ClientError):
        policy.call(always_throttled)
    assert len(calls) == 4 and policy.retried == 3
    assert sleeps == [1.0, 2.0, 3.0]  # upper bounds: base * 2^(n-1), capped at max_delay

    sleeps.clear()
    policy = s3.RetryPolicy(max_attempts=6, base_delay=1.0, max_delay=100.0, sleep=sleeps.append, rand=lambda: 0.25)
    attempts = iter([client_error("SlowDown", 503), ConnectionResetError(104, "reset"), None])

    def flaky():
        exc = next(attempts)
        if exc:
            raise exc
        return "done"

    seen = []
    assert policy.call(flaky, on_retry=lambda n, e: seen.append(n)) == "done"
    assert sleeps == [0.25, 0.5] and seen == [1, 2]


def test_retry_loop_does_not_retry_permanent_errors():
    sleeps = []
    policy = s3.RetryPolicy(max_attempts=5, sleep=sleeps.append)
    calls = []

    def denied():
        calls.append(1)
        raise client_error("AccessDenied", 403)

    with pytest.raises(ClientError):
        policy.call(denied)
    assert calls == [1] and sleeps == []


def test_jitter_is_random_within_bounds():
    policy = s3.RetryPolicy(base_delay=0.5, max_delay=20.0)
    delays = [policy.delay(3) for _draw in range(200)]
    assert all(0 <= d <= 2.0 for d in delays) and len(set(delays)) > 150


@pytest.mark.parametrize("text, value", [
    (5242880, 5242880), ("64MiB", 64 << 20), ("16M", 16 << 20), ("1GB", 1 << 30), ("512k", 512 << 10),
    ("1.5G", 3 << 29), ("100", 100),
])
def test_parse_size(text, value):
    assert s3.parse_size(text) == value


@pytest.mark.parametrize("bad", ["", "12 parsecs", "-5M", True])
def test_parse_size_rejects(bad):
    with pytest.raises(s3.S3Error):
        s3.parse_size(bad)


def good_manifest(name="baileys-auth-20260101T000000Z.dump"):
    return {"format": 1, "file": name, "created_at": "2026-01-01T00:00:00Z", "sha256": "a" * 64, "size": 10,
            "validated": {"restore_list": True, "row_counts": True}}


@pytest.mark.parametrize("change, reason", [
    ({"format": 2}, "format"), ({"file": "other.dump"}, "is for"), ({"sha256": "xyz"}, "sha256"),
    ({"size": -1}, "size"), ({"size": True}, "size"), ({"created_at": None}, "created_at"),
    ({"validated": {"restore_list": True, "row_counts": False}}, "validation"), ({"validated": None}, "validation"),
])
def test_manifest_problem(change, reason):
    name = "baileys-auth-20260101T000000Z.dump"
    assert s3.manifest_problem(good_manifest(), name) is None
    m = dict(good_manifest(), **change)
    assert reason in s3.manifest_problem(m, name)


def test_head_problem():
    head = {"ContentLength": 10, "Metadata": {"sha256": "a" * 64}, "ChecksumSHA256": "abc="}
    assert s3.head_problem(head, 10, "a" * 64) is None
    assert s3.head_problem(None, 10, "a" * 64) == "missing"
    assert "size" in s3.head_problem(head, 11, "a" * 64)
    assert "sha256 metadata" in s3.head_problem(head, 10, "b" * 64)
    assert "ChecksumSHA256" in s3.head_problem(head, 10, "a" * 64, "zzz=")
    assert s3.head_problem(dict(head, ChecksumSHA256="abc=-3"), 10, "a" * 64, "zzz=") is None  # composite


def test_candidate_order():
    def c(stamp):
        return {"created_at": "2026-01-0%sT00:00:00Z" % stamp, "name": "baileys-auth-2026010%sT000000Z.dump" % stamp}
    per_target = [[c(3), c(1)], [c(3), c(2)]]
    newest = [(ti, x["created_at"][8:10]) for ti, x in s3._order_candidates(per_target, "newest")]
    assert newest == [(0, "03"), (1, "03"), (1, "02"), (0, "01")]
    by_target = [(ti, x["created_at"][8:10]) for ti, x in s3._order_candidates(per_target, "target_order")]
    assert by_target == [(0, "03"), (0, "01"), (1, "03"), (1, "02")]


def test_normalize_target():
    t = s3.normalize_target({"bucket": "b", "prefix": "/a/b"})
    assert t["name"] == "b" and t["prefix"] == "a/b/" and t["addressing_style"] == "auto"
    assert s3.normalize_target({"bucket": "b", "prefix": ""})["prefix"] == ""
    with pytest.raises(s3.S3Error, match="either access_key"):
        s3.normalize_target({"bucket": "b", "access_key": "a", "secret_key": "s", "profile": "p"})
    with pytest.raises(s3.S3Error, match="unknown option"):
        s3.normalize_target({"bucket": "b", "colour": "blue"})
    with pytest.raises(s3.S3Error, match="session_token needs"):
        s3.normalize_target({"bucket": "b", "session_token": "t"})
