"""Shared fixtures: a real PostgreSQL server for the whole run, a fresh database per test.

The collection is importable as ``ansible_collections.baileys.resilience`` through
``.build/collections`` (``make collection`` creates the link).
"""
from __future__ import annotations

import itertools
import os
import shutil
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLLECTIONS = os.path.join(ROOT, ".build", "collections")
LINK = os.path.join(COLLECTIONS, "ansible_collections", "baileys", "resilience")
if not os.path.exists(LINK):
    os.makedirs(os.path.dirname(LINK), exist_ok=True)
    os.symlink(ROOT, LINK)
for path in (COLLECTIONS, os.path.join(ROOT, "tests")):
    if path not in sys.path:
        sys.path.insert(0, path)

import baileys_node  # noqa: E402
from pgserver import PgServer  # noqa: E402

from ansible_collections.baileys.resilience.plugins.module_utils import pgconn  # noqa: E402

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
