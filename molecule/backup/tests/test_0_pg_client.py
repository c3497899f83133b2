"""Verify of the backup scenario, part 0: the pg_client role on the app host (Debian 13 and Debian 12).

The pg_client role is converged here as provision.yml runs it (the scenario of its own was folded into this one:
the same containers, one create/converge/destroy less in make test, and the role is now proven on both
distributions): client 18 from the local PGDG-style mirror (deb822 source, dedicated keyring, pinning, the
published facts), it dumps the PostgreSQL 18 server, and client 17 against server 18 is refused in preflight
(mismatch.yml) with nothing written.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from scenario import APP, DISTRO, PG_HOST, PG_PASSWORD

testinfra_hosts = [APP]

VERSION = 18
BIN_DIR = f"/usr/lib/postgresql/{VERSION}/bin"
MIRROR = "http://host.containers.internal:{}".format(os.environ.get("BAILEYS_MIRROR_PORT", "8765"))


def test_pg_dump_on_path_is_18(host):
    out = host.check_output("pg_dump --version")
    assert out.startswith(f"pg_dump (PostgreSQL) {VERSION}."), out


def test_published_bin_dir_holds_pg_dump_18(host):
    fact = json.loads(host.file("/etc/ansible/facts.d/pg_client.fact").content_string)
    assert fact == {"version": VERSION, "bin_dir": BIN_DIR}
    for tool in ("pg_dump", "pg_restore", "psql"):
        out = host.check_output(f"{BIN_DIR}/{tool} --version")
        assert f"(PostgreSQL) {VERSION}." in out, out


def test_deb822_source_signed_by_dedicated_keyring(host):
    src = host.file("/etc/apt/sources.list.d/pgdg.sources")
    assert src.exists and src.user == "root" and src.mode == 0o644
    fields = dict(
        line.split(": ", 1) for line in src.content_string.splitlines() if ": " in line and not line.startswith("#")
    )
    assert fields["Types"] == "deb"
    assert fields["URIs"] == MIRROR
    assert fields["Suites"] == f"{DISTRO}-pgdg"
    assert fields["Components"] == "main"
    assert fields["Signed-By"] == "/etc/apt/keyrings/pgdg.asc"
    key = host.file("/etc/apt/keyrings/pgdg.asc")
    assert key.exists and key.mode == 0o644
    assert "-----BEGIN PGP PUBLIC KEY BLOCK-----" in key.content_string
    # no global trust: neither apt-key's keyring nor trusted.gpg.d got the key
    assert not host.file("/etc/apt/trusted.gpg").exists
    trusted = host.check_output("ls -A /etc/apt/trusted.gpg.d/ 2>/dev/null || true").split()
    assert [f for f in trusted if "pgdg" in f or "postgres" in f] == []
    assert host.file("/etc/apt/sources.list").content_string.count("pgdg") == 0


def test_client_is_pinned_to_pgdg(host):
    pref = host.file("/etc/apt/preferences.d/pgdg.pref").content_string
    assert f"Package: postgresql-client-{VERSION} postgresql-client-common libpq5" in pref
    assert f"Pin: release o=apt.postgresql.org,n={DISTRO}-pgdg" in pref
    assert "Pin-Priority: 600" in pref
    for pkg in (f"postgresql-client-{VERSION}", "libpq5"):
        policy = host.check_output(f"apt-cache policy {pkg}")
        installed = host.package(pkg).version
        assert installed.startswith(f"{VERSION}."), (pkg, installed)
        # the installed version carries the pin priority and comes from the mirror
        pinned = rf"\*\*\* {re.escape(installed)} 600\n\s+\d+ {re.escape(MIRROR)} {DISTRO}-pgdg/main"
        assert re.search(pinned, policy), policy


def test_client_dumps_the_pg18_server(host):
    cmd = host.run(
        f"PGPASSWORD={PG_PASSWORD} PGCONNECT_TIMEOUT=10 "
        f"{BIN_DIR}/pg_dump -h {PG_HOST} -U postgres --schema-only postgres"
    )
    assert cmd.rc == 0, cmd.stderr
    assert "PostgreSQL database dump complete" in cmd.stdout


def test_client_17_is_refused_against_server_18():
    """Run mismatch.yml (the role with pg_client_version 17 against pg18): it asserts the failure."""
    scenario = Path(os.environ.get("MOLECULE_SCENARIO_DIRECTORY", Path(__file__).resolve().parents[1]))
    playbook = shutil.which("ansible-playbook", path=os.path.dirname(sys.executable)) or "ansible-playbook"
    proc = subprocess.run(  # noqa: S603
        [playbook, "-i", os.environ["MOLECULE_INVENTORY_FILE"], str(scenario / "mismatch.yml")],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    out = proc.stdout + proc.stderr
    print(out)
    assert proc.returncode == 0, out
    assert "MISMATCH-MESSAGE: PostgreSQL client 17 is older than the server" in out
