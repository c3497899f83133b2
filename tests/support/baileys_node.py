"""The real Baileys client for tests: ``node`` and tests/compat/node_modules, and running its scripts.

tests/compat pins @whiskeysockets/baileys exactly (package.json + package-lock.json); its scripts print
JSON.  The ``node`` fixture (tests/conftest.py) calls :func:`find_node`; tests call :func:`run_node`.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess

import pytest

COMPAT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "compat")
BAILEYS_VERSION = "7.0.0-rc14"
BAILEYS_PACKAGE = os.path.join(COMPAT, "node_modules", "@whiskeysockets", "baileys", "package.json")
NODE_TIMEOUT = 120


def _installed_version():
    try:
        with open(BAILEYS_PACKAGE) as fh:
            return json.load(fh).get("version")
    except (OSError, ValueError):
        return None


def find_node():
    """``node`` on PATH and tests/compat/node_modules installed (``npm ci`` here if it is missing)."""
    node = shutil.which("node")
    if not node:
        pytest.skip("compat: 'node' is not on PATH (Node.js 20 or later is needed to run Baileys)")
    # one installer at a time, also across concurrent pytest runs
    with open(os.path.join(COMPAT, "package.json")) as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _installed_version() is None:
            npm = shutil.which("npm")
            if not npm:
                pytest.skip("compat: tests/compat/node_modules is missing and 'npm' is not on PATH to run npm ci")
            try:
                proc = subprocess.run([npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"],
                                      cwd=COMPAT, capture_output=True, text=True, timeout=600, check=False)
            except subprocess.TimeoutExpired:
                pytest.skip("compat: tests/compat/node_modules is missing and 'npm ci' timed out")
            if proc.returncode != 0:
                pytest.skip("compat: tests/compat/node_modules is missing and 'npm ci --ignore-scripts' failed: %s"
                            % (proc.stderr.strip()[-800:] or proc.stdout.strip()[-800:]))
    version = _installed_version()
    assert version == BAILEYS_VERSION, (
        "tests/compat/node_modules holds @whiskeysockets/baileys %s, the lock file pins %s: run "
        "'cd tests/compat && npm ci --ignore-scripts'" % (version, BAILEYS_VERSION))
    return node


def run_node(node, script, *args):
    """Run a tests/compat script from tests/compat (so the pinned package resolves); its stdout as JSON."""
    proc = subprocess.run([node, script, *args], cwd=COMPAT, capture_output=True, text=True, timeout=NODE_TIMEOUT,
                          check=False)
    assert proc.returncode == 0, "node %s failed (%d):\n%s" % (script, proc.returncode, proc.stderr[-4000:])
    return json.loads(proc.stdout)


def new_account(node, consume, pending=0):
    """A new account's pre-keys from tests/compat/prekeys.mjs: 812 generated and uploaded by Baileys'
    ``getNextPreKeysNode``, ``consume`` of them consumed by new contacts through libsignal's
    ``removePreKey``, ``pending`` generated but not uploaded.  Returns ``(creds, keys, info)``: creds and
    ``{(key_type, key_id): value}`` as a Baileys store holds them (BufferJSON form, for authgen.load_into),
    and the script's ``uploaded``/``consumed``/``pending``/``next_upload`` id lists."""
    out = run_node(node, "prekeys.mjs", str(int(consume)), str(int(pending)))
    keys = {(k["type"], k["id"]): k["value"] for k in out["keys"]}
    info = {name: out[name] for name in ("uploaded", "consumed", "pending", "next_upload", "contacts")}
    return out["creds"], keys, info
