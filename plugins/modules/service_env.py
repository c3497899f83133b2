#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: baileys.resilience contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: service_env
short_description: Switch the WhatsApp service's environment file between modes, keeping the original
version_added: 0.2.0
description:
  - With O(state=switched), sets each O(values) item as a C(KEY=VALUE) line of the dotenv-style environment file
    O(path) (the last C(KEY=) or C(export KEY=) line is replaced, a missing key is appended), and keeps a copy of
    the original as O(path) + O(backup_suffix) the first time (an existing copy is never overwritten, it is the
    file as it was before the first rollback).
  - With O(state=restored), puts that copy back over O(path) and removes it; without a copy, nothing changes.
  - Every write is atomic (temporary file, fsync, rename) and keeps the file's owner and mode. The file may hold
    C(PGPASSWORD); its content is never returned or shown, C(--diff) lists only the names of the keys that change.
author:
  - baileys.resilience contributors (!UNKNOWN)
attributes:
  check_mode:
    support: full
    description: Reports what would change; writes nothing.
  diff_mode:
    support: partial
    description: The names of the keys that change (never their values or the rest of the file).
options:
  path:
    description: Absolute path of the service's environment file. It must exist.
    type: path
    required: true
  state:
    description: C(switched) sets O(values); C(restored) puts the original back.
    type: str
    choices: [switched, restored]
    default: switched
  values:
    description: The variables to set with O(state=switched), for example C(USE_REPOSITORY_PATTERN=false).
    type: dict
    default: {}
  backup_suffix:
    description: Suffix of the copy of the original.
    type: str
    default: .pre-rollback
seealso:
  - module: baileys.resilience.failover_state
"""

EXAMPLES = r"""
- name: Switch the service to file-based sessions
  baileys.resilience.service_env:
    path: /srv/whatsapp/.env
    values:
      USE_REPOSITORY_PATTERN: "false"

- name: Back to PostgreSQL (the original file)
  baileys.resilience.service_env:
    path: /srv/whatsapp/.env
    state: restored
"""

RETURN = r"""
changed_keys:
  description: The keys whose line was set (O(state=switched)).
  returned: always
  type: list
  elements: str
backup:
  description: The path of the copy of the original.
  returned: always
  type: str
backup_created:
  description: Whether this run created the copy.
  returned: when O(state=switched)
  type: bool
restored:
  description: Whether the copy was put back.
  returned: when O(state=restored)
  type: bool
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.baileys.resilience.plugins.module_utils import service


def main():
    module = AnsibleModule(
        argument_spec=dict(
            path=dict(type="path", required=True),
            state=dict(type="str", choices=["switched", "restored"], default="switched"),
            values=dict(type="dict", default={}),
            backup_suffix=dict(type="str", default=".pre-rollback"),
        ),
        supports_check_mode=True,
    )
    p = module.params
    try:
        if p["state"] == "switched":
            result = service.switch_env(p["path"], {k: "" if v is None else str(v) for k, v in p["values"].items()},
                                        p["backup_suffix"], check_mode=module.check_mode)
        else:
            result = service.restore_env(p["path"], p["backup_suffix"], check_mode=module.check_mode)
            result["changed_keys"] = []
    except (service.ServiceError, OSError) as exc:
        module.fail_json(msg=str(exc))
    if module._diff and result["changed"]:
        result["diff"] = {"before": "", "after": "".join("%s=(set)\n" % k for k in result["changed_keys"])
                          + ("(original restored from %s)\n" % result["backup"] if result.get("restored") else "")}
    module.exit_json(**result)


if __name__ == "__main__":
    main()
