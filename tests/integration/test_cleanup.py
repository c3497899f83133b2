"""keys_cleanup core and module against a real PostgreSQL: protections, batches, threshold, check mode."""
from __future__ import annotations

import json
import subprocess

import authgen
import pytest

from ansible_collections.baileys.resilience.plugins.module_utils import cleanup, pgconn

MIX = {"pre-key": 20, "session": 10, "sender-key": 5, "app-state-sync-key": 3, "app-state-sync-version": 2,
       "lid-mapping": 4}
STORE = {"schema": "public", "auth_table": "whatsapp_auth", "keys_table": "whatsapp_keys"}
# 20 pre-keys 1..20: creds.signedPreKey.keyId = 1, nextPreKeyId = 21 -> 1 and 20 are protected
DELETABLE_PER_COMPANY = 18 + 10 + 5 + 4


def load(dbconn, n=2, mix=MIX):
    companies = authgen.generate(n, seed=7, form="base64", mix=mix)
    authgen.load_into(dbconn, companies)
    return companies


def backdate(dbconn, days, where="TRUE", args=()):
    dbconn.execute("UPDATE whatsapp_keys SET updated_at = now() - make_interval(days => %s) WHERE " + where,
                   (days,) + tuple(args))
    dbconn.execute("UPDATE whatsapp_auth SET updated_at = now() - make_interval(days => %s)", (days,))
    dbconn.commit()


def keys(dbconn):
    return set(dbconn.execute("SELECT company_id, key_type, key_id FROM whatsapp_keys").fetchall())


def test_protections_with_everything_old(db, dbconn):
    load(dbconn)
    backdate(dbconn, 45)
    before = keys(dbconn)
    result = cleanup.cleanup_keys(db, STORE, confirm_large_delete=True)
    after = keys(dbconn)
    assert result["changed"] is True
    assert result["deleted"] == 2 * DELETABLE_PER_COMPANY == len(before - after)
    assert result["deleted_by_type"] == {"pre-key": 36, "session": 20, "sender-key": 10, "lid-mapping": 8}
    assert result["protected_old_keys"] == {"pre-key": 4, "app-state": 10}
    for cid in ("company-001", "company-002"):
        assert (cid, "pre-key", "1") in after  # creds.signedPreKey.keyId
        assert (cid, "pre-key", "20") in after  # nextPreKeyId - 1
        assert (cid, "pre-key", "2") not in after
        assert sum(1 for k in after if k[0] == cid and k[1] == "app-state-sync-key") == 3
        assert sum(1 for k in after if k[0] == cid and k[1] == "app-state-sync-version") == 2
        assert sum(1 for k in after if k[0] == cid and k[1] == "session") == 0
    assert dbconn.execute("SELECT count(*) FROM whatsapp_auth").fetchone()[0] == 2
    assert result["age_buckets"][">30d"] == len(before)
    assert result["age_buckets_after"][">30d"] == len(after)
    assert result["sizes_before"]["total_bytes"] > 0 and "index_bytes" in result["sizes_after"]
    assert result.get("vacuumed") is True
    # idempotent
    again = cleanup.cleanup_keys(db, STORE)
    assert again["changed"] is False and again["deleted"] == 0 and again["would_delete"] == 0


def test_pointers_follow_creds_and_missing_creds_protect_pre_keys(db, dbconn):
    load(dbconn)
    # company-001 moved on: signed pre-key 7, next pre-key id 16 -> 7 and 15 protected, 20 is not any more
    dbconn.execute("UPDATE whatsapp_auth SET creds = jsonb_set(jsonb_set(creds, '{signedPreKey,keyId}', '7'), "
                   "'{nextPreKeyId}', '16') WHERE company_id = 'company-001'")
    dbconn.execute("DELETE FROM whatsapp_auth WHERE company_id = 'company-002'")
    dbconn.commit()
    backdate(dbconn, 40)
    result = cleanup.cleanup_keys(db, STORE, confirm_large_delete=True, vacuum=False)
    after = keys(dbconn)
    pre1 = sorted(int(k[2]) for k in after if k[0] == "company-001" and k[1] == "pre-key")
    assert pre1 == [7, 15]
    # no creds row: no pre-key can be judged, none is deleted; other old keys still go
    assert sum(1 for k in after if k[0] == "company-002" and k[1] == "pre-key") == 20
    assert sum(1 for k in after if k[0] == "company-002" and k[1] == "session") == 0
    assert result["protected_old_keys"]["pre-key"] == 2 + 20


def test_age_columns(db, dbconn):
    load(dbconn, n=1)
    # sessions: recent but expired; sender-keys: old but expiring in the future
    dbconn.execute("UPDATE whatsapp_keys SET expires_at = now() - interval '1 hour' WHERE key_type = 'session'")
    dbconn.execute("UPDATE whatsapp_keys SET updated_at = now() - interval '60 days', "
                   "expires_at = now() + interval '1 day' WHERE key_type = 'sender-key'")
    dbconn.execute("UPDATE whatsapp_keys SET updated_at = now() - interval '60 days' WHERE key_type = 'lid-mapping'")
    dbconn.commit()
    by_update = cleanup.cleanup_keys(db, STORE, age_column="updated_at", check_mode=True)
    assert by_update["candidates_by_type"] == {"sender-key": 5, "lid-mapping": 4}
    by_expiry = cleanup.cleanup_keys(db, STORE, age_column="expires_at", check_mode=True)
    assert by_expiry["candidates_by_type"] == {"session": 10}
    auto = cleanup.cleanup_keys(db, STORE, age_column="auto", check_mode=True)
    assert auto["candidates_by_type"] == {"session": 10, "lid-mapping": 4}
    assert auto["candidate_age_buckets"] == {"0-1d": 10, "1-7d": 0, "7-14d": 0, "14-30d": 0, ">30d": 4}
    done = cleanup.cleanup_keys(db, STORE, age_column="auto")
    assert done["deleted_by_type"] == {"session": 10, "lid-mapping": 4}
    assert dbconn.execute("SELECT count(*) FROM whatsapp_keys WHERE key_type = 'sender-key'").fetchone()[0] == 5
    # younger than older_than_days by updated_at: kept
    assert cleanup.cleanup_keys(db, STORE, older_than_days=61, age_column="updated_at")["deleted"] == 0


def test_batches_and_check_mode_counts(db, dbconn):
    load(dbconn)
    backdate(dbconn, 31)
    before = keys(dbconn)
    preview = cleanup.cleanup_keys(db, STORE, batch_size=7, confirm_large_delete=True, check_mode=True)
    assert keys(dbconn) == before
    assert preview["deleted"] == 0 and preview["batches"] == 0
    assert preview["changed"] is True and preview["would_delete"] == 2 * DELETABLE_PER_COMPANY

    class Log:
        lines = []

        def emit(self, step, status, duration=None, **fields):
            self.lines.append((step, status, fields))

    log = Log()
    done = cleanup.cleanup_keys(db, STORE, batch_size=7, confirm_large_delete=True, log=log)
    assert done["deleted"] == preview["would_delete"] == len(before - keys(dbconn))
    assert done["deleted_by_type"] == preview["candidates_by_type"]
    assert done["batches"] == -(-done["deleted"] // 7) == 11
    batch_lines = [f for s, st, f in log.lines if s == "cleanup_batch"]
    assert [f["deleted"] for f in batch_lines] == [7] * 10 + [4]


def test_large_delete_stops_without_confirmation(db, dbconn):
    load(dbconn)
    backdate(dbconn, 90)
    before = keys(dbconn)
    with pytest.raises(cleanup.LargeDeleteRefused) as info:
        cleanup.cleanup_keys(db, STORE, max_delete=10)
    assert "max_delete=10" in str(info.value) and "nothing was deleted" in str(info.value)
    assert info.value.result["would_delete"] == 2 * DELETABLE_PER_COMPANY and info.value.result["stopped"] is True
    assert keys(dbconn) == before
    # check mode gives the same verdict
    with pytest.raises(cleanup.LargeDeleteRefused):
        cleanup.cleanup_keys(db, STORE, max_delete=10, check_mode=True)
    # under the limit: runs; scoped to one company
    one = cleanup.cleanup_keys(db, STORE, max_delete=DELETABLE_PER_COMPANY, companies=["company-002"])
    assert one["deleted"] == DELETABLE_PER_COMPANY
    assert {k[0] for k in before - keys(dbconn)} == {"company-002"}


def test_bad_arguments(db):
    with pytest.raises(cleanup.CleanupError):
        cleanup.cleanup_keys(db, STORE, age_column="created_at")
    with pytest.raises(cleanup.CleanupError):
        cleanup.cleanup_keys(db, STORE, older_than_days=0)
    with pytest.raises(pgconn.PgError, match="not found"):
        cleanup.cleanup_keys(db, dict(STORE, keys_table="nope"))


def _ansible(ansible_env, args, check=False):
    cmd = ["ansible", "localhost", "-c", "local", "-m", "baileys.resilience.keys_cleanup", "-a", json.dumps(args)]
    if check:
        cmd.append("--check")
    env = dict(ansible_env, ANSIBLE_LOAD_CALLBACK_PLUGINS="1", ANSIBLE_STDOUT_CALLBACK="ansible.builtin.json")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    data = json.loads(proc.stdout)
    return proc.returncode, data["plays"][0]["tasks"][0]["hosts"]["localhost"]


def test_module_through_ansible(pg, db, dbconn, ansible_env):
    load(dbconn)
    backdate(dbconn, 45)
    args = dict(pg.socket_params(db["login_db"]), batch_size=10, max_delete=50)
    rc, res = _ansible(ansible_env, args)
    assert rc != 0 and res["failed"] is True and res["stopped"] is True
    assert "max_delete=50" in res["msg"] and res["would_delete"] == 2 * DELETABLE_PER_COMPANY
    assert len(keys(dbconn)) == 2 * sum(MIX.values())
    args["max_delete"] = 100
    rc, res = _ansible(ansible_env, args, check=True)
    assert rc == 0 and res["changed"] is True and res["deleted"] == 0
    assert res["would_delete"] == 2 * DELETABLE_PER_COMPANY
    assert len(keys(dbconn)) == 2 * sum(MIX.values())
    rc, res = _ansible(ansible_env, args)
    assert rc == 0 and res["changed"] is True and res["deleted"] == 2 * DELETABLE_PER_COMPANY
    assert res["batches"] == 8
    rc, res = _ansible(ansible_env, args)
    assert rc == 0 and res["changed"] is False and res["deleted"] == 0
