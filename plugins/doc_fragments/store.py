# -*- coding: utf-8 -*-
# Copyright: baileys.resilience contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import absolute_import, division, print_function

__metaclass__ = type


class ModuleDocFragment(object):
    # Where the auth state lives.
    DOCUMENTATION = r"""
options:
  schema:
    description:
      - Schema holding the auth state tables.
    type: str
    default: public
  auth_table:
    description:
      - Table of creds, one row per company C((company_id text primary key, creds jsonb, created_at, updated_at)).
    type: str
    default: whatsapp_auth
  keys_table:
    description:
      - Table of signal keys, primary key C((company_id, key_type, key_id)),
        with C(value jsonb), C(created_at), C(updated_at), C(expires_at).
    type: str
    default: whatsapp_keys
"""
