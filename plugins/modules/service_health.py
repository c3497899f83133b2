#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: baileys.resilience contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: service_health
short_description: Wait until the WhatsApp service's HTTP health check answers, in one task
version_added: 0.2.0
description:
  - Polls O(url) on the host every O(interval) seconds until it answers HTTP 200 (and, with O(expect_mode), its
    JSON has that C(mode)), or fails after O(timeout) seconds with the last answer or error. One task instead
    of one Ansible round trip per try, so the failover's downtime is not stretched by the polling.
  - With O(expect_creds) or O(expect_keys), the JSON's C(creds) and C(keys) counts must then equal them (the
    task fails at once, naming both numbers).
  - Read only; C(changed) is always false.
author:
  - baileys.resilience contributors (!UNKNOWN)
attributes:
  check_mode:
    support: full
    description: Polls as usual (nothing is changed either way).
  diff_mode:
    support: none
    description: Returns no diff.
options:
  url:
    description: The health URL.
    type: str
    required: true
  timeout:
    description: Seconds to wait.
    type: float
    default: 60
  interval:
    description: Seconds between tries.
    type: float
    default: 0.25
  expect_mode:
    description: The C(mode) the JSON answer must report (C(files) or C(postgres)).
    type: str
  expect_creds:
    description: The C(creds) count the JSON answer must report.
    type: int
  expect_keys:
    description: The C(keys) count the JSON answer must report.
    type: int
"""

EXAMPLES = r"""
- name: Wait for the service on files
  baileys.resilience.service_health:
    url: http://127.0.0.1:3000/health
    expect_mode: files
    timeout: 60
"""

RETURN = r"""
seconds:
  description: Seconds until it answered as expected (or until the timeout).
  returned: always
  type: float
attempts:
  description: Tries made.
  returned: always
  type: int
json:
  description: The last JSON answer.
  returned: always
  type: dict
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.baileys.resilience.plugins.module_utils import service


def main():
    module = AnsibleModule(
        argument_spec=dict(
            url=dict(type="str", required=True),
            timeout=dict(type="float", default=60),
            interval=dict(type="float", default=0.25),
            expect_mode=dict(type="str"),
            expect_creds=dict(type="int"),
            expect_keys=dict(type="int", no_log=False),
        ),
        supports_check_mode=True,
    )
    p = module.params
    expect = {"mode": p["expect_mode"]} if p["expect_mode"] else {}
    res = service.wait_healthy(p["url"], p["timeout"], p["interval"], expect)
    out = dict(changed=False, seconds=res["seconds"], attempts=res["attempts"], json=res["json"] or {})
    if not res["healthy"]:
        module.fail_json(msg="%s not healthy after %.1fs (%d tries): %s" % (
            p["url"], res["seconds"], res["attempts"], res["error"] or "HTTP %s" % res["status"]), **out)
    body = res["json"] or {}
    wrong = ["%s %s (expected %s)" % (name, body.get(name), want) for name, want in
             (("creds", p["expect_creds"]), ("keys", p["expect_keys"])) if want is not None and body.get(name) != want]
    if wrong:
        module.fail_json(msg="the service loaded " + ", ".join(wrong), **out)
    module.exit_json(**out)


if __name__ == "__main__":
    main()
