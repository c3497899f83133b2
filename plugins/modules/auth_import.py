#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: baileys.resilience contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: auth_import
short_description: Import a Baileys auth state from useMultiFileAuthState directories into PostgreSQL
version_added: 0.1.0
description:
  - Reads C(creds.json) and every C(<type>-<id>.json) key file of each company directory under O(src)
    (or of the single directory O(src) with O(company_id)) and writes them to PostgreSQL.
  - Validates every file before anything is committed. Any unreadable file, bad JSON or unknown file
    name fails the task, naming every bad file, and the database is not touched. (File names, encodings and
    Buffer forms are checked in Python; the JSON itself is checked by PostgreSQL while the files are loaded
    into a temporary table, in the transaction that is rolled back on any error; only then is every file
    re-read strictly to name all the bad ones.)
  - The whole run is one transaction, all or nothing. Rows are loaded with C(COPY) into a temporary
    table and merged with one upsert per table that only changes rows whose value differs, so
    C(updated_at) moves only on rows that changed.
  - When none of the companies has a key row yet (a restore into an empty or new database) and the
    keys table fills C(created_at) and C(updated_at) by default, the key rows are loaded with C(COPY)
    straight into the keys table instead, which is the same result at about half the database work.
    Should another session write keys for one of these companies in the meantime, the run starts over
    with the upsert.
  - Idempotent. Re-importing the same files changes no row and reports C(changed=false).
author:
  - baileys.resilience contributors (!UNKNOWN)
extends_documentation_fragment:
  - baileys.resilience.postgres
  - baileys.resilience.store
attributes:
  check_mode:
    support: full
    description:
      - Loads the files into a temporary table, computes what would be inserted, updated
        and deleted, and rolls back.
  diff_mode:
    support: full
    description: Lists the keys that would be inserted (+), updated (~) or deleted (-).
options:
  src:
    description:
      - Absolute path of the root directory holding one directory per company (named after O(company_dir)),
        or, with O(company_id), the directory of that one company.
    type: path
    required: true
  company_id:
    description:
      - Import O(src) as the directory of this company.
    type: str
  companies:
    description:
      - Only these companies (their directories must exist). Default, every company directory under O(src).
    type: list
    elements: str
  company_dir:
    description:
      - Name pattern of the company directories under O(src); must contain C({company_id}) once.
    type: str
    default: "{company_id}"
  prune:
    description:
      - Delete the company's keys that have no file. Only companies being imported are affected.
    type: bool
    default: false
  mirror:
    description:
      - Make the store equal the files for the imported companies (the return from file mode, where the files are
        the truth). Implies O(prune), and in the same transaction, before anything changes, checks the guards
        below; after the changes, compares the store with the files by fingerprint (key rows) and creds, and
        rolls everything back if they differ.
      - Always refused, nothing changed, naming the company, when a company directory has no C(creds.json)
        but the store has a creds row (the mirror would delete the account's creds).
    type: bool
    default: false
  max_delete_share:
    description:
      - With O(mirror), refuse when the files would delete more than this share (0 to 1) of a company's key rows.
    type: float
    default: 0.5
  handover:
    description:
      - With O(mirror), what the store held per company when the service left it (C(fingerprint), C(creds_sha256)),
        as the failover state file recorded it. A company whose store differs from it, and does not already
        equal the files, was written by someone else since; the import is refused, listing the rows written
        since O(handover_time), unless O(on_store_changed) says which side wins.
    type: dict
  handover_time:
    description: When the service left the store (UTC, ISO 8601); rows updated later are listed by the guard.
    type: str
  on_store_changed:
    description:
      - What to do with a company whose store changed after the handover. C(fail) refuses the whole import,
        C(files) imports the files over it, C(store) leaves that company as the store has it.
    type: str
    choices: [fail, files, store]
    default: fail
  buffer_encoding:
    description:
      - How Buffers are stored. C(base64) is Baileys' own form; C(array) writes the legacy
        C({"type":"Buffer","data":[...]}) form for readers that still expect it.
    type: str
    choices: [base64, array]
    default: base64
notes:
  - Temporary files left by an interrupted M(baileys.resilience.auth_export) and its manifest are ignored.
  - A company directory without C(creds.json) imports its keys and leaves the creds row alone.
seealso:
  - module: baileys.resilience.auth_export
"""

EXAMPLES = r"""
- name: Bring the file-based sessions back into PostgreSQL
  baileys.resilience.auth_import:
    login_host: db.internal
    login_user: baileys
    login_password: "{{ vault_baileys_db_password }}"
    login_db: whatsapp
    src: /srv/whatsapp/sessions
    company_dir: "session-{company_id}"

- name: Make the store match one company's files exactly (deletes keys without a file)
  baileys.resilience.auth_import:
    login_db: whatsapp
    src: /srv/whatsapp/sessions/acme
    company_id: acme
    prune: true

- name: What would the import change?
  baileys.resilience.auth_import:
    login_db: whatsapp
    src: /srv/whatsapp/sessions
  check_mode: true
  diff: true
"""

RETURN = r"""
src:
  description: The source directory.
  returned: always
  type: str
companies:
  description: One entry per company.
  returned: always
  type: list
  elements: dict
  contains:
    company_id:
      description: The company id.
      type: str
    files:
      description: Files read (creds and keys).
      type: int
    keys:
      description: Key files read.
      type: int
    inserted:
      description: Keys inserted.
      type: int
    updated:
      description: Keys whose value changed.
      type: int
    unchanged:
      description: Keys already identical.
      type: int
    deleted:
      description: Keys deleted by O(prune).
      type: int
    creds:
      description: What happened to the creds row, C(inserted), C(updated), C(unchanged) or C(absent) (no creds.json).
      type: str
    skipped:
      description: Left as the store has it (O(on_store_changed=store)).
      type: bool
    store_fingerprint:
      description: With O(mirror), the fingerprint of the company's key rows in the store before the import.
      type: str
    files_fingerprint:
      description: With O(mirror), the fingerprint of the company's key files.
      type: str
    store_fingerprint_after:
      description: With O(mirror), outside check mode, the store's fingerprint after the import (equal to the files').
      type: str
    replaced:
      description: With O(mirror), up to 100 store rows that the files replace or delete (C(replaced|deleted type/id)).
      type: list
      elements: str
totals:
  description: Sums over all companies.
  returned: always
  type: dict
  sample: {companies: 1, files: 1651, keys: 1650, inserted: 0, updated: 3, unchanged: 1647, deleted: 0,
           creds_changed: 1}
warnings_list:
  description: Non-fatal findings.
  returned: always
  type: list
  elements: str
duration:
  description: Seconds the import took.
  returned: always
  type: float
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.baileys.resilience.plugins.module_utils import authstate, modresult, pgconn


def main():
    module = AnsibleModule(
        argument_spec=pgconn.argspec(
            pgconn.CONNECTION_ARGSPEC,
            pgconn.STORE_ARGSPEC,
            src=dict(type="path", required=True),
            company_id=dict(type="str"),
            companies=dict(type="list", elements="str"),
            company_dir=dict(type="str", default="{company_id}"),
            prune=dict(type="bool", default=False),
            mirror=dict(type="bool", default=False),
            max_delete_share=dict(type="float", default=0.5),
            handover=dict(type="dict"),
            handover_time=dict(type="str"),
            on_store_changed=dict(type="str", choices=["fail", "files", "store"], default="fail"),
            buffer_encoding=dict(type="str", choices=["base64", "array"], default="base64"),
        ),
        mutually_exclusive=[("company_id", "companies")],
        supports_check_mode=True,
    )
    p = module.params
    module.no_log_values.update(pgconn.secret_values(p))  # connect_params' secret keys (not the dict)
    conn_params, store_params = pgconn.split_params(p)
    try:
        guards = None
        if p["mirror"]:
            guards = authstate.ImportGuards(max_delete_share=p["max_delete_share"], handover=p["handover"],
                                            handover_time=p["handover_time"], on_store_changed=p["on_store_changed"])
        result = authstate.import_auth_state(
            conn_params, store_params, p["src"], company_id=p["company_id"], companies=p["companies"],
            company_dir=p["company_dir"], prune=p["prune"] or p["mirror"], buffer_encoding=p["buffer_encoding"],
            check_mode=module.check_mode, diff=module._diff, guards=guards,
        )
    except authstate.ImportRefused as exc:
        module.fail_json(msg=str(exc), refused=exc.details)
    except (authstate.AuthStateError, pgconn.PgError) as exc:
        module.fail_json(msg=str(exc))
    modresult.publish_warnings(module, result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
