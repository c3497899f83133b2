"""The driver seam (plugins/module_utils/pgdriver.py) against a real PostgreSQL, under both drivers.

What the core relies on, with psycopg 3's meaning, checked for psycopg 3 and for psycopg2 wrapped:
execute chaining, transactions (autocommit, outer, savepoint), COPY FROM STDIN streamed with an
abort that leaves nothing, server-side cursors, SQL composition, the error classes.
"""
import threading

import pytest

from ansible_collections.baileys.resilience.plugins.module_utils import pgconn, pgdriver

DRIVERS = [name for name in pgdriver.NAMES if pgdriver.load(name)[0] is not None]


@pytest.fixture(params=pgdriver.NAMES)
def drv(request):
    driver, err = pgdriver.load(request.param)
    if driver is None:
        pytest.fail("driver %s not installed (requirements-dev.txt installs both): %s" % (request.param, err))
    return driver


def _connect(driver, params, autocommit=False):
    return driver.connect(autocommit=autocommit, **pgconn.libpq_params(params))


def test_both_drivers_installed():
    assert DRIVERS == ["psycopg", "psycopg2"]


def test_load_honours_the_environment(monkeypatch):
    monkeypatch.setenv(pgdriver.ENV_VAR, "psycopg2")
    assert pgdriver.load()[0].name == "psycopg2"
    monkeypatch.setenv(pgdriver.ENV_VAR, "psycopg")
    assert pgdriver.load()[0].name == "psycopg"
    monkeypatch.setenv(pgdriver.ENV_VAR, "pg8000")
    driver, err = pgdriver.load()
    assert driver is None and "pg8000" in str(err) and pgdriver.ENV_VAR in str(err)
    monkeypatch.delenv(pgdriver.ENV_VAR)
    assert pgdriver.load()[0].name == "psycopg"


def test_execute_chaining_and_composition(drv, db):
    conn = _connect(drv, db)
    sql = drv.sql
    store = pgconn.Store()
    q = sql.SQL("SELECT count(*), {} FROM {}").format(sql.Literal("x"), sql.Identifier(store.schema, store.auth_table))
    assert conn.execute(q).fetchone() == (0, "x")
    with conn.cursor() as cur:
        assert cur.execute("SELECT %s::int + 1", (41,)).fetchone() == (42,)
        assert cur.execute("SELECT '{\"a\": 1}'::jsonb").fetchone()[0] == {"a": 1}
    assert conn.info.dbname == db["login_db"]
    conn.close()


def test_transactions(drv, db):
    conn = _connect(drv, db, autocommit=True)
    with conn.transaction():
        conn.execute("INSERT INTO whatsapp_auth (company_id, creds) VALUES ('a', '{}')")
    with pytest.raises(RuntimeError):
        with conn.transaction():
            conn.execute("INSERT INTO whatsapp_auth (company_id, creds) VALUES ('b', '{}')")
            raise RuntimeError("boom")
    assert conn.autocommit is True
    assert [r[0] for r in conn.execute("SELECT company_id FROM whatsapp_auth ORDER BY 1").fetchall()] == ["a"]
    conn.close()

    conn = _connect(drv, db)
    conn.execute("INSERT INTO whatsapp_auth (company_id, creds) VALUES ('c', '{}')")
    with pytest.raises(drv.UniqueViolation):
        with conn.transaction():  # a savepoint inside the open transaction
            conn.execute("INSERT INTO whatsapp_auth (company_id, creds) VALUES ('a', '{}')")
    conn.commit()
    assert [r[0] for r in conn.execute("SELECT company_id FROM whatsapp_auth ORDER BY 1").fetchall()] == ["a", "c"]
    conn.close()


def test_copy_in_streams_and_escapes(drv, db):
    conn = _connect(drv, db)
    cur = conn.cursor()
    values = ["plain", "tab\there", "new\nline", "back\\slash", "cr\rx", "ünïcødé ✓", None]
    with cur.copy("COPY whatsapp_keys (company_id, key_type, key_id, value) FROM STDIN") as copy:
        for i in range(20000):  # ~ several MB: more than one queue chunk for psycopg2
            copy.write("c1\tsession\tk%d\t{\"n\": %d, \"pad\": \"%s\"}\n" % (i, i, "x" * 200))
        for i, v in enumerate(values):
            copy.write_row(("c2", "t", "v%d" % i, '{"v": %s}' % ("null" if v is None else '"%s"' % i)))
    cur.execute("CREATE TEMP TABLE t (id int, s text)")
    with cur.copy("COPY t (id, s) FROM STDIN") as copy:
        for i, v in enumerate(values):
            copy.write_row((i, v))
    conn.commit()
    assert conn.execute("SELECT count(*) FROM whatsapp_keys WHERE company_id = 'c1'").fetchone() == (20000,)
    got = conn.execute("SELECT s FROM t ORDER BY id").fetchall()
    assert [r[0] for r in got] == values
    conn.close()


def test_copy_abort_leaves_nothing(drv, db):
    conn = _connect(drv, db)
    cur = conn.cursor()
    with pytest.raises(ValueError):
        with cur.copy("COPY whatsapp_auth (company_id, creds) FROM STDIN") as copy:
            copy.write_row(("x", "{}"))
            raise ValueError("writer failed")
    conn.rollback()
    assert conn.execute("SELECT count(*) FROM whatsapp_auth").fetchone() == (0,)
    # a COPY the server refuses (bad JSON) raises the driver's DataError-family error
    with pytest.raises(drv.Error):
        with cur.copy("COPY whatsapp_auth (company_id, creds) FROM STDIN") as copy:
            for i in range(5000):
                copy.write_row(("x%d" % i, "{not json"))
    conn.rollback()
    assert conn.execute("SELECT count(*) FROM whatsapp_auth").fetchone() == (0,)
    assert threading.active_count() < 50
    conn.close()


def test_server_side_cursor(drv, db):
    conn = _connect(drv, db)
    conn.execute("INSERT INTO whatsapp_keys (company_id, key_type, key_id, value) "
                 "SELECT 'c', 'session', g::text, '{}' FROM generate_series(1, 2500) g")
    conn.commit()
    seen = 0
    with conn.cursor(name="br_test") as cur:
        cur.execute("SELECT key_id FROM whatsapp_keys")
        while True:
            batch = cur.fetchmany(1000)
            if not batch:
                break
            seen += len(batch)
    conn.commit()
    assert seen == 2500
    conn.close()
