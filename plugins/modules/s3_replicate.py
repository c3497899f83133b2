#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: baileys.resilience contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: s3_replicate
short_description: Copy every valid local backup to one or more S3-compatible buckets, and verify it there
version_added: 0.1.0
description:
  - Uploads every valid backup of O(backup_dir) (a C(<prefix>-<stamp>.dump) and its C(.dump.manifest.json),
    see docs/backup-format.md) that a target lacks, newest first, keeping the base names under the target's prefix.
    Every object carries its sha256 (hex) in the object metadata C(sha256) (C(x-amz-meta-sha256)).
  - Idempotent. One listing per target, then a HEAD of every object the listing shows with the expected size;
    an object whose size and C(sha256) metadata match is skipped. Nothing uploaded gives C(changed=false).
  - A local backup is valid when its manifest parses, records a successful validation, and its size matches;
    before any upload the dump is hashed and compared with the manifest's sha256. Invalid or C(.partial)
    files are never uploaded (they are listed in RV(invalid_local) and warned about).
  - Files smaller than O(multipart_threshold) go in one C(PutObject) carrying a C(SHA256) checksum
    (C(ChecksumAlgorithm=SHA256) with the precomputed C(ChecksumSHA256)); larger ones as a multipart upload
    (O(multipart_chunksize) parts, O(max_concurrency) threads). After each upload a HEAD must show the
    expected size and C(sha256) metadata; with O(verify_download) the object is also read back and hashed.
  - The manifest is uploaded only after its dump is verified on that target, so a manifest on a target
    always means a verified dump beside it.
  - Throttling, 5xx answers and broken connections are retried (see O(retries)). One target failing does
    not stop the others, but the task then fails with a message naming every target and object that is
    not replicated and verified, and still returns the per-target results. It never reports success while
    an object is missing or unverified.
author:
  - baileys.resilience contributors (!UNKNOWN)
extends_documentation_fragment:
  - baileys.resilience.s3
attributes:
  check_mode:
    support: full
    description: Lists and HEADs the targets and hashes the local backups that would be uploaded;
      uploads nothing and reports RV(targets[].would_upload).
  diff_mode:
    support: none
    description: Returns no diff.
options:
  backup_dir:
    description:
      - Directory holding the backups.
    type: path
    required: true
  name_prefix:
    description:
      - Only backups named C(<name_prefix>-<YYYYmmdd>T<HHMMSS>Z.dump) are replicated.
    type: str
    default: baileys-auth
  multipart_threshold:
    description:
      - Files of this size or more are sent as multipart uploads. Bytes, or a size such as C(64MiB) or C(1G)
        (K, M, G are powers of 1024). At least 5 MiB.
    type: raw
    default: 64MiB
  multipart_chunksize:
    description:
      - Part size of multipart uploads; same units as O(multipart_threshold). At least 5 MiB.
    type: raw
    default: 16MiB
  verify_download:
    description:
      - After each upload, also read the object back and compare its sha256.
    type: bool
    default: false
  backup_concurrency:
    description:
      - Backups replicated at the same time on one target (newest first). Each one still uploads its dump,
        verifies it, then uploads its manifest.
    type: int
    default: 4
  verify_existing:
    description:
      - Also read back every object already present (not only HEAD it) and upload it again when its bytes do
        not hash to its sha256. Costs one full download per object and run.
    type: bool
    default: false
  encryption:
    description:
      - Client-side age encryption of everything uploaded (docs/encryption.md). With at least one recipient,
        each backup is first sealed once (its dump hashed against the manifest, then encrypted with the
        Python package C(pyrage) into C(<backup_dir>/.sealed/), 0600) and only the sealed copies are uploaded;
        every body is checked for the C(age-encryption.org/v1) header before it is sent. The manifest object is
        encrypted too (it carries the ciphertext's sha256 and the recipients' fingerprints); objects carry the
        fingerprints in the metadata C(age-recipients).
      - An unknown option name, a recipient that does not parse, or O(encryption.required) without recipients
        fails the task before anything is read or uploaded.
    type: dict
    suboptions:
      recipients:
        description:
          - age X25519 public keys (C(age1...)), for example an operations key and an offline break-glass key.
            Only public keys; a secret key here is refused.
        type: list
        elements: str
        default: []
      required:
        description:
          - Refuse to run without recipients (no silent plaintext run).
        type: bool
        default: false
      encrypt_local:
        description:
          - Whether the backup job keeps the local backups as age ciphertext too (M(baileys.resilience.pg_backup)'s
            O(encryption.encrypt_local), the host command's C(s3.encryption.encrypt_local)); needs recipients.
            Accepted here so that one dict serves both; replication does not depend on it.
          - A local backup the backup job encrypted is uploaded as it is (its ciphertext and the sealed manifest
            its manifest carries, made when the backup was made), with no second encryption and no C(.sealed/) copy,
            also after the recipients changed (it cannot be encrypted again without an identity). Without
            recipients such a backup is not uploaded and is reported as not valid.
        type: bool
        default: false
notes:
  - The credentials need C(s3:ListBucket) on the bucket (without it S3 answers 403 instead of 404 for a
    missing object) and C(s3:GetObject) and C(s3:PutObject) on the prefix; with C(aws:kms),
    C(kms:GenerateDataKey) and C(kms:Decrypt) on the key.
  - An interrupted multipart upload is aborted when possible; add a lifecycle rule
    C(AbortIncompleteMultipartUpload) to the bucket so that parts left by a killed run are removed.
  - The local dump is hashed only when it has to be uploaded; a backup already verified on a target is
    not read again locally.
  - Secrets are never logged or put on a command line; O(targets[].access_key),
    O(targets[].secret_key) and O(targets[].session_token) are C(no_log).
seealso:
  - module: baileys.resilience.s3_fetch
  - module: baileys.resilience.pg_backup
"""

EXAMPLES = r"""
- name: Replicate the backups to two regions and an S3-compatible provider
  baileys.resilience.s3_replicate:
    backup_dir: /var/backups/baileys
    targets:
      - name: primary
        bucket: acme-baileys-backups-eu
        region: eu-west-1
        prefix: whatsapp/
        sse: "aws:kms"
        kms_key_id: alias/baileys-backups
        storage_class: STANDARD_IA
      - name: dr-region
        bucket: acme-baileys-backups-us
        region: us-east-1
        prefix: whatsapp/
        sse: AES256
      - name: offsite
        bucket: baileys-backups
        endpoint_url: https://s3.eu-central-003.backblazeb2.com
        region: eu-central-003
        access_key: "{{ vault_b2_key_id }}"
        secret_key: "{{ vault_b2_application_key }}"

- name: What would be uploaded?
  baileys.resilience.s3_replicate:
    backup_dir: /var/backups/baileys
    targets:
      - bucket: acme-baileys-backups-eu
        region: eu-west-1
        profile: backups
  check_mode: true
"""

RETURN = r"""
changed:
  description: Whether any object was uploaded (or would be, in check mode).
  returned: always
  type: bool
backups:
  description: The valid local backups considered, newest first.
  returned: always
  type: list
  elements: str
invalid_local:
  description: Local backups that are not valid and were not uploaded, with the reason.
  returned: always
  type: list
  elements: dict
  sample: [{name: baileys-auth-20261124T030000Z.dump, reason: "no manifest"}]
uploaded:
  description: Number of objects uploaded and verified, over all targets.
  returned: always
  type: int
failures:
  description: Every object not replicated and verified, with its target and the error. Empty on success.
  returned: always
  type: list
  elements: dict
  sample: [{target: dr-region, key: whatsapp/baileys-auth-20261124T030000Z.dump, error: "SlowDown (HTTP 503)"}]
targets:
  description: One entry per target.
  returned: always
  type: list
  elements: dict
  contains:
    name:
      description: The target's name.
      type: str
    bucket:
      description: The bucket.
      type: str
    status:
      description: C(ok), C(failed) (some objects failed), or C(unreachable).
      type: str
    uploaded:
      description: Keys uploaded and verified in this run.
      type: list
      elements: str
    would_upload:
      description: Keys that would be uploaded (check mode only).
      type: list
      elements: str
    verified_present:
      description: Objects already there with the right size and sha256 metadata.
      type: int
    repaired:
      description: Keys found corrupted by O(verify_existing) and uploaded again.
      type: list
      elements: str
    failed:
      description: Keys not replicated and verified, with the error.
      type: list
      elements: dict
    bytes_uploaded:
      description: Bytes uploaded.
      type: int
    retries:
      description: Operations retried by the module's retry loop.
      type: int
    seconds:
      description: Time spent on this target.
      type: float
warnings_list:
  description: Non-fatal findings (also shown as task warnings).
  returned: always
  type: list
  elements: str
encrypted:
  description: Whether the objects were sealed with age before upload (recipients were given).
  returned: always
  type: bool
recipients:
  description: Fingerprints (C(age:<16 hex>), the sha256 of each recipient) of the recipients the objects are for.
  returned: always
  type: list
  elements: str
duration:
  description: Seconds the run took.
  returned: always
  type: float
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.baileys.resilience.plugins.module_utils import modresult, s3


def main():
    argument_spec = dict(
        backup_dir=dict(type="path", required=True),
        name_prefix=dict(type="str", default=s3.DEFAULT_PREFIX),
        targets=dict(type="list", elements="dict", required=True, options=s3.TARGET_OPTIONS),
        multipart_threshold=dict(type="raw", default="64MiB"),
        multipart_chunksize=dict(type="raw", default="16MiB"),
        verify_download=dict(type="bool", default=False),
        verify_existing=dict(type="bool", default=False),
        backup_concurrency=dict(type="int", default=4),
        encryption=dict(type="dict", options=dict(
            recipients=dict(type="list", elements="str", default=[]),
            required=dict(type="bool", default=False),
            encrypt_local=dict(type="bool", default=False))),
    )
    argument_spec.update(s3.TRANSFER_ARGSPEC)
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True)
    p = module.params
    try:
        settings = s3.Settings.from_params(
            p, multipart_threshold=p["multipart_threshold"], multipart_chunksize=p["multipart_chunksize"],
            verify_download=p["verify_download"], verify_existing=p["verify_existing"],
            backup_concurrency=p["backup_concurrency"], check_mode=module.check_mode)
        encryption = s3.Encryption.from_options(p["encryption"])
        result = s3.replicate(p["backup_dir"], p["targets"], settings, name_prefix=p["name_prefix"],
                              encryption=encryption)
    except (s3.S3Error, s3.AgeError) as exc:
        module.fail_json(msg=str(exc))
    modresult.publish_warnings(module, result)
    if not result["ok"]:
        module.fail_json(msg=s3.failure_message(result), **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
