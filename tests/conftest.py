"""Shared fixtures: a real PostgreSQL server for the whole run, a fresh database per test, moto S3 servers.

The collection is importable as ``ansible_collections.baileys.resilience`` through
``.build/collections`` (``make collection`` creates the link; created here when missing).
The helpers are the package ``support`` (tests/support), on ``sys.path`` through the
``pythonpath`` setting in pyproject.toml, like ``.build/collections``.
"""
from __future__ import annotations

import importlib
import itertools
import os
import shutil
import sys
import tempfile

import pytest

from support import COLLECTIONS, ROOT, baileys_node

LINK = os.path.join(COLLECTIONS, "ansible_collections", "baileys", "resilience")
if not os.path.exists(LINK):
    os.makedirs(os.path.dirname(LINK), exist_ok=True)
    os.symlink(ROOT, LINK)
    importlib.invalidate_caches()  # .build/collections is on sys.path (pyproject.toml) but was missing

from ansible_collections.baileys.resilience.plugins.module_utils import pgconn  # noqa: E402
from support.pgserver import PgServer  # noqa: E402
from support.s3fixtures import TEST_ACCESS_KEY, TEST_SECRET_KEY, FaultProxy, MotoServer  # noqa: E402

_counter = itertools.count(1)


@pytest.fixture(scope="session")
def pg(tmp_path_factory):
    """One real PostgreSQL server (the newest on this machine) for the session."""
    # not under pytest's 0700 tmp dir: the server runs as the postgres user
    base = tempfile.mkdtemp(prefix="baileys-resilience-pg-")
    os.chmod(base, 0o755)
    server = PgServer(base).start()
    yield server
    server.stop("immediate")
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def db(pg):
    """A new empty database with the auth-state tables; yields its connection params."""
    name = "t%d_%d" % (os.getpid(), next(_counter))
    admin = pgconn.connect(pg.params(), autocommit=True)
    admin.execute('CREATE DATABASE "%s"' % name)
    admin.close()
    params = pg.params(name)
    conn = pgconn.connect(params)
    pgconn.create_schema(conn, pgconn.Store())
    conn.commit()
    conn.close()
    yield params
    admin = pgconn.connect(pg.params(), autocommit=True)
    admin.execute('DROP DATABASE IF EXISTS "%s" WITH (FORCE)' % name)
    admin.close()


@pytest.fixture
def dbconn(db):
    conn = pgconn.connect(db)
    yield conn
    conn.close()


@pytest.fixture(scope="session")
def node():
    """``node`` able to run the pinned Baileys in tests/compat (skips when Node.js is missing)."""
    return baileys_node.find_node()


@pytest.fixture(scope="session")
def ansible_env():
    """Environment for running ansible/ansible-playbook against this checkout."""
    env = dict(os.environ)
    env["ANSIBLE_COLLECTIONS_PATH"] = COLLECTIONS
    env["ANSIBLE_CONFIG"] = os.path.join(ROOT, "ansible.cfg")
    env["ANSIBLE_NOCOLOR"] = "1"
    env["ANSIBLE_HOST_KEY_CHECKING"] = "0"
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


@pytest.fixture(scope="session")
def host_pkg(tmp_path_factory):
    """module_utils copied on a 'host' as the package baileys_resilience (as the tool role installs it)."""
    base = tmp_path_factory.mktemp("host")
    shutil.copytree(os.path.join(ROOT, "plugins", "module_utils"), str(base / "baileys_resilience"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    return str(base)


# --------------------------------------------------------------------------- S3 (support/s3fixtures.py)


@pytest.fixture(scope="session")
def moto(tmp_path_factory):
    """A moto standalone server for the session (buckets are unique per test)."""
    server = MotoServer(log_path=str(tmp_path_factory.mktemp("moto1") / "moto.log")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def moto2(tmp_path_factory):
    """A second, independent moto server (another provider / region endpoint)."""
    server = MotoServer(log_path=str(tmp_path_factory.mktemp("moto2") / "moto.log")).start()
    yield server
    server.stop()


@pytest.fixture
def aws_env(monkeypatch, tmp_path):
    """The moto credentials in the environment; no ~/.aws, no instance metadata."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", TEST_ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", TEST_SECRET_KEY)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_PROFILE", raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    return {"AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": TEST_SECRET_KEY,
            "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials")}


@pytest.fixture
def fault_proxy():
    """Factory: ``fault_proxy(server, *rules)`` -> a started :class:`FaultProxy`; stopped after the test."""
    proxies = []

    def make(server, *rules):
        proxy = FaultProxy(server.port, rules).start()
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.stop()


@pytest.fixture
def backup_dir(tmp_path):
    path = tmp_path / "backups"
    path.mkdir(mode=0o700)
    return str(path)
