# -*- coding: utf-8 -*-
# Copyright: baileys.resilience contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Alerts for the host jobs: Sentry Crons check-ins and error events, Telegram messages.

No Ansible import.  Both channels are optional and best effort: a failed delivery is logged
(without the secret) and never changes the job's own result.

Sentry
    One monitor per job (slug ``<monitor_prefix>-<job>``).  :meth:`Alerts.job_started` sends an
    ``in_progress`` check-in carrying ``monitor_config`` (crontab schedule, ``checkin_margin``,
    ``max_runtime``, timezone UTC) so Sentry creates or updates the monitor and alerts on a missed
    or timed-out run; :meth:`Alerts.job_finished` sends ``ok`` or ``error``.  Failures are captured as
    events with the job's context.  ``send_default_pii`` is off, local variables are not sent, the
    default integrations (argv, logging, excepthook...) are off, and ``before_send`` masks every
    known secret and every field whose name looks like a secret.

Telegram
    ``POST {api_base}/bot<token>/sendMessage`` with ``chat_id`` and ``text`` (JSON), stdlib
    ``urllib`` with a timeout.  The token is part of the URL path, so every error message is
    scrubbed of it before it is logged.

Alert state (optional, alertstate.py)
    With ``alerts.state_file`` set (or a ``default_state_file`` given by the caller), every decision to
    send goes through the alert state on disk, one entry per alert key ``(job, check, company)``: the
    first occurrence and a level change are sent at once, the same problem again at most once per
    cooldown (``alerts.cooldowns``: check name, ``<job>.<check>`` or ``default`` to seconds or ``5m``),
    and a cleared problem gets one "resolved" message.  A job's failure is the key
    ``(job, "failure", "")``; the checks a job reports (health) are ``(job, <check>, <company>)``; a job's
    report is complete, so a key of that job it no longer reports is resolved.  Sentry events carry the
    fingerprint ``["baileys-resilience", job, check, company]`` so one problem is one Sentry issue.
    Without a state file the behaviour is the old one: a message on every failed or warning run.
"""
from __future__ import absolute_import, division, print_function

import json
import socket
import time

from . import alertstate, errors, jobs

__metaclass__ = type

try:  # Python 3
    from urllib.error import HTTPError, URLError
    from urllib.request import Request, build_opener, HTTPHandler, HTTPSHandler
except ImportError:  # pragma: no cover
    Request = None

DEFAULT_TELEGRAM_API = "https://api.telegram.org"
TELEGRAM_MAX_TEXT = 4096
DEFAULT_SCHEDULES = {
    "backup": "0 3 * * *",
    "verify": "0 5 * * 0",
    "cleanup": "30 4 * * *",
    "health": "*/5 * * * *",
    "export": "15 * * * *",
    "import": "0 0 1 1 *",
}


class AlertConfigError(errors.BaileysResilienceError, ValueError):
    pass


def _dict(value, name):
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise AlertConfigError("alerts.%s must be a mapping" % name)
    return value


class Alerts:
    """Sentry and Telegram, configured from the ``alerts`` section of the config file."""

    SENTRY_KEYS = ("dsn", "environment", "release", "monitor_prefix", "schedules", "checkin_margin",
                   "max_runtime", "failure_issue_threshold", "recovery_threshold", "flush_timeout", "server_name")
    TELEGRAM_KEYS = ("bot_token", "chat_id", "api_base", "notify_success", "timeout", "disable_notification")
    STATE_KEYS = ("state_file", "cooldowns")

    def __init__(self, config=None, log=None, secrets=(), default_state_file=None, clock=None):
        config = _dict(config, "")
        unknown = sorted(set(config) - {"sentry", "telegram"} - set(self.STATE_KEYS))
        if unknown:
            raise AlertConfigError("unknown key(s) under alerts: %s" % ", ".join(unknown))
        self.sentry_cfg = _dict(config.get("sentry"), "sentry")
        self.telegram_cfg = _dict(config.get("telegram"), "telegram")
        for section, allowed, name in ((self.sentry_cfg, self.SENTRY_KEYS, "sentry"),
                                       (self.telegram_cfg, self.TELEGRAM_KEYS, "telegram")):
            bad = sorted(set(section) - set(allowed))
            if bad:
                raise AlertConfigError("unknown key(s) under alerts.%s: %s" % (name, ", ".join(bad)))
        self.log = log
        self.secrets = [str(s) for s in secrets if s]
        for secret in (self.sentry_cfg.get("dsn"), self.telegram_cfg.get("bot_token")):
            if secret:
                self.secrets.append(str(secret))
                if log is not None:
                    log.add_secret(secret)
        self._sentry = None
        self._check_ins = {}
        self._started = {}
        self.delivery_failures = []
        self.decisions = []
        self.clock = clock
        state_file = config.get("state_file")
        if state_file is None:
            state_file = default_state_file
        if state_file not in (None, False) and not isinstance(state_file, str):
            raise AlertConfigError("alerts.state_file must be a path (or empty to turn the alert state off)")
        try:
            self.cooldowns = alertstate.parse_cooldowns(config.get("cooldowns"))
        except alertstate.AlertStateError as exc:
            raise AlertConfigError(str(exc))
        self.state = None
        if state_file:
            self.use_state(state_file)

    def use_state(self, path):
        """Decide through the alert state at ``path`` (kept when one is already configured)."""
        if self.state is None and path:
            self.state = alertstate.AlertState(path, cooldowns=self.cooldowns, clock=self.clock,
                                               warn=self._state_warning)
        return self.state

    def _state_warning(self, message):
        self._log("alert_state", "warning", message=jobs.scrub_text(message, self.secrets))

    # ------------------------------------------------------------------ helpers

    @property
    def sentry_enabled(self):
        return bool(self.sentry_cfg.get("dsn"))

    @property
    def telegram_enabled(self):
        return bool(self.telegram_cfg.get("bot_token") and self.telegram_cfg.get("chat_id"))

    def _log(self, step, status, duration=None, **fields):
        if self.log is not None:
            self.log.emit(step, status, duration, **fields)

    def _fail(self, channel, exc):
        message = jobs.scrub_text("%s: %s" % (type(exc).__name__, exc), self.secrets)
        self.delivery_failures.append({"channel": channel, "error": message})
        self._log("alert_%s" % channel, "error", error=message)

    def scrub_event(self, event, hint=None):
        """Sentry ``before_send``: mask secrets anywhere in the event."""
        return jobs.scrub(event, self.secrets)

    # ------------------------------------------------------------------ Sentry

    def _sentry_sdk(self):
        if self._sentry is not None or not self.sentry_enabled:
            return self._sentry or None
        try:
            import sentry_sdk
            from sentry_sdk import consts

            if "data_collection" in getattr(consts, "DEFAULT_OPTIONS", {}):
                # newer 2.x: the structured replacement of send_default_pii
                privacy = {"data_collection": {"user_info": False, "http_bodies": [], "stack_frame_variables": False,
                                               "database_query_data": False}}
            else:
                privacy = {"send_default_pii": False}
            sentry_sdk.init(
                **privacy,
                dsn=self.sentry_cfg["dsn"],
                environment=self.sentry_cfg.get("environment"),
                release=self.sentry_cfg.get("release"),
                server_name=self.sentry_cfg.get("server_name"),
                include_local_variables=False,
                max_request_body_size="never",
                default_integrations=False,
                auto_enabling_integrations=False,
                before_send=self.scrub_event,
                before_breadcrumb=lambda crumb, hint: jobs.scrub(crumb, self.secrets),
                traces_sample_rate=0,
                shutdown_timeout=float(self.sentry_cfg.get("flush_timeout", 5)),
            )
            self._sentry = sentry_sdk
        except Exception as exc:  # noqa: BLE001 - a broken alert channel must not break the job
            self._fail("sentry", exc)
            self._sentry = False
        return self._sentry or None

    def monitor_slug(self, job):
        return "%s-%s" % (self.sentry_cfg.get("monitor_prefix") or "baileys-resilience", job)

    def monitor_config(self, job):
        schedules = dict(DEFAULT_SCHEDULES)
        schedules.update(_dict(self.sentry_cfg.get("schedules"), "sentry.schedules"))
        config = {
            "schedule": {"type": "crontab", "value": str(schedules.get(job, DEFAULT_SCHEDULES["backup"]))},
            "checkin_margin": int(self.sentry_cfg.get("checkin_margin", 10)),
            "max_runtime": int(self.sentry_cfg.get("max_runtime", 60)),
            "timezone": "UTC",
        }
        for key in ("failure_issue_threshold", "recovery_threshold"):
            if self.sentry_cfg.get(key) is not None:
                config[key] = int(self.sentry_cfg[key])
        return config

    def checkin(self, job, status, duration=None):
        sdk = self._sentry_sdk()
        if sdk is None:
            return None
        try:
            from sentry_sdk.crons import capture_checkin
            check_in_id = capture_checkin(
                monitor_slug=self.monitor_slug(job),
                check_in_id=self._check_ins.get(job),
                status=status,
                duration=duration,
                monitor_config=self.monitor_config(job),
            )
            if check_in_id:
                self._check_ins[job] = check_in_id
            return check_in_id
        except Exception as exc:  # noqa: BLE001
            self._fail("sentry", exc)
            return None

    def capture_failure(self, job, message, context=None, exc=None, check="failure", company="", level="error"):
        """A Sentry event grouped by the alert key's fingerprint (one issue per job, check and company)."""
        sdk = self._sentry_sdk()
        if sdk is None:
            return None
        try:
            # sentry-sdk 2.x: new_scope; 1.x (Debian bookworm's python3-sentry-sdk): push_scope
            scope_cm = sdk.new_scope() if hasattr(sdk, "new_scope") else sdk.push_scope()
            with scope_cm as scope:
                scope.set_tag("job", job)
                scope.set_tag("check", check)
                if company:
                    scope.set_tag("company", company)
                scope.set_context("job", jobs.scrub(dict(context or {}, job=job), self.secrets))
                scope.fingerprint = alertstate.fingerprint((job, check, company))
                if exc is not None:
                    return sdk.capture_exception(exc)
                return sdk.capture_message(jobs.scrub_text(message, self.secrets), level=level)
        except Exception as err:  # noqa: BLE001
            self._fail("sentry", err)
            return None

    def flush(self):
        if self._sentry:
            try:
                self._sentry.flush(timeout=float(self.sentry_cfg.get("flush_timeout", 5)))
            except Exception as exc:  # noqa: BLE001
                self._fail("sentry", exc)

    # ------------------------------------------------------------------ Telegram

    def telegram(self, text, alert_key=None, level="warning"):
        """Send ``text``; True when Telegram answered ok.

        With ``alert_key`` (``(job, check, company)``) and an alert state, the state decides first:
        False (nothing sent) when this key is within its cooldown.
        """
        if not self.telegram_enabled:
            return False
        if alert_key is not None and self.state is not None:
            decision = self.state.decide(alert_key, level, message=text)
            self.decisions.append(decision)
            if not decision.send:
                return False
            if not self._telegram_send(text):
                self.state.mark_undelivered([decision.key])
                return False
            return True
        return self._telegram_send(text)

    def _telegram_send(self, text):
        if not self.telegram_enabled:
            return False
        cfg = self.telegram_cfg
        base = str(cfg.get("api_base") or DEFAULT_TELEGRAM_API).rstrip("/")
        url = "%s/bot%s/sendMessage" % (base, cfg["bot_token"])
        text = jobs.scrub_text(text, self.secrets)
        if len(text) > TELEGRAM_MAX_TEXT:
            text = text[: TELEGRAM_MAX_TEXT - 15] + "\n...(truncated)"
        body = {"chat_id": cfg["chat_id"], "text": text, "disable_web_page_preview": True}
        if cfg.get("disable_notification"):
            body["disable_notification"] = True
        data = json.dumps(body).encode("utf-8")
        request = Request(url, data=data, method="POST",
                          headers={"Content-Type": "application/json", "User-Agent": "baileys-resilience"})
        started = time.monotonic()
        try:
            opener = build_opener(HTTPHandler(), HTTPSHandler())
            with opener.open(request, timeout=float(cfg.get("timeout", 10))) as response:
                reply = json.loads(response.read(65536).decode("utf-8") or "{}")
            if not reply.get("ok", False):
                raise RuntimeError("Telegram answered %s" % (reply.get("description") or "not ok"))
        except HTTPError as exc:
            detail = ""
            try:
                detail = json.loads(exc.read(4096).decode("utf-8")).get("description", "")
            except Exception:  # noqa: BLE001
                pass
            self._fail("telegram", RuntimeError("HTTP %s %s" % (exc.code, detail)))
            return False
        except (URLError, OSError, socket.timeout, ValueError, RuntimeError) as exc:
            self._fail("telegram", exc)
            return False
        self._log("alert_telegram", "ok", duration=time.monotonic() - started)
        return True

    # ------------------------------------------------------------------ job lifecycle

    def job_started(self, job):
        self._started[job] = time.monotonic()
        self.checkin(job, "in_progress")

    def job_finished(self, job, ok, summary, context=None, exc=None, host=None, warn=False, checks=None,
                     notify_on="warning"):
        """Report the end of a job: check-in, error event, Telegram.  Never raises.

        ``ok`` decides the check-in; ``warn`` (a run that worked but found a problem, such as a health
        warning) sends the Telegram message without failing the check-in.  ``checks`` (health's
        ``[{"name", "status", "detail", "company_id"?}]``) make one alert key per check when the alert
        state is on; ``notify_on`` (warning/critical/never) is the lowest check level that alerts.
        """
        duration = time.monotonic() - self._started.pop(job, time.monotonic())
        try:
            self.checkin(job, "ok" if ok else "error", duration=duration)
            if self.state is not None:
                self._finish_with_state(job, ok, summary, context, exc, host, warn, checks, notify_on)
                return
            if not ok:
                self.capture_failure(job, summary, context, exc)
            if not ok or warn or self.telegram_cfg.get("notify_success"):
                if not ok:
                    head = "\u274c baileys-resilience %s FAILED" % job
                elif warn:
                    head = "\u26a0\ufe0f baileys-resilience %s needs attention" % job
                else:
                    head = "\u2705 baileys-resilience %s succeeded" % job
                if host:
                    head += " on %s" % host
                self.telegram("%s\n%s" % (head, summary))
        except Exception as err:  # noqa: BLE001 - alerting never changes the job's result
            self._fail("alerts", err)
        finally:
            self.flush()

    # ------------------------------------------------------------------ with the alert state

    @staticmethod
    def check_items(job, checks, notify_on="warning", notify=True):
        """``(items, held)``: ``[(key, level, detail)]`` of the checks that alert (at or above ``notify_on``,
        and ``notify``), and the keys of the other failing checks, which neither alert nor resolve."""
        floor = len(alertstate.LEVELS) if notify_on == "never" else \
            alertstate.LEVELS.index(alertstate.normalize_level(notify_on))
        items, held = [], []
        for check in checks or ():
            level = alertstate.normalize_level(check.get("status"))
            if level == "ok":
                continue
            company = check.get("company_id", check.get("company")) or ""
            key = alertstate.make_key(job, check.get("name") or "check", company)
            if notify and alertstate.LEVELS.index(level) >= floor:
                items.append((key, level, check.get("detail") or ""))
            else:
                held.append(key)
        return items, held

    def _finish_with_state(self, job, ok, summary, context, exc, host, warn, checks, notify_on):
        items, held = [], []
        if checks is not None:
            items, held = self.check_items(job, checks, notify_on, notify=warn or not ok)
        if not ok and not any(level == "critical" for _k, level, _m in items):
            items.append((alertstate.make_key(job, "failure"), "critical", summary))
        elif ok and warn and not items:
            items.append((alertstate.make_key(job, "attention"), "warning", summary))
        decisions = self.state.report(job, items, hold=held)
        self.decisions.extend(decisions)
        problems = [d for d in decisions if d.send and d.kind != "resolved"]
        resolved = [d for d in decisions if d.send and d.kind == "resolved"]
        for d in problems:
            if d.level == "critical":
                failure = d.key.check == "failure"
                self.capture_failure(job, summary if failure else "%s: %s" % (d.key.check, d.message),
                                     dict(context or {}, alert=d.kind, occurrences=d.count),
                                     exc if failure else None, check=d.key.check, company=d.key.company)
        on = " on %s" % host if host else ""
        if problems:
            if not ok:
                head = "\u274c baileys-resilience %s FAILED%s" % (job, on)
            else:
                head = "\u26a0\ufe0f baileys-resilience %s needs attention%s" % (job, on)
            lines = [head]
            for d in problems:
                if d.key.check in ("failure", "attention") and not d.key.company:
                    lines.append(str(d.message))
                    if d.note():
                        lines.append("(%s)" % d.note())
                else:
                    lines.append("\u2022 [%s] %s%s: %s%s" % (
                        d.level.upper(), d.key.check, " (%s)" % d.key.company if d.key.company else "", d.message,
                        " (%s)" % d.note() if d.note() else ""))
            lines.extend("\u2705 " + d.describe() for d in resolved)
            text = "\n".join(lines)
        elif resolved:
            text = "\n".join(["\u2705 baileys-resilience %s recovered%s" % (job, on)]
                             + [d.describe() for d in resolved])
            if ok and summary and self.telegram_cfg.get("notify_success"):
                text += "\n" + summary
        elif ok and self.telegram_cfg.get("notify_success"):
            text = "\u2705 baileys-resilience %s succeeded%s\n%s" % (job, on, summary)
        else:
            return
        if not self._telegram_send(text) and self.telegram_enabled and problems:
            self.state.mark_undelivered([d.key for d in problems])

    def alert(self, job, check, level, message, company="", host=None, context=None, exc=None):
        """One alert key outside a job's end (the store probe, a lock held): decide, then send.

        Returns the :class:`alertstate.Decision`.  Without an alert state every problem is sent and
        nothing is ever "resolved".  Never raises.
        """
        try:
            level = alertstate.normalize_level(level)
            key = alertstate.make_key(job, check, company)
            if self.state is not None:
                decision = self.state.decide(key, level, message=message)
            else:
                decision = alertstate.Decision(key, level, "new" if level != "ok" else "none", level != "ok",
                                               time.time(), count=1, message=message, degraded=True)
            self.decisions.append(decision)
            if not decision.send:
                return decision
            on = " on %s" % host if host else ""
            label = check + (" (%s)" % company if company else "")
            if decision.kind == "resolved":
                text = "\u2705 baileys-resilience %s%s: %s" % (job, on, decision.describe())
                if message:
                    text += "\n%s" % message
            else:
                icon = "\u274c" if level == "critical" else "\u26a0\ufe0f"
                text = "%s baileys-resilience %s%s: %s %s\n%s" % (icon, job, on, label, level.upper(), message)
                if decision.note():
                    text += "\n(%s)" % decision.note()
                if level == "critical":
                    self.capture_failure(job, "%s: %s" % (label, message),
                                         dict(context or {}, alert=decision.kind, occurrences=decision.count),
                                         exc, check=check, company=company)
            if not self._telegram_send(text) and self.telegram_enabled and self.state is not None \
                    and decision.kind != "resolved":
                self.state.mark_undelivered([key])
            return decision
        except Exception as err:  # noqa: BLE001 - alerting never changes the job's result
            self._fail("alerts", err)
            return None
        finally:
            self.flush()
