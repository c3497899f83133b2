"""Every exception class the core defines derives from errors.BaileysResilienceError."""
from __future__ import annotations

import importlib
import inspect
import os

import pytest

from ansible_collections.baileys.resilience.plugins.module_utils import errors, s3conf

PACKAGE = "ansible_collections.baileys.resilience.plugins.module_utils"
MODULE_UTILS = os.path.dirname(os.path.abspath(errors.__file__))
ROOMS = sorted(n[:-3] for n in os.listdir(MODULE_UTILS) if n.endswith(".py") and n != "__init__.py")
# s3conf's stand-ins for botocore's exception classes when boto3 is missing mimic botocore, not us
BOTO_STANDINS = {"BotoCoreError", "ClientError", "BotoConnectionError", "HTTPClientError", "IncompleteReadError"}


def _exception_classes(module):
    """Exception classes defined in ``module`` (at module level or nested in a class)."""
    found, seen = [], set()
    todo = list(vars(module).values())
    while todo:
        obj = todo.pop()
        if inspect.isclass(obj) and obj.__module__ == module.__name__ and obj not in seen:
            seen.add(obj)
            if issubclass(obj, BaseException):
                found.append(obj)
            todo.extend(v for v in vars(obj).values() if inspect.isclass(v))
    return found


@pytest.mark.parametrize("room", ROOMS)
def test_every_exception_class_derives_from_the_common_parent(room):
    module = importlib.import_module("%s.%s" % (PACKAGE, room))
    for cls in _exception_classes(module):
        if room == "s3conf" and not s3conf.HAS_BOTO3 and cls.__name__ in BOTO_STANDINS:
            continue
        assert issubclass(cls, errors.BaileysResilienceError), "%s.%s does not derive from BaileysResilienceError" % (
            room, cls.__qualname__)


def test_the_common_parent_keeps_the_builtin_bases():
    from ansible_collections.baileys.resilience.plugins.module_utils import backup, cli, fsutil, pgconn

    assert issubclass(backup.BackupError, RuntimeError)
    assert issubclass(pgconn.PgError, RuntimeError)
    assert issubclass(cli.ConfigError, ValueError)
    err = fsutil.FsError(2, "no such file")
    assert isinstance(err, OSError) and err.errno == 2 and err.strerror == "no such file"
    assert issubclass(errors.BaileysResilienceError, Exception)
    assert errors.BaileysResilienceError.__doc__
