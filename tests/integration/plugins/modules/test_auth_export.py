"""auth_export source=backup through Ansible, with the database unreachable."""
from __future__ import annotations

import json
import os
import subprocess

from ansible_collections.baileys.resilience.plugins.module_utils import authstate, backup
from ansible_collections.baileys.resilience.plugins.module_utils import baileys_codec as codec

from support.authgen import REFERENCE_MIX, generate, load_into


MIX = {k: max(2, v // 40) for k, v in REFERENCE_MIX.items()}


def files(root):
    out = {}
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            if name != codec.MANIFEST_FILE:
                with open(os.path.join(dirpath, name), "rb") as fh:
                    out[os.path.relpath(os.path.join(dirpath, name), root)] = fh.read()
    return out


def test_export_from_backup_module_without_database(ansible_env, db, dbconn, tmp_path):
    load_into(dbconn, generate(2, seed=31, form="mixed", mix=MIX))
    made = backup.run_backup(db, {}, str(tmp_path / "backups"))
    dump = made["backup"]
    assert dump and os.path.exists(dump)
    authstate.export_from_database(db, {}, authstate.ExportOptions(str(tmp_path / "from-db")))

    args = {"source": "backup", "backup_file": dump, "dest": str(tmp_path / "from-backup"),
            "login_host": "127.0.0.1", "login_port": 1}  # the database is "down": never contacted
    proc = subprocess.run(["ansible", "localhost", "-c", "local", "-e",
                           "ansible_python_interpreter=%s" % ansible_env["PATH"].split(os.pathsep)[0] + "/python",
                           "-m", "baileys.resilience.auth_export", "-a", json.dumps(args)],
                          capture_output=True, text=True, env=dict(ansible_env, ANSIBLE_LOAD_CALLBACK_PLUGINS="1",
                                                                   ANSIBLE_STDOUT_CALLBACK="json"), check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    result = json.loads(proc.stdout[proc.stdout.index("{"):])["plays"][0]["tasks"][0]["hosts"]["localhost"]
    assert result["changed"] and result["source"].startswith("backup:")
    assert result["totals"]["keys"] == 2 * sum(MIX.values())
    assert files(tmp_path / "from-backup") == files(tmp_path / "from-db")
