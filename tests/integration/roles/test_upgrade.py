"""Upgrading an installation: old role and variable names fail in preflight naming the new ones; the one
connection input (baileys_db_*) reaches every role's connection variables.

Each case is a small playbook run with ansible-playbook on localhost (the demo inventory's connection local) as an
operator would run it, with the old names in an inventory's group_vars as an existing installation has them. The
failing cases stop at the first preflight task, before anything is changed; the connection case runs only the
read-only preflights of pg_client (its version check against a real PostgreSQL), cli and failover, in check mode.
"""
from __future__ import annotations

import json
import os
import subprocess

import yaml

from support import ROOT

PLAY_HEAD = {"hosts": "baileys_app", "gather_facts": False}


def run(env, tmp_path, tasks=None, roles=None, group_vars=None, name="play", gather_facts=False, check=True):
    """Write an inventory (localhost, as inventories/demo, plus group_vars) and a playbook; run it."""
    inventory = tmp_path / ("inventory-" + name)
    (inventory / "group_vars").mkdir(parents=True)
    with open(os.path.join(ROOT, "inventories", "demo", "hosts.yml")) as demo:
        (inventory / "hosts.yml").write_text(demo.read())
    (inventory / "group_vars" / "all.yml").write_text(yaml.safe_dump(group_vars or {}))
    play = dict(PLAY_HEAD, name=name, gather_facts=gather_facts)
    if roles is not None:
        play["roles"] = roles
    play["tasks"] = tasks or []
    book = tmp_path / ("%s.yml" % name)
    book.write_text(yaml.safe_dump([play], sort_keys=False))
    args = ["ansible-playbook", "-i", str(inventory), str(book)] + (["--check"] if check else [])
    proc = subprocess.run(args, capture_output=True, text=True, cwd=ROOT,
                          env=dict(env, ANSIBLE_STDOUT_CALLBACK="json"), check=False)
    out = json.loads(proc.stdout[proc.stdout.index("{"):])
    results = [(t["task"]["name"], t["hosts"].get("localhost", {})) for p in out["plays"] for t in p["tasks"]]
    return proc.returncode, results, out["stats"]["localhost"], proc.stdout + proc.stderr


def failure(results):
    """(task name, message) of the one failed task."""
    failed = [(name, r.get("msg", "")) for name, r in results if r.get("failed")]
    assert len(failed) == 1, results
    return failed[0]


def nothing_ran_before(results):
    """Only argument validation and the other old-name checks ran before the failed task: nothing was changed,
    nothing on the host even looked at."""
    before = [name for name, r in results if not r.get("failed")]
    assert all("Validating arguments against arg spec" in name or "Preflight | no " in name for name in before), before


def include(role, tasks_from=None, **extra):
    task = {"name": "Include %s" % role, "ansible.builtin.include_role": dict({"name": role}, **extra)}
    if tasks_from:
        task["ansible.builtin.include_role"]["tasks_from"] = tasks_from
    return task


def test_old_tool_variables_fail_in_the_cli_preflight_naming_the_new_ones(ansible_env, tmp_path):
    old = {"tool_db_host": "db.example.internal", "tool_db_password": "s3cret", "tool_textfile_dir": "/x"}
    rc, results, stats, out = run(ansible_env, tmp_path, roles=["baileys.resilience.pg_backup"], group_vars=old)
    assert rc != 0, out
    task, msg = failure(results)
    assert "Preflight | no variable of the old tool role" in task
    for name in old:
        assert "%s -> %s" % (name, name.replace("tool_", "cli_")) in msg, msg
    assert "cli_db_host" in msg and "baileys_db_" in msg
    assert "s3cret" not in out  # names only, never a value
    assert stats["changed"] == 0, stats
    nothing_ran_before(results)


def test_the_old_role_name_fails_at_once_naming_cli(ansible_env, tmp_path):
    rc, results, stats, out = run(ansible_env, tmp_path, roles=["baileys.resilience.tool"])
    assert rc != 0, out
    _task, msg = failure(results)
    assert "role baileys.resilience.tool is now baileys.resilience.cli; rename tool_* to cli_*" in msg, msg
    assert stats["changed"] == 0, stats
    nothing_ran_before(results)


def test_old_health_check_variables_fail_naming_cli_health(ansible_env, tmp_path):
    old = {"keys_cleanup_health_schedule": "*/10 * * * *", "keys_cleanup_health_enabled": False}
    # the role as provision.yml runs it: its dependency cli runs first and refuses before changing anything
    rc, results, stats, out = run(ansible_env, tmp_path, roles=["baileys.resilience.keys_cleanup"], group_vars=old,
                                  name="role")
    assert rc != 0, out
    task, msg = failure(results)
    assert "Preflight | no health check variable of the keys_cleanup role" in task
    assert "keys_cleanup_health_schedule -> cli_health_schedule" in msg, msg
    assert "keys_cleanup_health_enabled -> cli_health_enabled" in msg, msg
    assert stats["changed"] == 0, stats
    nothing_ran_before(results)
    # keys_cleanup's own preflight says the same (its task file, without the dependency in front of it)
    tasks = [{"name": "keys_cleanup's tasks", "ansible.builtin.include_tasks":
              os.path.join(ROOT, "roles", "keys_cleanup", "tasks", "main.yml")}]
    rc, results, stats, out = run(ansible_env, tmp_path, tasks=tasks, group_vars={
        "keys_cleanup_health_schedule": "*/10 * * * *"}, name="tasks")
    assert rc != 0, out
    task, msg = failure(results)
    assert "Preflight | no health check variable of earlier versions" in task
    assert "keys_cleanup_health_schedule -> cli_health_schedule" in msg, msg
    assert stats["changed"] == 0, stats


def test_the_one_connection_input_reaches_every_role(ansible_env, db, tmp_path):
    """Only baileys_db_* set: pg_client's check connects with them, the cli config and failover's module
    defaults carry them."""
    env_file = tmp_path / "app.env"
    env_file.write_text("USE_REPOSITORY_PATTERN=true\n")
    os.chmod(env_file, 0o600)
    rendered = tmp_path / "config.yml"
    group_vars = {
        "baileys_db_host": db["login_host"], "baileys_db_port": db["login_port"],
        "baileys_db_user": db["login_user"], "baileys_db_password": db["login_password"],
        "baileys_db_name": db["login_db"], "baileys_db_ssl_mode": "disable",
        "baileys_db_connect_params": {"connect_timeout": 7},
        "pg_client_version": 99,
        "failover_sessions_dir": str(tmp_path / "sessions"), "failover_env_file": str(env_file),
        "failover_state_file": str(tmp_path / "state.json"),
    }
    tasks = [
        # the version check reads the server's version with the connection (read-only, runs in check mode)
        include("baileys.resilience.pg_client", "preflight", public=True),
        include("baileys.resilience.cli", "preflight", public=True),
        include("baileys.resilience.failover", "preflight", public=True),
        {"name": "Render the cli role's config as the role writes it",
         "ansible.builtin.template": {"src": os.path.join(ROOT, "roles", "cli", "templates", "config.yml.j2"),
                                      "dest": str(rendered), "mode": "0600"},
         "check_mode": False, "diff": False},
        {"name": "The passwords reached every role", "no_log": True, "ansible.builtin.assert": {"that": [
            "pg_client_server_login_password == baileys_db_password",
            "cli_db_password == baileys_db_password",
            "failover_postgres_module_defaults.login_password == baileys_db_password"]}},
        {"name": "Report the connections", "ansible.builtin.debug": {"msg": {
            "pg_client": {"host": "{{ pg_client_server_login_host }}", "port": "{{ pg_client_server_login_port }}",
                          "user": "{{ pg_client_server_login_user }}", "db": "{{ pg_client_server_login_db }}",
                          "ssl_mode": "{{ pg_client_server_ssl_mode }}",
                          "server_major": "{{ pg_client_server_major }}"},
            "failover": "{{ failover_postgres_module_defaults | dict2items | rejectattr('key', 'eq', 'login_password')"
                        " | items2dict }}",
            "failover_db_host": "{{ failover_db_host }}"}}},
    ]
    rc, results, stats, out = run(ansible_env, tmp_path, tasks=tasks, group_vars=group_vars, gather_facts=True)
    assert rc == 0, out
    assert db["login_password"] not in out
    report = dict(results)["Report the connections"]["msg"]
    pg_client = {k: str(v) for k, v in report["pg_client"].items()}
    assert pg_client == {"host": db["login_host"], "port": str(db["login_port"]), "user": db["login_user"],
                         "db": db["login_db"], "ssl_mode": "disable", "server_major": pg_client["server_major"]}, report
    assert int(report["pg_client"]["server_major"]) >= 12  # the check connected
    assert report["failover_db_host"] == db["login_host"]
    failover = report["failover"]
    assert (failover["login_host"], int(failover["login_port"]), failover["login_user"], failover["login_db"],
            failover["ssl_mode"], failover["connect_params"]) == (
        db["login_host"], db["login_port"], db["login_user"], db["login_db"], "disable", {"connect_timeout": 7})
    config = yaml.safe_load(rendered.read_text())
    assert (config["login_host"], int(config["login_port"]), config["login_user"], config["login_password"],
            config["login_db"], config["ssl_mode"], config["connect_params"]) == (
        db["login_host"], db["login_port"], db["login_user"], db["login_password"], db["login_db"], "disable",
        {"connect_timeout": 7})
