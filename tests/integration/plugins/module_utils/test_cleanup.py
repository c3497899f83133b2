"""keys_cleanup core and module against a real PostgreSQL: retention rules, batches, threshold, check mode.

The rules themselves (cleanup.RULES, docs/key-retention.md) are checked against keys Baileys itself
wrote: tests/compat/prekeys.mjs generates a new account's pre-keys with the real package.
"""
from __future__ import annotations

import datetime
import io
import json
import os
import subprocess

import pytest
import yaml

from ansible_collections.baileys.resilience.plugins.module_utils import cleanup, cli, pgconn

from support import authgen, baileys_node


MIX = {"pre-key": 20, "session": 10, "sender-key": 5, "sender-key-memory": 3, "app-state-sync-key": 3,
       "app-state-sync-version": 2, "lid-mapping": 4, "device-list": 4}
STORE = {"schema": "public", "auth_table": "whatsapp_auth", "keys_table": "whatsapp_keys"}
# by age: sessions, sender keys, sender-key memory, device lists; pre-keys, app-state keys and
# lid-mappings are kept whatever their age
DELETABLE_PER_COMPANY = 10 + 5 + 3 + 4
KEPT_PER_COMPANY = 20 + 3 + 2 + 4


def load(dbconn, n=2, mix=None):
    companies = authgen.generate(n, seed=7, form="base64", mix=MIX if mix is None else mix)
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
    assert result["deleted_by_type"] == {"session": 20, "sender-key": 10, "sender-key-memory": 6, "device-list": 8}
    assert result["protected_old_keys"] == {"pre-key": 40, "app-state": 10, "identity-key": 0, "lid-mapping": 8,
                                            "tctoken": 0, "other": 0}
    for cid in ("company-001", "company-002"):
        # every pre-key stays, not only the ones the creds point at
        assert sorted(int(k[2]) for k in after if k[0] == cid and k[1] == "pre-key") == list(range(1, 21))
        assert sum(1 for k in after if k[0] == cid and k[1] == "app-state-sync-key") == 3
        assert sum(1 for k in after if k[0] == cid and k[1] == "app-state-sync-version") == 2
        assert sum(1 for k in after if k[0] == cid and k[1] == "lid-mapping") == 4
        assert sum(1 for k in after if k[0] == cid and k[1] in ("session", "sender-key", "device-list")) == 0
    assert len(after) == 2 * KEPT_PER_COMPANY
    assert dbconn.execute("SELECT count(*) FROM whatsapp_auth").fetchone()[0] == 2
    assert result["age_buckets"][">30d"] == len(before)
    assert result["age_buckets_after"][">30d"] == len(after)
    assert result["sizes_before"]["total_bytes"] > 0 and "index_bytes" in result["sizes_after"]
    assert result.get("vacuumed") is True
    rules = {r["name"]: r for r in result["rules"]}
    view = {name: (r["deletes"], r["kept_old"], r["candidates"], r["deleted"]) for name, r in rules.items()}
    assert view["pre-key"] == ("never", 40, 0, 0)
    assert view["session"] == ("by_age", 0, 20, 20)
    assert all(r["reason"] and (r["source"] or r["name"] == "other") for r in result["rules"])
    # idempotent
    again = cleanup.cleanup_keys(db, STORE)
    assert again["changed"] is False and again["deleted"] == 0 and again["would_delete"] == 0
    assert again["protected_old_keys"]["pre-key"] == 40


def test_pre_keys_never_go_by_age_whatever_the_creds(db, dbconn):
    """The old rule kept only creds.signedPreKey.keyId and nextPreKeyId - 1 and judged pre-keys through the
    creds row; now no pre-key is deleted by age, whether or not the creds point at it or exist at all."""
    load(dbconn)
    # company-001 moved on: signed pre-key 7, next pre-key id 16; company-002 lost its creds row
    dbconn.execute("UPDATE whatsapp_auth SET creds = jsonb_set(jsonb_set(creds, '{signedPreKey,keyId}', '7'), "
                   "'{nextPreKeyId}', '16') WHERE company_id = 'company-001'")
    dbconn.execute("DELETE FROM whatsapp_auth WHERE company_id = 'company-002'")
    dbconn.execute("UPDATE whatsapp_keys SET expires_at = now() - interval '1 day' WHERE key_type = 'pre-key'")
    dbconn.commit()
    backdate(dbconn, 400)
    for age_column in cleanup.AGE_COLUMNS:
        preview = cleanup.cleanup_keys(db, STORE, age_column=age_column, confirm_large_delete=True, check_mode=True)
        assert "pre-key" not in preview["candidates_by_type"]
        assert preview["protected_old_keys"]["pre-key"] == 40
    result = cleanup.cleanup_keys(db, STORE, confirm_large_delete=True, vacuum=False, older_than_days=1)
    after = keys(dbconn)
    for cid in ("company-001", "company-002"):
        assert sum(1 for k in after if k[0] == cid and k[1] == "pre-key") == 20
        assert sum(1 for k in after if k[0] == cid and k[1] == "session") == 0  # other old keys still go
    assert "pre-key" not in result["deleted_by_type"]


def test_unknown_and_kept_types_are_listed_by_rule(db, dbconn):
    load(dbconn, n=1, mix={"identity-key": 3, "session": 2})
    dbconn.execute("INSERT INTO whatsapp_keys (company_id, key_type, key_id, value) "
                   "VALUES ('company-001', 'future-type', 'x', '{}')")
    dbconn.commit()
    backdate(dbconn, 60)
    preview = cleanup.cleanup_keys(db, STORE, check_mode=True)
    assert preview["changed"] is True and preview["candidates_by_type"] == {"session": 2}
    assert preview["kept_old_by_type"] == {"identity-key": 3, "future-type": 1}
    rules = {r["name"]: r for r in preview["rules"]}
    assert rules["identity-key"]["kept_old"] == 3 and rules["identity-key"]["candidates"] == 0
    assert rules["other"]["types"] == ["future-type"] and rules["other"]["kept_old"] == 1
    assert rules["session"]["candidates"] == 2 and "deleted" not in rules["session"]  # check mode: nothing ran
    assert len(keys(dbconn)) == 6


def _epoch(days_ago):
    return int((datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=days_ago)).timestamp())


def test_tctokens_go_only_once_baileys_would_drop_them(db, dbconn):
    """isTcTokenExpired: a token is valid for the current 7-day bucket and the 3 before it (21 to 28 days);
    a row goes when its timestamp and senderTimestamp are both expired or absent; never the __index row."""
    load(dbconn, n=1, mix={"session": 1})
    rows = {
        "__index": {"token": {"type": "Buffer", "data": "WyJhQGxpZCJd"}},
        "expired@lid": {"token": {"type": "Buffer", "data": "AAEC"}, "timestamp": str(_epoch(40)),
                        "senderTimestamp": _epoch(35)},
        "empty@lid": {"token": {"type": "Buffer", "data": ""}},
        "valid-peer@lid": {"token": {"type": "Buffer", "data": "AAEC"}, "timestamp": str(_epoch(20))},
        "valid-sender@lid": {"token": {"type": "Buffer", "data": ""}, "timestamp": str(_epoch(40)),
                             "senderTimestamp": _epoch(2)},
        "unreadable@lid": {"token": {"type": "Buffer", "data": "AAEC"}, "timestamp": "soon"},
    }
    with dbconn.cursor() as cur:
        for key_id, value in rows.items():
            cur.execute("INSERT INTO whatsapp_keys (company_id, key_type, key_id, value) "
                        "VALUES ('company-001', 'tctoken', %s, %s)", (key_id, json.dumps(value)))
    dbconn.commit()
    backdate(dbconn, 45)
    result = cleanup.cleanup_keys(db, STORE)
    assert result["deleted_by_type"] == {"session": 1, "tctoken": 2}
    assert result["protected_old_keys"]["tctoken"] == 4
    left = {k[2] for k in keys(dbconn) if k[1] == "tctoken"}
    assert left == {"__index", "valid-peer@lid", "valid-sender@lid", "unreadable@lid"}


def _new_account_store(node, dbconn, consume=12, pending=3):
    """company 'acme': Baileys' pre-keys, sessions and identity keys (prekeys.mjs) plus the other key types
    (authgen), all 40 days old."""
    creds, baileys_keys, info = baileys_node.new_account(node, consume, pending)
    _c, other = authgen.generate(1, seed=11, form="base64", mix={
        "session": 10, "sender-key": 5, "sender-key-memory": 3, "device-list": 4, "tctoken": 3, "lid-mapping": 4,
        "app-state-sync-key": 2, "app-state-sync-version": 2})["company-001"]
    assert not set(other) & set(baileys_keys)
    authgen.load_into(dbconn, {"acme": (creds, {**baileys_keys, **other})})
    backdate(dbconn, 40)
    return creds, baileys_keys, other, info


@pytest.mark.compat
def test_new_account_pre_keys_written_by_baileys_survive_cleanup(node, db, dbconn):
    creds, baileys_keys, other, info = _new_account_store(node, dbconn)
    # what prekeys.mjs did with Baileys' own functions
    assert info["uploaded"] == list(range(1, 813))  # INITIAL_PREKEY_COUNT, one getNextPreKeysNode
    assert len(info["consumed"]) == 12 and set(info["consumed"]) < set(info["uploaded"])
    assert info["pending"] == [813, 814, 815]
    assert (creds["firstUnuploadedPreKeyId"], creds["nextPreKeyId"]) == (813, 816)
    assert info["next_upload"][:3] == info["pending"]  # the next upload reads the unuploaded ones back
    unconsumed = {str(i) for i in info["uploaded"] if i not in info["consumed"]} | {str(i) for i in info["pending"]}
    assert {k[1] for k in baileys_keys if k[0] == "pre-key"} == unconsumed
    before = keys(dbconn)

    preview = cleanup.cleanup_keys(db, STORE, confirm_large_delete=True, check_mode=True)
    rules = {r["name"]: r for r in preview["rules"]}
    assert (rules["pre-key"]["kept_old"], rules["pre-key"]["candidates"]) == (803, 0)
    assert keys(dbconn) == before

    done = cleanup.cleanup_keys(db, STORE, confirm_large_delete=True)
    after = keys(dbconn)
    assert {k[2] for k in after if k[1] == "pre-key"} == unconsumed  # not one unconsumed pre-key deleted
    # ... and every stale key of the types Baileys rebuilds is gone
    stale_types = ("session", "sender-key", "sender-key-memory", "device-list")
    assert not [k for k in after if k[1] in stale_types]
    assert done["deleted_by_type"] == {"session": 12 + 10, "sender-key": 5, "sender-key-memory": 3,
                                       "device-list": 4, "tctoken": 2}
    assert done["deleted"] == done["would_delete"] == preview["would_delete"] == len(before - after)
    kept = {(t, i) for _c, t, i in after}
    assert {k for k in baileys_keys if k[0] == "identity-key"} <= kept
    assert {k for k in other if k[0] in ("lid-mapping", "app-state-sync-key", "app-state-sync-version")} <= kept
    assert ("tctoken", "__index") in kept


def test_age_columns(db, dbconn):
    load(dbconn, n=1)
    # sessions: recent but expired; sender-keys: old but expiring in the future
    dbconn.execute("UPDATE whatsapp_keys SET expires_at = now() - interval '1 hour' WHERE key_type = 'session'")
    dbconn.execute("UPDATE whatsapp_keys SET updated_at = now() - interval '60 days', "
                   "expires_at = now() + interval '1 day' WHERE key_type = 'sender-key'")
    dbconn.execute("UPDATE whatsapp_keys SET updated_at = now() - interval '60 days' "
                   "WHERE key_type IN ('device-list', 'lid-mapping')")
    dbconn.commit()
    by_update = cleanup.cleanup_keys(db, STORE, age_column="updated_at", check_mode=True)
    assert by_update["candidates_by_type"] == {"sender-key": 5, "device-list": 4}
    assert by_update["kept_old_by_type"] == {"lid-mapping": 4}
    by_expiry = cleanup.cleanup_keys(db, STORE, age_column="expires_at", check_mode=True)
    assert by_expiry["candidates_by_type"] == {"session": 10}
    auto = cleanup.cleanup_keys(db, STORE, age_column="auto", check_mode=True)
    assert auto["candidates_by_type"] == {"session": 10, "device-list": 4}
    assert auto["candidate_age_buckets"] == {"0-1d": 10, "1-7d": 0, "7-14d": 0, "14-30d": 0, ">30d": 4}
    done = cleanup.cleanup_keys(db, STORE, age_column="auto")
    assert done["deleted_by_type"] == {"session": 10, "device-list": 4}
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
    assert done["batches"] == -(-done["deleted"] // 7) == 7
    batch_lines = [f for s, st, f in log.lines if s == "cleanup_batch"]
    assert [f["deleted"] for f in batch_lines] == [7] * 6 + [2]


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


def test_cli_check_lists_each_rule(db, dbconn, tmp_path):
    load(dbconn)
    backdate(dbconn, 45)
    path = tmp_path / "config.yml"
    with os.fdopen(os.open(str(path), os.O_WRONLY | os.O_CREAT, 0o600), "w") as fh:
        yaml.safe_dump(dict(db, lock_dir=str(tmp_path)), fh)
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(["--config", str(path), "cleanup", "--check", "--confirm-large-delete"], stdout=out, stderr=err)
    assert code == 0, out.getvalue() + err.getvalue()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("baileys-resilience cleanup: would delete %d keys" % (2 * DELETABLE_PER_COMPANY))
    rules = {line.split()[0]: line for line in lines[2:]}
    assert list(rules) == [r.name for r in cleanup.RULES] + ["other"]
    assert "keeps 40 old, would delete 0" in rules["pre-key"] and "never" in rules["pre-key"]
    assert "keeps 0 old, would delete 20" in rules["session"] and "by_age" in rules["session"]
    assert "keeps 8 old" in rules["lid-mapping"] and "keeps 10 old" in rules["app-state"]
    assert len(keys(dbconn)) == 2 * sum(MIX.values())


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
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, check=False)
    data = json.loads(proc.stdout)
    return proc.returncode, data["plays"][0]["tasks"][0]["hosts"]["localhost"]


def test_module_through_ansible(pg, db, dbconn, ansible_env):
    load(dbconn)
    backdate(dbconn, 45)
    args = dict(pg.socket_params(db["login_db"]), batch_size=10, max_delete=40)
    rc, res = _ansible(ansible_env, args)
    assert rc != 0 and res["failed"] is True and res["stopped"] is True
    assert "max_delete=40" in res["msg"] and res["would_delete"] == 2 * DELETABLE_PER_COMPANY
    assert len(keys(dbconn)) == 2 * sum(MIX.values())
    args["max_delete"] = 100
    rc, res = _ansible(ansible_env, args, check=True)
    assert rc == 0 and res["changed"] is True and res["deleted"] == 0
    assert res["would_delete"] == 2 * DELETABLE_PER_COMPANY
    assert {r["name"]: r["kept_old"] for r in res["rules"]}["pre-key"] == 40  # check mode lists every rule
    assert len(keys(dbconn)) == 2 * sum(MIX.values())
    rc, res = _ansible(ansible_env, args)
    assert rc == 0 and res["changed"] is True and res["deleted"] == 2 * DELETABLE_PER_COMPANY
    assert res["batches"] == 5 and res["protected_old_keys"]["pre-key"] == 40
    rc, res = _ansible(ansible_env, args)
    assert rc == 0 and res["changed"] is False and res["deleted"] == 0
