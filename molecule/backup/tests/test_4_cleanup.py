"""Verify of the backup scenario, part 4: key cleanup and its protections (runs last: it deletes keys)."""

from scenario import APP, CLEANUP_CRON, SEED, log_records, psql, run_like_cron

testinfra_hosts = [APP]

BIG = "company-001"
SMALL = "small-001"
SESSIONS_BACKDATED = 100


def _keys(host, where="TRUE"):
    return {tuple(r) for r in psql(host, "SELECT company_id, key_type, key_id FROM whatsapp_keys WHERE %s" % where)}


def _total(host):
    return int(psql(host, "SELECT count(*) FROM whatsapp_keys")[0][0])


def _creds(host):
    return {r[0]: r[1] for r in psql(host, "SELECT company_id, md5(creds::text) FROM whatsapp_auth")}


def test_threshold_stops_a_large_delete(host):
    assert _total(host) == SEED["counts"]["keys"]
    creds_before = _creds(host)
    psql(host, "UPDATE whatsapp_keys SET updated_at = now() - interval '40 days'")
    result, _command = run_like_cron(host, CLEANUP_CRON, "baileys-resilience cleanup")
    log = host.file("/var/log/baileys-resilience/cleanup.log").content_string
    assert result.rc == 1, log
    # every key is old; creds, app-state rows and each company's two live pre-keys are not candidates
    candidates = SEED["counts"]["keys"] - sum(
        c["app-state-sync-key"] + c["app-state-sync-version"] + 2 for c in SEED["by_company"].values())
    assert candidates > 1000
    assert "refusing to delete %d keys: more than max_delete=1000; nothing was deleted" % candidates in log, log
    finish = [r for r in log_records(host, "cleanup.log") if r["step"] == "finish"]
    assert finish[-1]["exit_code"] == 1
    assert _total(host) == SEED["counts"]["keys"]
    assert _creds(host) == creds_before


def test_cleanup_deletes_old_keys_but_never_the_protected_ones(host):
    creds_before = _creds(host)
    everything = _keys(host)
    # only these are old: all pre-keys (with the signed pre-key and the highest one), the app-state rows,
    # 100 sessions of the big company, and every key of the small company
    psql(host, "UPDATE whatsapp_keys SET updated_at = now()")
    psql(host, "UPDATE whatsapp_keys SET updated_at = now() - interval '40 days' WHERE key_type IN "
               "('pre-key', 'app-state-sync-key', 'app-state-sync-version') OR company_id = '%s' OR "
               "(company_id, key_type, key_id) IN (SELECT company_id, key_type, key_id FROM whatsapp_keys "
               "WHERE company_id = '%s' AND key_type = 'session' ORDER BY key_id LIMIT %d)"
               % (SMALL, BIG, SESSIONS_BACKDATED))
    old = _keys(host, "updated_at < now() - interval '30 days'")
    protected = {k for k in old if k[1] in ("app-state-sync-key", "app-state-sync-version")}
    for company, p in SEED["pointers"].items():
        assert (company, "pre-key", p["signed"]) in old and (company, "pre-key", p["highest"]) in old
        protected |= {(company, "pre-key", p["signed"]), (company, "pre-key", p["highest"])}
    doomed = old - protected
    assert len(doomed) == 810 + SESSIONS_BACKDATED + 34 and len(doomed) <= 1000

    result, _command = run_like_cron(host, CLEANUP_CRON, "baileys-resilience cleanup")
    log = host.file("/var/log/baileys-resilience/cleanup.log").content_string
    assert result.rc == 0, log
    assert "baileys-resilience cleanup: deleted %d keys" % len(doomed) in log, log
    remaining = _keys(host)
    assert remaining == everything - doomed
    assert protected <= remaining
    assert _creds(host) == creds_before  # all creds, unchanged
    # what is left of the small company: its app-state rows and its two live pre-keys
    p = SEED["pointers"][SMALL]
    assert {k for k in remaining if k[0] == SMALL} == {k for k in protected if k[0] == SMALL}
    assert {k[2] for k in remaining if k[0] == SMALL and k[1] == "pre-key"} == {p["signed"], p["highest"]}
    assert {k[2] for k in remaining if k[0] == BIG and k[1] == "pre-key"} == {"1", "812"}
    sessions = [k for k in remaining if k[0] == BIG and k[1] == "session"]
    assert len(sessions) == SEED["by_company"][BIG]["session"] - SESSIONS_BACKDATED
