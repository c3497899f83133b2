"""The s3_replication role's preflight refuses an encryption setting that would upload plaintext or fail later
(issue 14: fail closed), before anything is written or uploaded.

The role's task file runs with ansible-playbook on localhost (the demo inventory's connection local), as
test_upgrade.py runs keys_cleanup's, with the role's defaults in the inventory: its dependency cli is not in front of
it here, so ``cli_runtime_python`` is
this test's Python and ``<cli_install_dir>/lib`` holds the collection's module_utils as the package
``baileys_resilience`` (as the cli role installs it), whose age parser checks what a regular expression cannot
(the bech32 checksum). The target is a bucket of a moto server with every path under tmp_path: after each refusal
the bucket is still empty, and neither the credentials directory nor the config fragment exists.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from support import ROOT
from support.s3fixtures import TEST_ACCESS_KEY, TEST_SECRET_KEY, create_bucket, list_keys

pyrage = pytest.importorskip("pyrage")

SECRET = str(pyrage.x25519.Identity.generate())
GOOD = str(pyrage.x25519.Identity.generate().to_public())
# the right shape (age1 + 58 bech32 characters) with a broken checksum: only the parser sees it
BAD_CHECKSUM = GOOD[:-1] + ("q" if GOOD[-1] != "q" else "p")


@pytest.fixture
def setup(ansible_env, moto, tmp_path):
    install = tmp_path / "install"
    install.mkdir()
    (install / "lib").mkdir()  # <cli_install_dir>/lib/baileys_resilience.zip, as the cli role packs it
    subprocess.run([sys.executable, os.path.join(ROOT, "roles", "cli", "files", "pack_package.py"),
                    os.path.join(ROOT, "plugins", "module_utils"), str(install / "lib" / "baileys_resilience.zip")],
                   check=True)
    bucket = create_bucket(moto.url, "eu-west-1")
    group_vars = {
        "s3_replication_targets": [{"name": "primary", "bucket": bucket, "region": "eu-west-1",
                                    "endpoint_url": moto.url, "access_key": TEST_ACCESS_KEY,
                                    "secret_key": TEST_SECRET_KEY}],
        "s3_replication_credentials_dir": str(tmp_path / "config" / "s3"),
        "s3_replication_backup_dir": str(tmp_path / "backups"),
        "cli_config_dir": str(tmp_path / "config"), "cli_log_dir": str(tmp_path / "log"),
        "cli_bin": str(tmp_path / "bin" / "baileys-resilience"), "cli_manage_packages": False,
        "cli_install_dir": str(install), "cli_runtime_python": sys.executable, "cli_install_encryption": True,
    }
    return {"env": ansible_env, "tmp": tmp_path, "bucket": bucket, "moto": moto, "group_vars": group_vars}


def run_role(setup, tasks_file, **extra):
    """The role's task file on localhost with the test's group_vars plus ``extra``; (rc, results, stats, out)."""
    tmp = setup["tmp"]
    inventory = tmp / "inventory"
    (inventory / "group_vars").mkdir(parents=True, exist_ok=True)
    with open(os.path.join(ROOT, "inventories", "demo", "hosts.yml")) as demo:
        (inventory / "hosts.yml").write_text(demo.read())
    # the role's defaults first (a bare task file does not load them), as an inventory would override them
    with open(os.path.join(ROOT, "roles", "s3_replication", "defaults", "main.yml")) as defaults:
        group_vars = dict(yaml.safe_load(defaults), **setup["group_vars"])
    (inventory / "group_vars" / "all.yml").write_text(yaml.safe_dump(dict(group_vars, **extra)))
    play = {"hosts": "baileys_app", "gather_facts": False, "name": "s3_replication", "tasks": [
        {"name": "s3_replication's tasks", "ansible.builtin.include_tasks":
         os.path.join(ROOT, "roles", "s3_replication", "tasks", tasks_file)}]}
    book = tmp / "play.yml"
    book.write_text(yaml.safe_dump([play], sort_keys=False))
    proc = subprocess.run(["ansible-playbook", "-i", str(inventory), str(book)], capture_output=True, text=True,
                          cwd=ROOT, env=dict(setup["env"], ANSIBLE_STDOUT_CALLBACK="json"), check=False)
    out = json.loads(proc.stdout[proc.stdout.index("{"):])
    results = [(t["task"]["name"], t["hosts"].get("localhost", {})) for p in out["plays"] for t in p["tasks"]]
    return proc.returncode, results, out["stats"]["localhost"], proc.stdout + proc.stderr


def refused(setup, task, words, **extra):
    """The role stops at ``task`` with a message holding ``words``; nothing after it ran, nothing was written,
    nothing uploaded. Returns the whole output."""
    rc, results, stats, out = run_role(setup, "main.yml", **extra)
    assert rc != 0, out
    failed = [(name, r.get("msg", "")) for name, r in results if r.get("failed")]
    assert len(failed) == 1 and failed[0][0] == task, results
    for word in words:
        assert word in failed[0][1], failed[0][1]
    assert all(name.startswith("Preflight") or name == "s3_replication's tasks" for name, _result in results), results
    assert stats["changed"] == 0, stats
    assert not (setup["tmp"] / "config").exists()  # no credentials file, no config fragment
    assert list_keys(setup["moto"].url, setup["bucket"], "eu-west-1") == {}
    return out


def test_an_unparseable_recipient_is_refused(setup):
    refused(setup, "Preflight | encryption recipients", ["not one of them parses", "age1notakey"],
            s3_replication_encryption_recipients=[GOOD, "age1notakey"])


def test_a_recipient_with_a_bad_checksum_is_refused_by_the_parser(setup):
    refused(setup, "Preflight | every recipient parses", ["recipient 1", "does not parse"],
            s3_replication_encryption_recipients=[BAD_CHECKSUM])


def test_a_secret_key_given_as_recipient_is_refused_without_echoing_it(setup):
    out = refused(setup, "Preflight | encryption recipients", ["AGE-SECRET-KEY is an identity"],
                  s3_replication_encryption_recipients=[SECRET])
    assert SECRET not in out and SECRET[len("AGE-SECRET-KEY-1"):][:20] not in out


def test_required_without_recipients_is_refused(setup):
    refused(setup, "Preflight | encryption recipients", ["refusing a plaintext upload"],
            s3_replication_encryption_recipients=[], s3_replication_encryption_required=True)


def test_recipients_without_pyrage_in_the_cli_runtime_are_refused(setup):
    refused(setup, "Preflight | the host command can encrypt (pyrage, cli_install_encryption)",
            ["cli_install_encryption is false"], s3_replication_encryption_recipients=[GOOD],
            cli_install_encryption=False)


def test_valid_recipients_pass_the_preflight(setup):
    rc, results, stats, out = run_role(setup, "preflight.yml", s3_replication_encryption_recipients=[GOOD],
                                       s3_replication_encryption_required=True)
    assert rc == 0, out
    parsed = dict(results)["Preflight | the recipients parse (the host command's age library)"]
    assert parsed.get("rc") == 0 and not parsed.get("skipped"), parsed
    assert stats["changed"] == 0, stats


def test_encrypt_local_without_recipients_is_refused(setup):
    refused(setup, "Preflight | encryption recipients", ["s3_replication_encryption_local is true and no recipient"],
            s3_replication_encryption_recipients=[], s3_replication_encryption_local=True)


def test_encrypt_local_with_recipients_passes_and_reaches_the_config(setup):
    rc, results, stats, out = run_role(setup, "preflight.yml", s3_replication_encryption_recipients=[GOOD],
                                       s3_replication_encryption_local=True)
    assert rc == 0, out
    parsed = dict(results)["Preflight | the recipients parse (the host command's age library)"]
    assert parsed.get("rc") == 0 and not parsed.get("skipped"), parsed
    with open(os.path.join(ROOT, "roles", "s3_replication", "tasks", "main.yml")) as fh:
        tasks = yaml.safe_load(fh)
    [fragment] = [t for t in tasks if t["name"].startswith("Write the replication settings")]
    encryption = fragment["vars"]["common_config"]["s3"]["encryption"]
    assert encryption["encrypt_local"] == "{{ s3_replication_encryption_local | bool }}"
