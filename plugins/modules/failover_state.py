#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: baileys.resilience contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: failover_state
short_description: Read or record where the WhatsApp service's auth state lives (the failover state file)
version_added: 0.2.0
description:
  - Reads the failover state file on the service host, and records a new mode, source or handover
    when any of those options is given. The state says whether the service runs on PostgreSQL
    (C(postgres)), on its session files (C(files)), or is being switched (C(switching-to-files),
    C(switching-to-postgres)); since when; from which source the files were seeded; which run set it;
    and per company the fingerprint of what was handed over.
  - Every failover entry point reads it first and acts from it. A missing file means C(postgres). A
    damaged file fails the task (guessing could overwrite files newer than the store).
  - Written atomically (temporary file, fsync, rename, directory fsync), mode 0600, its directory 0700 when
    created. Nothing is written when nothing changes.
author:
  - baileys.resilience contributors (!UNKNOWN)
attributes:
  check_mode:
    support: full
    description: Reports the state it would write; writes nothing.
  diff_mode:
    support: full
    description: The state before and after, as JSON (it holds no secret).
options:
  path:
    description: Absolute path of the state file.
    type: path
    required: true
  mode:
    description: The new mode. A change of mode sets O(since) (now, unless given) and is added to the history.
    type: str
    choices: [postgres, switching-to-files, files, switching-to-postgres]
  since:
    description: When the mode began (UTC, ISO 8601). Default, now when O(mode) changes.
    type: str
  run_id:
    description: The id of the run that records this.
    type: str
  source:
    description:
      - What the files were seeded from, for example C(kind=database) with C(snapshot_time), or C(kind=backup)
        with C(backup_file) and C(sha256).
    type: dict
  companies:
    description:
      - Per company id what was handed over (C(fingerprint), C(creds_sha256), C(keys)), or the C(companies)
        list of an M(baileys.resilience.auth_export) or M(baileys.resilience.auth_import) result. Replaces the map.
    type: raw
  handover_time:
    description: When the service stopped writing to the side it left (UTC, ISO 8601).
    type: str
  stopped_at:
    description: When the run stopped the service (UTC, ISO 8601), for the downtime report.
    type: str
  note:
    description: Free text shown in reports.
    type: str
  require_paths:
    description:
      - Paths that must exist (for example the service's environment file); the task fails naming the first
        missing one before it reads or writes anything, so that a failover stops before it touches the service.
    type: list
    elements: path
    default: []
  legacy_files_marker:
    description:
      - A path whose existence means C(files) when there is no state file yet, for a service rolled back before
        the state file existed (the failover role passes the environment file's C(.pre-rollback) copy).
    type: path
seealso:
  - module: baileys.resilience.auth_export
  - module: baileys.resilience.auth_import
"""

EXAMPLES = r"""
- name: Where does the service's auth state live?
  baileys.resilience.failover_state:
    path: /srv/whatsapp/.baileys-failover-state.json
  register: state

- name: Record that the service now runs on files
  baileys.resilience.failover_state:
    path: /srv/whatsapp/.baileys-failover-state.json
    mode: files
    run_id: "{{ run_id }}"
"""

RETURN = r"""
state:
  description: The state after this task (the state as read when nothing was given to change).
  returned: always
  type: dict
  sample: {format: 1, mode: files, since: "2026-11-30T23:10:02.120431Z", run_id: "20261130T231000Z-4f2a",
           source: {kind: database, snapshot_time: "2026-11-30T23:09:58.001+00:00"}, companies: {}, history: []}
before:
  description: The state before this task.
  returned: always
  type: dict
summary:
  description: One line, for example C(files since 2026-11-30T23:10:02Z (run ..., source database snapshot ...)).
  returned: always
  type: str
exists:
  description: Whether the state file existed before this task.
  returned: always
  type: bool
"""

import json
import os

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.baileys.resilience.plugins.module_utils import failover_state


def main():
    module = AnsibleModule(
        argument_spec=dict(
            path=dict(type="path", required=True),
            mode=dict(type="str", choices=list(failover_state.MODES)),
            since=dict(type="str"),
            run_id=dict(type="str"),
            source=dict(type="dict"),
            companies=dict(type="raw"),
            handover_time=dict(type="str"),
            stopped_at=dict(type="str"),
            note=dict(type="str"),
            legacy_files_marker=dict(type="path"),
            require_paths=dict(type="list", elements="path", default=[]),
        ),
        supports_check_mode=True,
    )
    p = module.params
    for path in p["require_paths"]:
        if not os.path.exists(path):
            module.fail_json(msg="failover: %s does not exist" % path)
    changes = {k: p[k] for k in failover_state.FIELDS if p.get(k) is not None}
    exists = os.path.exists(p["path"]) if p["path"] else False
    try:
        if changes:
            before, after, changed = failover_state.update(p["path"], changes, check_mode=module.check_mode,
                                                           legacy_files_marker=p["legacy_files_marker"])
        else:
            before = after = failover_state.read(p["path"], p["legacy_files_marker"])
            changed = False
    except failover_state.StateError as exc:
        module.fail_json(msg=str(exc))
    result = dict(changed=changed, state=after, before=before, exists=exists,
                  summary=failover_state.describe(after))
    if module._diff and changed:
        result["diff"] = {"before_header": p["path"], "after_header": p["path"],
                          "before": json.dumps(before, indent=2, sort_keys=True) + "\n",
                          "after": json.dumps(after, indent=2, sort_keys=True) + "\n"}
    module.exit_json(**result)


if __name__ == "__main__":
    main()
