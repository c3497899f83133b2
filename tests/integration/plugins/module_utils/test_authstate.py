"""auth_export / auth_import core against a real PostgreSQL server."""
from __future__ import annotations

import base64
import json
import os
import shutil

import pytest

from ansible_collections.baileys.resilience.plugins.module_utils import authexport, authimport, authnames, authstate
from ansible_collections.baileys.resilience.plugins.module_utils import fsutil, pgconn
from ansible_collections.baileys.resilience.plugins.module_utils import baileys_codec as codec

from support.authgen import REFERENCE_MIX, generate, load_into


SMALL_MIX = {k: max(2, v // 40) for k, v in REFERENCE_MIX.items()}  # ~45 keys of every type


def export(params, dest, **kw):
    companies = kw.pop("companies", None)
    return authstate.export_from_database(params, {}, authstate.ExportOptions(str(dest), **kw), companies)


def store_rows(conn):
    with conn.cursor() as cur:
        cur.execute("SELECT company_id, key_type, key_id, value FROM whatsapp_keys")
        keys = {(c, t, i): v for c, t, i, v in cur.fetchall()}
        cur.execute("SELECT company_id, creds FROM whatsapp_auth")
        creds = dict(cur.fetchall())
    conn.commit()
    return creds, keys


def tree(path):
    """{relative path: (bytes, mtime_ns, mode)} of every file below path."""
    out = {}
    for root, _dirs, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            st = os.lstat(full)
            with open(full, "rb") as fh:
                out[os.path.relpath(full, path)] = (fh.read(), st.st_mtime_ns, st.st_mode & 0o7777)
    return out


def buffers(value):
    """Every Buffer in value as bytes, whatever its form, in document order of the normalised value."""
    normalised, _converted = codec.normalise(value)
    found = []

    def walk(v):
        if isinstance(v, dict):
            if v.get("type") == "Buffer" and isinstance(v.get("data"), str):
                found.append(base64.b64decode(v["data"]))
            for k in sorted(v):
                walk(v[k])
        elif isinstance(v, list):
            for x in v:
                walk(x)

    walk(normalised)
    return found


@pytest.mark.parametrize("form", ["base64", "array", "numeric", "mixed"])
def test_round_trip_store_files_store_is_lossless(pg, db, dbconn, tmp_path, form):
    data = generate(2, seed=7, form=form, mix=SMALL_MIX)
    load_into(dbconn, data)
    res = export(db, tmp_path / "out")
    assert res["changed"] and res["totals"]["keys"] == 2 * sum(SMALL_MIX.values())
    assert res["totals"]["written"] == res["totals"]["keys"] + 2

    # every file is JSON with Buffers only in base64 form
    for rel, (raw, _m, mode) in tree(tmp_path / "out").items():
        assert mode == 0o600, rel
        if rel.endswith(codec.MANIFEST_FILE):
            continue
        text = raw.decode()
        assert '"data": [' not in text and '{"0": ' not in text, rel

    # import into a second database
    admin = pgconn.connect(pg.params(), autocommit=True)
    admin.execute('DROP DATABASE IF EXISTS "%s_b"' % db["login_db"])
    admin.execute('CREATE DATABASE "%s_b"' % db["login_db"])
    other = dict(db, login_db=db["login_db"] + "_b")
    conn2 = pgconn.connect(other)
    pgconn.create_schema(conn2, pgconn.Store())
    conn2.commit()
    imp = authstate.import_auth_state(other, {}, str(tmp_path / "out"))
    assert imp["changed"] and imp["totals"]["inserted"] == res["totals"]["keys"]
    creds, keys = store_rows(conn2)
    for cid, (orig_creds, orig_keys) in data.items():
        assert creds[cid] == codec.normalise(orig_creds)[0]
        assert buffers(creds[cid]) == buffers(orig_creds)
        for (key_type, key_id), value in orig_keys.items():
            got = keys[(cid, key_type, key_id)]
            assert got == codec.normalise(value)[0], (key_type, key_id)
            assert buffers(got) == buffers(value)
    assert len(keys) == sum(len(k) for _c, k in data.values())

    # and back to files again: byte-identical to the first export
    res2 = export(other, tmp_path / "again")
    a, b = tree(tmp_path / "out"), tree(tmp_path / "again")
    strip = {k: v[0] for k, v in a.items() if not k.endswith(codec.MANIFEST_FILE)}
    assert strip == {k: v[0] for k, v in b.items() if not k.endswith(codec.MANIFEST_FILE)}
    assert res2["totals"]["written"] == res["totals"]["written"]
    conn2.close()
    admin.execute('DROP DATABASE "%s_b" WITH (FORCE)' % db["login_db"])
    admin.close()


def test_export_is_idempotent_and_touches_nothing(db, dbconn, tmp_path):
    load_into(dbconn, generate(2, seed=3, mix=SMALL_MIX))
    first = export(db, tmp_path)
    before = tree(tmp_path)
    second = export(db, tmp_path)
    assert first["changed"] and not second["changed"]
    assert second["totals"]["written"] == 0 and second["totals"]["removed"] == 0
    assert second["totals"]["unchanged"] == first["totals"]["written"]
    assert tree(tmp_path) == before  # same bytes, same mtimes, same modes (manifest included)


def test_export_repairs_tampered_files_and_modes(db, dbconn, tmp_path):
    load_into(dbconn, generate(1, seed=4, mix=SMALL_MIX))
    export(db, tmp_path)
    company = tmp_path / "company-001"
    victim = company / "pre-key-1.json"
    good = victim.read_bytes()
    victim.write_bytes(b'{"tampered": true}')
    os.chmod(company / "creds.json", 0o644)
    os.unlink(company / "pre-key-2.json")
    res = export(db, tmp_path)
    assert res["changed"]
    c = res["companies"][0]
    assert c["written"] == 2 and c["metadata_fixed"] == 1
    assert victim.read_bytes() == good
    assert os.stat(company / "creds.json").st_mode & 0o777 == 0o600
    assert not export(db, tmp_path)["changed"]


def test_check_mode_writes_nothing_and_predicts_exactly(db, dbconn, tmp_path):
    load_into(dbconn, generate(1, seed=5, mix=SMALL_MIX))
    dest = tmp_path / "dest"
    predicted = export(db, dest, check_mode=True)
    assert predicted["changed"] and not dest.exists()
    real = export(db, dest)
    assert predicted["totals"]["written"] == real["totals"]["written"]
    # now change the store: delete 3 keys, update 2, and check again
    with dbconn.cursor() as cur:
        cur.execute("DELETE FROM whatsapp_keys WHERE key_type = 'session' AND key_id IN "
                    "(SELECT key_id FROM whatsapp_keys WHERE key_type = 'session' ORDER BY key_id LIMIT 3)")
        cur.execute("UPDATE whatsapp_keys SET value = '{\"type\": \"Buffer\", \"data\": \"AAEC\"}' "
                    "WHERE key_type = 'identity-key' AND key_id IN (SELECT key_id FROM whatsapp_keys "
                    "WHERE key_type = 'identity-key' ORDER BY key_id LIMIT 2)")
    dbconn.commit()
    before = tree(dest)
    predicted = export(db, dest, check_mode=True, diff=True)
    assert tree(dest) == before
    c = predicted["companies"][0]
    assert (c["written"], c["removed"]) == (2, 3)
    assert len(c["diff"]["after"].splitlines()) == 2 and len(c["diff"]["before"].splitlines()) == 5
    real = export(db, dest)
    assert (real["companies"][0]["written"], real["companies"][0]["removed"]) == (2, 3)


def test_prune_export_both_ways(db, dbconn, tmp_path):
    load_into(dbconn, generate(1, seed=6, mix=SMALL_MIX))
    export(db, tmp_path)
    company = tmp_path / "company-001"
    (company / "notes.txt").write_text("operator notes")  # unknown file: never removed
    outside = tmp_path / "pre-key-999.json"
    outside.write_text("{}")  # outside company dirs: never removed
    dbconn.execute("DELETE FROM whatsapp_keys WHERE key_type = 'pre-key' AND key_id IN ('1', '2')")
    dbconn.commit()
    kept = export(db, tmp_path, prune=False)
    assert (company / "pre-key-1.json").exists() and kept["companies"][0]["removed"] == 0
    pruned = export(db, tmp_path)
    assert pruned["companies"][0]["removed"] == 2
    assert not (company / "pre-key-1.json").exists() and not (company / "pre-key-2.json").exists()
    assert (company / "notes.txt").exists() and outside.exists()
    assert "notes.txt" in pruned["companies"][0]["ignored"]


def test_prune_import_both_ways(db, dbconn, tmp_path):
    load_into(dbconn, generate(1, seed=8, form="base64", mix=SMALL_MIX))
    export(db, tmp_path)
    os.unlink(tmp_path / "company-001" / ("session-%s.json" % _first_session(dbconn)))
    n_before = _count(dbconn)
    res = authstate.import_auth_state(db, {}, str(tmp_path), prune=False)
    assert not res["changed"] and _count(dbconn) == n_before
    check = authstate.import_auth_state(db, {}, str(tmp_path), prune=True, check_mode=True, diff=True)
    assert check["changed"] and check["totals"]["deleted"] == 1 and _count(dbconn) == n_before
    assert check["diff"]["after"].startswith("- company-001 session/")
    res = authstate.import_auth_state(db, {}, str(tmp_path), prune=True)
    assert res["totals"]["deleted"] == 1 and _count(dbconn) == n_before - 1


def _first_session(conn):
    row = conn.execute("SELECT key_id FROM whatsapp_keys WHERE key_type = 'session' ORDER BY key_id LIMIT 1").fetchone()
    conn.commit()
    return codec.fix_file_name(row[0])


def _count(conn):
    n = conn.execute("SELECT count(*) FROM whatsapp_keys").fetchone()[0]
    conn.commit()
    return n


def test_import_moves_updated_at_only_on_changed_rows(db, dbconn, tmp_path):
    load_into(dbconn, generate(1, seed=9, form="base64", mix=SMALL_MIX))
    export(db, tmp_path)
    dbconn.execute("UPDATE whatsapp_keys SET updated_at = '2020-01-01'")
    dbconn.execute("UPDATE whatsapp_auth SET updated_at = '2020-01-01'")
    dbconn.commit()
    target = tmp_path / "company-001" / "pre-key-3.json"
    target.write_text(json.dumps({"private": {"type": "Buffer", "data": "AAAA"},
                                  "public": {"type": "Buffer", "data": "AQID"}}))
    res = authstate.import_auth_state(db, {}, str(tmp_path))
    assert res["totals"]["updated"] == 1 and res["totals"]["inserted"] == 0
    assert res["companies"][0]["creds"] == "unchanged"
    moved = dbconn.execute("SELECT key_type, key_id FROM whatsapp_keys WHERE updated_at > '2021-01-01'").fetchall()
    assert moved == [("pre-key", "3")]
    assert dbconn.execute("SELECT count(*) FROM whatsapp_auth WHERE updated_at > '2021-01-01'").fetchone()[0] == 0
    dbconn.commit()
    again = authstate.import_auth_state(db, {}, str(tmp_path))
    assert not again["changed"] and again["totals"]["unchanged"] == again["totals"]["keys"]


def test_import_array_encoding(db, dbconn, tmp_path):
    company = tmp_path / "acme"
    company.mkdir()
    (company / "identity-key-5511.0.json").write_text('{"type":"Buffer","data":"AQID"}')
    (company / "creds.json").write_text('{"noiseKey": {"private": {"0": 1, "1": 255}}}')
    authstate.import_auth_state(db, {}, str(tmp_path), buffer_encoding="array")
    value = dbconn.execute("SELECT value FROM whatsapp_keys").fetchone()[0]
    creds = dbconn.execute("SELECT creds FROM whatsapp_auth").fetchone()[0]
    assert value == {"type": "Buffer", "data": [1, 2, 3]}
    assert creds == {"noiseKey": {"private": {"type": "Buffer", "data": [1, 255]}}}


@pytest.mark.parametrize("bad_name,content,expected", [
    ("pre-key-1.json", "{not json", "bad JSON"),
    ("random-thing.json", "{}", "unknown file name"),
    ("creds.json", "[1, 2]", "creds must be a JSON object"),
    ("session-1.0.json", "NaN", "bad JSON"),
    ("pre-key-2.json", b"\xff\xfe", "not UTF-8"),
])
def test_import_refuses_bad_files_and_leaves_store_untouched(db, dbconn, tmp_path, bad_name, content, expected):
    load_into(dbconn, generate(1, seed=10, mix=SMALL_MIX))
    export(db, tmp_path)
    dbconn.execute("DELETE FROM whatsapp_keys WHERE key_type = 'tctoken'")  # so an import would change things
    dbconn.commit()
    before = store_rows(dbconn)
    path = tmp_path / "company-001" / bad_name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(authstate.ValidationError) as err:
        authstate.import_auth_state(db, {}, str(tmp_path))
    assert str(path) in str(err.value) and expected in str(err.value)
    assert "database was not touched" in str(err.value)
    assert store_rows(dbconn) == before


def test_import_is_all_or_nothing(db, dbconn, tmp_path):
    load_into(dbconn, generate(2, seed=11, mix=SMALL_MIX))
    export(db, tmp_path)
    dbconn.execute("DELETE FROM whatsapp_keys")
    dbconn.execute("""CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN IF NEW.company_id = 'company-002' AND NEW.key_type = 'tctoken' THEN
        RAISE EXCEPTION 'simulated failure'; END IF; RETURN NEW; END $$""")
    dbconn.execute("CREATE TRIGGER refuse BEFORE INSERT ON whatsapp_keys FOR EACH ROW EXECUTE FUNCTION refuse()")
    dbconn.commit()
    with pytest.raises(pgconn.PgError, match="nothing was changed.*simulated failure"):
        authstate.import_auth_state(db, {}, str(tmp_path))
    assert _count(dbconn) == 0


def test_unreachable_server_leaves_dest_untouched(tmp_path, pg):
    dest = tmp_path / "dest"
    params = dict(pg.params(), login_port=1, connect_timeout=3)
    with pytest.raises(pgconn.PgError) as err:
        export(params, dest)
    assert "cannot connect to PostgreSQL" in str(err.value) and "port=1" in str(err.value)
    assert pg.params()["login_password"] not in str(err.value)
    assert not dest.exists()


def test_wrong_password_is_not_echoed(db, tmp_path):
    params = dict(db, login_password="wrong<|>'\"pass")
    with pytest.raises(pgconn.PgError) as err:
        export(params, tmp_path / "d")
    assert "wrong<|>" not in str(err.value) and "password authentication failed" in str(err.value)


def test_missing_tables_clear_message(db, dbconn, tmp_path):
    with pytest.raises(pgconn.PgError, match=r"not found: public\.nope"):
        authstate.export_from_database(db, {"keys_table": "nope"}, authstate.ExportOptions(str(tmp_path)))
    (tmp_path / "acme").mkdir()
    (tmp_path / "acme" / "creds.json").write_text("{}")
    with pytest.raises(pgconn.PgError, match=r"not found: other\.whatsapp_auth"):
        authstate.import_auth_state(db, {"schema": "other"}, str(tmp_path))


@pytest.mark.parametrize("bad_id", ["../evil", "a/b", "..", ".hidden", "", "x\x00y"])
def test_company_id_escaping_dest_is_refused(db, dbconn, tmp_path, bad_id):
    # One bad row must not take every company down (issue 10): the good companies are exported, the bad
    # one is reported in `refused` (the module then fails the task naming it), nothing leaves dest.
    load_into(dbconn, generate(2, seed=31, form="base64", mix=SMALL_MIX))
    if "\x00" not in bad_id:
        dbconn.execute("INSERT INTO whatsapp_auth (company_id, creds) VALUES (%s, '{}')", (bad_id,))
        dbconn.execute("INSERT INTO whatsapp_keys (company_id, key_type, key_id, value) "
                       "VALUES (%s, 'pre-key', '1', '{}')", (bad_id,))
    dbconn.commit()
    dest = tmp_path / "inner" / "dest"
    dest.parent.mkdir()
    if "\x00" in bad_id:  # asked for by the operator: an input error, nothing exported
        with pytest.raises(authstate.AuthStateError, match="refusing company id"):
            export(db, dest, companies=[bad_id])
        return
    res = export(db, dest)
    assert [r["company_id"] for r in res["refused"]] == [bad_id]
    assert "company id" in res["refused"][0]["error"]
    assert [c["company_id"] for c in res["companies"]] == ["company-001", "company-002"]
    assert sorted(os.listdir(tmp_path)) == ["inner"]
    assert sorted(os.listdir(tmp_path / "inner")) == ["dest"]
    assert sorted(os.listdir(dest)) == ["company-001", "company-002"]
    # a second run exports nothing new and still reports the bad row
    again = export(db, dest)
    assert not again["changed"] and [r["company_id"] for r in again["refused"]] == [bad_id]


def test_company_dir_template(db, dbconn, tmp_path):
    load_into(dbconn, generate(2, seed=12, form="base64", mix=SMALL_MIX))
    export(db, tmp_path, company_dir="session-{company_id}")
    assert sorted(os.listdir(tmp_path)) == ["session-company-001", "session-company-002"]
    res = authstate.import_auth_state(db, {}, str(tmp_path), company_dir="session-{company_id}",
                                      companies=["company-002"])
    assert [c["company_id"] for c in res["companies"]] == ["company-002"] and not res["changed"]
    with pytest.raises(authstate.AuthStateError, match="exactly once"):
        authstate.ExportOptions(str(tmp_path), company_dir="../{company_id}")


def test_interrupted_export_leaves_no_half_file_and_next_run_completes(db, dbconn, tmp_path, monkeypatch):
    """An update of an existing company directory killed among its renames."""
    load_into(dbconn, generate(1, seed=13, form="base64", mix=SMALL_MIX))
    export(db, tmp_path)
    dbconn.execute("UPDATE whatsapp_keys SET value = jsonb_build_object('v', key_id)")
    dbconn.commit()
    calls = {"n": 0}
    real_rename = os.rename

    def flaky_rename(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 40:
            raise KeyboardInterrupt("simulated kill")
        return real_rename(*args, **kwargs)

    monkeypatch.setattr(fsutil.os, "rename", flaky_rename)
    with pytest.raises(KeyboardInterrupt):
        export(db, tmp_path)
    monkeypatch.setattr(fsutil.os, "rename", real_rename)
    company = tmp_path / "company-001"
    names = os.listdir(company)
    assert not [n for n in names if n.startswith(fsutil.TEMP_PREFIX)]
    new = old = 0
    for name in names:  # every file present is whole: the old version or the new one
        value = json.loads((company / name).read_text())
        if name not in (codec.MANIFEST_FILE, codec.CREDS_FILE):
            new, old = (new + 1, old) if set(value) == {"v"} else (new, old + 1)
    assert new == 39 and old > 0
    manifest = json.loads((company / codec.MANIFEST_FILE).read_text())  # renamed last: still the old one
    assert set(manifest["files"]) == set(names) - {codec.MANIFEST_FILE}
    res = export(db, tmp_path)
    assert res["changed"] and res["totals"]["written"] == res["totals"]["keys"] - 39
    assert not export(db, tmp_path)["changed"]


def test_interrupted_export_of_a_new_company_leaves_no_directory(db, dbconn, tmp_path, monkeypatch):
    """A new company directory is built under a staging name: killed half way, no company directory
    exists at all; the next export removes the staging directory and writes the company whole."""
    load_into(dbconn, generate(1, seed=13, mix=SMALL_MIX))
    calls = {"n": 0}
    real_write = os.write

    def flaky_write(*args):
        calls["n"] += 1
        if calls["n"] == 40:
            raise KeyboardInterrupt("simulated kill")
        return real_write(*args)

    monkeypatch.setattr(fsutil.os, "write", flaky_write)
    monkeypatch.setattr(authexport.shutil, "rmtree", lambda *a, **k: None)  # as after SIGKILL: nothing cleans up
    with pytest.raises(KeyboardInterrupt):
        export(db, tmp_path)
    monkeypatch.undo()
    left = os.listdir(tmp_path)
    assert len(left) == 1 and left[0].startswith(authstate.STAGING_PREFIX)  # no company-001
    with pytest.raises(authstate.AuthStateError, match="no company directories"):
        authstate.import_auth_state(db, {}, str(tmp_path))  # import never takes it for a company
    res = export(db, tmp_path)
    assert res["changed"] and res["totals"]["written"] == res["totals"]["keys"] + 1
    assert os.listdir(tmp_path) == ["company-001"]
    assert not export(db, tmp_path)["changed"]


def test_new_company_directory_that_appears_meanwhile_is_not_replaced(db, dbconn, tmp_path, monkeypatch):
    load_into(dbconn, generate(1, seed=14, mix=SMALL_MIX))
    real_open_dir = fsutil.open_dir

    def racing_open_dir(path, *args, **kwargs):
        fd = real_open_dir(path, *args, **kwargs)
        if path.startswith(authstate.STAGING_PREFIX):  # someone else creates it after our check
            os.mkdir(tmp_path / "company-001")
            (tmp_path / "company-001" / "theirs.txt").write_text("keep me")
        return fd

    monkeypatch.setattr(fsutil, "open_dir", racing_open_dir)
    with pytest.raises(authstate.AuthStateError, match="appeared while it was being exported"):
        export(db, tmp_path)
    assert os.listdir(tmp_path) == ["company-001"]  # our staging directory is gone
    assert os.listdir(tmp_path / "company-001") == ["theirs.txt"]


def test_leftover_temp_files_are_cleaned(db, dbconn, tmp_path):
    load_into(dbconn, generate(1, seed=14, mix=SMALL_MIX))
    export(db, tmp_path)
    stale = tmp_path / "company-001" / (fsutil.TEMP_PREFIX + "999-1")
    stale.write_text('{"half')
    res = authstate.import_auth_state(db, {}, str(tmp_path))
    assert any("leftover temporary file" in w for w in res["warnings"])
    export(db, tmp_path)
    assert not stale.exists()


def test_unwritable_dest_fails_clearly(db, dbconn):
    """As an unprivileged user (root writes anywhere): a clear error, nothing written."""
    import pathlib
    import pwd
    import tempfile

    load_into(dbconn, generate(1, seed=15, mix=SMALL_MIX))
    base = pathlib.Path(tempfile.mkdtemp(prefix="br-ro-"))
    os.chmod(base, 0o755)
    dest = base / "ro"
    dest.mkdir(mode=0o755)
    nobody = pwd.getpwnam("nobody")
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop privileges, run the export in-process, report
        os.close(read_fd)
        code = 0
        try:
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            authstate.export_from_database(db, {}, authstate.ExportOptions(str(dest)))
            os.write(write_fd, b"no error")
        except authstate.AuthStateError as exc:
            os.write(write_fd, str(exc).encode())
            code = 3
        except BaseException as exc:  # noqa: BLE001
            os.write(write_fd, repr(exc).encode())
            code = 4
        os._exit(code)
    os.close(write_fd)
    message = os.read(read_fd, 65536).decode()
    os.close(read_fd)
    _pid, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 3, message
    assert "not writable" in message and str(dest) in message
    assert os.listdir(dest) == []
    shutil.rmtree(base)


def test_passfile_and_libpq_environment(pg, db, dbconn, tmp_path, monkeypatch):
    load_into(dbconn, generate(1, seed=16, mix={"pre-key": 3}))
    passfile = tmp_path / "pgpass"
    pw = db["login_password"].replace("\\", "\\\\").replace(":", "\\:")
    passfile.write_text("127.0.0.1:%d:*:postgres:%s\n" % (pg.port, pw))
    os.chmod(passfile, 0o600)
    monkeypatch.setenv("PGPASSFILE", str(passfile))
    monkeypatch.setenv("PGHOST", "127.0.0.1")
    monkeypatch.setenv("PGPORT", str(pg.port))
    monkeypatch.setenv("PGUSER", "postgres")
    monkeypatch.setenv("PGDATABASE", db["login_db"])
    res = export({}, tmp_path / "out")
    assert res["totals"]["keys"] == 3


def test_unix_socket_connection(pg, db, dbconn, tmp_path):
    load_into(dbconn, generate(1, seed=17, mix={"session": 2}))
    params = pg.socket_params(db["login_db"])
    assert export(params, tmp_path / "out")["totals"]["keys"] == 2


def test_colliding_file_names_are_refused(db, dbconn, tmp_path):
    dbconn.execute("INSERT INTO whatsapp_auth (company_id, creds) VALUES ('acme', '{}')")
    dbconn.execute("INSERT INTO whatsapp_keys (company_id, key_type, key_id, value) VALUES "
                   "('acme', 'session', 'a:b', '1'), ('acme', 'session', 'a-b', '2')")
    dbconn.commit()
    with pytest.raises(authstate.AuthStateError, match="same Baileys file session-a-b.json"):
        export(db, tmp_path)


def test_non_round_tripping_ids_warn(db, dbconn, tmp_path):
    dbconn.execute("INSERT INTO whatsapp_auth (company_id, creds) VALUES ('acme', '{}')")
    dbconn.execute("INSERT INTO whatsapp_keys (company_id, key_type, key_id, value) VALUES "
                   "('acme', 'session', '5511:3.0', '1')")
    dbconn.commit()
    res = export(db, tmp_path)
    assert (tmp_path / "acme" / "session-5511-3.0.json").exists()
    assert any("reads back as a different id" in w for w in res["warnings"])


def test_array_encoding_refuses_invalid_base64_naming_the_file(db, dbconn, tmp_path):
    company = tmp_path / "acme"
    company.mkdir()
    (company / "creds.json").write_text("{}")
    bad = company / "identity-key-1.0.json"
    bad.write_text('{"type": "Buffer", "data": "not base64!"}')
    with pytest.raises(authstate.ValidationError) as err:
        authstate.import_auth_state(db, {}, str(tmp_path), buffer_encoding="array")
    assert str(bad) in str(err.value) and "not valid base64" in str(err.value)
    assert dbconn.execute("SELECT count(*) FROM whatsapp_auth").fetchone()[0] == 0


def _spy_direct(monkeypatch, force=None):
    """Record what _copy_directly decided (or force its answer) for each attempt."""
    seen = []
    real = authstate._copy_directly

    def spy(cur, store, company_ids):
        answer = real(cur, store, company_ids) if force is None else force
        seen.append(answer)
        return answer

    monkeypatch.setattr(authimport, "_copy_directly", spy)
    return seen


def _exported_then_emptied(db, dbconn, tmp_path, companies, seed, **kw):
    """Load generated companies, export them to tmp_path, empty the store; return the rows it held."""
    load_into(dbconn, generate(companies, seed=seed, mix=SMALL_MIX, **kw))
    export(db, tmp_path)
    before = store_rows(dbconn)
    dbconn.execute("DELETE FROM whatsapp_keys")
    dbconn.execute("DELETE FROM whatsapp_auth")
    dbconn.commit()
    return before


def test_import_into_empty_store_copies_rows_directly(db, dbconn, tmp_path, monkeypatch):
    before = _exported_then_emptied(db, dbconn, tmp_path, 2, 21, form="base64")
    seen = _spy_direct(monkeypatch)
    res = authstate.import_auth_state(db, {}, str(tmp_path))
    assert seen == [True]
    assert res["totals"]["inserted"] == res["totals"]["keys"] == len(before[1])
    assert [c["creds"] for c in res["companies"]] == ["inserted", "inserted"]
    assert store_rows(dbconn) == before
    # the table's defaults filled the timestamps, as the upsert's now() does
    stamps = dbconn.execute("SELECT count(*) FROM whatsapp_keys WHERE created_at = updated_at "
                            "AND updated_at > now() - interval '1 hour'").fetchone()[0]
    dbconn.commit()
    assert stamps == len(before[1])
    # the second run finds the rows and upserts: nothing changes
    again = authstate.import_auth_state(db, {}, str(tmp_path))
    assert seen == [True, False] and not again["changed"]


def test_import_into_empty_store_refuses_bad_json_and_writes_nothing(db, dbconn, tmp_path, monkeypatch):
    _exported_then_emptied(db, dbconn, tmp_path, 1, 22)
    (tmp_path / "company-001" / "pre-key-1.json").write_text('{"private": ')
    seen = _spy_direct(monkeypatch)
    with pytest.raises(authstate.ValidationError, match="pre-key-1.json.*bad JSON"):
        authstate.import_auth_state(db, {}, str(tmp_path))
    assert seen[0] is True
    assert store_rows(dbconn) == ({}, {})


def test_import_retries_with_upsert_when_rows_appear_after_the_check(db, dbconn, tmp_path, monkeypatch):
    """Another writer's rows between the emptiness check and the COPY: unique violation, then the upsert."""
    load_into(dbconn, generate(1, seed=23, form="base64", mix=SMALL_MIX))
    export(db, tmp_path)
    dbconn.execute("DELETE FROM whatsapp_keys WHERE key_type <> 'pre-key'")
    dbconn.execute("UPDATE whatsapp_keys SET value = '{\"stale\": true}' WHERE key_id = '1'")
    dbconn.commit()
    keys_before = _count(dbconn)
    seen = _spy_direct(monkeypatch, force=True)  # as if the rows were written after the check
    res = authstate.import_auth_state(db, {}, str(tmp_path))
    assert seen == [True]  # the retry does not ask again: it upserts
    assert res["totals"]["updated"] == 1
    assert res["totals"]["unchanged"] == keys_before - 1
    assert res["totals"]["inserted"] == res["totals"]["keys"] - keys_before


def test_import_upserts_when_the_table_has_no_timestamp_defaults(db, dbconn, tmp_path, monkeypatch):
    load_into(dbconn, generate(1, seed=24, mix=SMALL_MIX))
    export(db, tmp_path)
    dbconn.execute("DELETE FROM whatsapp_keys")
    dbconn.execute("ALTER TABLE whatsapp_keys ALTER COLUMN updated_at DROP DEFAULT")
    dbconn.commit()
    seen = _spy_direct(monkeypatch)
    res = authstate.import_auth_state(db, {}, str(tmp_path))
    assert seen == [False] and res["totals"]["inserted"] == res["totals"]["keys"]
    assert dbconn.execute("SELECT count(*) FROM whatsapp_keys WHERE updated_at IS NULL").fetchone()[0] == 0
    dbconn.commit()


@pytest.mark.parametrize("size", [authstate._READ_SIZE - 1, authstate._READ_SIZE, authstate._READ_SIZE + 1,
                                  3 * authstate._READ_SIZE + 7])
def test_import_reads_files_of_any_size_whole(db, dbconn, tmp_path, size, monkeypatch):
    def strict(*_a, **_k):
        raise AssertionError("the fast reader refused a good file")

    monkeypatch.setattr(authimport, "read_directory", strict)  # a truncated read would fall back to it
    company = tmp_path / "acme"
    company.mkdir()
    (company / "creds.json").write_text('{"registered": true}')
    head = '{"pad":"'
    text = head + "x" * (size - len(head) - 2) + '"}'
    assert len(text) == size
    (company / "app-state-sync-version-regular.json").write_text(text)
    res = authstate.import_auth_state(db, {}, str(tmp_path))
    assert res["totals"]["inserted"] == 1
    value = dbconn.execute("SELECT value FROM whatsapp_keys").fetchone()[0]
    dbconn.commit()
    assert value == json.loads(text)


def test_import_fast_reader_escapes_key_ids_for_copy(db, dbconn, tmp_path, monkeypatch):
    """Key ids with a backslash, a tab or a line break travel through COPY's text format intact."""
    def strict(*_a, **_k):
        raise AssertionError("the fast reader refused good files")

    monkeypatch.setattr(authimport, "read_directory", strict)
    company = tmp_path / "acme"
    company.mkdir()
    (company / "creds.json").write_text('{"registered": true}')
    ids = ["a\\b", "c\td", "e\nf", "g\rh", "plain"]
    for n, key_id in enumerate(ids):
        (company / ("device-list-%s.json" % key_id)).write_text('{"n": %d, "s": "x\\\\ty\\ny"}' % n)
    res = authstate.import_auth_state(db, {}, str(tmp_path))
    assert res["totals"]["inserted"] == len(ids)
    rows = dict(dbconn.execute("SELECT key_id, value FROM whatsapp_keys").fetchall())
    dbconn.commit()
    assert rows == {key_id: {"n": n, "s": "x\\ty\ny"} for n, key_id in enumerate(ids)}


def test_import_reads_many_companies_in_worker_processes(db, dbconn, tmp_path, monkeypatch):
    """Four companies: read by forked reader processes, in order, bad files still named."""
    import multiprocessing

    monkeypatch.setattr(authnames, "READ_PROCESSES", 2)
    contexts = []
    real_get_context = multiprocessing.get_context

    def get_context(method=None):
        contexts.append(method)
        return real_get_context(method)

    monkeypatch.setattr(multiprocessing, "get_context", get_context)
    before = _exported_then_emptied(db, dbconn, tmp_path, 4, 31, form="base64")
    data = list(authstate._read_all_fast(authstate._discover(str(tmp_path), authstate.DirTemplate("{company_id}")),
                                         "base64"))
    assert [d.company_id for d in data] == ["company-001", "company-002", "company-003", "company-004"]
    res = authstate.import_auth_state(db, {}, str(tmp_path))
    assert res["totals"]["companies"] == 4 and res["totals"]["inserted"] == len(before[1])
    assert store_rows(dbconn) == before
    assert contexts == ["fork", "fork"]  # both reads went through the reader processes
    (tmp_path / "company-004" / "pre-key-1.json").write_text("{broken")
    with pytest.raises(authstate.ValidationError, match="company-004/pre-key-1.json"):
        authstate.import_auth_state(db, {}, str(tmp_path), prune=True)
    assert store_rows(dbconn) == before


# --------------------------------------------------------------------------- no-op export: fingerprints


def _spy_reads(monkeypatch):
    """The company ids whose key rows each export reads (DatabaseSource.states calls)."""
    reads = []
    real = authstate.DatabaseSource.states

    def spy(self, company_ids=None):
        reads.append(None if company_ids is None else sorted(company_ids))
        return real(self, company_ids)

    monkeypatch.setattr(authstate.DatabaseSource, "states", spy)
    return reads


def _in_snapshot(db, fn, server_version_num=None):
    """``fn(source, snapshot)`` with a DatabaseSource of the default store in one export snapshot."""
    conn = pgconn.connect(db)
    try:
        with authstate.snapshot_transaction(conn) as snapshot:
            source = authstate.DatabaseSource(conn, pgconn.Store.from_params({}), None,
                                              server_version_num or snapshot["server_version_num"])
            return fn(source, snapshot)
    finally:
        conn.close()


def _varied_store(dbconn):
    """Four generated companies plus the cases a verified directory must report again:
    a key id that does not round trip (warning) and a company with keys but no creds row."""
    load_into(dbconn, generate(4, seed=41, mix=SMALL_MIX))
    dbconn.execute("INSERT INTO whatsapp_keys (company_id, key_type, key_id, value) VALUES "
                   "('company-002', 'session', '5511:3.0', '1'), ('no-creds', 'pre-key', '1', '{\"a\": 1}')")
    dbconn.commit()


@pytest.mark.parametrize("prune,diff", [(True, False), (False, True)])
def test_noop_export_reads_no_key_row_and_reports_as_a_full_comparison(db, dbconn, tmp_path, monkeypatch,
                                                                       prune, diff):
    _varied_store(dbconn)
    reads = _spy_reads(monkeypatch)
    first = export(db, tmp_path, prune=prune)
    assert first["changed"] and reads == [sorted(["company-001", "company-002", "company-003", "company-004",
                                                  "no-creds"])]
    (tmp_path / "company-003" / "notes.txt").write_text("operator notes")  # reported as ignored
    if not prune:
        (tmp_path / "company-004" / "pre-key-99999.json").write_text("{}")  # not in the store, kept
    before = tree(tmp_path)
    fast = export(db, tmp_path, prune=prune, diff=diff)
    assert reads[1:] == []  # no key row read: every directory was verified against its manifest
    assert not fast["changed"] and tree(tmp_path) == before
    assert any("reads back as a different id" in w for w in fast["warnings"])
    assert any("'no-creds' has keys but no creds row" in w for w in fast["warnings"])

    monkeypatch.setattr(authexport, "verify_directory", lambda *args: None)  # every company compared file by file
    full = export(db, tmp_path, prune=prune, diff=diff)
    assert reads[1:] == [sorted(c["company_id"] for c in first["companies"])]
    assert tree(tmp_path) == before
    for key in ("changed", "companies", "totals", "warnings", "dest", "source"):
        assert fast[key] == full[key], key
    assert fast["totals"]["unchanged"] == first["totals"]["written"]


def test_export_reads_the_rows_of_changed_companies_only(db, dbconn, tmp_path, monkeypatch):
    load_into(dbconn, generate(3, seed=42, form="base64", mix=SMALL_MIX))
    reads = _spy_reads(monkeypatch)
    export(db, tmp_path)
    victim = dbconn.execute("SELECT key_id, value::text FROM whatsapp_keys WHERE company_id = 'company-002' "
                            "AND key_type = 'session' ORDER BY key_id LIMIT 1").fetchone()
    path = tmp_path / "company-002" / ("session-%s.json" % codec.fix_file_name(victim[0]))
    # same length, one character different: size and count are no help, the fingerprint is
    changed = victim[1].replace("A", "B", 1) if "A" in victim[1] else victim[1].replace("B", "A", 1)
    assert changed != victim[1] and len(changed) == len(victim[1])
    dbconn.execute("UPDATE whatsapp_keys SET value = %s::jsonb WHERE company_id = 'company-002' "
                   "AND key_type = 'session' AND key_id = %s", (changed, victim[0]))
    dbconn.commit()
    del reads[:]
    res = export(db, tmp_path)
    assert reads == [["company-002"]] and res["totals"]["written"] == 1
    assert path.read_text() == changed

    dbconn.execute("DELETE FROM whatsapp_keys WHERE company_id = 'company-003' AND key_type = 'pre-key' "
                   "AND key_id = '1'")
    dbconn.execute("UPDATE whatsapp_auth SET creds = creds || '{\"me\": {\"id\": \"x\"}}' "
                   "WHERE company_id = 'company-001'")
    dbconn.commit()
    del reads[:]
    res = export(db, tmp_path)
    assert reads == [["company-001", "company-003"]]
    assert [(c["company_id"], c["written"], c["removed"]) for c in res["companies"]] == [
        ("company-001", 1, 0), ("company-002", 0, 0), ("company-003", 0, 1)]

    # rewriting rows with the values they already hold moves no fingerprint (content, not row versions)
    dbconn.execute("UPDATE whatsapp_keys SET value = value, updated_at = now()")
    dbconn.commit()
    del reads[:]
    assert not export(db, tmp_path)["changed"] and reads == []


def test_fingerprint_sees_values_swapped_between_keys(db, dbconn):
    dbconn.execute("INSERT INTO whatsapp_keys (company_id, key_type, key_id, value) VALUES "
                   "('acme', 'session', 'a', '{\"v\": 1}'), ('acme', 'session', 'b', '{\"v\": 2}')")
    dbconn.commit()

    def fingerprint():
        return _in_snapshot(db, lambda source, _snapshot: source.fingerprint("acme"))

    before = fingerprint()
    dbconn.execute("UPDATE whatsapp_keys SET value = CASE key_id WHEN 'a' THEN '{\"v\": 2}'::jsonb "
                   "ELSE '{\"v\": 1}'::jsonb END")
    dbconn.commit()
    assert before.startswith("1:2:") and fingerprint() != before


def test_export_compares_file_by_file_when_the_directory_changed(db, dbconn, tmp_path, monkeypatch):
    load_into(dbconn, generate(3, seed=43, form="base64", mix=SMALL_MIX))
    export(db, tmp_path)
    reads = _spy_reads(monkeypatch)
    company = tmp_path / "company-002"
    manifest = json.loads((company / codec.MANIFEST_FILE).read_text())
    assert manifest["fingerprint"].startswith("1:")

    victim = company / "pre-key-1.json"  # rewritten in place by something else, same size
    good = victim.read_bytes()
    victim.write_bytes(good.replace(b'"', b"'", 1))
    res = export(db, tmp_path)
    assert reads == [["company-002"]] and res["totals"]["written"] == 1 and victim.read_bytes() == good

    os.unlink(company / "pre-key-2.json")  # missing: written again
    stale = tmp_path / "company-001" / (fsutil.TEMP_PREFIX + "999-1")  # left by a killed run: removed
    stale.write_text('{"half')
    del reads[:]
    res = export(db, tmp_path)
    assert reads == [["company-001", "company-002"]] and res["totals"]["written"] == 1
    assert (company / "pre-key-2.json").exists() and not stale.exists()

    (company / "pre-key-99999.json").write_text("{}")  # a key file the store does not have: pruned
    os.chmod(tmp_path / "company-003" / "creds.json", 0o644)  # metadata only
    del reads[:]
    res = export(db, tmp_path)
    assert reads == [["company-002", "company-003"]]
    assert res["totals"]["removed"] == 1 and res["totals"]["metadata_fixed"] == 1

    # a manifest written before fingerprints existed: one file-by-file pass, which adds it
    del manifest["fingerprint"]
    del reads[:]
    (company / codec.MANIFEST_FILE).write_text(json.dumps(manifest))
    res = export(db, tmp_path)
    assert reads == [["company-002"]] and res["changed"] and res["totals"]["written"] == 0
    del reads[:]
    assert not export(db, tmp_path)["changed"] and reads == []

    # a manifest of another source (an export from a backup file) is not trusted: every company compared
    del reads[:]
    res = _in_snapshot(db, lambda source, snapshot: authstate.export_states(
        source, authstate.ExportOptions(str(tmp_path), source_label="backup x"), snapshot))
    assert reads == [["company-001", "company-002", "company-003"]]
    assert res["changed"] and res["totals"]["written"] == 0  # the manifests name the new source


def test_locked_directory_is_reported_on_a_noop_export(db, dbconn, tmp_path):
    import fcntl

    load_into(dbconn, generate(1, seed=44, mix=SMALL_MIX))
    export(db, tmp_path)
    fd = os.open(tmp_path / "company-001", os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(authstate.AuthStateError, match="locked by another export or import"):
            export(db, tmp_path)
    finally:
        os.close(fd)
    assert not export(db, tmp_path)["changed"]


@pytest.mark.parametrize("processes", [0, 2])
def test_directory_checks_in_worker_processes_or_not_agree(db, dbconn, tmp_path, monkeypatch, processes):
    import multiprocessing

    monkeypatch.setattr(authnames, "READ_PROCESSES", processes)
    contexts = []
    real_get_context = multiprocessing.get_context
    monkeypatch.setattr(multiprocessing, "get_context", lambda method=None: contexts.append(method)
                        or real_get_context(method))
    _varied_store(dbconn)
    export(db, tmp_path)
    assert contexts == []  # no directory to check yet: nothing forked
    dbconn.execute("DELETE FROM whatsapp_keys WHERE company_id = 'company-004' AND key_type = 'pre-key' "
                   "AND key_id = '1'")
    dbconn.commit()
    reads = _spy_reads(monkeypatch)
    res = export(db, tmp_path)
    assert reads == [["company-004"]] and res["totals"]["removed"] == 1
    assert contexts == (["fork"] if processes else [])


def test_server_without_jsonb_hash_reads_every_company(db, dbconn, tmp_path, monkeypatch):
    """PostgreSQL before 11 has no jsonb_hash_extended: no fingerprint, every row read, same files."""
    _varied_store(dbconn)

    def export_old(source, snapshot):
        assert source.company_ids is None and source.fingerprint("company-001") is None
        return authstate.export_states(source, authstate.ExportOptions(str(tmp_path / "old")), snapshot)

    old = _in_snapshot(db, export_old, server_version_num=100000)
    new = export(db, tmp_path / "new")
    assert [c["company_id"] for c in old["companies"]] == [c["company_id"] for c in new["companies"]]
    assert "no-creds" in [c["company_id"] for c in old["companies"]]
    strip = {k: v[0] for k, v in tree(tmp_path / "old").items() if not k.endswith(codec.MANIFEST_FILE)}
    assert strip == {k: v[0] for k, v in tree(tmp_path / "new").items() if not k.endswith(codec.MANIFEST_FILE)}
    manifest = json.loads((tmp_path / "old" / "company-001" / codec.MANIFEST_FILE).read_text())
    assert "fingerprint" not in manifest


def test_a_damaged_manifest_sends_the_company_through_the_file_by_file_path(db, dbconn, tmp_path, monkeypatch):
    load_into(dbconn, generate(1, seed=45, mix=SMALL_MIX))
    export(db, tmp_path)
    reads = _spy_reads(monkeypatch)
    path = tmp_path / "company-001" / codec.MANIFEST_FILE
    good = json.loads(path.read_text())
    for damage in ({"files": dict(good["files"], **{"pre-key-1.json": "x"})}, {"warnings": "not a list"},
                   {"counts": None}, {"fingerprint": 7}):
        path.write_text(json.dumps(dict(good, **damage)))
        del reads[:]
        res = export(db, tmp_path)
        assert reads == [["company-001"]] and res["changed"] and res["totals"]["written"] == 0, damage
        assert json.loads(path.read_text())["fingerprint"] == good["fingerprint"]


def test_store_with_json_columns_exports_and_fingerprints(db, dbconn, tmp_path, monkeypatch):
    """Some stores declare the value column json, not jsonb: export works, and the no-op still reads no row."""
    dbconn.execute("CREATE SCHEMA legacy")
    dbconn.execute("CREATE TABLE legacy.auth (company_id text PRIMARY KEY, creds json NOT NULL)")
    dbconn.execute("CREATE TABLE legacy.keys (company_id text, key_type text, key_id text, value json NOT NULL, "
                   "PRIMARY KEY (company_id, key_type, key_id))")
    dbconn.execute("""INSERT INTO legacy.auth VALUES ('acme', '{"registered": true}')""")
    dbconn.execute("""INSERT INTO legacy.keys VALUES ('acme', 'pre-key', '1', '{"public": {"type": "Buffer", """
                   """"data": [1, 2, 3]}}'), ('acme', 'session', 'a.0', '{"v": 1}')""")
    dbconn.commit()
    store = {"schema": "legacy", "auth_table": "auth", "keys_table": "keys"}
    reads = _spy_reads(monkeypatch)
    first = authstate.export_from_database(db, store, authstate.ExportOptions(str(tmp_path)))
    assert first["totals"]["written"] == 3 and reads == [["acme"]]
    assert json.loads((tmp_path / "acme" / "pre-key-1.json").read_text()) == {
        "public": {"type": "Buffer", "data": "AQID"}}
    second = authstate.export_from_database(db, store, authstate.ExportOptions(str(tmp_path)))
    assert not second["changed"] and reads == [["acme"]]
    dbconn.execute("""UPDATE legacy.keys SET value = '{"v": 2}' WHERE key_type = 'session'""")
    dbconn.commit()
    third = authstate.export_from_database(db, store, authstate.ExportOptions(str(tmp_path)))
    assert third["totals"]["written"] == 1 and reads == [["acme"], ["acme"]]
