"""``source: backup``: an export read straight from a backup file equals the export from the database."""
from __future__ import annotations

import datetime
import json
import os

import pytest

from ansible_collections.baileys.resilience.plugins.module_utils import authstate, backup, pgconn
from ansible_collections.baileys.resilience.plugins.module_utils import baileys_codec as codec

from support.authgen import REFERENCE_MIX, generate, load_into


MIX = {k: max(3, v // 10) for k, v in REFERENCE_MIX.items()}
ODD = "odd\tco ✓"
# everything COPY's text format escapes, in ids and in JSON strings, plus things that look like escapes
ODD_KEYS = {
    ("session", "a\tb.0"): {"s": "tab\there\nnewline\rcr\\backslash \"q\" \b\f\u0001\u007f ✓ 𝄞"},
    ("session", "line\nbreak.1"): {"type": "Buffer", "data": "AQID"},
    ("pre-key", "back\\slash"): {"private": {"type": "Buffer", "data": [1, 2, 3]}, "public": {"0": 4, "1": 5}},
    ("sender-key-memory", "\\N"): {"\\N": True, "x\\ty": False},
    ("tctoken", "x\ry"): {"token": "\\x41\\101\\.", "n": [1.5e300, 12345678901234567890, -0.0, 1e-7]},
    ("lid-mapping", "\\x41"): "\\N",
    ("device-list", "\\101"): [],
    ("app-state-sync-version", "\\."): {},
}
ODD_CREDS = {"me": {"name": "Ação \"quoted\"\ttab\\n", "id": "1@s.whatsapp.net"}, "emoji": "😀", "empty": ""}


def load_odd(conn):
    with conn.cursor() as cur:
        cur.execute("INSERT INTO whatsapp_auth (company_id, creds) VALUES (%s, %s)", (ODD, json.dumps(ODD_CREDS)))
        for (key_type, key_id), value in ODD_KEYS.items():
            cur.execute("INSERT INTO whatsapp_keys (company_id, key_type, key_id, value) VALUES (%s, %s, %s, %s)",
                        (ODD, key_type, key_id, json.dumps(value)))
        # keys without creds, and creds without keys
        cur.execute("INSERT INTO whatsapp_keys (company_id, key_type, key_id, value) "
                    "VALUES ('keys-only', 'pre-key', '1', '{\"a\": 1}')")
        cur.execute("INSERT INTO whatsapp_auth (company_id, creds) VALUES ('creds-only', '{\"registered\": false}')")
    conn.commit()


def tree(root):
    """{relative path: bytes} of every exported file except the per-company manifests."""
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            if name == codec.MANIFEST_FILE:
                continue
            path = os.path.join(dirpath, name)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = fh.read()
    return out


def manifests(root):
    out = {}
    for company in os.listdir(root):
        with open(os.path.join(root, company, codec.MANIFEST_FILE)) as fh:
            data = json.load(fh)
        out[company] = data
    return out


def _strip_mtime(files):
    """The per-file entries of a manifest without their mtime_ns."""
    return {k: {f: v for f, v in r.items() if f != "mtime_ns"} for k, r in files.items()}


def test_export_from_backup_is_identical_to_export_from_database(db, dbconn, tmp_path, monkeypatch):
    load_into(dbconn, generate(2, seed=3, form="mixed", mix=MIX))
    load_odd(dbconn)
    from_db = str(tmp_path / "from-db")
    res_db = authstate.export_from_database(db, {}, authstate.ExportOptions(from_db))
    assert res_db["totals"]["companies"] == 5
    made = backup.run_backup(db, {}, str(tmp_path / "backups"), now=datetime.datetime(2026, 5, 1, 3, 0, 0))
    odd_texts = {(t, i): v for t, i, v in dbconn.execute(
        "SELECT key_type, key_id, value::text FROM whatsapp_keys WHERE company_id = %s", (ODD,))}
    # later changes are not in the backup
    dbconn.execute("DELETE FROM whatsapp_keys WHERE key_type = 'session'")
    dbconn.execute("UPDATE whatsapp_auth SET creds = '{}'")
    dbconn.commit()

    # no server: any connection attempt fails the test
    def no_server(*_a, **_k):
        raise AssertionError("read_backup_states must not connect to PostgreSQL")

    monkeypatch.setattr(pgconn, "connect", no_server)
    monkeypatch.setenv("PGHOST", "/nonexistent")
    snapshot, states = backup.read_backup_states(made["backup"], {})
    name = os.path.basename(made["backup"])
    assert snapshot["snapshot_time"] == "2026-05-01T03:00:00Z" == made["manifest"]["created_at"]
    assert snapshot["source"] == "backup:%s" % name
    assert snapshot["server_version_num"] == made["manifest"]["server_version_num"]
    from_backup = str(tmp_path / "from-backup")
    res_bk = authstate.export_states(states, authstate.ExportOptions(from_backup, source_label=snapshot["source"]),
                                     snapshot)

    a, b = tree(from_db), tree(from_backup)
    assert len(a) == 2 * sum(MIX.values()) + 2 + len(ODD_KEYS) + 1 + 1 + 1
    assert sorted(a) == sorted(b)
    assert [k for k in a if a[k] != b[k]] == []
    assert res_bk["totals"] == res_db["totals"] and res_bk["warnings"] == res_db["warnings"]
    odd_dir = os.path.join(from_backup, ODD)
    assert json.loads(open(os.path.join(odd_dir, "creds.json"), encoding="utf-8").read()) == ODD_CREDS
    assert not os.path.exists(os.path.join(from_backup, "keys-only", "creds.json"))
    assert os.listdir(os.path.join(from_backup, "creds-only")) != []
    mdb, mbk = manifests(from_db), manifests(from_backup)
    for company in mdb:
        assert mbk[company]["source"] == "backup:%s" % name
        assert mbk[company]["snapshot_time"] == "2026-05-01T03:00:00Z"
        assert mbk[company]["counts"] == mdb[company]["counts"]
        assert _strip_mtime(mbk[company]["files"]) == _strip_mtime(mdb[company]["files"])

    # a subset of companies
    _snap, states = backup.read_backup_states(made["backup"], {}, companies=[ODD, "creds-only"])
    got = {s.company_id: s for s in states}
    assert sorted(got) == sorted([ODD, "creds-only"])
    assert sorted((t, i) for t, i, _v in got[ODD].keys) == sorted(ODD_KEYS)
    assert {(t, i): v for t, i, v in got[ODD].keys} == odd_texts  # exactly value::text, jsonb's rendering
    assert {(t, i): json.loads(v) for t, i, v in got[ODD].keys if t != "tctoken"} == \
        {k: v for k, v in ODD_KEYS.items() if k[0] != "tctoken"}
    assert got["creds-only"].keys == [] and json.loads(got["creds-only"].creds) == {"registered": False}


def test_damaged_backup_is_refused_before_anything_is_read(db, dbconn, tmp_path):
    load_into(dbconn, generate(1, seed=4, mix=MIX))
    made = backup.run_backup(db, {}, str(tmp_path / "backups"))
    path = made["backup"]
    with open(path, "r+b") as fh:
        fh.seek(os.path.getsize(path) - 100)
        fh.write(b"\0" * 10)
    with pytest.raises(backup.BackupError, match="sha256"):
        backup.read_backup_states(path, {})
    os.unlink(path + backup.MANIFEST_SUFFIX)
    with pytest.raises(backup.BackupError, match="no manifest"):
        backup.read_backup_states(path, {})
