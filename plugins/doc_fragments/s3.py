# -*- coding: utf-8 -*-
# Copyright: baileys.resilience contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import absolute_import, division, print_function

__metaclass__ = type


class ModuleDocFragment(object):
    # S3 targets and transfer settings shared by s3_replicate and s3_fetch (module_utils/s3conf.py
    # TARGET_OPTIONS, TRANSFER_ARGSPEC, re-exported by s3.py).
    DOCUMENTATION = r"""
options:
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
requirements:
  - boto3 and botocore on the host that runs the module (Debian C(python3-boto3)).
"""
