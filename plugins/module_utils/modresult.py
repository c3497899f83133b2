# -*- coding: utf-8 -*-
# Copyright: baileys.resilience contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""How every module of the collection ends: the core's ``warnings`` become task warnings and ``warnings_list``.

No Ansible import: ``module`` is anything with a ``warn(str)`` method (an AnsibleModule).
"""
from __future__ import absolute_import, division, print_function

__metaclass__ = type

WARNINGS_SHOWN = 20  # task warnings shown per task; warnings_list keeps them all


def publish_warnings(module, result, shown=WARNINGS_SHOWN):
    """Show the first ``shown`` (None: all) of ``result["warnings"]`` as task warnings and move the whole
    list to ``result["warnings_list"]``; returns ``result``."""
    warnings = result.pop("warnings", None) or []
    for warning in warnings if shown is None else warnings[:shown]:
        module.warn(warning)
    result["warnings_list"] = warnings
    return result
