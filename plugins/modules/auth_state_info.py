#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: baileys.resilience contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: auth_state_info
short_description: Health of a Baileys auth-state store in PostgreSQL and of its backups
version_added: 0.1.0
description:
  - Reports, per company, key counts by type; old keys split by the cleanup's retention rules
    (C(docs/key-retention.md)) into stale ones, which the cleanup may delete (C(stale_keys), not updated for
    C(stale_key_days); C(expired_keys), C(expires_at) in the past), and old but live ones, kept by a rule
    (C(old_live_keys), for example unconsumed pre-keys); the live pre-key count (uploaded and not consumed, the
    server-side supply Baileys relies on); the C(updated_at) age buckets of all keys; the table and index
    sizes; the latency (p50/p95/p99) of O(probes) primary-key lookups, the query Baileys runs most.
  - Only stale keys are checked against thresholds; old but live keys never raise a warning.
  - With O(backup_dir), reads the backup manifests there (docs/backup-format.md) and reports the newest
    backup, the newest valid one and its age.
  - Grades each check C(ok), C(warning) or C(critical) against O(thresholds) and returns the worst as
    RV(status). An unreachable database is C(critical), not a task failure, unless O(fail_on) says so.
  - Read only. Never reports C(changed).
author:
  - baileys.resilience contributors (!UNKNOWN)
extends_documentation_fragment:
  - baileys.resilience.postgres
  - baileys.resilience.store
attributes:
  check_mode:
    support: full
    description: Reads only, so check mode runs the same queries.
  diff_mode:
    support: none
    description: Returns no diff.
options:
  backup_dir:
    description:
      - Directory of the C(pg_dump) backups and their manifests. Unset, backups are not checked.
    type: path
  backup_prefix:
    description:
      - File name prefix of the backups.
    type: str
    default: baileys-auth
  verify_checksum:
    description:
      - Also compare the sha256 of the newest backup with its manifest (reads the whole file).
    type: bool
    default: false
  probes:
    description:
      - Number of probe queries timed for the latency percentiles.
    type: int
    default: 20
  companies:
    description:
      - Only report these companies. Default, every company.
    type: list
    elements: str
  thresholds:
    description:
      - Overrides of the default thresholds C(latency_p95_warning_ms) (100), C(latency_p95_critical_ms) (1000),
        C(backup_age_warning_hours) (26), C(backup_age_critical_hours) (50), C(stale_key_days) (30),
        C(stale_keys_warning) (unset, no check) and C(expired_keys_warning) (unset, no check). The two key
        checks count only keys the retention rules let the cleanup delete.
    type: dict
    default: {}
  fail_on:
    description:
      - Fail the task when RV(status) is at least this bad. V(never) only reports.
    type: str
    choices: [never, warning, critical]
    default: never
seealso:
  - module: baileys.resilience.keys_cleanup
"""

EXAMPLES = r"""
- name: Health of the store and of last night's backup
  baileys.resilience.auth_state_info:
    login_unix_socket: /var/run/postgresql
    login_db: whatsapp
    backup_dir: /var/backups/baileys
  register: health

- name: Fail the play when the store is critical
  baileys.resilience.auth_state_info:
    login_host: db.internal
    login_user: monitor
    login_password: "{{ vault_monitor_password }}"
    login_db: whatsapp
    thresholds:
      latency_p95_warning_ms: 20
    fail_on: critical
"""

RETURN = r"""
status:
  description: Worst status of all checks.
  returned: always
  type: str
  sample: ok
exit_code:
  description: C(0) ok, C(1) warning, C(2) critical (what C(baileys-resilience health) exits with).
  returned: always
  type: int
checks:
  description:
    - One entry per check (C(database), C(latency), C(backup), C(creds), ...) with C(name), C(status), C(detail).
  returned: always
  type: list
  elements: dict
database:
  description: C(reachable), C(server_version_num), C(target) (never the password) and C(error) when unreachable.
  returned: always
  type: dict
companies:
  description:
    - Per company C(company_id), C(creds), C(keys), C(by_type), C(stale_keys) and C(expired_keys) (keys the
      cleanup may delete), C(old_live_keys) and C(old_live_by_type) (old keys kept by a retention rule),
      C(live_pre_keys) (pre-key ids below C(creds.firstUnuploadedPreKeyId), so uploaded and not consumed),
      C(unuploaded_pre_keys) (ids at or above it; both V(null) without creds), C(highest_pre_key_present).
  returned: always
  type: list
  elements: dict
totals:
  description:
    - C(companies), C(companies_with_creds), C(keys), C(stale_keys), C(expired_keys), C(old_live_keys),
      C(live_pre_keys).
  returned: when the database is reachable
  type: dict
age_buckets:
  description: Keys per C(updated_at) age bucket (C(0-1d), C(1-7d), C(7-14d), C(14-30d), C(>30d)).
  returned: always
  type: dict
table_sizes:
  description: C(auth) and C(keys) tables with C(table_bytes), C(index_bytes), C(total_bytes).
  returned: when the database is reachable
  type: dict
latency_ms:
  description: Probe latency in milliseconds (C(probes), C(p50), C(p95), C(p99), C(max)).
  returned: when the database is reachable
  type: dict
backup:
  description:
    - Backup directory summary (C(count), C(valid_count), C(newest), C(newest_valid), C(age_seconds), C(size),
      C(status)).
  returned: when O(backup_dir) is set
  type: dict
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.baileys.resilience.plugins.module_utils import backup_format, health, pgconn


def main():
    module = AnsibleModule(
        argument_spec=pgconn.argspec(
            pgconn.CONNECTION_ARGSPEC,
            pgconn.STORE_ARGSPEC,
            backup_dir=dict(type="path"),
            backup_prefix=dict(type="str", default=backup_format.DEFAULT_PREFIX),
            verify_checksum=dict(type="bool", default=False),
            probes=dict(type="int", default=20),
            companies=dict(type="list", elements="str"),
            thresholds=dict(type="dict", default={}),
            fail_on=dict(type="str", choices=["never", "warning", "critical"], default="never"),
        ),
        supports_check_mode=True,
    )
    p = module.params
    module.no_log_values.update(pgconn.secret_values(p))  # connect_params' secret keys (not the dict)
    conn_params, store_params = pgconn.split_params(p)
    try:
        result = health.collect(conn_params, store_params, backup_dir=p["backup_dir"], backup_prefix=p["backup_prefix"],
                                probes=p["probes"], thresholds=p["thresholds"], verify_checksum=p["verify_checksum"],
                                companies=p["companies"])
    except (health.HealthError, pgconn.PgError) as exc:
        module.fail_json(msg=str(exc))
    if p["fail_on"] != "never" and health.EXIT_CODES[result["status"]] >= health.EXIT_CODES[p["fail_on"]]:
        module.fail_json(msg="auth state health is %s: %s" % (
            result["status"], "; ".join("%s: %s" % (c["name"], c["detail"]) for c in result["checks"]
                                        if c["status"] != "ok")), changed=False, **result)
    module.exit_json(changed=False, **result)


if __name__ == "__main__":
    main()
