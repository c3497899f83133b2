# -*- coding: utf-8 -*-
# Copyright: baileys.resilience contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Alert state on disk: when to send, when to stay quiet, when to say "resolved".

No Ansible import.  One entry per alert key ``(job, check, company)`` in a JSON file
(default :data:`DEFAULT_STATE_FILE`): ``first_seen``, ``last_seen``, ``last_sent``, ``count``,
``level``, ``last_message``.  :meth:`AlertState.decide` says whether a message goes out:

* the first occurrence of a key (level ``warning`` or ``critical``) is sent at once;
* a level change (warning <-> critical) is sent at once;
* the same level again is sent at most once per *cooldown* (per check, :data:`DEFAULT_COOLDOWNS`:
  5 minutes for failures, latency, probes, pool...; 30 minutes for expired and stale keys, as the
  reference system had it; configurable);
* a key that clears (level ``ok``) after a message was sent gets exactly one "resolved" message, and
  its entry is dropped; an ``ok`` for a key with no entry sends nothing.

The read-decide-write cycle runs under an exclusive ``flock`` on ``<state file>.lock``, so two jobs
deciding the same new alert at the same moment send it once.  Writes are atomic (temporary file,
fsync, rename, directory fsync; file 0600, directory 0700).  A damaged state file is renamed
``<name>.damaged-<UTC time>`` and the run goes on with an empty state and a warning.  Alerting never
stops a job: when the state cannot be used at all (unwritable directory, lock held too long) every
decision "fails open" (a warning or critical is sent, as without a state file) and says so
(``degraded``).

Time comes from a ``clock`` callable (seconds since the epoch), injected by the tests.
"""
from __future__ import absolute_import, division, print_function

import collections
import errno
import fcntl
import json
import os
import re
import time

from . import errors, fsutil

__metaclass__ = type

DEFAULT_STATE_DIR = "/var/lib/baileys-resilience"
DEFAULT_STATE_FILE_NAME = "alert-state.json"
DEFAULT_STATE_FILE = os.path.join(DEFAULT_STATE_DIR, DEFAULT_STATE_FILE_NAME)
STATE_VERSION = 1
LEVELS = ("ok", "warning", "critical")
_LEVEL_ALIASES = {"error": "critical", "fatal": "critical", "warn": "warning", "resolved": "ok", "info": "ok"}
DEFAULT_COOLDOWN = 300.0
# seconds between two messages for the same key at the same level
DEFAULT_COOLDOWNS = {
    "default": 300.0,  # job failures, slow queries, pool, probes, anything not named below
    "expired_keys": 1800.0,
    "stale_keys": 1800.0,
}
DEFAULT_MAX_AGE = 7 * 86400.0  # an entry not seen for this long is forgotten (its job stopped running)
DEFAULT_LOCK_TIMEOUT = 10.0
FINGERPRINT_PREFIX = "baileys-resilience"

AlertKey = collections.namedtuple("AlertKey", "job check company")


class AlertStateError(errors.BaileysResilienceError, ValueError):
    """A bad cooldown setting (raised at config time, never while a job runs)."""


class StateUnavailable(errors.BaileysResilienceError, RuntimeError):
    """The state file cannot be used right now; decisions fail open."""


def make_key(job, check="failure", company=""):
    if isinstance(job, AlertKey):
        return job
    if isinstance(job, (tuple, list)):
        job, check, company = (list(job) + ["failure", ""])[:3]
    return AlertKey(str(job), str(check or "failure"), "" if company is None else str(company))


def fingerprint(key):
    """Sentry fingerprint of an alert key: one issue per (job, check, company), whatever the message."""
    key = make_key(key)
    return [FINGERPRINT_PREFIX, key.job, key.check, key.company]


def normalize_level(level):
    level = _LEVEL_ALIASES.get(str(level).lower(), str(level).lower()) if level is not None else "ok"
    if level not in LEVELS:
        raise AlertStateError("unknown alert level %r (known: %s)" % (level, ", ".join(LEVELS)))
    return level


_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(s|sec|m|min|h|d)?\s*$", re.I)
_UNITS = {None: 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}


def parse_seconds(value, where="cooldown"):
    """Seconds from a number or a string such as ``90``, ``90s``, ``5m``, ``1h``, ``1d``."""
    if isinstance(value, bool) or value is None:
        raise AlertStateError("%s must be a number of seconds or a duration such as 5m, got %r" % (where, value))
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        m = _DURATION.match(str(value))
        if not m:
            raise AlertStateError("%s must be a number of seconds or a duration such as 5m, got %r" % (where, value))
        seconds = float(m.group(1)) * _UNITS[(m.group(2) or "").lower() or None]
    if seconds < 0:
        raise AlertStateError("%s must not be negative" % where)
    return seconds


def parse_cooldowns(config):
    """Validated cooldowns: ``{"default": s, "<check>": s, "<job>.<check>": s}`` merged over the defaults."""
    merged = dict(DEFAULT_COOLDOWNS)
    if config is None:
        return merged
    if not isinstance(config, dict):
        raise AlertStateError("alerts.cooldowns must be a mapping of check name to seconds")
    for name, value in config.items():
        if not isinstance(name, str) or not name:
            raise AlertStateError("alerts.cooldowns keys must be check names")
        merged[name] = parse_seconds(value, "alerts.cooldowns.%s" % name)
    return merged


def _key_id(key):
    return json.dumps([key.job, key.check, key.company], separators=(",", ":"))


def _utc(ts):
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def human_duration(seconds):
    seconds = int(max(0, round(seconds or 0)))
    if seconds < 60:
        return "%ds" % seconds
    if seconds < 3600:
        return "%dm%s" % (seconds // 60, " %ds" % (seconds % 60) if seconds % 60 else "")
    if seconds < 86400:
        return "%dh%s" % (seconds // 3600, " %dm" % (seconds % 3600 // 60) if seconds % 3600 // 60 else "")
    return "%dd %dh" % (seconds // 86400, seconds % 86400 // 3600)


class Decision:
    """What :meth:`AlertState.decide` says about one key.

    ``kind``: ``new`` (first occurrence), ``changed`` (level change), ``repeat`` (same level, cooldown
    over), ``suppressed`` (same level, within the cooldown), ``resolved`` (cleared after a message),
    ``none`` (ok and nothing open).  ``send`` is true for new, changed, repeat and resolved.
    """

    __slots__ = ("key", "level", "previous_level", "kind", "send", "count", "suppressed", "first_seen",
                 "last_sent", "now", "cooldown", "message", "degraded")

    def __init__(self, key, level, kind, send, now, previous_level=None, count=0, suppressed=0, first_seen=None,
                 last_sent=None, cooldown=None, message=None, degraded=False):
        self.key = key
        self.level = level
        self.previous_level = previous_level
        self.kind = kind
        self.send = send
        self.now = now
        self.count = count
        self.suppressed = suppressed
        self.first_seen = first_seen
        self.last_sent = last_sent
        self.cooldown = cooldown
        self.message = message
        self.degraded = degraded

    @property
    def fingerprint(self):
        return fingerprint(self.key)

    @property
    def open_for(self):
        """Seconds since the first occurrence of this episode."""
        return None if self.first_seen is None else max(0.0, self.now - self.first_seen)

    def as_dict(self):
        out = {name: getattr(self, name) for name in self.__slots__}
        out["key"] = list(self.key)
        out["fingerprint"] = self.fingerprint
        return out

    def describe(self):
        """A short human line about the episode (for a message)."""
        key = self.key
        label = key.check + (" (%s)" % key.company if key.company else "")
        if self.kind == "resolved":
            return "%s resolved after %s (%d occurrence%s, was %s)" % (
                label, human_duration(self.open_for), self.count, "" if self.count == 1 else "s", self.previous_level)
        if self.kind == "changed":
            return "%s %s -> %s" % (label, self.previous_level, self.level)
        if self.kind == "repeat":
            return "%s still %s since %s (%d occurrences, %d not messaged)" % (
                label, self.level, _utc(self.first_seen), self.count, self.suppressed)
        return "%s %s" % (label, self.level)

    def note(self):
        """What the message adds to the problem's own text: "" for a new one."""
        if self.kind == "changed":
            return "was %s" % self.previous_level
        if self.kind == "repeat":
            return "still %s since %s, %d occurrences" % (self.level, _utc(self.first_seen), self.count)
        return ""

    def __repr__(self):
        return "Decision(%s %s %s send=%s count=%d)" % ("/".join(self.key), self.level, self.kind, self.send,
                                                        self.count)


class Transaction:
    """The state, loaded under the lock; decisions change it; written back when the block ends."""

    def __init__(self, state, entries, now, degraded=False):
        self.state = state
        self.entries = entries
        self.now = now
        self.degraded = degraded
        self.changed = False

    def decide(self, key, level, message=None, now=None):
        key = make_key(key)
        level = normalize_level(level)
        now = self.now if now is None else float(now)
        kid = _key_id(key)
        entry = self.entries.get(kid)
        cooldown = self.state.cooldown(key)
        if self.degraded:
            # no state to go by: behave as without one (send every problem, never a "resolved")
            send = level != "ok"
            return Decision(key, level, "new" if send else "none", send, now, count=1 if send else 0,
                            cooldown=cooldown, message=message, degraded=True)
        if level == "ok":
            if entry is None:
                return Decision(key, level, "none", False, now, cooldown=cooldown, message=message)
            del self.entries[kid]
            self.changed = True
            sent = entry.get("last_sent") is not None
            return Decision(key, level, "resolved" if sent else "none", sent, now,
                            previous_level=entry.get("level"), count=int(entry.get("count") or 0),
                            suppressed=int(entry.get("suppressed") or 0), first_seen=entry.get("first_seen"),
                            last_sent=entry.get("last_sent"), cooldown=cooldown, message=message)
        self.changed = True
        if entry is None:
            entry = {"job": key.job, "check": key.check, "company": key.company, "first_seen": now, "count": 0,
                     "suppressed": 0, "last_sent": None, "level": None}
            self.entries[kid] = entry
        previous = entry.get("level")
        last_sent = entry.get("last_sent")
        entry["count"] = int(entry.get("count") or 0) + 1
        entry["last_seen"] = now
        entry["level"] = level
        if message is not None:
            entry["last_message"] = str(message)[:1000]
        if previous is None:
            kind = "new"
        elif previous != level:
            kind = "changed"
        elif entry.get("retry") or last_sent is None or now - float(last_sent) >= cooldown or now < float(last_sent):
            # a failed delivery, or the cooldown is over (or the clock went back: better one message too many)
            kind = "repeat"
        else:
            kind = "suppressed"
        send = kind != "suppressed"
        suppressed = int(entry.get("suppressed") or 0)
        if send:
            entry["last_sent"] = now
            entry["sent_level"] = level
            entry["suppressed"] = 0
            entry.pop("retry", None)
        else:
            entry["suppressed"] = suppressed + 1
        return Decision(key, level, kind, send, now, previous_level=previous, count=entry["count"],
                        suppressed=suppressed, first_seen=entry.get("first_seen"), last_sent=last_sent,
                        cooldown=cooldown, message=message)

    def sweep(self, job, active_keys, now=None):
        """Resolve every open key of ``job`` not in ``active_keys`` (a job's report is complete)."""
        active = {_key_id(make_key(k)) for k in active_keys}
        out = []
        for kid, entry in sorted(self.entries.items()):
            if entry.get("job") == job and kid not in active:
                out.append(self.decide(AlertKey(entry["job"], entry["check"], entry.get("company") or ""), "ok",
                                       now=now))
        return out

    def mark_undelivered(self, keys):
        """The message for these keys did not go out: send again at the next occurrence."""
        for key in keys:
            entry = self.entries.get(_key_id(make_key(key)))
            if entry is not None:
                entry["retry"] = True
                self.changed = True


class AlertState:
    """The alert state file; see the module docstring."""

    def __init__(self, path=DEFAULT_STATE_FILE, cooldowns=None, clock=None, warn=None,
                 lock_timeout=DEFAULT_LOCK_TIMEOUT, max_age=DEFAULT_MAX_AGE):
        self.path = os.path.abspath(path)
        self.lock_path = self.path + ".lock"
        self.cooldowns = parse_cooldowns(cooldowns)
        self.clock = clock or time.time
        self.warn = warn
        self.lock_timeout = float(lock_timeout)
        self.max_age = max_age
        self.warnings = []

    def _warn(self, message):
        self.warnings.append(message)
        if self.warn is not None:
            try:
                self.warn(message)
            except Exception:  # noqa: BLE001 - a broken logger must not break alerting
                pass

    def cooldown(self, key):
        key = make_key(key)
        for name in ("%s.%s" % (key.job, key.check), key.check, "default"):
            if name in self.cooldowns:
                return float(self.cooldowns[name])
        return DEFAULT_COOLDOWN

    # ------------------------------------------------------------------ disk

    def _ensure_dir(self):
        directory = os.path.dirname(self.path)
        try:
            os.makedirs(directory, mode=0o700)
        except OSError as exc:
            if exc.errno != errno.EEXIST:
                raise

    def _lock(self):
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        deadline = time.monotonic() + self.lock_timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
            if time.monotonic() >= deadline:
                os.close(fd)
                raise StateUnavailable("alert state lock %s held for more than %.0f s"
                                       % (self.lock_path, self.lock_timeout))
            time.sleep(0.02)

    def _set_aside(self, reason, now):
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
        aside = "%s.damaged-%s" % (self.path, stamp)
        n = 1
        while os.path.lexists(aside):
            n += 1
            aside = "%s.damaged-%s-%d" % (self.path, stamp, n)
        os.rename(self.path, aside)
        fsutil.fsync_dir(os.path.dirname(self.path))
        self._warn("alert state %s is damaged (%s): kept aside as %s; going on with an empty state"
                   % (self.path, reason, aside))
        return aside

    def _read(self, now):
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return {}
        with os.fdopen(fd, "rb") as fh:
            raw = fh.read(16 << 20)
        try:
            data = json.loads(raw.decode("utf-8"))
            if not isinstance(data, dict) or not isinstance(data.get("alerts"), dict):
                raise ValueError("not an alert state document")
            if data.get("version") != STATE_VERSION:
                raise ValueError("unknown version %r" % data.get("version"))
            entries = {}
            for kid, entry in data["alerts"].items():
                if not isinstance(entry, dict) or normalize_level(entry.get("level")) == "ok":
                    raise ValueError("bad entry %r" % kid)
                for field in ("first_seen", "last_seen", "last_sent"):
                    if entry.get(field) is not None:
                        entry[field] = float(entry[field])
                entries[kid] = entry
        except (ValueError, TypeError, AttributeError, AlertStateError, UnicodeDecodeError) as exc:
            self._set_aside(exc, now)
            return {}
        return entries

    def _write(self, entries, now):
        if self.max_age:
            for kid in [k for k, e in entries.items() if now - float(e.get("last_seen") or now) > self.max_age]:
                del entries[kid]
        doc = {"version": STATE_VERSION, "updated_at": _utc(now), "alerts": entries}
        data = json.dumps(doc, indent=1, sort_keys=True).encode("utf-8") + b"\n"
        fsutil.atomic_write(self.path, data, mode=0o600)

    def transaction(self):
        return _TransactionContext(self)

    # ------------------------------------------------------------------ decisions

    def decide(self, key, level, message=None, now=None):
        """One decision in its own locked read-decide-write."""
        with self.transaction() as tx:
            return tx.decide(key, level, message=message, now=now)

    def report(self, job, items, now=None, hold=()):
        """A job's complete report: ``items`` ``[(key, level, message)]``; keys of ``job`` not listed (nor
        in ``hold``: still failing but not alerting, left as they are) are ok.

        Returns the decisions (the listed ones first, then the swept ones).
        """
        with self.transaction() as tx:
            out = [tx.decide(key, level, message=message, now=now) for key, level, message in items]
            active = [d.key for d in out if d.level != "ok"] + [make_key(k) for k in hold]
            out.extend(tx.sweep(job, active, now=now))
            return out

    def mark_undelivered(self, keys):
        keys = list(keys)
        if not keys:
            return
        with self.transaction() as tx:
            tx.mark_undelivered(keys)

    def entries(self):
        """A copy of the current entries (read under the lock)."""
        with self.transaction() as tx:
            return {k: dict(v) for k, v in tx.entries.items()}


class _TransactionContext:
    def __init__(self, state):
        self.state = state
        self.fd = None
        self.tx = None

    def __enter__(self):
        state = self.state
        now = float(state.clock())
        try:
            state._ensure_dir()
            self.fd = state._lock()
            entries = state._read(now)
            self.tx = Transaction(state, entries, now)
        except (OSError, StateUnavailable) as exc:
            self._unlock()
            state._warn("alert state %s unusable (%s): sending without de-duplication" % (
                state.path, getattr(exc, "strerror", None) or exc))
            self.tx = Transaction(state, {}, now, degraded=True)
        return self.tx

    def _unlock(self):
        if self.fd is not None:
            try:
                os.close(self.fd)  # drops the flock
            finally:
                self.fd = None

    def __exit__(self, exc_type, exc, tb):
        try:
            if self.tx is not None and not self.tx.degraded and self.tx.changed and exc_type is None:
                try:
                    self.state._write(self.tx.entries, self.tx.now)
                except OSError as err:
                    self.state._warn("cannot write alert state %s: %s" % (self.state.path, err.strerror or err))
        finally:
            self._unlock()
        return False
