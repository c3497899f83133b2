# -*- coding: utf-8 -*-
# Copyright: baileys.resilience contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""A backup as an export source: the auth state read straight from a backup file, no server.

:func:`read_backup_states` yields the same :class:`authstate.CompanyState` objects as
``authstate.DatabaseSource`` does (the ``source: backup`` export of ``auth_export`` and the
failover's rollback from a backup), so ``authstate.export_states`` writes identical files.  The
backup is first checked (backupcheck.py).  An encrypted backup (age ciphertext, such as a sealed
copy of backupseal.py) is read with an identity: decrypted into a private temporary directory
(backupseal.decrypted_backup), read, and the directory removed before this returns.  No Ansible
import.
"""
from __future__ import absolute_import, division, print_function

import os
import tempfile

from . import agecrypt, authsource, backupcheck, backupfiles, backupseal, pgtools

__metaclass__ = type

BackupError = backupfiles.BackupError


def _column(columns, name, table):
    try:
        return columns.index(name)
    except ValueError:
        raise BackupError("table %s in the dump has no column %r (columns: %s)" % (table, name, ", ".join(columns)))


def read_backup_states(backup_file, store_params=None, companies=None, pg_bin_dir=None, identities=None):
    """Read the auth state straight from a backup file, with no database server.

    ``identities`` (agecrypt.load_identities) open an encrypted backup file; without them an
    encrypted file is refused with a message that says so.

    Returns ``(snapshot, states)``: ``snapshot`` has ``snapshot_time`` (the
    manifest's ``created_at``), ``server_version_num`` and ``source``
    (``backup:<file name>``); ``states`` iterates :class:`authstate.CompanyState`
    exactly as :meth:`authstate.DatabaseSource.states` would at that snapshot, so
    :func:`authstate.export_states` writes identical files.  The sha256 is checked
    against the manifest first, and the row counts read must equal the manifest's.
    Everything is read before this returns: a broken backup raises here, before
    the caller touches anything.  The tables read are the ones the manifest
    names; ``store_params`` only matters for a manifest that names none.
    """
    if backupseal.is_encrypted_backup(backup_file):
        if not identities:
            raise BackupError("%s is age-encrypted: give identity_file or identity to read it" % backup_file)
        try:
            with backupseal.decrypted_backup(backup_file, identities) as plain:
                snapshot, states = _read_plain(plain, store_params, companies, pg_bin_dir)
        except agecrypt.AgeError as exc:
            raise BackupError(str(exc))
        return snapshot, states
    return _read_plain(backup_file, store_params, companies, pg_bin_dir)


def _read_plain(backup_file, store_params, companies, pg_bin_dir):
    backup_path, manifest = backupcheck.load_valid(backup_file)
    bin_dir, _text = backupcheck.restore_bin_dir(pg_bin_dir, manifest)
    schema, auth_table, keys_table = backupcheck.store_names(backupcheck.tables_for(manifest, store_params))
    wanted = set(companies) if companies else None
    creds = {}
    counts = {"auth": 0, "keys": 0}
    spool = tempfile.TemporaryFile()
    index = {}
    try:
        for label, table in (("auth", auth_table), ("keys", keys_table)):
            found = False
            with pgtools.restore_stream(bin_dir, backup_path, table, schema) as out:
                for name, columns, rows in pgtools.iter_copy_blocks(out):
                    found = True
                    ci = _column(columns, "company_id", name)
                    if label == "auth":
                        vi = _column(columns, "creds", name)
                        for line in rows:
                            counts["auth"] += 1
                            fields = line.split(b"\t")
                            company_id = pgtools.copy_field(fields[ci])
                            if wanted is None or company_id in wanted:
                                creds[company_id] = pgtools.copy_field(fields[vi])
                    else:
                        wanted_cols = [_column(columns, c, name) for c in ("key_type", "key_id", "value")]
                        for line in rows:
                            counts["keys"] += 1
                            fields = line.split(b"\t")
                            company_id = pgtools.copy_field(fields[ci])
                            if wanted is not None and company_id not in wanted:
                                continue
                            record = b"\t".join(fields[i] for i in wanted_cols) + b"\n"
                            index.setdefault(company_id, []).append((spool.tell(), len(record)))
                            spool.write(record)
            if not found:
                raise BackupError("backup %s holds no data for %s.%s" % (backup_path, schema, table))
        expected = manifest.get("counts") or {}
        for label in ("auth", "keys"):
            if counts[label] != expected.get(label):
                raise BackupError("backup %s holds %d %s rows, its manifest says %s" % (
                    backup_path, counts[label], label, expected.get(label)))
        spool.flush()
    except pgtools.ToolError as exc:
        spool.close()
        raise BackupError("cannot read backup %s: %s" % (backup_path, exc))
    except BaseException:
        spool.close()
        raise
    snapshot = {"snapshot_time": manifest.get("created_at"), "server_version_num": manifest.get("server_version_num"),
                "source": "backup:%s" % os.path.basename(backup_path), "counts": counts}

    def states():
        try:
            for company_id in sorted(index):
                state = authsource.CompanyState(company_id, creds.get(company_id))
                for offset, length in index[company_id]:
                    spool.seek(offset)
                    key_type, key_id, value = pgtools.parse_copy_row(spool.read(length)[:-1])
                    state.keys.append((key_type, key_id, value))
                yield state
            for company_id in sorted(set(creds) - set(index)):
                yield authsource.CompanyState(company_id, creds[company_id])
        finally:
            spool.close()

    return snapshot, states()
