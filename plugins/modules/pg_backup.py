#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: baileys.resilience contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: pg_backup
short_description: Make a verified PostgreSQL backup of the Baileys auth state and apply retention
version_added: 0.1.0
description:
  - Runs C(pg_dump --format=custom) from O(pg_bin_dir), compressed with zstd (clients 16 and newer)
    or gzip (older clients), into O(backup_dir) as C(<prefix>-<YYYYmmdd>T<HHMMSS>Z.dump).
  - Before anything is written it compares the client's and the server's major versions and fails
    when the client is older, naming both versions.
  - The rows of the auth and keys tables are counted in the same snapshot the dump uses
    (C(pg_export_snapshot) and C(pg_dump --snapshot)).
  - The dump is written as C(<name>.partial) and only becomes a backup when C(pg_restore --list) reads
    it and the row counts found in it (read back without any server) equal the snapshot's counts. Then it
    is renamed and a JSON manifest (sha256, size, counts, versions, duration) is written beside it,
    atomically. A job that cannot produce such a backup fails and deletes nothing.
  - Retention keeps the newest backup of each of the last O(keep_daily) days and one backup (the first
    of the month) for each of the last O(keep_monthly) months; the newest valid backup is never deleted
    and backups that are not valid are never deleted (they are reported).
  - A valid backup made earlier the same day (UTC) makes the task a no-op (C(changed=false)) unless
    O(force=true).
  - C(.partial) files left by a killed run are removed at the start of the next run and are never
    counted as backups.
  - The password reaches C(pg_dump) through a temporary passfile readable only by the user running
    the module, never through its command line.
author:
  - baileys.resilience contributors (!UNKNOWN)
extends_documentation_fragment:
  - baileys.resilience.postgres
  - baileys.resilience.store
attributes:
  check_mode:
    support: full
    description: Connects and checks versions, then reports which file would be written and which
      backups retention would delete; writes nothing.
  diff_mode:
    support: none
    description: Returns no diff.
options:
  backup_dir:
    description:
      - Absolute path of the backup directory. Created with mode C(0700) when missing; its mode is
        set to C(0700). Backup files are C(0600).
    type: path
    required: true
  pg_bin_dir:
    description:
      - Directory holding C(pg_dump) and C(pg_restore), for example the C(/usr/lib/postgresql/18/bin)
        the pg_client role publishes.
      - Default, the newest C(/usr/lib/postgresql/*/bin); C(PATH) is never searched.
    type: path
  prefix:
    description:
      - File name prefix of the backups in O(backup_dir).
    type: str
    default: baileys-auth
  force:
    description:
      - Make a new backup even when a valid one of the same day exists.
    type: bool
    default: false
  keep_daily:
    description:
      - Number of most recent days whose newest backup is kept.
    type: int
    default: 7
  keep_monthly:
    description:
      - Number of most recent months whose first backup is kept.
    type: int
    default: 4
  encryption:
    description:
      - The backup encryption settings (docs/encryption.md), the same dict as the C(encryption) option of
        M(baileys.resilience.s3_replicate) and the host command's C(s3.encryption). Only
        O(encryption.encrypt_local=true) changes what this module writes; the options are checked (an unknown
        name, a recipient that does not parse, O(encryption.encrypt_local) or O(encryption.required) without
        recipients) before anything is read.
      - With O(encryption.encrypt_local=true) the dump is written and validated exactly as without it, then
        encrypted as a stream (the Python package C(pyrage)) into the backup file, which is age ciphertext
        (0600); the plaintext temporary file is removed. The manifest stays plaintext and records the sha256 and
        size of the plaintext and of the ciphertext, the recipients' fingerprints and the format, so listing,
        retention and integrity checks need no identity. Replication uploads such a backup as it is.
    type: dict
    suboptions:
      recipients:
        description: age X25519 public keys (C(age1...)). Only public keys; a secret key here is refused.
        type: list
        elements: str
        default: []
      required:
        description: Refuse to run without recipients.
        type: bool
        default: false
      encrypt_local:
        description: Keep the local backup only as age ciphertext for O(encryption.recipients).
        type: bool
        default: false
notes:
  - The dump covers the whole database named by O(login_db); the manifest counts the rows of the
    auth-state tables named by O(schema), O(auth_table) and O(keys_table).
  - The file format is described in the collection's C(docs/backup-format.md).
seealso:
  - module: baileys.resilience.backup_verify
  - module: baileys.resilience.auth_export
"""

EXAMPLES = r"""
- name: Nightly backup of the auth state
  baileys.resilience.pg_backup:
    login_host: db.internal
    login_user: backup
    login_password: "{{ vault_backup_password }}"
    login_db: whatsapp
    backup_dir: /var/backups/baileys
    pg_bin_dir: /usr/lib/postgresql/18/bin

- name: A second backup today, keeping two weeks of dailies
  baileys.resilience.pg_backup:
    login_unix_socket: /var/run/postgresql
    login_db: whatsapp
    backup_dir: /var/backups/baileys
    force: true
    keep_daily: 14

- name: Backup kept only as age ciphertext on the host (encrypt_local)
  baileys.resilience.pg_backup:
    login_db: whatsapp
    backup_dir: /var/backups/baileys
    encryption:
      recipients: "{{ baileys_age_recipients }}"  # public keys (age1...)
      encrypt_local: true

- name: What would the backup job do?
  baileys.resilience.pg_backup:
    login_db: whatsapp
    backup_dir: /var/backups/baileys
  check_mode: true
"""

RETURN = r"""
encrypted:
  description: Whether the backup is written as age ciphertext (O(encryption.encrypt_local)).
  returned: always
  type: bool
backup:
  description:
    - Path of the backup written (or that would be written, in check mode), or of today's existing
      valid backup when the task was a no-op.
  returned: always
  type: str
  sample: /var/backups/baileys/baileys-auth-20261124T030000Z.dump
manifest:
  description: The backup's manifest (see C(docs/backup-format.md)); null in check mode.
  returned: always
  type: dict
  sample: {format: 1, file: baileys-auth-20261124T030000Z.dump, kind: daily, counts: {auth: 1, keys: 1650}}
up_to_date:
  description: Whether a valid backup of the same day already existed, so none was made.
  returned: always
  type: bool
deleted:
  description: Names of the backups retention deleted (would delete, in check mode).
  returned: always
  type: list
  elements: str
kept:
  description: Names of the valid backups retention keeps.
  returned: always
  type: list
  elements: str
partials_removed:
  description: Names of C(.partial) files left by an interrupted run, removed (would be removed, in check mode).
  returned: always
  type: list
  elements: str
invalid:
  description: Backups that are not valid (for example a dump without manifest), left alone, with the reason.
  returned: always
  type: list
  elements: dict
server_version:
  description: The server's version.
  returned: always
  type: str
  sample: "18.1"
client_version:
  description: The C(pg_dump --version) line.
  returned: always
  type: str
  sample: pg_dump (PostgreSQL) 18.1
pg_bin_dir:
  description: The client directory used.
  returned: always
  type: str
duration:
  description: Seconds the task took.
  returned: always
  type: float
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.baileys.resilience.plugins.module_utils import backup, pgconn


def main():
    module = AnsibleModule(
        argument_spec=pgconn.argspec(
            pgconn.CONNECTION_ARGSPEC,
            pgconn.STORE_ARGSPEC,
            backup_dir=dict(type="path", required=True),
            pg_bin_dir=dict(type="path"),
            prefix=dict(type="str", default=backup.DEFAULT_PREFIX),
            force=dict(type="bool", default=False),
            keep_daily=dict(type="int", default=7),
            keep_monthly=dict(type="int", default=4),
            encryption=dict(type="dict", options=dict(
                recipients=dict(type="list", elements="str", default=[]),
                required=dict(type="bool", default=False),
                encrypt_local=dict(type="bool", default=False))),
        ),
        supports_check_mode=True,
    )
    p = module.params
    module.no_log_values.update(pgconn.secret_values(p))  # connect_params' secret keys (not the dict)
    conn_params, store_params = pgconn.split_params(p)
    try:
        result = backup.run_backup(
            conn_params, store_params, p["backup_dir"], pg_bin_dir=p["pg_bin_dir"], prefix=p["prefix"],
            force=p["force"], keep_daily=p["keep_daily"], keep_monthly=p["keep_monthly"],
            check_mode=module.check_mode, encryption=p["encryption"],
        )
    except (backup.BackupError, pgconn.PgError) as exc:
        module.fail_json(msg=pgconn._scrub(exc, conn_params))
    # "skipped" means something else to Ansible
    result["up_to_date"] = result.pop("skipped")
    for item in result["invalid"][:20]:
        module.warn("not a valid backup, left alone: %s (%s)" % (item["name"], item["reason"]))
    module.exit_json(**result)


if __name__ == "__main__":
    main()
