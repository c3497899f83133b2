# -*- coding: utf-8 -*-
# Copyright: baileys.resilience contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Off-site copies of backups on S3-compatible storage, and disaster-recovery fetch: the map.

The work lives in four modules ("rooms"); this one holds no code.  It re-exports their
public names, and the private one the tests use, so that callers can keep writing
``s3.X``.  The modules ``s3_replicate`` and ``s3_fetch`` and the ``baileys-resilience``
command-line tool (clijobs.py) call :func:`replicate`, :func:`fetch` and
:func:`failure_message` through it.

===========  =========================================================================================
s3conf       settings and what every operation shares: TARGET_OPTIONS, TRANSFER_ARGSPEC,
             normalize_target(s), Settings, RetryPolicy (full-jitter backoff), error classification
             (is_retryable, error_text), the errors (S3Error, VerifyError, CorruptObject,
             FetchError), make_client, and the boto3 import (HAS_BOTO3, require_boto3)
s3objects    the objects of a backup on a target: object_key, META_SHA256, head_problem, and the
             retried list, HEAD and streaming (hashing, resuming) GET
s3replicate  replication: scan_local_backups, verify_local, replicate, failure_message
s3fetch      disaster recovery: fetch (candidates newest first, failover across targets,
             verified download, decrypted with an identity), SELECTIONS, _order_candidates,
             restore_fetched
s3rekey      key rotation: reencrypt (the retained encrypted objects to the current recipients,
             streamed S3 -> decrypt -> encrypt -> S3, no plaintext on disk)
===========  =========================================================================================

Encryption (age, docs/encryption.md): agecrypt.py holds the keys and the cipher, backupseal.py
the sealed copies replication uploads; ENCRYPTION_OPTIONS, Encryption, AgeError, WrongIdentity
and load_identities are re-exported here for the modules.

Imports (no cycle): s3conf imports no other room; s3objects imports s3conf; s3replicate and
s3fetch import s3conf and s3objects (and agecrypt; s3replicate also backupseal), and neither
imports the other; s3rekey imports s3conf, s3objects, agecrypt and backup_format; this module
imports them all.  Backup names and manifest checks come from backup_format.py (and fsutil.py for the
fetch's files).  No Ansible import anywhere: the same code runs in the modules and in the
cron tool.  The invariants of each operation are in its room's docstring.

Every name below is bound once, at import: assigning ``s3.X`` (or monkeypatching it) does not
reach the room that uses X.  Patch a function or a setting in its room (``s3conf.make_client``,
``s3objects.CHUNK``...), or pass ``client_factory``, ``Settings(sleep=...)`` or
``RetryPolicy(sleep=..., rand=...)``, which is what the tests do.
"""
from __future__ import absolute_import, division, print_function

from . import agecrypt, backup_format, s3conf, s3fetch, s3objects, s3rekey, s3replicate

__metaclass__ = type

# the backup file rules live in backup_format; these names stay importable from here
DEFAULT_PREFIX = backup_format.DEFAULT_PREFIX
DUMP_SUFFIX = backup_format.DUMP_SUFFIX
MANIFEST_SUFFIX = backup_format.MANIFEST_SUFFIX
MAX_MANIFEST_SIZE = backup_format.MAX_MANIFEST_SIZE
KINDS = backup_format.KINDS
manifest_problem = backup_format.manifest_problem
sha256_file = backup_format.sha256_file

# s3conf: boto3, option specs, settings, retries, errors, clients
HAS_BOTO3 = s3conf.HAS_BOTO3
BOTO3_IMPORT_ERROR = s3conf.BOTO3_IMPORT_ERROR
BotoCoreError = s3conf.BotoCoreError
ClientError = s3conf.ClientError
BotoConnectionError = s3conf.BotoConnectionError
HTTPClientError = s3conf.HTTPClientError
IncompleteReadError = s3conf.IncompleteReadError
require_boto3 = s3conf.require_boto3
MiB = s3conf.MiB
MIN_PART_SIZE = s3conf.MIN_PART_SIZE
SSE_CHOICES = s3conf.SSE_CHOICES
STORAGE_CLASSES = s3conf.STORAGE_CLASSES
RETRYABLE_CODES = s3conf.RETRYABLE_CODES
TARGET_OPTIONS = s3conf.TARGET_OPTIONS
TRANSFER_ARGSPEC = s3conf.TRANSFER_ARGSPEC
S3Error = s3conf.S3Error
VerifyError = s3conf.VerifyError
CorruptObject = s3conf.CorruptObject
FetchError = s3conf.FetchError
parse_size = s3conf.parse_size
describe_target = s3conf.describe_target
error_text = s3conf.error_text
is_retryable = s3conf.is_retryable
is_connection_error = s3conf.is_connection_error
RetryPolicy = s3conf.RetryPolicy
Settings = s3conf.Settings
normalize_target = s3conf.normalize_target
normalize_targets = s3conf.normalize_targets
credentials_file_warning = s3conf.credentials_file_warning
make_client = s3conf.make_client

# s3objects: object keys, metadata, and the retried object operations
META_SHA256 = s3objects.META_SHA256
CHUNK = s3objects.CHUNK
object_key = s3objects.object_key
b64_of_hex = s3objects.b64_of_hex
head_problem = s3objects.head_problem

# s3replicate: replication
scan_local_backups = s3replicate.scan_local_backups
verify_local = s3replicate.verify_local
replicate = s3replicate.replicate
failure_message = s3replicate.failure_message

# s3fetch: disaster-recovery fetch (and the private name tests/unit/test_s3_units.py uses)
SELECTIONS = s3fetch.SELECTIONS
fetch = s3fetch.fetch
restore_fetched = s3fetch.restore_fetched
_order_candidates = s3fetch._order_candidates

# s3rekey: key rotation
reencrypt = s3rekey.reencrypt

# agecrypt: encryption settings and identities (the modules' options)
ENCRYPTION_OPTIONS = agecrypt.OPTIONS
Encryption = agecrypt.Encryption
AgeError = agecrypt.AgeError
WrongIdentity = agecrypt.WrongIdentity
load_identities = agecrypt.load_identities
HAS_PYRAGE = agecrypt.HAS_PYRAGE
