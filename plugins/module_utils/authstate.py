# -*- coding: utf-8 -*-
# Copyright: baileys.resilience contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Move a Baileys auth state between PostgreSQL and useMultiFileAuthState files: the map.

The work lives in five modules ("rooms"); this one holds no code.  It re-exports their
public names, and the private ones that the tests and benchmarks use, so that callers can
keep writing ``authstate.X``.  The modules ``auth_export``/``auth_import`` and the
``baileys-resilience`` command-line tool (clijobs.py) call :func:`export_from_database`
(or :func:`export_states`, for a source such as a backup: backupsource.py yields the same
``CompanyState`` objects) and :func:`import_auth_state` through it.

=============  =====================================================================================
authnames      names every room shares: AuthStateError, InvalidCompanyId, check_company_id,
               display_name, DirTemplate, resolve_owner, parse_mode, key file names read back
               (_parse_key_name), _sha, DIFF_LIMIT, READ_PROCESSES, the export's and the
               import's defaults (DEFAULT_COMPANY_DIR, DEFAULT_FILE_MODE, ...)
authsource     reading the store: CompanyState, snapshot_transaction, DatabaseSource (batched,
               prefetched key rows), the fingerprint formula
authexport     export: ExportOptions, export_from_database, export_states, mirror_company,
               verify_directory (a directory its manifest proves mirrored is not compared again)
authguards     the guards of a mirroring import: ImportGuards, ImportRefused
authimport     import: ValidationError, import_auth_state, import_states, the fast and the strict
               readers, _apply
=============  =====================================================================================

Imports (no cycle): authnames and authsource import no other room; authexport and authguards
import those two; authimport imports authnames, authsource and authguards; this module
imports all five.  No Ansible import anywhere.

Every name below is bound once, at import: assigning ``authstate.X`` (or monkeypatching it)
does not reach the room that uses X.  Set or patch a setting or a function in its room
(``authnames.READ_PROCESSES``, ``authsource.FETCH_ROWS``, ``authimport.read_directory``...).
"""
from __future__ import absolute_import, division, print_function

from . import authexport, authguards, authimport, authnames, authsource

__metaclass__ = type

# authnames: shared names and settings
AuthStateError = authnames.AuthStateError
InvalidCompanyId = authnames.InvalidCompanyId
check_company_id = authnames.check_company_id
display_name = authnames.display_name
DirTemplate = authnames.DirTemplate
resolve_owner = authnames.resolve_owner
parse_mode = authnames.parse_mode
DIFF_LIMIT = authnames.DIFF_LIMIT
DEFAULT_COMPANY_DIR = authnames.DEFAULT_COMPANY_DIR
DEFAULT_FILE_MODE = authnames.DEFAULT_FILE_MODE
DEFAULT_DIRECTORY_MODE = authnames.DEFAULT_DIRECTORY_MODE
DEFAULT_BUFFER_ENCODING = authnames.DEFAULT_BUFFER_ENCODING
READ_PROCESSES = authnames.READ_PROCESSES

# authsource: reading the store
CompanyState = authsource.CompanyState
DatabaseSource = authsource.DatabaseSource
snapshot_transaction = authsource.snapshot_transaction
FINGERPRINT_VERSION = authsource.FINGERPRINT_VERSION
FETCH_ROWS = authsource.FETCH_ROWS

# authexport: export
ExportOptions = authexport.ExportOptions
export_from_database = authexport.export_from_database
export_states = authexport.export_states
mirror_company = authexport.mirror_company
verify_directory = authexport.verify_directory
MANIFEST_FORMAT = authexport.MANIFEST_FORMAT
STAGING_PREFIX = authexport.STAGING_PREFIX

# authguards: the guards of a mirroring import
ImportGuards = authguards.ImportGuards
ImportRefused = authguards.ImportRefused
STORE_CHANGED_CHOICES = authguards.STORE_CHANGED_CHOICES
GUARD_LIST = authguards.GUARD_LIST

# authimport: import (and the private names the tests and benchmarks/breakdown.py use)
ValidationError = authimport.ValidationError
import_auth_state = authimport.import_auth_state
import_states = authimport.import_states
read_directory = authimport.read_directory
READ_AHEAD = authimport.READ_AHEAD
IMPORT_TEMP_BUFFERS = authimport.IMPORT_TEMP_BUFFERS
_CompanyData = authimport._CompanyData
_READ_SIZE = authimport._READ_SIZE
_apply = authimport._apply
_copy_directly = authimport._copy_directly
_discover = authimport._discover
_parse_key_names = authimport._parse_key_names
_read_all_fast = authimport._read_all_fast
_read_directory_fast = authimport._read_directory_fast
