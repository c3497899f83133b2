"""`ansible-galaxy collection build` produces a tarball that installs and works."""
from __future__ import annotations

import json
import os
import subprocess
import tarfile

from support import ROOT
from support.authgen import generate, load_into


def test_built_collection_installs_and_runs(ansible_env, db, dbconn, tmp_path):
    bindir = ansible_env["PATH"].split(os.pathsep)[0]
    dist = tmp_path / "dist"
    subprocess.run([os.path.join(bindir, "ansible-galaxy"), "collection", "build", "--output-path", str(dist), ROOT],
                   check=True, capture_output=True, env=ansible_env)
    (tarball,) = list(dist.iterdir())
    names = tarfile.open(tarball).getnames()
    assert "plugins/modules/auth_export.py" in names and "roles/failover/tasks/rollback.yml" in names
    assert not [n for n in names if "node_modules" in n or "__pycache__" in n or n.startswith(".demo")]

    installed = tmp_path / "collections"
    subprocess.run([os.path.join(bindir, "ansible-galaxy"), "collection", "install", "--force", "-p",
                    str(installed), str(tarball)], check=True, capture_output=True, env=ansible_env)
    env = dict(ansible_env, ANSIBLE_COLLECTIONS_PATH=str(installed), ANSIBLE_STDOUT_CALLBACK="json",
               ANSIBLE_LOAD_CALLBACK_PLUGINS="1")
    load_into(dbconn, generate(1, seed=51, mix={"pre-key": 3, "session": 2}))
    varfile = tmp_path / "vars.json"
    varfile.write_text(json.dumps({"a": dict(db, dest=str(tmp_path / "out"))}))
    os.chmod(varfile, 0o600)
    play = tmp_path / "play.yml"
    play.write_text("- hosts: localhost\n  gather_facts: false\n  tasks:\n"
                    "    - baileys.resilience.auth_export: '{{ a }}'\n")
    proc = subprocess.run([os.path.join(bindir, "ansible-playbook"), "-i", "localhost,", "-c", "local", "-e",
                           "ansible_python_interpreter=%s/python" % bindir, "-e", "@%s" % varfile, str(play)],
                          capture_output=True, text=True, env=env, cwd=str(tmp_path), check=False)
    assert proc.returncode == 0, proc.stdout[-3000:]
    result = json.loads(proc.stdout[proc.stdout.index("{"):])["plays"][0]["tasks"][0]["hosts"]["localhost"]
    assert result["changed"] and result["totals"]["keys"] == 5
    assert os.path.exists(tmp_path / "out" / "company-001" / "creds.json")
