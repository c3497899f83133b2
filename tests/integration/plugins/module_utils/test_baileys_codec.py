"""Compatibility with the real client: Baileys 7's useMultiFileAuthState.

PostgreSQL -> export -> Baileys must revive every Buffer to the original bytes,
whatever form the store held it in; and Baileys -> import -> export must give
back what Baileys wrote.  The node scripts live in tests/compat, which pins
@whiskeysockets/baileys exactly (package.json + package-lock.json).
"""
from __future__ import annotations

import base64
import json
import os

import pytest

from ansible_collections.baileys.resilience.plugins.module_utils import authstate, pgconn
from ansible_collections.baileys.resilience.plugins.module_utils import baileys_codec as codec

from support import authgen
from support.baileys_node import run_node


pytestmark = pytest.mark.compat

# --------------------------------------------------------------------------- expected values


def _buffer_bytes(value):
    """Bytes of a Buffer in any stored form, or None -- decoded here, independently of the codec."""
    if not isinstance(value, dict) or not value:
        return None
    if set(value) == {"type", "data"} and value["type"] == "Buffer":
        if isinstance(value["data"], str):
            return base64.b64decode(value["data"], validate=True)
        return bytes(value["data"])
    # pylint: disable-next=unidiomatic-typecheck  # exactly int: a bool (an int subclass) is not a Buffer byte
    if set(value) == {str(i) for i in range(len(value))} and all(type(v) is int for v in value.values()):
        return bytes(value[str(i)] for i in range(len(value)))
    return None


def baileys_view(value):
    """What Baileys must hand out for a stored value, in the encoding of tests/compat/lib/dump.mjs."""
    raw = _buffer_bytes(value)
    if raw is not None:
        return {"$hex": raw.hex()}
    if isinstance(value, dict):
        return {k: baileys_view(v) for k, v in value.items()}
    if isinstance(value, list):
        return [baileys_view(v) for v in value]
    return value


def baileys_key_view(key_type, value):
    if key_type != "app-state-sync-key":
        return baileys_view(value)
    # revived as proto.Message.AppStateSyncKeyData.fromObject(value)
    fingerprint = value["fingerprint"]
    return {
        "$class": "AppStateSyncKeyData",
        "keyData": baileys_view(value["keyData"]),
        "fingerprint": {"$class": "AppStateSyncKeyFingerprint", "rawId": fingerprint["rawId"],
                        "currentIndex": fingerprint["currentIndex"],
                        "deviceIndexes": fingerprint["deviceIndexes"]},
        "timestamp": {"$long": str(int(value["timestamp"]))},
    }


def forms_used(value, found=None):
    """Which Buffer forms a value holds: {"base64", "array", "numeric"}."""
    found = set() if found is None else found
    raw = _buffer_bytes(value)
    if raw is not None:
        found.add("numeric" if "type" not in value else "base64" if isinstance(value["data"], str) else "array")
    elif isinstance(value, dict):
        for v in value.values():
            forms_used(v, found)
    elif isinstance(value, list):
        for v in value:
            forms_used(v, found)
    return found


def compare(label, got, expected, limit=10):
    """Assert two {name: value} maps are equal, naming the first differences."""
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    differ = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])
    details = ["missing %r" % (k,) for k in missing[:limit]] + ["unexpected %r" % (k,) for k in extra[:limit]]
    details += ["%r: got %s, expected %s" % (k, json.dumps(got[k])[:300], json.dumps(expected[k])[:300])
                for k in differ[:limit]]
    assert not (missing or extra or differ), "%s: %d missing, %d unexpected, %d different:\n  %s" % (
        label, len(missing), len(extra), len(differ), "\n  ".join(details))


def flat_keys(keys_by_type):
    return {(t, i): v for t, by_id in keys_by_type.items() for i, v in by_id.items()}


def files_in(directory):
    """{name: bytes} of a company directory, the manifest left out."""
    out = {}
    for name in sorted(os.listdir(directory)):
        if name != codec.MANIFEST_FILE:
            with open(os.path.join(directory, name), "rb") as fh:
                out[name] = fh.read()
    return out


def export(db, dest):
    result = authstate.export_from_database(db, {}, authstate.ExportOptions(str(dest)))
    assert result["warnings"] == []
    return result


def truncate(db):
    conn = pgconn.connect(db)
    try:
        conn.execute("TRUNCATE whatsapp_auth, whatsapp_keys")
        conn.commit()
    finally:
        conn.close()


# --------------------------------------------------------------------------- PostgreSQL -> files -> Baileys


def test_baileys_revives_export_of_mixed_buffer_forms(node, db, tmp_path):
    companies = authgen.generate(1, seed=20251124, form="mixed")
    (company_id, (creds, keys)), = companies.items()
    # the point of the test: the store holds all three forms, in creds and in keys
    assert forms_used(creds) == {"base64", "array", "numeric"}
    assert forms_used(list(keys.values())) == {"base64", "array", "numeric"}
    assert {t for t, _i in keys} == set(codec.KEY_TYPES)
    conn = pgconn.connect(db)
    try:
        authgen.load_into(conn, companies)
    finally:
        conn.close()

    result = export(db, tmp_path / "export")
    assert result["totals"]["keys"] == len(keys) == 1650
    directory = str(tmp_path / "export" / company_id)

    seen = run_node(node, "dump-auth-state.mjs", directory)

    expected_files = {codec.CREDS_FILE, codec.MANIFEST_FILE} | {codec.key_file_name(t, i) for t, i in keys}
    assert set(seen["files"]) == expected_files
    assert seen["unknown"] == []
    compare("creds", seen["creds"], baileys_view(creds))
    compare("keys", flat_keys(seen["keys"]), {(t, i): baileys_key_view(t, v) for (t, i), v in keys.items()})
    # spot checks in plain terms, in case both sides of the comparison were wrong the same way
    assert seen["creds"]["noiseKey"]["private"]["$hex"] == _buffer_bytes(creds["noiseKey"]["private"]).hex()
    assert len(bytes.fromhex(seen["creds"]["account"]["details"]["$hex"])) == 80
    sync_id = next(i for t, i in keys if t == "app-state-sync-key")
    sync = seen["keys"]["app-state-sync-key"][sync_id]
    assert sync["keyData"]["$hex"] == _buffer_bytes(keys[("app-state-sync-key", sync_id)]["keyData"]).hex()
    assert seen["keys"]["tctoken"]["__index"]["token"]["$hex"] == \
        _buffer_bytes(keys[("tctoken", "__index")]["token"]).hex()


def test_dump_detects_a_legacy_form_baileys_cannot_revive(node, tmp_path):
    """The comparison above can fail: Baileys 7 does not revive the array form."""
    directory = tmp_path / "c"
    directory.mkdir()
    (directory / "creds.json").write_text(json.dumps({"noiseKey": {"private": {"type": "Buffer", "data": [1, 2]},
                                                                   "public": {"type": "Buffer", "data": "AQI="}}}))
    (directory / "app-state-sync-key-AAAA.json").write_text(json.dumps(
        {"keyData": {"type": "Buffer", "data": [1, 2]}, "timestamp": "1"}))
    seen = run_node(node, "dump-auth-state.mjs", str(directory))
    assert seen["creds"]["noiseKey"]["public"] == {"$hex": "0102"}
    assert seen["creds"]["noiseKey"]["private"] == {"type": "Buffer", "data": [1, 2]}
    # fromObject silently drops keyData that is not a Buffer
    assert "keyData" not in seen["keys"]["app-state-sync-key"]["AAAA"]


# --------------------------------------------------------------------------- Baileys -> files -> PostgreSQL -> files


def test_state_written_by_baileys_survives_import_and_export(node, db, tmp_path):
    src = tmp_path / "baileys"
    src.mkdir()
    written = run_node(node, "write-auth-state.mjs", str(src / "acme"))
    baileys_files = files_in(src / "acme")
    n_keys = len(baileys_files) - 1
    assert codec.CREDS_FILE in baileys_files
    assert {codec.parse_key_file_name(n)[0] for n in baileys_files if n != codec.CREDS_FILE} == set(codec.KEY_TYPES)
    assert {codec.parse_key_file_name(n) for n in baileys_files if n != codec.CREDS_FILE} == \
        set(flat_keys(written["keys"]))

    result = authstate.import_auth_state(db, {}, str(src))
    assert result["changed"] is True
    assert result["totals"]["inserted"] == n_keys
    assert result["companies"][0]["creds"] == "inserted"
    assert result["warnings"] == []

    export(db, tmp_path / "export1")
    export1 = files_in(tmp_path / "export1" / "acme")
    assert sorted(export1) == sorted(baileys_files)
    differ = [n for n in baileys_files if json.loads(export1[n]) != json.loads(baileys_files[n])]
    assert differ == [], "files that do not parse to what Baileys wrote: %s" % differ[:10]

    # Baileys loads the re-export to the same bytes it held in memory when it wrote them
    seen = run_node(node, "dump-auth-state.mjs", str(tmp_path / "export1" / "acme"))
    compare("creds", seen["creds"], written["creds"])
    compare("keys", flat_keys(seen["keys"]), flat_keys(written["keys"]))

    # importing the export again changes nothing
    again = authstate.import_auth_state(db, {}, str(tmp_path / "export1"))
    assert again["changed"] is False
    assert again["totals"]["unchanged"] == n_keys

    # a second full cycle, from an empty store, is byte-identical to the first export
    truncate(db)
    authstate.import_auth_state(db, {}, str(tmp_path / "export1"))
    export(db, tmp_path / "export2")
    export2 = files_in(tmp_path / "export2" / "acme")
    assert sorted(export2) == sorted(export1)
    assert [n for n in export1 if export1[n] != export2[n]] == []


def test_array_encoded_import_still_exports_what_baileys_reads(node, db, tmp_path):
    src = tmp_path / "baileys"
    src.mkdir()
    written = run_node(node, "write-auth-state.mjs", str(src / "acme"))
    baileys_files = files_in(src / "acme")

    authstate.import_auth_state(db, {}, str(src), buffer_encoding="array")
    conn = pgconn.connect(db)
    try:
        stored = conn.execute("SELECT creds FROM whatsapp_auth WHERE company_id = 'acme'").fetchone()[0]
        session_id = next(iter(written["keys"]["session"]))
        session = conn.execute("SELECT value FROM whatsapp_keys WHERE key_type = 'session' AND key_id = %s",
                               (session_id,)).fetchone()[0]
    finally:
        conn.close()
    # the store now holds the legacy array form ...
    noise_private = bytes.fromhex(written["creds"]["noiseKey"]["private"]["$hex"])
    assert stored["noiseKey"]["private"] == {"type": "Buffer", "data": list(noise_private)}
    assert session == {"type": "Buffer", "data": list(bytes.fromhex(written["keys"]["session"][session_id]["$hex"]))}

    # ... and the export turns it back into exactly what Baileys wrote
    export(db, tmp_path / "export")
    exported = files_in(tmp_path / "export" / "acme")
    assert sorted(exported) == sorted(baileys_files)
    assert [n for n in exported if json.loads(exported[n]) != json.loads(baileys_files[n])] == []
    seen = run_node(node, "dump-auth-state.mjs", str(tmp_path / "export" / "acme"))
    compare("creds", seen["creds"], written["creds"])
    compare("keys", flat_keys(seen["keys"]), flat_keys(written["keys"]))
