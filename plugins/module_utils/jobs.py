# -*- coding: utf-8 -*-
# Copyright: baileys.resilience contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Running a host job: one lock per job, one structured log line per step, Prometheus textfiles.

No Ansible import; used by the ``baileys-resilience`` command-line tool.

* :class:`JobLock` is an ``flock`` on ``<lock_dir>/baileys-resilience-<job>.lock``: a second run of
  the same job while the first holds it fails at once with :class:`LockBusy` (no overlap, no wait).
  The kernel drops the lock when the process dies, so a crashed run never leaves a stale lock.
* :class:`JobLog` writes one line per step (JSON lines or logfmt) with ``ts``, ``job``, ``step``,
  ``status``, ``duration`` and counts.  Every known secret is replaced by ``********`` in every value
  before the line is written, and keys that name secrets are dropped.
* :func:`write_textfile` writes a node_exporter textfile atomically (temporary file in the same
  directory, then rename) so the collector never reads half a file.
"""
from __future__ import absolute_import, division, print_function

import datetime
import errno
import fcntl
import json
import os
import re
import sys
import time

from . import errors, fsutil

__metaclass__ = type

DEFAULT_LOCK_DIR = "/run/lock"
LOG_FORMATS = ("json", "logfmt")
DEFAULT_LOG_FORMAT = LOG_FORMATS[0]
SECRET_KEY_RE = re.compile(r"(pass(word|wd)?|pwd|secret|token|dsn|api[_-]?key|authorization|credential)", re.I)
MASK = "********"


class LockBusy(errors.BaileysResilienceError, RuntimeError):
    """Another run of the same job holds the lock."""


class JobLock:
    """An exclusive, non-blocking ``flock`` held for the lifetime of a job."""

    def __init__(self, job, lock_dir=None, path=None):
        self.job = job
        self.path = path or os.path.join(lock_dir or DEFAULT_LOCK_DIR, "baileys-resilience-%s.lock" % job)
        self.fd = None

    def acquire(self):
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise LockBusy("cannot open lock file %s: %s" % (self.path, exc.strerror or exc))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = ""
            try:
                holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
            except OSError:
                pass
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise LockBusy("another baileys-resilience %s run is in progress (lock %s held%s); not starting "
                               "an overlapping run" % (self.job, self.path, " by pid %s" % holder if holder else ""))
            raise LockBusy("cannot lock %s: %s" % (self.path, exc.strerror or exc))
        os.ftruncate(fd, 0)
        os.pwrite(fd, ("%d\n" % os.getpid()).encode("ascii"), 0)
        self.fd = fd
        return self

    def release(self):
        if self.fd is not None:
            try:
                os.ftruncate(self.fd, 0)
            except OSError:
                pass
            os.close(self.fd)  # closing drops the flock
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


def utc_now():
    return datetime.datetime.now(datetime.timezone.utc)


def iso(ts=None):
    ts = ts or utc_now()
    return ts.strftime("%Y-%m-%dT%H:%M:%S.") + "%03dZ" % (ts.microsecond // 1000)


def scrub_text(text, secrets):
    text = str(text)
    for secret in secrets:
        if secret and len(str(secret)) >= 3:
            text = text.replace(str(secret), MASK)
    return text


def scrub(value, secrets):
    """Copy of ``value`` with every secret string masked and secret-named keys masked."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if isinstance(key, str) and SECRET_KEY_RE.search(key) and item not in (None, "", {}, []):
                out[key] = MASK
            else:
                out[key] = scrub(item, secrets)
        return out
    if isinstance(value, (list, tuple)):
        return [scrub(item, secrets) for item in value]
    if isinstance(value, str):
        return scrub_text(value, secrets)
    return value


def _logfmt_value(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, (dict, list)):
        value = json.dumps(value, sort_keys=True, separators=(",", ":"))
    text = str(value)
    if text == "" or re.search(r'[\s"=\\]', text):
        return '"%s"' % text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return text


class JobLog:
    """One structured line per step on ``stream`` (stderr by default)."""

    def __init__(self, job, stream=None, fmt=DEFAULT_LOG_FORMAT, secrets=()):
        if fmt not in LOG_FORMATS:
            raise ValueError("log format must be json or logfmt")
        self.job = job
        self.stream = stream if stream is not None else sys.stderr
        self.fmt = fmt
        self.secrets = [s for s in secrets if s]
        self.run_id = "%d-%d" % (os.getpid(), int(time.time()))

    def add_secret(self, secret):
        if secret:
            self.secrets.append(str(secret))

    def emit(self, step, status, duration=None, /, **fields):
        record = {"ts": iso(), "job": self.job, "step": step, "status": status}
        if duration is not None:
            record["duration"] = round(duration, 3)
        for key, value in fields.items():
            if value is not None:
                record["field_" + key if key in ("ts", "job", "step", "status", "duration") else key] = value
        record = scrub(record, self.secrets)
        if self.fmt == "json":
            line = json.dumps(record, sort_keys=False, separators=(",", ":"), default=str)
        else:
            line = " ".join("%s=%s" % (k, _logfmt_value(v)) for k, v in record.items())
        try:
            self.stream.write(line + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # a closed pipe must not kill the job
            pass
        return record

    def step(self, name, **fields):
        return _Step(self, name, fields)


class _Step:
    """``with log.step("name") as s: ...; s.counts(deleted=3)``: logs ok/error with duration."""

    def __init__(self, log, name, fields):
        self.log = log
        self.name = name
        self.fields = dict(fields)
        self.started = None

    def counts(self, **fields):
        self.fields.update(fields)

    def __enter__(self):
        self.started = time.monotonic()
        return self

    def __exit__(self, exc_type, exc, tb):
        duration = time.monotonic() - self.started
        if exc_type is None:
            self.log.emit(self.name, "ok", duration, **self.fields)
        else:
            self.log.emit(self.name, "error", duration, error="%s: %s" % (exc_type.__name__, exc), **self.fields)
        return False


# --------------------------------------------------------------------------- Prometheus textfile

_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")


def _label_value(value):
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def prom_text(metrics):
    """Exposition text from ``[(name, help, type, [(labels dict, value)])]``.

    A sample may carry a third element, a suffix of the metric name (``_bucket``, ``_sum``,
    ``_count``: see :func:`histogram_metric`).
    """
    lines = []
    for name, help_text, kind, samples in metrics:
        if not _METRIC_NAME.match(name):
            raise ValueError("invalid metric name %r" % name)
        samples = [sample for sample in samples if sample[1] is not None]
        if not samples:
            continue
        lines.append("# HELP %s %s" % (name, help_text.replace("\n", " ")))
        lines.append("# TYPE %s %s" % (name, kind))
        for sample in samples:
            labels, value = sample[0], sample[1]
            suffix = sample[2] if len(sample) > 2 else ""
            label_text = ""
            if labels:
                label_text = "{%s}" % ",".join('%s="%s"' % (k, _label_value(v)) for k, v in sorted(labels.items()))
            if isinstance(value, bool):
                value = int(value)
            lines.append("%s%s%s %s" % (name, suffix, label_text,
                                        repr(float(value)) if isinstance(value, float) else value))
    return "\n".join(lines) + "\n"


def le_label(bound):
    """The ``le`` label of a histogram bucket bound, as the Prometheus clients write it."""
    if bound == float("inf"):
        return "+Inf"
    return repr(float(bound))


def histogram_metric(name, help_text, bounds, bucket_counts, total, count, labels=None):
    """A histogram for :func:`prom_text`: cumulative ``_bucket{le=...}`` (``bucket_counts[i]`` observations
    at or below ``bounds[i]``, not cumulative; the ``+Inf`` bucket is ``count``), ``_sum`` and ``_count``."""
    labels = dict(labels or {})
    samples = []
    running = 0
    for bound, n in zip(bounds, bucket_counts):
        running += int(n)
        samples.append((dict(labels, le=le_label(bound)), running, "_bucket"))
    samples.append((dict(labels, le="+Inf"), int(count), "_bucket"))
    samples.append((labels, float(total), "_sum"))
    samples.append((labels, int(count), "_count"))
    return (name, help_text, "histogram", samples)


def write_textfile(directory, name, metrics):
    """Write ``<directory>/<name>.prom`` atomically (mode 0644: metrics carry no secret)."""
    if not name.endswith(".prom"):
        name += ".prom"
    path = os.path.join(directory, name)
    fsutil.atomic_write(path, prom_text(metrics).encode("utf-8"), mode=0o644)
    return path


def job_metrics(job, ok, duration, finished_at=None, extra=None):
    """The metrics every job writes: success, duration, last run and last success times."""
    labels = {"job": job}
    ts = (finished_at or utc_now()).timestamp()
    metrics = [
        ("baileys_resilience_job_success", "1 if the last run of the job succeeded.", "gauge", [(labels, int(ok))]),
        ("baileys_resilience_job_duration_seconds", "Duration of the last run.", "gauge",
         [(labels, round(duration, 3))]),
        ("baileys_resilience_job_last_run_timestamp_seconds", "End time of the last run.", "gauge",
         [(labels, round(ts, 3))]),
    ]
    if ok:
        metrics.append(("baileys_resilience_job_last_success_timestamp_seconds", "End time of the last successful run.",
                        "gauge", [(labels, round(ts, 3))]))
    return metrics + list(extra or [])
