"""The pitr role's preflight refuses, before anything is configured, what docs/pitr.md says it refuses.

Each case runs the role's preflight task file with the role's defaults on localhost (the demo inventory's
connection local; the role's dependency, the cli role, is left out: it would install the host command here), as
tests/integration/roles/test_upgrade.py runs its cases: the failing task is the one named, nothing changed.
"""
from __future__ import annotations

import os

from support import ROOT
from tests.integration.roles.test_upgrade import failure, run


def preflight(settings):
    """The role's defaults, the inventory's settings over them (as a role's defaults are), its preflight."""
    return [
        {"name": "The pitr role's defaults", "ansible.builtin.include_vars":
         os.path.join(ROOT, "roles", "pitr", "defaults", "main.yml")},
        {"name": "The inventory's settings", "ansible.builtin.set_fact": settings},
        {"name": "The pitr role's preflight", "ansible.builtin.include_tasks":
         os.path.join(ROOT, "roles", "pitr", "tasks", "preflight.yml")},
    ]


AGE_RECIPIENT = "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p"
TARGET = {"name": "primary", "bucket": "pitr-bucket", "region": "eu-west-1"}
CONNECTION = {"baileys_db_host": "db.example.internal", "baileys_db_user": "barman", "baileys_db_name": "whatsapp"}


def test_cloud_hooks_are_refused_when_the_dumps_are_encrypted_to_age_recipients(ansible_env, tmp_path):
    settings = dict(pitr_s3_targets=[TARGET], pitr_s3_age_recipients=[AGE_RECIPIENT])
    rc, results, stats, out = run(ansible_env, tmp_path, tasks=preflight(settings), group_vars=CONNECTION,
                                  check=False)
    assert rc != 0, out
    task, msg = failure(results)
    assert task == "Preflight | off-host copies and age recipients", (task, msg)
    assert "barman-cloud cannot encrypt" in msg and "Nothing was configured" in msg, msg
    assert stats["changed"] == 0, stats
    # the read-only probe of the server never ran: the refusal comes first
    assert not any("can Barman stream" in name for name, _result in results), results


def test_cloud_hooks_with_recipients_need_sse_on_every_target_when_accepted(ansible_env, tmp_path):
    settings = dict(pitr_s3_targets=[dict(TARGET, sse="aws:kms"), dict(TARGET, name="dr")],
                    pitr_s3_age_recipients=[AGE_RECIPIENT], pitr_s3_accept_sse=True)
    rc, results, stats, out = run(ansible_env, tmp_path, tasks=preflight(settings), group_vars=CONNECTION,
                                  check=False)
    assert rc != 0, out
    task, _msg = failure(results)
    assert task == "Preflight | off-host copies and age recipients", task
    assert stats["changed"] == 0, stats


def test_cloud_hooks_with_recipients_pass_when_sse_is_accepted_on_every_target(ansible_env, tmp_path):
    settings = dict(pitr_s3_targets=[dict(TARGET, sse="aws:kms"), dict(TARGET, name="dr", sse="AES256")],
                    pitr_s3_age_recipients=[AGE_RECIPIENT], pitr_s3_accept_sse=True)
    rc, results, _stats, out = run(ansible_env, tmp_path, tasks=preflight(settings), group_vars=CONNECTION,
                                   check=False)
    # past the refusal: the next check, the read-only probe of the (unreachable) server, is what stops it
    assert rc != 0, out
    task, _msg = failure(results)
    assert task == "Preflight | can Barman stream the server? (read-only)", task
