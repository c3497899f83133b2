#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: baileys.resilience contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: keys_cleanup
short_description: Delete old Baileys signal keys from PostgreSQL, never one Baileys may still need
version_added: 0.1.0
description:
  - Deletes keys older than O(older_than_days) days by C(updated_at), or past their C(expires_at),
    as chosen by O(age_column), when the retention rule of their type lets them go. The rules, their
    reasons and the Baileys source lines they rest on are in C(docs/key-retention.md).
  - Never deleted, whatever their age, creds (the auth table is not touched); C(pre-key) rows (an
    uploaded, unconsumed one-time pre-key is live on WhatsApp's server until a new contact uses it, and
    one not uploaded yet is read back by the next upload); C(app-state-sync-key) and
    C(app-state-sync-version); C(identity-key); C(lid-mapping); key types the rules do not know.
  - Deleted by age, C(session), C(sender-key), C(sender-key-memory) and C(device-list), which Baileys
    rebuilds (retry receipts and pre-key bundle fetches re-establish a session); C(tctoken) rows only
    once Baileys itself would treat both their timestamps as expired, never the C(__index) row.
  - Deletes in batches of O(batch_size) rows, one short transaction per batch, rows picked by primary key
    with C(FOR UPDATE SKIP LOCKED), so the running service is never blocked for long.
  - A run that would delete more than O(max_delete) keys deletes nothing and fails, unless
    O(confirm_large_delete=true). Check mode fails the same way (it predicts the real run) and returns
    the counts and age buckets, so the preview shows what a confirmed run would delete.
  - Returns, per retention rule (RV(rules)), how many old keys it keeps and how many it deletes (check
    mode, would delete).
  - Reports the age buckets of all keys and of the candidates, and the table and index size before and after.
author:
  - baileys.resilience contributors (!UNKNOWN)
extends_documentation_fragment:
  - baileys.resilience.postgres
  - baileys.resilience.store
attributes:
  check_mode:
    support: full
    description: Counts exactly what would be deleted (same counts as a real run), lists per retention rule
      what it keeps and would delete, and deletes nothing.
  diff_mode:
    support: none
    description: Returns no diff.
options:
  older_than_days:
    description:
      - Keys whose C(updated_at) is older than this many days are candidates, if their retention rule lets
        them go.
    type: int
    default: 30
  age_column:
    description:
      - V(updated_at), the C(updated_at) age only.
      - V(expires_at), only keys whose C(expires_at) is set and in the past.
      - V(auto), C(expires_at < now()) where C(expires_at) is set, the C(updated_at) age otherwise.
        Tables without an C(expires_at) column use C(updated_at).
    type: str
    choices: [auto, updated_at, expires_at]
    default: auto
  batch_size:
    description:
      - Rows deleted per transaction.
    type: int
    default: 1000
  max_delete:
    description:
      - A run that would delete more keys than this deletes nothing and fails, unless O(confirm_large_delete).
    type: int
    default: 1000
  confirm_large_delete:
    description:
      - Delete even when more than O(max_delete) keys are candidates.
    type: bool
    default: false
  companies:
    description:
      - Only clean these companies. Default, every company.
    type: list
    elements: str
  vacuum:
    description:
      - Run C(VACUUM (ANALYZE)) on the keys table after deleting, so the space is reused and the planner
        statistics are fresh. Failures (for example, not the table owner) are warnings.
    type: bool
    default: true
notes:
  - The table does not shrink on disk after a plain C(VACUUM); RV(sizes_after) shows the space PostgreSQL
    keeps for reuse.
seealso:
  - module: baileys.resilience.auth_state_info
"""

EXAMPLES = r"""
- name: Delete keys unused for 30 days (at most 1,000 per run)
  baileys.resilience.keys_cleanup:
    login_host: db.internal
    login_user: baileys
    login_password: "{{ vault_baileys_db_password }}"
    login_db: whatsapp

- name: What would go? (check mode reports counts, age buckets and what each retention rule keeps)
  baileys.resilience.keys_cleanup:
    login_unix_socket: /var/run/postgresql
    login_db: whatsapp
    older_than_days: 14
  check_mode: true
  register: preview

- name: A first cleanup of a large backlog, confirmed after reading the preview
  baileys.resilience.keys_cleanup:
    login_unix_socket: /var/run/postgresql
    login_db: whatsapp
    older_than_days: 14
    confirm_large_delete: true
    batch_size: 5000
"""

RETURN = r"""
deleted:
  description: Keys deleted (0 in check mode).
  returned: always
  type: int
would_delete:
  description: Candidates found by the scan (what check mode would delete).
  returned: always
  type: int
candidates_by_type:
  description: Candidates per key type.
  returned: always
  type: dict
  sample: {pre-key: 700, session: 120}
deleted_by_type:
  description: Keys deleted per key type.
  returned: when keys were deleted
  type: dict
protected_old_keys:
  description:
    - Old keys kept by a retention rule, per rule that keeps keys (C(pre-key), C(app-state), C(identity-key),
      C(lid-mapping), C(tctoken), C(other) for unknown key types).
  returned: always
  type: dict
  sample: {pre-key: 800, app-state: 17, identity-key: 12, lid-mapping: 8, tctoken: 1, other: 0}
kept_old_by_type:
  description: Old keys kept by a retention rule, per key type.
  returned: always
  type: dict
  sample: {pre-key: 800, identity-key: 12}
rules:
  description:
    - The retention rules, in order, with what each did in this run.
    - C(name), C(types), C(deletes) (V(never), V(by_age) or V(by_age_once_expired)), C(reason), C(source) (the
      Baileys source lines the rule rests on), C(kept_old) (old keys it kept), C(candidates) (old keys it lets go)
      and, after a real run, C(deleted).
  returned: always
  type: list
  elements: dict
  sample:
    - {name: pre-key, types: [pre-key], deletes: never, kept_old: 800, candidates: 0, deleted: 0}
    - {name: session, types: [session], deletes: by_age, kept_old: 0, candidates: 22, deleted: 22}
age_buckets:
  description: All keys per C(updated_at) age bucket before the run (C(0-1d), C(1-7d), C(7-14d), C(14-30d), C(>30d)).
  returned: always
  type: dict
candidate_age_buckets:
  description: Candidates per C(updated_at) age bucket.
  returned: always
  type: dict
age_buckets_after:
  description: All keys per age bucket after the run.
  returned: when keys were deleted or the run found none
  type: dict
sizes_before:
  description: Keys table C(table_bytes), C(index_bytes) and C(total_bytes) before the run.
  returned: always
  type: dict
sizes_after:
  description: The same after the run.
  returned: always
  type: dict
batches:
  description: Delete transactions run.
  returned: always
  type: int
stopped:
  description: True when the run stopped because of O(max_delete).
  returned: always
  type: bool
age_column_used:
  description: The age rule applied (V(auto) falls back to V(updated_at) without an C(expires_at) column).
  returned: always
  type: str
warnings_list:
  description: Non-fatal findings.
  returned: always
  type: list
  elements: str
duration:
  description: Seconds the run took.
  returned: always
  type: float
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.baileys.resilience.plugins.module_utils import cleanup, modresult, pgconn


def main():
    module = AnsibleModule(
        argument_spec=pgconn.argspec(
            pgconn.CONNECTION_ARGSPEC,
            pgconn.STORE_ARGSPEC,
            older_than_days=dict(type="int", default=30),
            age_column=dict(type="str", choices=list(cleanup.AGE_COLUMNS), default="auto"),
            batch_size=dict(type="int", default=1000),
            max_delete=dict(type="int", default=1000),
            confirm_large_delete=dict(type="bool", default=False),
            companies=dict(type="list", elements="str"),
            vacuum=dict(type="bool", default=True),
        ),
        supports_check_mode=True,
    )
    p = module.params
    module.no_log_values.update(pgconn.secret_values(p))  # connect_params' secret keys (not the dict)
    conn_params, store_params = pgconn.split_params(p)
    try:
        result = cleanup.cleanup_keys(
            conn_params, store_params, older_than_days=p["older_than_days"], age_column=p["age_column"],
            batch_size=p["batch_size"], max_delete=p["max_delete"], confirm_large_delete=p["confirm_large_delete"],
            companies=p["companies"], vacuum=p["vacuum"], check_mode=module.check_mode,
        )
    except cleanup.CleanupError as exc:
        found = dict(exc.result)
        modresult.publish_warnings(module, found, shown=0)
        found.pop("changed", None)
        module.fail_json(msg=str(exc), **found)
    except pgconn.PgError as exc:
        module.fail_json(msg=str(exc))
    modresult.publish_warnings(module, result, shown=None)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
