#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: baileys.resilience contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: pitr_restore
short_description: Recover the auth state to a point in time into a scratch PostgreSQL on the backup host
version_added: 0.2.0
description:
  - Runs on the Barman host the C(pitr) role set up. Barman restores the newest base backup that ends before the
    target into a new directory under O(scratch_dir) (never the production server), the WAL that C(receive-wal)
    is still writing (its C(.partial) segment) is added, and a private PostgreSQL (the server programs of
    O(pg_bin_dir), run as O(barman_user), unix socket only, no TCP) replays up to the target and is promoted.
  - "O(target): C(latest) (everything streamed so far), a time (ISO 8601 with its zone, C(2026-03-01T14:04:59+00:00),
    optionally prefixed C(time:)), or C(name:<restore point>) (see M(baileys.resilience.pitr_restore_point))."
  - "Then O(action): C(export) writes the chosen companies' auth state to O(export_dest) in the Baileys layout (as
    M(baileys.resilience.auth_export) does); C(import) brings the chosen companies back into production (the
    connection options) as a mirror in one transaction with the failover guards: the creds are never deleted,
    at most O(max_delete_share) of a company's keys, the store's fingerprint is compared with the recovered state
    after the change, and nothing is done while the service runs on files (O(failover_mode)); C(keep) leaves the
    scratch instance running for inspection (its C(psql) command is returned); C(none) only reports."
  - Reports the recovered time (the last transaction replayed), the WAL replayed, counts per company and the
    seconds of each step. The scratch instance is stopped and removed unless O(action=keep), also on failure.
author:
  - baileys.resilience contributors (!UNKNOWN)
extends_documentation_fragment:
  - baileys.resilience.postgres
  - baileys.resilience.store
attributes:
  check_mode:
    support: partial
    description: Only picks the base backup; nothing is restored.
    details: In check mode the module picks the base backup and the WAL range it would replay and reports them;
      it starts no scratch instance and changes nothing.
  diff_mode:
    support: none
    description: Nothing to show as a diff.
options:
  target:
    description: C(latest), a time with its zone, or C(name:<restore point>).
    type: str
    default: latest
  action:
    description: What to do with the recovered state.
    type: str
    choices: [export, import, keep, none]
    default: none
  companies:
    description: The companies to export or import (required for those); also limits the counts.
    type: list
    elements: str
    default: []
  export_dest:
    description: With O(action=export), the root directory of the company directories.
    type: path
  company_dir:
    description: With O(action=export), the name pattern of the company directories.
    type: str
    default: "{company_id}"
  owner:
    description: With O(action=export), the owner of the files.
    type: str
  group:
    description: With O(action=export), their group.
    type: str
  max_delete_share:
    description: With O(action=import), refuse when a company would lose more than this share (0 to 1) of its keys.
    type: float
    default: 0.5
  failover_mode:
    description:
      - With O(action=import), the failover state's mode on the service host (C(postgres), C(files)...); any mode
        but C(postgres) refuses the import (the service does not read the store). Unset, not checked.
    type: str
  server:
    description: The Barman server name.
    type: str
    default: baileys
  barman:
    description: The barman program (the C(pitr) role's virtual environment).
    type: path
    default: /opt/barman/bin/barman
  barman_config:
    description: Barman's configuration file.
    type: path
    default: /etc/barman.conf
  barman_user:
    description: The user Barman and the scratch instance run as.
    type: str
    default: barman
  backup_id:
    description: Restore this base backup instead of the newest one that ends before the target.
    type: str
  scratch_dir:
    description: Where the scratch instance's directory is created (0700, the Barman user's).
    type: path
    default: /var/lib/barman/scratch
  scratch_port:
    description: The scratch instance's port (its socket's name; it does not listen on TCP).
    type: int
    default: 54329
  scratch_user:
    description: The role that reads the recovered store (it exists there too). Default O(login_user).
    type: str
  pg_bin_dir:
    description: PostgreSQL server programs of the production server's major version. Default, the newest installed.
    type: path
  timeout:
    description: Seconds for the base backup copy and for the replay, each.
    type: int
    default: 1800
seealso:
  - module: baileys.resilience.pitr_restore_point
  - module: baileys.resilience.auth_import
"""

EXAMPLES = r"""
- name: Bring back one company's keys as they were just before a mistaken DELETE at 14:05
  baileys.resilience.pitr_restore:
    login_host: db.internal
    login_user: baileys
    login_password: "{{ vault_baileys_db_password }}"
    login_db: whatsapp
    target: "2026-03-01T14:04:59+00:00"
    action: import
    companies: [acme]

- name: Everything streamed so far, kept running for inspection
  baileys.resilience.pitr_restore:
    login_db: whatsapp
    login_user: baileys
    target: latest
    action: keep
"""

RETURN = r"""
backup_id:
  description: The base backup restored.
  returned: always
  type: str
recovered_time:
  description: Time of the last transaction replayed.
  returned: success
  type: str
wal_replayed_bytes:
  description: WAL replayed (redo start to redo end).
  returned: success
  type: int
redo_start_lsn:
  description: Where the replay started.
  returned: success
  type: str
redo_end_lsn:
  description: Where it ended.
  returned: success
  type: str
stopped:
  description: The first transaction not replayed (a time or name target).
  returned: when the target stopped the replay
  type: str
partial_wal_added:
  description: Segments added from receive-wal's partial file.
  returned: success
  type: list
  elements: str
companies:
  description: Per company, the recovered key count and whether creds exist.
  returned: always
  type: dict
  sample: {acme: {keys: 1650, creds: true}}
import:
  description: With O(action=import), what changed in production (totals and per company).
  returned: when action is import
  type: dict
export:
  description: With O(action=export), where and how much.
  returned: when action is export
  type: dict
scratch:
  description: With O(action=keep), the running instance (data, socket, port, log, psql command).
  returned: when action is keep
  type: dict
seconds:
  description: Seconds per step (select, restore_base_backup, replay, the action, total).
  returned: success
  type: dict
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.baileys.resilience.plugins.module_utils import pgconn, pitr, pitrscratch


def main():
    module = AnsibleModule(
        argument_spec=pgconn.argspec(
            pgconn.CONNECTION_ARGSPEC,
            pgconn.STORE_ARGSPEC,
            target=dict(type="str", default="latest"),
            action=dict(type="str", choices=list(pitrscratch.ACTIONS), default="none"),
            companies=dict(type="list", elements="str", default=[]),
            export_dest=dict(type="path"),
            company_dir=dict(type="str", default="{company_id}"),
            owner=dict(type="str"),
            group=dict(type="str"),
            max_delete_share=dict(type="float", default=0.5),
            failover_mode=dict(type="str"),
            server=dict(type="str", default=pitr.DEFAULT_SERVER),
            barman=dict(type="path", default=pitr.DEFAULT_BARMAN),
            barman_config=dict(type="path", default=pitr.DEFAULT_BARMAN_CONFIG),
            barman_user=dict(type="str", default=pitr.DEFAULT_BARMAN_USER),
            backup_id=dict(type="str"),
            scratch_dir=dict(type="path", default=pitrscratch.DEFAULT_SCRATCH_DIR),
            scratch_port=dict(type="int", default=pitrscratch.DEFAULT_SCRATCH_PORT),
            scratch_user=dict(type="str"),
            pg_bin_dir=dict(type="path"),
            timeout=dict(type="int", default=1800),
        ),
        required_if=[("action", "export", ("export_dest",))],
        supports_check_mode=True,
    )
    p = module.params
    module.no_log_values.update(pgconn.secret_values(p))
    conn_params, store_params = pgconn.split_params(p)
    barman = pitr.Barman(p["barman"], p["barman_config"], p["server"], p["barman_user"])
    export_options = {"company_dir": p["company_dir"], "owner": p["owner"], "group": p["group"]}
    try:
        result = pitrscratch.recover(
            barman, target=p["target"], action=p["action"], companies=p["companies"], scratch_dir=p["scratch_dir"],
            pg_bin_dir=p["pg_bin_dir"], scratch_port=p["scratch_port"],
            scratch_login_user=p["scratch_user"] or p["login_user"] or "postgres", dbname=p["login_db"],
            store_params=store_params, export_dest=p["export_dest"], export_options=export_options,
            prod_conn_params=conn_params, max_delete_share=p["max_delete_share"], failover_mode=p["failover_mode"],
            backup_id=p["backup_id"], timeout=p["timeout"], check_mode=module.check_mode)
    except (pitr.PitrError, pgconn.PgError) as exc:
        module.fail_json(msg=str(exc))
    module.exit_json(**result)


if __name__ == "__main__":
    main()
