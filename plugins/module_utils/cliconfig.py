# -*- coding: utf-8 -*-
# Copyright: baileys.resilience contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The host tool's config: reading, merging and validating ``config.yml`` and its ``config.d/`` fragments.

``/etc/baileys-resilience/config.yml``, then the fragments ``config.d/*.yml`` next to it, merged
in name order; each refused unless mode 0600/0400 and owned by root or the user running the tool
(it may hold a password and tokens).  :data:`SECTIONS` and :data:`TOP_LEVEL` are every option the
file may hold, with its type; the connection and store options are the modules' argument specs
(pgconn.py).  Part of ``baileys-resilience`` (cli.py); no Ansible import, no module imports it.
"""
from __future__ import absolute_import, division, print_function

import os
import re
import stat

from . import alerts as alerts_mod
from . import agecrypt, errors, jobs, pgconn

__metaclass__ = type

DEFAULT_CONFIG = "/etc/baileys-resilience/config.yml"
NOTIFY_ON = ("warning", "critical", "never")  # health.notify_on; the first is the default

SECTIONS = {
    "backup": {"prefix": str},
    "retention": {"keep_daily": int, "keep_monthly": int},
    "cleanup": {"older_than_days": int, "age_column": str, "batch_size": int, "max_delete": int,
                "confirm_large_delete": bool, "companies": list, "vacuum": bool},
    "health": {"probes": int, "thresholds": dict, "verify_checksum": bool, "watch_interval": (int, float),
               "notify_on": str},
    "export": {"dest": str, "company_dir": str, "prune": bool, "owner": (str, int), "group": (str, int),
               "mode": (str, int), "directory_mode": (str, int), "companies": list},
    "import": {"src": str, "company_dir": str, "prune": bool, "buffer_encoding": str, "companies": list},
    "alerts": {"sentry": dict, "telegram": dict, "state_file": str, "cooldowns": dict},
    "probe": {"interval": (int, float), "slow_seconds": (int, float), "connect_timeout": int,
              "statement_timeout": (int, float)},
    "s3": {"targets": list, "name_prefix": str, "after_backup": bool, "settings": dict, "verify_download": bool,
           "verify_existing": bool, "fetch_dir": str, "encryption": dict},
}
TOP_LEVEL = {"backup_dir": str, "pg_bin_dir": str, "textfile_dir": str, "lock_dir": str, "log_format": str,
             "hostname": str, "state_dir": str}


class ConfigError(errors.BaileysResilienceError, ValueError):
    """The config file is missing, unsafe or wrong."""


# --------------------------------------------------------------------------- config


def _check_type(where, value, expected):
    if value is None:
        return
    kinds = expected if isinstance(expected, tuple) else (expected,)
    if bool in kinds and not isinstance(value, bool):
        raise ConfigError("%s must be true or false, got %r" % (where, type(value).__name__))
    if bool not in kinds and isinstance(value, bool):
        raise ConfigError("%s must be %s, not a boolean" % (where, "/".join(k.__name__ for k in kinds)))
    if not isinstance(value, kinds):
        raise ConfigError("%s must be %s, got %s" % (where, "/".join(k.__name__ for k in kinds),
                                                     type(value).__name__))


def _argspec_kinds():
    table = {"str": str, "int": int, "dict": dict, "bool": bool, "list": list, "path": str}
    kinds, aliases = {}, {}
    for spec in (pgconn.CONNECTION_ARGSPEC, pgconn.STORE_ARGSPEC):
        for name, opts in spec.items():
            kinds[name] = table[opts.get("type", "str")]
            for alias in opts.get("aliases", []):
                aliases[alias] = name
    return kinds, aliases


def check_config_file(fd, path):
    """Refuse a config others could read or write (it may hold a password and tokens)."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError("config %s is not a regular file" % path)
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o177:
        raise ConfigError("refusing to read config %s: mode %04o lets others read or write it; it may hold "
                          "passwords and tokens. Run: chmod 0600 %s" % (path, mode, path))
    if st.st_uid not in (0, os.geteuid()):
        raise ConfigError("refusing to read config %s: owned by uid %d, not by root or uid %d"
                          % (path, st.st_uid, os.geteuid()))


def _read_yaml(path):
    """One YAML mapping from a private file (see :func:`check_config_file`)."""
    try:
        import yaml
    except ImportError:  # pragma: no cover
        raise ConfigError("PyYAML is required (Debian: python3-yaml)")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError("cannot open config %s: %s" % (path, exc.strerror or exc))
    try:
        check_config_file(fd, path)
        with os.fdopen(fd, "rb") as fh:
            fd = None
            text = fh.read(1 << 20)
    finally:
        if fd is not None:
            os.close(fd)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        # a YAML error quotes the offending line, which may hold a secret: give the position only
        mark = getattr(exc, "problem_mark", None)
        where = " at line %d column %d" % (mark.line + 1, mark.column + 1) if mark else ""
        raise ConfigError("config %s is not valid YAML%s" % (path, where))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("config %s must be a YAML mapping" % path)
    return data


def _merge(base, extra):
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def fragment_paths(path):
    """``<config dir>/config.d/*.yml`` (and ``*.yaml``), sorted: the roles' fragments, merged in that order."""
    directory = os.path.join(os.path.dirname(os.path.abspath(path)), "config.d")
    try:
        st = os.stat(directory)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise ConfigError("cannot read %s: %s" % (directory, exc.strerror or exc))
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError("%s is not a directory" % directory)
    if stat.S_IMODE(st.st_mode) & 0o022 or st.st_uid not in (0, os.geteuid()):
        raise ConfigError("refusing to read %s: others can write it (mode %04o, uid %d)"
                          % (directory, stat.S_IMODE(st.st_mode), st.st_uid))
    return [os.path.join(directory, n) for n in sorted(os.listdir(directory))
            if n.endswith((".yml", ".yaml")) and not n.startswith(".")]


def _coerce(where, value, expected):
    kinds = expected if isinstance(expected, tuple) else (expected,)
    # templated role fragments may render a number as a string
    if int in kinds and isinstance(value, str) and re.match(r"^-?[0-9]+$", value.strip()):
        return int(value)
    _check_type(where, value, expected)
    return value


def load_config(path):
    """Parse the config file and its ``config.d/`` fragments, validate, return a plain dict."""
    data = _read_yaml(path)
    for fragment in fragment_paths(path):
        data = _merge(data, _read_yaml(fragment))
    kinds, aliases = _argspec_kinds()
    config = {}
    for key, value in data.items():
        name = aliases.get(key, key)
        if name in kinds:
            config[name] = _coerce(key, value, kinds[name])
        elif name in TOP_LEVEL:
            config[name] = _coerce(key, value, TOP_LEVEL[name])
        elif name in SECTIONS:
            _check_type(key, value, dict)
            section = {}
            for sub, item in (value or {}).items():
                if sub not in SECTIONS[name]:
                    raise ConfigError("unknown option %s.%s in %s (known: %s)" % (
                        name, sub, path, ", ".join(sorted(SECTIONS[name]))))
                section[sub] = _coerce("%s.%s" % (name, sub), item, SECTIONS[name][sub])
            config[name] = section
        else:
            raise ConfigError("unknown option %r in %s" % (key, path))
    if (config.get("health") or {}).get("notify_on", NOTIFY_ON[0]) not in NOTIFY_ON:
        raise ConfigError("health.notify_on must be warning, critical or never")
    if config.get("log_format", jobs.DEFAULT_LOG_FORMAT) not in jobs.LOG_FORMATS:
        raise ConfigError("log_format must be json or logfmt")
    try:
        alerts_mod.Alerts(config.get("alerts"))
    except alerts_mod.AlertConfigError as exc:
        raise ConfigError(str(exc))
    encryption = (config.get("s3") or {}).get("encryption")
    if encryption is not None:
        # checked here, before any job runs: a mistyped option or a bad recipient uploads nothing
        try:
            agecrypt.Encryption.from_options(encryption, "s3.encryption")
        except agecrypt.AgeError as exc:
            raise ConfigError("%s: %s" % (path, exc))
    return config


def config_secrets(config):
    """The secrets in ``config`` (password, Sentry DSN, bot token): masked in every log line and output."""
    out = [config.get("login_password"), (config.get("connect_params") or {}).get("password")]
    a = config.get("alerts") or {}
    out.append((a.get("sentry") or {}).get("dsn"))
    out.append((a.get("telegram") or {}).get("bot_token"))
    return [str(s) for s in out if s]
