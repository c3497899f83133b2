#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: baileys.resilience contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: auth_export
short_description: Export a Baileys auth state from PostgreSQL to useMultiFileAuthState directories
version_added: 0.1.0
description:
  - Reads the creds and signal keys of every company (or of O(companies)) from PostgreSQL in one
    C(REPEATABLE READ) snapshot, so creds and keys agree, and mirrors each company into
    C(<dest>/<company_dir>/) in the layout Baileys' C(useMultiFileAuthState) reads
    (C(creds.json) and C(<type>-<id>.json) per key).
  - Every Buffer is written in Baileys' base64 form C({"type":"Buffer","data":"<base64>"});
    the legacy array form and numeric-keyed objects found in the store are normalised.
  - Each file is written atomically (temporary file, flush to disk, rename). A manifest per company
    (sha256 and size per file, counts, snapshot time) is written last. An interrupted run leaves no
    half-written file and the next run completes the mirror.
  - A company directory that does not exist yet is written whole under a staging name
    (C(.baileys-resilience-tmp-dir-*)), flushed, and renamed into place, never over a directory that
    appeared meanwhile. A reader sees no directory or a complete one. Staging directories left by a
    killed run are removed by the next export and never read by M(baileys.resilience.auth_import).
  - Idempotent. A run that finds nothing to change touches no file and reports C(changed=false);
    the manifest lets it skip unchanged files without rewriting them.
  - The manifest also holds a fingerprint of the company's key rows, which the server computes from
    the stored C(jsonb) (a hash per row of type, id and value; per company the count and the sum).
    When the store's fingerprint and creds match the manifest and every file still has the size,
    mtime, mode and owner the manifest recorded (nothing missing, nothing to prune), the company's
    key rows are not read at all. Anything else, such as a file rewritten by Baileys or a manifest
    from another source, makes the run compare that company file by file. Values that C(jsonb)
    treats as equal (V(1) and V(1.0)) count as unchanged, as in M(baileys.resilience.auth_import).
  - Nothing under O(dest) is touched when the database cannot be reached.
author:
  - baileys.resilience contributors (!UNKNOWN)
extends_documentation_fragment:
  - baileys.resilience.postgres
  - baileys.resilience.store
attributes:
  check_mode:
    support: full
    description: Reads the database, writes nothing, and reports exactly what would change.
  diff_mode:
    support: full
    description: Lists, per company, the files that would be written or removed.
options:
  dest:
    description:
      - Absolute path of the root directory; each company goes to a directory below it.
      - Created (mode O(directory_mode)) when missing; its parent must exist.
    type: path
    required: true
  companies:
    description:
      - Company ids to export. Default, every company found in the store.
      - Ids containing C(/), C(\), NUL or C(..), or starting with C(.), are refused.
    type: list
    elements: str
  company_dir:
    description:
      - Name of each company's directory under O(dest); must contain C({company_id}) once.
    type: str
    default: "{company_id}"
  prune:
    description:
      - Remove key files that are no longer in the store.
      - Only files named like Baileys key files inside company directories are ever removed;
        C(creds.json), unknown files and anything outside the company directories are left alone.
    type: bool
    default: true
  owner:
    description:
      - Owner of the files and company directories (name or uid). Default, the user running the module.
    type: str
  group:
    description:
      - Group of the files and company directories (name or gid).
    type: str
  mode:
    description:
      - Mode of every file written, as an octal string.
    type: raw
    default: "0600"
  directory_mode:
    description:
      - Mode of O(dest) when created and of the company directories, as an octal string.
    type: raw
    default: "0700"
  source:
    description:
      - C(database) reads PostgreSQL.
      - C(backup) reads the auth state straight from O(backup_file), a backup made by
        M(baileys.resilience.pg_backup), with no database server at all (PostgreSQL is down).
        Its sha256 is checked against its manifest first; the files are identical to an export from the
        database at the snapshot the backup was taken in.
    type: str
    choices: [database, backup]
    default: database
  backup_file:
    description:
      - The C(.dump) file to read with O(source=backup).
      - It may be age-encrypted (a backup the backup job encrypted on the host with C(encrypt_local), or a sealed
        copy from C(<backup_dir>/.sealed/) with its encrypted manifest beside it); it is then decrypted with
        O(identity_file) or O(identity) into a private temporary directory that is removed before the export is
        written. The files are the same as from the plaintext backup. A wrong identity fails naming the
        recipient fingerprints the backup was made for.
    type: path
  identity_file:
    description:
      - File holding the age identity that opens an encrypted O(backup_file) (docs/encryption.md).
    type: path
  identity:
    description:
      - The identity's content instead of a file (for example from ansible-vault). Never logged.
    type: str
  state_file:
    description:
      - A failover state file (see M(baileys.resilience.failover_state)) in which a successful export records what
        it handed over, in the same task (the source (O(state_source) plus C(kind) and C(snapshot_time)), the
        C(handover_time) and per company the fingerprint, creds sha256 and key count). Not written in check mode.
    type: path
  state_source:
    description: More about the source for O(state_file), for example C(backup_file), C(sha256), C(s3_object).
    type: dict
    default: {}
  pg_bin_dir:
    description:
      - Directory of C(pg_restore) for O(source=backup) (the pg_client role's C(pg_client_bin_dir)).
        Default, the newest C(/usr/lib/postgresql/*/bin).
    type: path
notes:
  - Key ids that Baileys' file naming cannot carry back (for example a C(:) in a session id) are
    exported under Baileys' own name, which Baileys reads, and reported in RV(warnings_list),
    because M(baileys.resilience.auth_import) would read them back as a different id.
  - The C(expires_at) column has no place in Baileys' files and is not exported.
seealso:
  - module: baileys.resilience.auth_import
"""

EXAMPLES = r"""
- name: Export every company's auth state for the file-based build
  baileys.resilience.auth_export:
    login_host: db.internal
    login_user: baileys
    login_password: "{{ vault_baileys_db_password }}"
    login_db: whatsapp
    dest: /srv/whatsapp/sessions
    company_dir: "session-{company_id}"
    owner: whatsapp
    group: whatsapp

- name: Export two companies, keep files the store no longer has
  baileys.resilience.auth_export:
    login_unix_socket: /var/run/postgresql
    login_db: whatsapp
    dest: /srv/whatsapp/sessions
    companies: [acme, globex]
    prune: false

- name: PostgreSQL is down - export from the newest backup instead
  baileys.resilience.auth_export:
    source: backup
    backup_file: /var/backups/baileys-resilience/baileys-auth-20261124T030000Z.dump
    pg_bin_dir: /usr/lib/postgresql/18/bin
    dest: /srv/whatsapp/sessions

- name: What would change? (check mode with diff)
  baileys.resilience.auth_export:
    login_db: whatsapp
    dest: /srv/whatsapp/sessions
  check_mode: true
  diff: true
"""

RETURN = r"""
dest:
  description: The root directory.
  returned: always
  type: str
snapshot_time:
  description: Start time of the database snapshot the export reflects.
  returned: always
  type: str
  sample: "2026-11-24T03:00:00.123456+00:00"
source:
  description: Where the state was read from, C(database) or C(backup:<file name>).
  returned: always
  type: str
  sample: database
backup_file:
  description: The backup read, with O(source=backup).
  returned: when source is backup
  type: str
server_version_num:
  description: The server's C(server_version_num).
  returned: always
  type: int
  sample: 180001
companies:
  description: One entry per company.
  returned: always
  type: list
  elements: dict
  contains:
    company_id:
      description: The company id.
      type: str
    directory:
      description: The company's directory.
      type: str
    creds:
      description: Whether the company has creds (C(creds.json)).
      type: bool
    keys:
      description: Number of keys in the store.
      type: int
    written:
      description: Files written (or that would be, in check mode).
      type: int
    unchanged:
      description: Files already identical, not touched.
      type: int
    removed:
      description: Key files removed by O(prune).
      type: int
    metadata_fixed:
      description: Files or directories whose mode or owner was corrected.
      type: int
    ignored:
      description: Files in the company directory that are not part of the auth state, left alone.
      type: list
      elements: str
    changed:
      description: Whether anything changed for this company.
      type: bool
    fingerprint:
      description: The store's fingerprint of the company's key rows in the snapshot (None from a backup).
      type: str
    creds_sha256:
      description: sha256 of the creds JSON text exported (None without a creds row).
      type: str
totals:
  description:
    - Sums over all companies (C(companies), C(creds), C(keys), C(written), C(unchanged),
      C(removed), C(metadata_fixed)).
  returned: always
  type: dict
  sample: {companies: 1, creds: 1, keys: 1650, written: 1651, unchanged: 0, removed: 0, metadata_fixed: 0}
refused:
  description:
    - Companies whose id cannot name a directory (empty, C(../x), C(a/b), not UTF-8), each with C(company_id) and
      C(error). Every other company is exported; the task then fails naming these.
  returned: always
  type: list
  elements: dict
warnings_list:
  description: Non-fatal findings (also shown as task warnings).
  returned: always
  type: list
  elements: str
duration:
  description: Seconds the export took.
  returned: always
  type: float
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.baileys.resilience.plugins.module_utils import (
    agecrypt, authstate, backup, failover_state, modresult, pgconn)


def main():
    module = AnsibleModule(
        argument_spec=pgconn.argspec(
            pgconn.CONNECTION_ARGSPEC,
            pgconn.STORE_ARGSPEC,
            dest=dict(type="path", required=True),
            companies=dict(type="list", elements="str"),
            company_dir=dict(type="str", default="{company_id}"),
            prune=dict(type="bool", default=True),
            owner=dict(type="str"),
            group=dict(type="str"),
            mode=dict(type="raw", default="0600"),
            directory_mode=dict(type="raw", default="0700"),
            source=dict(type="str", choices=["database", "backup"], default="database"),
            backup_file=dict(type="path"),
            pg_bin_dir=dict(type="path"),
            state_file=dict(type="path"),
            state_source=dict(type="dict", default={}),
            identity_file=dict(type="path"),
            identity=dict(type="str", no_log=True),
        ),
        required_if=[("source", "backup", ["backup_file"])],
        mutually_exclusive=[("identity_file", "identity")],
        supports_check_mode=True,
    )
    p = module.params
    module.no_log_values.update(pgconn.secret_values(p))  # connect_params' secret keys (not the dict)
    conn_params, store_params = pgconn.split_params(p)
    try:
        opts = authstate.ExportOptions(
            dest=p["dest"], company_dir=p["company_dir"], prune=p["prune"], owner=p["owner"], group=p["group"],
            mode=p["mode"], directory_mode=p["directory_mode"], check_mode=module.check_mode, diff=module._diff,
        )
        if p["source"] == "backup":
            identities = agecrypt.load_identities(p["identity_file"], p["identity"])
            snapshot, states = backup.read_backup_states(p["backup_file"], store_params, p["companies"],
                                                         p["pg_bin_dir"], identities=identities)
            opts.source_label = snapshot.get("source", "backup")
            result = authstate.export_states(states, opts, snapshot)
            result["server_version_num"] = snapshot.get("server_version_num")
            result["backup_file"] = p["backup_file"]
        else:
            result = authstate.export_from_database(conn_params, store_params, opts, p["companies"])
    except (authstate.AuthStateError, pgconn.PgError, backup.BackupError, agecrypt.AgeError) as exc:
        module.fail_json(msg=str(exc))
    if p["state_file"] and not module.check_mode:
        source = dict(p["state_source"], kind=p["state_source"].get("kind") or p["source"],
                      snapshot_time=result.get("snapshot_time"))
        try:
            failover_state.update(p["state_file"], {"source": source, "companies": result["companies"],
                                                    "handover_time": result.get("snapshot_time")})
        except failover_state.StateError as exc:
            module.fail_json(msg="exported, but %s" % exc, **result)
    diffs = [c.pop("diff") for c in result["companies"] if "diff" in c]
    modresult.publish_warnings(module, result)
    if module._diff:
        result["diff"] = diffs
    if result["refused"]:
        # every good company was exported; the bad ones fail the task, by name
        module.fail_json(msg="exported %d compan%s; refused %d: %s" % (
            result["totals"]["companies"], "y" if result["totals"]["companies"] == 1 else "ies",
            len(result["refused"]), "; ".join(r["error"] for r in result["refused"])), **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
