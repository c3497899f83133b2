"""s3_replicate with ``encryption`` and s3_fetch with ``identity`` through ansible-playbook, against moto: the
objects are ciphertext, a mistyped option stops the task before any upload, the identity is never logged, the
fetched files are the local ones byte for byte, a wrong identity fails clearly and leaves nothing."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from support import ROOT
from support.s3fixtures import TEST_ACCESS_KEY, TEST_SECRET_KEY, create_bucket, list_keys, make_backup, s3_client

pyrage = pytest.importorskip("pyrage")

PLAYBOOK = """\
- name: Encrypted S3 replication and DR fetch
  hosts: localhost
  gather_facts: false
  connection: local
  tasks:
    - name: Mistyped encryption option
      baileys.resilience.s3_replicate:
        backup_dir: "{{ backup_dir }}"
        targets: "{{ targets }}"
        encryption:
          recipents: "{{ recipients }}"
      ignore_errors: true

    - name: Unparseable recipient
      baileys.resilience.s3_replicate:
        backup_dir: "{{ backup_dir }}"
        targets: "{{ targets }}"
        encryption:
          recipients: ["age1tooshort"]
          required: true
      ignore_errors: true

    - name: Replicate encrypted
      baileys.resilience.s3_replicate:
        backup_dir: "{{ backup_dir }}"
        targets: "{{ targets }}"
        multipart_threshold: 5MiB
        multipart_chunksize: 5MiB
        encryption:
          recipients: "{{ recipients }}"
          required: true

    - name: Fetch with a wrong identity
      baileys.resilience.s3_fetch:
        dest_dir: "{{ wrong_dir }}"
        targets: "{{ targets }}"
        identity: "{{ stranger }}"
      ignore_errors: true

    - name: Fetch with the identity
      baileys.resilience.s3_fetch:
        dest_dir: "{{ dest_dir }}"
        targets: "{{ targets }}"
        identity: "{{ identity }}"
"""


def test_encryption_through_ansible(ansible_env, moto, backup_dir, tmp_path):
    env = {k: v for k, v in ansible_env.items() if not k.startswith("AWS_")}
    backups = [make_backup(backup_dir, 1, size=30_000), make_backup(backup_dir, 5, size=6 * 1024 * 1024)]
    ident = pyrage.x25519.Identity.generate()
    bucket = create_bucket(moto.url, "eu-west-1")
    targets = [dict(name="eu", bucket=bucket, region="eu-west-1", endpoint_url=moto.url, prefix="wa",
                    access_key=TEST_ACCESS_KEY, secret_key=TEST_SECRET_KEY)]
    varfile = tmp_path / "vars.json"
    varfile.write_text(json.dumps({
        "ansible_python_interpreter": sys.executable, "backup_dir": backup_dir, "targets": targets,
        "recipients": [str(ident.to_public())], "identity": str(ident),
        "stranger": str(pyrage.x25519.Identity.generate()), "dest_dir": str(tmp_path / "dr"),
        "wrong_dir": str(tmp_path / "wrong")}))
    os.chmod(varfile, 0o600)
    book = tmp_path / "enc.yml"
    book.write_text(PLAYBOOK)
    proc = subprocess.run(
        ["ansible-playbook", "-i", "localhost,", str(book), "-e", "@%s" % varfile], capture_output=True, text=True,
        cwd=ROOT, check=False,
        env=dict(env, ANSIBLE_STDOUT_CALLBACK="json", AWS_EC2_METADATA_DISABLED="true",
                 AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none")))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    tasks = {t["task"]["name"]: t["hosts"]["localhost"]
             for t in json.loads(proc.stdout[proc.stdout.index("{"):])["plays"][0]["tasks"]}
    assert str(ident) not in out and TEST_SECRET_KEY not in out  # no_log

    assert tasks["Mistyped encryption option"]["failed"] and "recipents" in tasks["Mistyped encryption option"]["msg"]
    assert tasks["Unparseable recipient"]["failed"]
    assert "recipient 1 'age1tooshort' is not an age X25519 public key" in tasks["Unparseable recipient"]["msg"]

    made = tasks["Replicate encrypted"]
    assert made["encrypted"] and made["uploaded"] == 4 and len(made["recipients"]) == 1
    client = s3_client(moto.url)
    for key in list_keys(moto.url, bucket, "eu-west-1"):
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        assert body.startswith(b"age-encryption.org/v1\n") and b"whatsapp_keys" not in body, key

    wrong = tasks["Fetch with a wrong identity"]
    assert wrong["failed"] and "cannot be decrypted with the identity given" in wrong["msg"]
    assert made["recipients"][0] in wrong["msg"]
    assert not os.path.exists(tmp_path / "wrong") or os.listdir(tmp_path / "wrong") == []

    got = tasks["Fetch with the identity"]
    assert got["decrypted"] and got["name"] == backups[1]["name"]
    for a, b in ((got["path"], backups[1]["path"]), (got["manifest_path"], backups[1]["manifest_path"])):
        with open(a, "rb") as fa, open(b, "rb") as fb:
            assert fa.read() == fb.read()
