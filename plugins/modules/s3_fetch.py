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
version_added: 0.2.0
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
  - baileys.resilience contributors
attributes:
  check_mode:
    support: full
    description: Lists the targets, reads the manifests and HEADs the chosen dump; downloads nothing and reports
      the object that would be fetched (its bytes are not hashed, so a corrupted object is only found by a real run).
  diff_mode:
    support: none
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
  targets:
    description:
      - The S3 or S3-compatible destinations, in order of preference.
    type: list
    elements: dict
    required: true
    suboptions:
      name:
        description:
          - Name of the target in results and messages. Default, the bucket name. Must be unique.
        type: str
      bucket:
        description:
          - Bucket name.
        type: str
        required: true
      region:
        description:
          - Region of the bucket (for example C(eu-west-1)).
        type: str
      endpoint_url:
        description:
          - URL of an S3-compatible service (MinIO, Ceph RGW, Backblaze B2, Wasabi, Cloudflare R2,
            Scaleway, OVH...). Default, AWS S3 for O(targets[].region).
        type: str
      prefix:
        description:
          - Key prefix under which the backups are kept (a C(/) is appended when missing).
        type: str
        default: ""
      access_key:
        description:
          - Access key id. With O(targets[].secret_key); otherwise boto3's default chain is used
            (C(AWS_*) environment, O(targets[].profile), O(targets[].credentials_file), container or instance role).
        type: str
        aliases: [aws_access_key_id]
      secret_key:
        description:
          - Secret access key.
        type: str
        aliases: [aws_secret_access_key]
      session_token:
        description:
          - Session token of temporary credentials.
        type: str
        aliases: [aws_session_token]
      profile:
        description:
          - Named profile of the shared AWS config and credentials files.
        type: str
      credentials_file:
        description:
          - Path of a shared credentials file (INI, as C(~/.aws/credentials)) to use instead of the default one.
            It should be mode 0600; a warning is given when group or others can read it.
        type: path
      storage_class:
        description:
          - Storage class of the uploaded objects. Default, the provider's default.
        type: str
        choices: [STANDARD, REDUCED_REDUNDANCY, STANDARD_IA, ONEZONE_IA, INTELLIGENT_TIERING, GLACIER, DEEP_ARCHIVE,
                  GLACIER_IR, EXPRESS_ONEZONE]
      sse:
        description:
          - Server-side encryption of the uploaded objects.
        type: str
        choices: [AES256, "aws:kms"]
      kms_key_id:
        description:
          - KMS key id or ARN for O(targets[].sse=aws:kms). Default, the account's S3 KMS key.
        type: str
      addressing_style:
        description:
          - S3 addressing style; some S3-compatible services need C(path).
        type: str
        default: auto
        choices: [auto, path, virtual]
  retries:
    description:
      - Attempts per object operation (HEAD, PUT, multipart upload, GET) in the module's own retry loop.
        Throttling (C(SlowDown), HTTP 429/503), other 5xx answers, timeouts and broken or refused
        connections are retried with full-jitter exponential backoff; other errors are not.
    type: int
    default: 5
  retry_delay:
    description:
      - Base delay in seconds of the backoff; attempt N waits a random time between 0 and
        min(O(retry_max_delay), O(retry_delay) * 2^(N-1)).
    type: float
    default: 0.5
  retry_max_delay:
    description:
      - Upper bound in seconds of one backoff wait.
    type: float
    default: 20.0
  botocore_max_attempts:
    description:
      - Attempts per HTTP request inside botocore (its C(standard) retry mode), below the module's own loop.
        Each multipart part is retried this many times before the whole upload is retried.
    type: int
    default: 2
  connect_timeout:
    description:
      - Seconds to wait for a connection.
    type: float
    default: 10.0
  read_timeout:
    description:
      - Seconds to wait for data on an open connection.
    type: float
    default: 60.0
  max_concurrency:
    description:
      - Threads per multipart transfer.
    type: int
    default: 8
  validate_certs:
    description:
      - Verify TLS certificates.
    type: bool
    default: true
  ca_bundle:
    description:
      - CA bundle to verify TLS certificates with (a private S3-compatible service).
    type: path
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
    C(corrupt), C(invalid), C(error), C(unreachable)).
  returned: always
  type: list
  elements: dict
  sample: [{target: primary, key: whatsapp/baileys-auth-20261124T030000Z.dump, outcome: corrupt,
            error: "sha256 ab12..., manifest says cd34..."}]
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

from ansible_collections.baileys.resilience.plugins.module_utils import s3


def main():
    argument_spec = dict(
        dest_dir=dict(type="path", required=True),
        name_prefix=dict(type="str", default=s3.DEFAULT_PREFIX),
        backup_name=dict(type="str"),
        selection=dict(type="str", default="newest", choices=list(s3.SELECTIONS)),
        targets=dict(type="list", elements="dict", required=True, options=s3.TARGET_OPTIONS),
    )
    argument_spec.update(s3.TRANSFER_ARGSPEC)
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True)
    p = module.params
    try:
        settings = s3.Settings.from_params(p, check_mode=module.check_mode)
        result = s3.fetch(p["dest_dir"], p["targets"], settings, name_prefix=p["name_prefix"],
                          backup_name=p["backup_name"], selection=p["selection"])
    except s3.FetchError as exc:
        for warning in exc.result["warnings"][:20]:
            module.warn(warning)
        exc.result["warnings_list"] = exc.result.pop("warnings")
        module.fail_json(msg=str(exc), **exc.result)
    except s3.S3Error as exc:
        module.fail_json(msg=str(exc))
    for warning in result["warnings"][:20]:
        module.warn(warning)
    result["warnings_list"] = result.pop("warnings")
    module.exit_json(**result)


if __name__ == "__main__":
    main()
