#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: baileys.resilience contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: pitr_preflight
short_description: Check that a PostgreSQL server can be streamed by Barman (point-in-time recovery), changing nothing
version_added: 0.2.0
description:
  - Asks the server, over a normal connection, for the role's REPLICATION attribute, C(wal_level), the free
    replication slots and WAL senders and C(max_slot_wal_keep_size); then sends C(IDENTIFY_SYSTEM) over a
    replication connection (what C(pg_hba.conf) decides); then compares the client programs' version
    (C(pg_receivewal)) with the server's.
  - Every problem comes back with a code and a plain message. C(replication_allowed) is false when the problem is
    one only the database provider can fix (replication refused by C(pg_hba.conf), no REPLICATION attribute,
    C(wal_level) below C(replica)); the C(pitr) role then falls back to hourly logical dumps.
  - Read-only; never fails because of a problem it finds (see O(fail_on_problem)).
author:
  - baileys.resilience contributors (!UNKNOWN)
extends_documentation_fragment:
  - baileys.resilience.postgres
  - baileys.resilience.store
attributes:
  check_mode:
    support: full
    description: Changes nothing in any mode.
  diff_mode:
    support: none
    description: Nothing to show as a diff.
options:
  replication_user:
    description: The role of the streaming connection, when not the same as O(login_user).
    type: str
  replication_password:
    description: Its password.
    type: str
  slot_name:
    description: Barman's replication slot (an existing slot of that name counts as free).
    type: str
    default: barman_baileys
  pg_bin_dir:
    description: Directory of the PostgreSQL client programs (psql, pg_receivewal). Default, the newest installed.
    type: path
  fail_on_problem:
    description: Fail the task, with every problem's message, when any is found.
    type: bool
    default: false
seealso:
  - module: baileys.resilience.pitr_restore
"""

EXAMPLES = r"""
- name: Can Barman stream this server?
  baileys.resilience.pitr_preflight:
    login_host: db.internal
    login_user: barman
    login_password: "{{ vault_barman_password }}"
    login_db: whatsapp
  register: pitr_check
"""

RETURN = r"""
ok:
  description: True when nothing stands in the way.
  returned: always
  type: bool
replication_allowed:
  description: False when a problem needs the provider (the fallback to hourly dumps applies).
  returned: always
  type: bool
problems:
  description: Each problem found.
  returned: always
  type: list
  elements: dict
  contains:
    code:
      description: C(replication_refused), C(no_replication_privilege), C(wal_level), C(no_free_slot),
        C(no_free_wal_sender) or C(client_too_old).
      type: str
    message:
      description: What is wrong and how to fix it.
      type: str
message:
  description: All messages in one line.
  returned: always
  type: str
wal_level:
  description: The server's wal_level.
  returned: always
  type: str
slot_exists:
  description: The slot exists already.
  returned: always
  type: bool
max_slot_wal_keep_size:
  description: The server's max_slot_wal_keep_size (-1 is unlimited; see the role's documentation).
  returned: always
  type: str
server_version_num:
  description: The server's version number.
  returned: always
  type: int
client_version:
  description: pg_receivewal's version line.
  returned: when pg_receivewal runs
  type: str
system_identifier:
  description: The server's system identifier (from IDENTIFY_SYSTEM).
  returned: when the replication connection works
  type: str
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.baileys.resilience.plugins.module_utils import pgconn, pitr


def main():
    module = AnsibleModule(
        argument_spec=pgconn.argspec(
            pgconn.CONNECTION_ARGSPEC,
            pgconn.STORE_ARGSPEC,  # the postgres module_defaults group sets them for every module: accepted
            replication_user=dict(type="str"),
            replication_password=dict(type="str", no_log=True),
            slot_name=dict(type="str", default=pitr.DEFAULT_SLOT),
            pg_bin_dir=dict(type="path"),
            fail_on_problem=dict(type="bool", default=False),
        ),
        supports_check_mode=True,
    )
    p = module.params
    module.no_log_values.update(pgconn.secret_values(p))
    conn_params, _store = pgconn.split_params(p)
    repl = None
    if p["replication_user"]:
        repl = dict(conn_params, login_user=p["replication_user"],
                    login_password=p["replication_password"] or conn_params.get("login_password"))
    try:
        result = pitr.preflight(conn_params, repl, p["pg_bin_dir"], p["slot_name"])
    except (pitr.PitrError, pgconn.PgError, OSError) as exc:
        module.fail_json(msg="pitr preflight: %s" % exc)
    if p["fail_on_problem"] and result["problems"]:
        module.fail_json(msg="pitr preflight: %s" % result["message"], **result)
    module.exit_json(changed=False, **result)


if __name__ == "__main__":
    main()
