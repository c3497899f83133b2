#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: baileys.resilience contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: pitr_restore_point
short_description: Create a named restore point (pg_create_restore_point) for point-in-time recovery
version_added: 0.2.0
description:
  - Runs C(SELECT pg_create_restore_point(name)) so that M(baileys.resilience.pitr_restore) can recover to
    C(name:<name>). The failover role takes one before every switch (C(failover_restore_point)).
  - With O(only_with_slot), only when that replication slot exists on the server (the C(pitr) role's); without
    WAL streaming a restore point is of no use, and nothing is done.
  - With O(required=false), a failure (the server is down, the role may not call the function) is a warning,
    not an error (a failover must not stop for it).
  - The function needs a superuser, or EXECUTE granted on it (C(GRANT EXECUTE ON FUNCTION
    pg_create_restore_point(text) TO ...)).
author:
  - baileys.resilience contributors (!UNKNOWN)
extends_documentation_fragment:
  - baileys.resilience.postgres
  - baileys.resilience.store
attributes:
  check_mode:
    support: full
    description: Reports that a point would be created and creates none.
  diff_mode:
    support: none
    description: Nothing to show as a diff.
options:
  name:
    description: "Name of the restore point (letters, digits and C(.), C(_), C(:), C(-); at most 63)."
    type: str
    required: true
  only_with_slot:
    description: Create it only when this replication slot exists (empty, always).
    type: str
    default: ""
  required:
    description: Fail when the point cannot be created; false makes that a warning.
    type: bool
    default: true
seealso:
  - module: baileys.resilience.pitr_restore
"""

EXAMPLES = r"""
- name: A restore point before a risky change
  baileys.resilience.pitr_restore_point:
    login_host: db.internal
    login_user: postgres
    login_password: "{{ vault_pg_password }}"
    login_db: whatsapp
    name: before-migration-42
"""

RETURN = r"""
created:
  description: Whether a restore point was created.
  returned: always
  type: bool
name:
  description: Its name.
  returned: always
  type: str
lsn:
  description: Its WAL location.
  returned: when created
  type: str
at:
  description: The server's time when it was created.
  returned: when created
  type: str
reason:
  description: Why none was created (no slot, or the error with O(required=false)).
  returned: always
  type: str
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.baileys.resilience.plugins.module_utils import pgconn, pitr


def main():
    module = AnsibleModule(
        argument_spec=pgconn.argspec(
            pgconn.CONNECTION_ARGSPEC,
            pgconn.STORE_ARGSPEC,  # the postgres module_defaults group sets them for every module: accepted
            name=dict(type="str", required=True),
            only_with_slot=dict(type="str", default=""),
            required=dict(type="bool", default=True),
        ),
        supports_check_mode=True,
    )
    p = module.params
    module.no_log_values.update(pgconn.secret_values(p))
    conn_params, _store = pgconn.split_params(p)
    try:
        pitr.check_point_name(p["name"])
        if module.check_mode:
            module.exit_json(changed=True, created=False, name=p["name"], reason="check mode")
        result = pitr.restore_point(conn_params, p["name"], p["only_with_slot"] or None)
    except (pitr.PitrError, pgconn.PgError) as exc:
        if p["required"]:
            module.fail_json(msg=str(exc))
        module.warn("no restore point: %s" % exc)
        module.exit_json(changed=False, created=False, name=p["name"], reason=str(exc))
    module.exit_json(changed=result["created"], **result)


if __name__ == "__main__":
    main()
