#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: baileys.resilience contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: backup_verify
short_description: Restore test of a Baileys auth-state backup made by pg_backup
version_added: 0.1.0
description:
  - Checks a backup made by M(baileys.resilience.pg_backup) (O(backup_file), or the newest valid
    backup in O(backup_dir)), that is its manifest, size and sha256, and that C(pg_restore --list) reads it.
  - Then restores it into a throwaway database (C(baileys_verify_<UTC time>_<random>)) on the server
    the connection options point at, compares the row counts of the auth and keys tables with the
    manifest, checks that every company's creds are a JSON object and every key type is one Baileys
    knows, and drops the database again, also when a check fails.
  - Fails when any check fails. Changes nothing that existed before; C(changed) is false unless
    O(keep_database) leaves the restored database behind.
  - The password reaches C(pg_restore) through a temporary passfile readable only by the user running
    the module, never through its command line.
author:
  - baileys.resilience contributors (!UNKNOWN)
extends_documentation_fragment:
  - baileys.resilience.postgres
  - baileys.resilience.store
attributes:
  check_mode:
    support: full
    description: Only checks the backup file (manifest, sha256, C(pg_restore --list)); restores nothing
      and needs no server.
  diff_mode:
    support: none
    description: Returns no diff.
options:
  backup_file:
    description:
      - The backup (C(.dump)) to test. Its C(.manifest.json) must be beside it.
      - One of O(backup_file) and O(backup_dir) is required.
    type: path
  backup_dir:
    description:
      - Test the newest valid backup (checksum verified) in this directory.
    type: path
  prefix:
    description:
      - File name prefix of the backups in O(backup_dir).
    type: str
    default: baileys-auth
  pg_bin_dir:
    description:
      - Directory holding C(pg_restore). Default, the newest C(/usr/lib/postgresql/*/bin).
    type: path
  identity_file:
    description:
      - File holding the age identity that opens an encrypted backup (a backup the backup job encrypted on the
        host with C(encrypt_local), whose manifest stays plaintext; a sealed copy from C(<backup_dir>/.sealed/);
        or objects downloaded as they are, with the encrypted manifest beside it).
        The backup is decrypted into a private temporary directory (removed afterwards) and tested as usual;
        RV(decrypted) is then true. See docs/encryption.md.
      - Without an identity, an encrypted backup is only checked for integrity (its ciphertext sha256 and size
        against the seal record C(<backup_file>.seal.json), or against the C(encryption) block of the plaintext
        manifest of a backup encrypted on the host); nothing is restored, RV(decrypted) is false and the task's
        message says so plainly. This also holds in O(backup_dir) mode when the newest valid backup is encrypted.
    type: path
  identity:
    description:
      - The identity's content instead of a file (for example from ansible-vault). Never logged.
    type: str
  keep_database:
    description:
      - Keep the restored database for inspection instead of dropping it (the task then reports C(changed)).
    type: bool
    default: false
notes:
  - O(login_db) is the database the module connects to on the restore server to create and drop the
    throwaway database (a maintenance database such as C(postgres)); the role needs C(CREATEDB).
  - The tables checked in the restored database are the ones the backup's manifest names;
    O(schema), O(auth_table) and O(keys_table) only apply to a manifest that names none.
seealso:
  - module: baileys.resilience.pg_backup
"""

EXAMPLES = r"""
- name: Weekly restore test of the newest backup on the standby server
  baileys.resilience.backup_verify:
    login_host: restore-test.internal
    login_user: postgres
    login_password: "{{ vault_restore_password }}"
    login_db: postgres
    backup_dir: /var/backups/baileys
    pg_bin_dir: /usr/lib/postgresql/18/bin

- name: Check a fetched backup file without restoring it
  baileys.resilience.backup_verify:
    backup_file: /var/backups/baileys/baileys-auth-20261124T030000Z.dump
  check_mode: true
"""

RETURN = r"""
ok:
  description: Whether every check passed (the task fails otherwise).
  returned: always
  type: bool
backup:
  description: Path of the backup tested.
  returned: always
  type: str
backup_file:
  description: Same as RV(backup), under the option's name (for O(backup_dir) it names the file chosen).
  returned: always
  type: str
encrypted:
  description: Whether the backup file is age ciphertext.
  returned: always
  type: bool
decrypted:
  description: Whether it was decrypted and tested. C(false) for an encrypted backup tested without an identity
    (only its ciphertext integrity was checked; the task's message says so).
  returned: always
  type: bool
manifest:
  description: The backup's manifest.
  returned: always
  type: dict
counts:
  description: Rows restored per table (the manifest's counts in check mode).
  returned: always
  type: dict
  sample: {auth: 1, keys: 1650}
restore_seconds:
  description: Seconds C(pg_restore) took; null in check mode.
  returned: always
  type: float
restored:
  description: Whether a restore was done (false in check mode).
  returned: always
  type: bool
database:
  description: Name of the throwaway database.
  returned: when restored
  type: str
dropped:
  description: Whether the throwaway database was dropped.
  returned: when restored
  type: bool
duration:
  description: Seconds the task took.
  returned: always
  type: float
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.baileys.resilience.plugins.module_utils import agecrypt, backup, backupseal, pgconn


def main():
    spec = pgconn.argspec(
        pgconn.CONNECTION_ARGSPEC,
        pgconn.STORE_ARGSPEC,
        backup_file=dict(type="path"),
        backup_dir=dict(type="path"),
        prefix=dict(type="str", default=backup.DEFAULT_PREFIX),
        pg_bin_dir=dict(type="path"),
        keep_database=dict(type="bool", default=False),
        identity_file=dict(type="path"),
        identity=dict(type="str", no_log=True),
    )
    module = AnsibleModule(
        argument_spec=spec,
        required_one_of=[("backup_file", "backup_dir")],
        mutually_exclusive=[("backup_file", "backup_dir"), ("identity_file", "identity")],
        supports_check_mode=True,
    )
    p = module.params
    module.no_log_values.update(pgconn.secret_values(p))  # connect_params' secret keys (not the dict)
    conn_params, store_params = pgconn.split_params(p)
    try:
        path = p["backup_file"]
        if path is None:
            entry = backup.newest_valid_backup(p["backup_dir"], p["prefix"])
            if entry is None:
                module.fail_json(msg="no valid backup in %s" % p["backup_dir"], ok=False)
            path = entry["path"]
        if backupseal.is_encrypted_backup(path):
            identities = agecrypt.load_identities(p["identity_file"], p["identity"])
            if not identities:
                result = backupseal.ciphertext_check(path)
                result.update(backup_file=path, changed=False)
                if not result["ok"]:
                    module.fail_json(**result)
                module.warn(result["msg"])
                module.exit_json(**result)
            with backupseal.decrypted_backup(path, identities) as plain:
                result = backup.verify_backup(plain, conn_params, store_params, pg_bin_dir=p["pg_bin_dir"],
                                              keep_database=p["keep_database"], check_only=module.check_mode)
            result.update(backup=path, encrypted=True, decrypted=True)
        else:
            result = backup.verify_backup(path, conn_params, store_params, pg_bin_dir=p["pg_bin_dir"],
                                          keep_database=p["keep_database"], check_only=module.check_mode)
            result.update(encrypted=False, decrypted=False)
    except (backup.BackupError, pgconn.PgError, agecrypt.AgeError) as exc:
        module.fail_json(msg=pgconn._scrub(exc, conn_params), ok=False)
    result["backup_file"] = result["backup"]
    result["changed"] = bool(p["keep_database"] and result.get("restored"))
    module.exit_json(**result)


if __name__ == "__main__":
    main()
