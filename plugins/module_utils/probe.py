# -*- coding: utf-8 -*-
# Copyright: baileys.resilience contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The store probe: is the auth-state store answering, and how fast?  Meant to run every 10-15 s.

No Ansible import.  :func:`run_probe` connects with the same parameters as the jobs (pgconn.py;
``connect_timeout`` lowered to :data:`DEFAULT_CONNECT_TIMEOUT`, a ``statement_timeout`` of
:data:`DEFAULT_STATEMENT_TIMEOUT` passed as a libpq option, so no extra round trip), reads one row of
the auth table (``SELECT 1 FROM <auth table> LIMIT 1``) and measures the whole probe (connect and
query; the query alone is reported too).

Metrics (node_exporter textfile ``baileys_resilience_probe.prom``, label ``target="store"``):

* ``baileys_resilience_probe_up`` (gauge): 1 if the last probe read the auth table, else 0;
* ``baileys_resilience_probe_duration_seconds`` (histogram, buckets :data:`DEFAULT_BUCKETS`): duration of
  the successful probes (connect + query), accumulated across runs in a small state file
  (``<state_dir>/probe-histogram.json``, 0600, atomic writes under a lock), since every probe is a
  separate process; a failed probe is not observed (it would only measure the timeout);
* ``baileys_resilience_probe_failures_total`` (counter): failed probes;
* ``baileys_resilience_probe_last_timestamp_seconds`` (gauge): time of the last probe;
* ``baileys_resilience_probe_last_success_timestamp_seconds`` (gauge): time of the last successful probe;
* ``baileys_resilience_probe_query_seconds`` (gauge): the query alone, in the last successful probe.

A damaged histogram file is kept aside (``.damaged-<UTC time>``) and the counts start again (Prometheus'
``rate()`` handles a counter reset).

Alerts go through the alert state (alertstate.py; the probe uses ``<state_dir>/alert-state.json`` when
the ``Alerts`` it is given has none): ``(probe, store_unreachable)`` is critical while the store does not
answer, ``(probe, store_slow)`` a warning while a probe takes longer than ``slow_seconds``.  A store that
stays down alerts once, again once per cooldown, and once "resolved" when it answers again.
The health job's ``baileys_resilience_probe_latency_seconds`` (query quantiles) is a different metric.
"""
from __future__ import absolute_import, division, print_function

import errno
import fcntl
import json
import os
import time

from . import alertstate, fsutil, jobs, pgconn

__metaclass__ = type

TARGET = "store"
TEXTFILE_NAME = "baileys_resilience_probe.prom"
HISTOGRAM_FILE = "probe-histogram.json"
ALERT_STATE_FILE = "alert-state.json"
DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
DEFAULT_CONNECT_TIMEOUT = 5  # libpq: whole seconds, at least 2
DEFAULT_STATEMENT_TIMEOUT = 5.0
DEFAULT_SLOW_SECONDS = 1.0
DEFAULT_INTERVAL = 15.0
HISTOGRAM_VERSION = 1
LOCK_TIMEOUT = 10.0


def _probe_params(conn_params, connect_timeout, statement_timeout):
    params = dict(conn_params or {})
    current = params.get("connect_timeout")
    timeout = max(2, int(connect_timeout))
    params["connect_timeout"] = min(int(current), timeout) if current else timeout
    extra = dict(params.get("connect_params") or {})
    option = "-c statement_timeout=%d" % max(1, int(float(statement_timeout) * 1000))
    extra["options"] = ("%s %s" % (extra.get("options") or "", option)).strip()
    params["connect_params"] = extra
    return params


def _secs(value):
    """Seconds for a message, ``%.3f``; a timing the probe did not measure (None) as ``?``."""
    return "?" if value is None else "%.3f" % value


def probe_store(conn_params, store_params, connect_timeout=DEFAULT_CONNECT_TIMEOUT,
                statement_timeout=DEFAULT_STATEMENT_TIMEOUT, timer=time.perf_counter):
    """One probe: ``{"up", "duration", "connect_seconds", "query_seconds", "error"}``.  Never raises."""
    out = {"up": False, "duration": None, "connect_seconds": None, "query_seconds": None, "error": None,
           "target": pgconn.describe(conn_params or {})}
    started = timer()
    conn = None
    try:
        store = pgconn.Store.from_params(store_params or {})
        conn = pgconn.connect(_probe_params(conn_params, connect_timeout, statement_timeout), autocommit=True)
        connected = timer()
        with conn.cursor() as cur:
            cur.execute(pgconn.sql.SQL("SELECT 1 FROM {} LIMIT 1").format(store.auth))
            cur.fetchall()
        done = timer()
        out.update(up=True, duration=done - started, connect_seconds=connected - started,
                   query_seconds=done - connected)
    except Exception as exc:  # noqa: BLE001 - any failure is "the store did not answer", never a crash
        out["duration"] = timer() - started
        text = pgconn._scrub(exc, conn_params or {})
        if not isinstance(exc, pgconn.PgError):
            text = "%s: %s" % (type(exc).__name__, text)
        out["error"] = text
    finally:
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: BLE001
                pass
    return out


# --------------------------------------------------------------------------- histogram across runs


def _empty_histogram(buckets):
    return {"version": HISTOGRAM_VERSION, "target": TARGET, "bounds": [float(b) for b in buckets],
            "buckets": [0] * len(buckets), "sum": 0.0, "count": 0, "failures": 0, "runs": 0,
            "last_success": None}


def _valid_histogram(data, buckets):
    return (isinstance(data, dict) and data.get("version") == HISTOGRAM_VERSION
            and data.get("bounds") == [float(b) for b in buckets]
            and isinstance(data.get("buckets"), list) and len(data["buckets"]) == len(buckets)
            and all(isinstance(n, int) and n >= 0 for n in data["buckets"])
            and isinstance(data.get("count"), int) and isinstance(data.get("sum"), (int, float))
            and isinstance(data.get("failures"), int))


def observe(hist, duration, up, now):
    """Add one probe to ``hist`` (in place)."""
    hist["runs"] = int(hist.get("runs") or 0) + 1
    if not up:
        hist["failures"] += 1
        return hist
    for i, bound in enumerate(hist["bounds"]):
        if duration <= bound:
            hist["buckets"][i] += 1
            break
    hist["sum"] = float(hist["sum"]) + float(duration)
    hist["count"] += 1
    hist["last_success"] = now
    return hist


def update_histogram(state_dir, duration, up, now, buckets=DEFAULT_BUCKETS, warn=None):
    """Read, add this probe, write back, under an ``flock``; returns the histogram.

    Never raises for the file: on a damaged file the counts start again (the file is kept aside);
    when the directory cannot be used, the histogram of this probe alone is returned.
    """
    def _warn(message):
        if warn is not None:
            warn(message)

    path = os.path.join(state_dir, HISTOGRAM_FILE)
    fd = None
    try:
        try:
            os.makedirs(state_dir, mode=0o700)
        except OSError as exc:
            if exc.errno != errno.EEXIST:
                raise
        fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES) or time.monotonic() > deadline:
                    raise
            time.sleep(0.02)
        hist = None
        try:
            with open(path, "rb") as fh:
                raw = fh.read(1 << 20)
        except FileNotFoundError:
            raw = None
        if raw is not None:
            try:
                hist = json.loads(raw.decode("utf-8"))
            except (ValueError, UnicodeDecodeError):
                hist = None
            if not _valid_histogram(hist, buckets):
                if isinstance(hist, dict) and hist.get("version") == HISTOGRAM_VERSION and \
                        hist.get("bounds") != [float(b) for b in buckets]:
                    _warn("probe histogram %s has other buckets: counts start again" % path)
                else:
                    aside = "%s.damaged-%s" % (path, time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now)))
                    os.rename(path, aside)
                    _warn("probe histogram %s is damaged: kept aside as %s; counts start again" % (path, aside))
                hist = None
        hist = observe(hist or _empty_histogram(buckets), duration, up, now)
        fsutil.atomic_write(path, json.dumps(hist, sort_keys=True).encode("utf-8") + b"\n", mode=0o600)
        return hist
    except OSError as exc:
        _warn("cannot use the probe histogram %s: %s" % (path, exc.strerror or exc))
        return observe(_empty_histogram(buckets), duration, up, now)
    finally:
        if fd is not None:
            os.close(fd)


def prom_metrics(result, hist):
    labels = {"target": TARGET}
    metrics = [
        ("baileys_resilience_probe_up", "1 if the last store probe read the auth table, else 0.", "gauge",
         [(labels, int(bool(result["up"])))]),
        jobs.histogram_metric("baileys_resilience_probe_duration_seconds",
                              "Duration of the successful store probes (connect and one read of the auth table).",
                              hist["bounds"], hist["buckets"], hist["sum"], hist["count"], labels),
        ("baileys_resilience_probe_failures_total", "Store probes that failed (no connection, error or timeout).",
         "counter", [(labels, int(hist["failures"]))]),
        ("baileys_resilience_probe_last_timestamp_seconds", "Time of the last store probe.", "gauge",
         [(labels, round(float(result["timestamp"]), 3))]),
        ("baileys_resilience_probe_last_success_timestamp_seconds", "Time of the last successful store probe.",
         "gauge", [(labels, None if hist.get("last_success") is None else round(float(hist["last_success"]), 3))]),
        ("baileys_resilience_probe_query_seconds", "The auth table read alone, in the last successful probe.",
         "gauge", [(labels, None if result.get("query_seconds") is None else round(result["query_seconds"], 6))]),
    ]
    return metrics


def _active_alerts(alerts, warn):
    """The alert state's open entries (``None`` when there is no state to read)."""
    state = getattr(alerts, "state", None) if alerts is not None else None
    if state is None:
        return None
    try:
        return state.entries()
    except (OSError, alertstate.AlertStateError, alertstate.StateUnavailable) as exc:
        warn("cannot read the alert state for its metrics: %s" % exc)
        return None


def alert_metrics(entries):
    """``baileys_resilience_alert_active``: one sample per open alert (job/check[/company]) with its level.

    The probe writes it every run, so what Prometheus sees is at most one probe interval old.  Without a
    readable alert state nothing is written (an absent series, not a false "no alerts").
    """
    if entries is None:
        return []
    samples = []
    for entry in sorted(entries.values(), key=lambda e: (e.get("job", ""), e.get("check", ""), e.get("company", ""))):
        name = "/".join(p for p in (entry.get("job"), entry.get("check"), entry.get("company")) if p)
        samples.append(({"alert": name, "level": entry.get("level") or "warning"}, 1))
    return [("baileys_resilience_alert_active", "1 for each alert the alert state holds as open, with its level.",
             "gauge", samples)]


def run_probe(conn_params, store_params, textfile_dir, state_dir, alerts, clock=time.time,
              slow_seconds=DEFAULT_SLOW_SECONDS, connect_timeout=DEFAULT_CONNECT_TIMEOUT,
              statement_timeout=DEFAULT_STATEMENT_TIMEOUT, host=None, buckets=DEFAULT_BUCKETS, log=None,
              timer=time.perf_counter):
    """Probe the store, write the metrics, feed the alert state; returns the result dict.  Never raises
    for the store, the metrics or the alerts (each failure is in ``warnings``)."""
    warnings = []

    def warn(message):
        warnings.append(message)
        if log is not None:
            log.emit("probe", "warning", message=message)

    result = probe_store(conn_params, store_params, connect_timeout, statement_timeout, timer)
    now = float(clock())
    result.update(timestamp=now, slow=bool(result["up"] and result["duration"] >= float(slow_seconds)),
                  slow_seconds=float(slow_seconds), warnings=warnings, alerts=[], textfile=None)
    if state_dir:
        hist = update_histogram(state_dir, result["duration"], result["up"], now, buckets, warn)
    else:
        hist = observe(_empty_histogram(buckets), result["duration"], result["up"], now)
    result["histogram"] = {"count": hist["count"], "sum": hist["sum"], "failures": hist["failures"]}
    if alerts is not None:
        if state_dir:
            alerts.use_state(os.path.join(state_dir, ALERT_STATE_FILE))
        context = {"target": result["target"], "duration": result["duration"]}
        if result["up"]:
            decisions = [
                alerts.alert("probe", "store_unreachable", "ok", "the store answers again (probe %s s)"
                             % _secs(result["duration"]), host=host, context=context),
                alerts.alert("probe", "store_slow", "warning" if result["slow"] else "ok",
                             "store probe took %s s (warning at %.3f s; connect %s s, query %s s)" % (
                                 _secs(result["duration"]), float(slow_seconds), _secs(result["connect_seconds"]),
                                 _secs(result["query_seconds"])), host=host, context=context),
            ]
        else:
            # store_slow is left as it is: while the store is down its speed is unknown
            decisions = [alerts.alert("probe", "store_unreachable", "critical", "store unreachable (%s): %s" % (
                result["target"], result["error"]), host=host, context=context)]
        result["alerts"] = [d.as_dict() for d in decisions if d is not None]
    if textfile_dir:
        active = _active_alerts(alerts, warn)
        try:
            result["textfile"] = jobs.write_textfile(textfile_dir, TEXTFILE_NAME,
                                                     prom_metrics(result, hist) + alert_metrics(active))
        except (OSError, ValueError) as exc:
            warn("cannot write %s in %s: %s" % (TEXTFILE_NAME, textfile_dir, getattr(exc, "strerror", None) or exc))
    if log is not None:
        log.emit("probe", "ok" if result["up"] else "error", result["duration"], target=result["target"],
                 error=result["error"], slow=result["slow"] or None,
                 alerts_sent=sum(1 for d in result["alerts"] if d["send"]) or None)
    return result


def probe_loop(interval=DEFAULT_INTERVAL, count=None, sleep=time.sleep, monotonic=time.monotonic, **kwargs):
    """:func:`run_probe` every ``interval`` seconds (``count`` times, or until interrupted); the last result.

    Runs are spaced from their start, so a slow probe does not drift the schedule; a probe longer than
    the interval starts the next one at once.
    """
    interval = max(0.1, float(interval))
    runs = 0
    result = None
    next_at = monotonic()
    try:
        while True:
            result = run_probe(**kwargs)
            runs += 1
            if count and runs >= count:
                break
            next_at += interval
            delay = next_at - monotonic()
            if delay < 0:
                next_at = monotonic()
                delay = 0
            sleep(delay)
    except KeyboardInterrupt:
        pass
    return result


def exit_code(result):
    """0 store up and fast, 1 slow, 2 down (as the health job's codes)."""
    if not result["up"]:
        return 2
    return 1 if result["slow"] else 0


def render_text(result):
    if result["up"]:
        return "store up: %s s (connect %s s, query %s s)%s\n" % (
            _secs(result["duration"]), _secs(result["connect_seconds"]), _secs(result["query_seconds"]),
            " SLOW (warning at %.3f s)" % result["slow_seconds"] if result["slow"] else "")
    return "store DOWN: %s\n" % result["error"]


def alert_state_path(state_dir=None):
    return os.path.join(state_dir, ALERT_STATE_FILE) if state_dir else alertstate.DEFAULT_STATE_FILE
