#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: baileys.resilience contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: backup_restore
short_description: Disaster recovery - restore a pg_backup backup into a new database and verify it
version_added: 0.1.0
description:
  - Restores a backup made by M(baileys.resilience.pg_backup) (its manifest, size and sha256 are checked
    first) into the new database O(restore_db) on the server the connection options point at, then compares
    the row counts of the auth and keys tables with the manifest and checks every company's creds and key types.
  - Never overwrites anything. When O(restore_db) already exists and holds exactly the manifest's counts,
    nothing is done (C(changed=false)), so a re-run after a successful recovery is safe; when it exists
    with other contents, the task fails.
  - The password reaches C(pg_restore) through a temporary passfile, never its command line.
author:
  - baileys.resilience contributors (!UNKNOWN)
extends_documentation_fragment:
  - baileys.resilience.postgres
  - baileys.resilience.store
attributes:
  check_mode:
    support: full
    description: Checks the backup file and whether the database exists; restores nothing.
  diff_mode:
    support: none
    description: Returns no diff.
options:
  backup_file:
    description:
      - The backup (C(.dump)) to restore; its C(.manifest.json) must be beside it.
    type: path
    required: true
  restore_db:
    description:
      - Name of the new database to create and restore into.
    type: str
    required: true
  pg_bin_dir:
    description:
      - Directory holding C(pg_restore). Default, the newest C(/usr/lib/postgresql/*/bin).
    type: path
  identity_file:
    description:
      - File holding the age identity that opens an encrypted O(backup_file) (a backup the backup job encrypted
        on the host with C(encrypt_local), a sealed copy from C(<backup_dir>/.sealed/), or objects downloaded as
        they are); see docs/encryption.md. It is decrypted into a private (0700) temporary directory, removed
        afterwards, and restored from there.
      - An encrypted O(backup_file) without an identity fails, saying so; a wrong identity fails naming the
        recipient fingerprints the backup was made for, and leaves no file.
    type: path
  identity:
    description:
      - The identity's content instead of a file (for example from ansible-vault). Never logged.
    type: str
notes:
  - O(login_db) is the database to connect to for C(CREATE DATABASE) (for example C(postgres)).
seealso:
  - module: baileys.resilience.s3_fetch
  - module: baileys.resilience.backup_verify
"""

EXAMPLES = r"""
- name: Rebuild the auth-state database on a new server
  baileys.resilience.backup_restore:
    login_host: wa-db-2.example.internal
    login_user: postgres
    login_password: "{{ vault_postgres_password }}"
    login_db: postgres
    backup_file: /var/backups/baileys-resilience/dr/baileys-auth-20261124T030000Z.dump
    restore_db: whatsapp

- name: Restore a backup the backup job encrypted on the host (encrypt_local)
  baileys.resilience.backup_restore:
    login_db: postgres
    backup_file: /var/backups/baileys-resilience/baileys-auth-20261124T030000Z.dump
    restore_db: whatsapp_restored
    identity: "{{ vault_baileys_age_identity }}"
"""

RETURN = r"""
restore_db:
  description: The database restored into.
  returned: always
  type: str
counts:
  description: Rows found in the restored auth and keys tables.
  returned: unless check mode restored nothing
  type: dict
  sample: {auth: 1, keys: 1650}
expected:
  description: The manifest's counts.
  returned: always
  type: dict
restore_seconds:
  description: Seconds pg_restore took.
  returned: when restored
  type: float
restored:
  description: Whether this run restored the backup.
  returned: always
  type: bool
decrypted:
  description: Whether O(backup_file) was age ciphertext, decrypted with the identity given.
  returned: always
  type: bool
duration:
  description: Seconds the whole task took.
  returned: always
  type: float
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.baileys.resilience.plugins.module_utils import agecrypt, backup, backupseal, pgconn


def main():
    module = AnsibleModule(
        argument_spec=pgconn.argspec(
            pgconn.CONNECTION_ARGSPEC,
            pgconn.STORE_ARGSPEC,
            backup_file=dict(type="path", required=True),
            restore_db=dict(type="str", required=True),
            pg_bin_dir=dict(type="path"),
            identity_file=dict(type="path"),
            identity=dict(type="str", no_log=True),
        ),
        mutually_exclusive=[("identity_file", "identity")],
        supports_check_mode=True,
    )
    p = module.params
    module.no_log_values.update(pgconn.secret_values(p))  # connect_params' secret keys (not the dict)
    conn_params, store_params = pgconn.split_params(p)
    try:
        identities = agecrypt.load_identities(p["identity_file"], p["identity"])
        with backupseal.opened_backup(p["backup_file"], identities, "restore") as path:
            result = backup.restore_backup(path, conn_params, p["restore_db"], store_params,
                                           pg_bin_dir=p["pg_bin_dir"], check_mode=module.check_mode)
        result["decrypted"] = path != p["backup_file"]
        result["backup"] = p["backup_file"]
        result["restore_db"] = result.pop("database")
    except (backup.BackupError, pgconn.PgError, agecrypt.AgeError) as exc:
        module.fail_json(msg=pgconn._scrub(exc, conn_params))
    module.exit_json(**result)


if __name__ == "__main__":
    main()
