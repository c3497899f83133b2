#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: baileys.resilience contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: s3_fetch
short_description: Fetch the newest backup that verifies from S3-compatible buckets (disaster recovery)
version_added: 0.1.0
description:
  - Lists the backup manifests (C(<prefix>-<stamp>.dump.manifest.json)) under each target's prefix, reads and
    checks them (docs/backup-format.md), and fetches the newest backup whose bytes hash to the manifest's sha256.
  - A target that cannot be listed (unreachable, throttled past O(retries), access denied) is skipped with a
    warning (region failover).
  - B(Candidate order) with O(selection=newest) (the default) - backups from newest to oldest by the manifest's
    C(created_at); for one backup, the targets in the order given. So when the newest backup is corrupted on the
    first target, the same backup is tried on the next target before any older backup.
    With O(selection=target_order) - the first target's backups from newest to oldest, then the next target's.
  - A candidate is rejected, with a warning naming the object, when its size or C(sha256) metadata disagrees
    with the manifest, or when its downloaded bytes do not hash to the manifest's sha256 (a corrupted object);
    the next candidate is then tried.
  - The dump is streamed into a temporary file in O(dest_dir) (hashed while written, resumed with a range
    request after a broken connection), flushed to disk, verified, and only then renamed to its final name with
    mode 0600; the manifest is then written beside it, atomically. An interrupted run leaves no partial backup.
  - When the chosen backup is already in O(dest_dir) and verifies, nothing is downloaded (C(changed=false)).
author:
  - baileys.resilience contributors (!UNKNOWN)
extends_documentation_fragment:
  - baileys.resilience.s3
attributes:
  check_mode:
    support: full
    description: Lists the targets, reads the manifests and HEADs the chosen dump; downloads nothing and reports
      the object that would be fetched (its bytes are not hashed, so a corrupted object is only found by a real run).
  diff_mode:
    support: none
    description: Returns no diff.
options:
  dest_dir:
    description:
      - Directory to put the backup in. Created (mode 0700) when missing; its parent must exist.
    type: path
    required: true
  name_prefix:
    description:
      - Only backups named C(<name_prefix>-<YYYYmmdd>T<HHMMSS>Z.dump) are considered.
    type: str
    default: baileys-auth
  backup_name:
    description:
      - Fetch this backup (for example C(baileys-auth-20261124T030000Z.dump)) instead of the newest.
    type: str
  selection:
    description:
      - Candidate order, see the description.
    type: str
    default: newest
    choices: [newest, target_order]
  identity_file:
    description:
      - File holding the age identity (C(AGE-SECRET-KEY-1...), as C(age-keygen) writes it) that opens encrypted
        backups (docs/encryption.md). The manifest is decrypted in memory, the dump while it downloads, into the
        same 0600 temporary file; the ciphertext is checked against the sealed manifest and the plaintext against
        the manifest, and the manifest written beside the dump is the original one, byte for byte.
      - An identity that is not one of the recipients fails the candidate with a message naming the recipient
        fingerprints the backup was encrypted to, and leaves no file.
      - Without an identity, encrypted backups are not candidates and the error says so.
    type: path
  identity:
    description:
      - The identity's content instead of a file (for example from ansible-vault). Never logged.
    type: str
notes:
  - The credentials need C(s3:ListBucket) and C(s3:GetObject) (and C(kms:Decrypt) for C(aws:kms) objects).
  - Options of the targets that only matter for uploads (O(targets[].storage_class), O(targets[].sse),
    O(targets[].kms_key_id)) are accepted so that the same target list serves both modules.
  - Restoring the fetched dump is the job of M(baileys.resilience.backup_verify) or
    M(baileys.resilience.backup_restore).
seealso:
  - module: baileys.resilience.s3_replicate
  - module: baileys.resilience.backup_verify
"""

EXAMPLES = r"""
- name: Fetch the newest verified backup, from the primary region or else the DR region
  baileys.resilience.s3_fetch:
    dest_dir: /var/restore/baileys
    targets:
      - name: primary
        bucket: acme-baileys-backups-eu
        region: eu-west-1
        prefix: whatsapp/
      - name: dr-region
        bucket: acme-baileys-backups-us
        region: us-east-1
        prefix: whatsapp/
  register: fetched

- name: Which backup would be fetched?
  baileys.resilience.s3_fetch:
    dest_dir: /var/restore/baileys
    targets: "{{ backup_targets }}"
  check_mode: true
"""

RETURN = r"""
path:
  description: The verified local dump (also in check mode, where it is where the dump would go).
  returned: success
  type: str
  sample: /var/restore/baileys/baileys-auth-20261124T030000Z.dump
manifest_path:
  description: The manifest written beside it.
  returned: success
  type: str
manifest:
  description: The backup's manifest.
  returned: success
  type: dict
name:
  description: The backup's file name.
  returned: success
  type: str
target:
  description: Name of the target the backup came from (or would come from).
  returned: success
  type: str
bucket:
  description: Its bucket.
  returned: success
  type: str
key:
  description: The object key of the dump.
  returned: success
  type: str
tried:
  description: Every target listing that failed and every candidate tried, in order, with the outcome
    (C(fetched), C(present) - already in O(dest_dir) and verified, C(would_fetch) in check mode,
    C(corrupt), C(invalid), C(wrong_identity), C(undecryptable), C(error), C(unreachable)).
  returned: always
  type: list
  elements: dict
  sample: [{target: primary, key: whatsapp/baileys-auth-20261124T030000Z.dump, outcome: corrupt,
            error: "sha256 ab12..., manifest says cd34..."}]
decrypted:
  description: Whether the backup was encrypted and decrypted with the identity given.
  returned: success
  type: bool
recipients:
  description: Fingerprints of the recipients an encrypted backup was made for (empty for a plaintext one).
  returned: success
  type: list
  elements: str
downloaded_bytes:
  description: Bytes downloaded for the chosen backup.
  returned: always
  type: int
seconds:
  description: Seconds the fetch took.
  returned: always
  type: float
warnings_list:
  description: Skipped targets and rejected candidates (also shown as task warnings).
  returned: always
  type: list
  elements: str
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.baileys.resilience.plugins.module_utils import modresult, s3


def main():
    argument_spec = dict(
        dest_dir=dict(type="path", required=True),
        name_prefix=dict(type="str", default=s3.DEFAULT_PREFIX),
        backup_name=dict(type="str"),
        selection=dict(type="str", default="newest", choices=list(s3.SELECTIONS)),
        targets=dict(type="list", elements="dict", required=True, options=s3.TARGET_OPTIONS),
        identity_file=dict(type="path"),
        identity=dict(type="str", no_log=True),
    )
    argument_spec.update(s3.TRANSFER_ARGSPEC)
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True,
                           mutually_exclusive=[("identity_file", "identity")])
    p = module.params
    try:
        settings = s3.Settings.from_params(p, check_mode=module.check_mode)
        identities = s3.load_identities(p["identity_file"], p["identity"])
        result = s3.fetch(p["dest_dir"], p["targets"], settings, name_prefix=p["name_prefix"],
                          backup_name=p["backup_name"], selection=p["selection"], identities=identities)
    except s3.FetchError as exc:
        modresult.publish_warnings(module, exc.result)
        module.fail_json(msg=str(exc), **exc.result)
    except (s3.S3Error, s3.AgeError) as exc:
        module.fail_json(msg=str(exc))
    modresult.publish_warnings(module, result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
