"""Verify of the backup scenario, part 4: key cleanup and its retention rules (runs last: it deletes keys)."""

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


# the types Baileys rebuilds (docs/key-retention.md); tctoken rows go once expired, never __index
BY_AGE = ("session", "sender-key", "sender-key-memory", "device-list")
EXTRA_SESSIONS = 400


def _deletable(counts):
    """Keys of one company (type -> count, all old) the retention rules let go: the seed's tctoken timestamps
    (authgen: 2025-10) are expired by Baileys' rule, its __index row is kept."""
    return sum(counts.get(t, 0) for t in BY_AGE) + max(counts.get("tctoken", 0) - 1, 0)


def test_threshold_stops_a_large_delete(host):
    assert _total(host) == SEED["counts"]["keys"]
    creds_before = _creds(host)
    # pre-keys, app-state rows, identity keys and lid-mappings are never candidates: the seed alone has fewer
    # than max_delete=1000 deletable keys, so 400 extra sessions take this run over it (removed afterwards)
    psql(host, "INSERT INTO whatsapp_keys (company_id, key_type, key_id, value) SELECT '%s', 'session', "
               "'extra-' || g, '{}' FROM generate_series(1, %d) g" % (BIG, EXTRA_SESSIONS))
    psql(host, "UPDATE whatsapp_keys SET updated_at = now() - interval '40 days'")
    result, _command = run_like_cron(host, CLEANUP_CRON, "baileys-resilience cleanup")
    log = host.file("/var/log/baileys-resilience/cleanup.log").content_string
    assert result.rc == 1, log
    candidates = EXTRA_SESSIONS + sum(_deletable(c) for c in SEED["by_company"].values())
    assert candidates > 1000
    assert "refusing to delete %d keys: more than max_delete=1000; nothing was deleted" % candidates in log, log
    finish = [r for r in log_records(host, "cleanup.log") if r["step"] == "finish"]
    assert finish[-1]["exit_code"] == 1
    assert _total(host) == SEED["counts"]["keys"] + EXTRA_SESSIONS
    assert _creds(host) == creds_before
    psql(host, "DELETE FROM whatsapp_keys WHERE key_type = 'session' AND key_id LIKE 'extra-%'")
    assert _total(host) == SEED["counts"]["keys"]


def test_cleanup_deletes_old_keys_but_never_the_protected_ones(host):
    creds_before = _creds(host)
    everything = _keys(host)
    # only these are old: all pre-keys, the app-state rows, 100 sessions of the big company, and every key of
    # the small company
    psql(host, "UPDATE whatsapp_keys SET updated_at = now()")
    psql(host, "UPDATE whatsapp_keys SET updated_at = now() - interval '40 days' WHERE key_type IN "
               "('pre-key', 'app-state-sync-key', 'app-state-sync-version') OR company_id = '%s' OR "
               "(company_id, key_type, key_id) IN (SELECT company_id, key_type, key_id FROM whatsapp_keys "
               "WHERE company_id = '%s' AND key_type = 'session' ORDER BY key_id LIMIT %d)"
               % (SMALL, BIG, SESSIONS_BACKDATED))
    old = _keys(host, "updated_at < now() - interval '30 days'")
    doomed = {k for k in old if k[1] in BY_AGE or (k[1] == "tctoken" and k[2] != "__index")}
    protected = old - doomed  # every pre-key, app-state row and lid-mapping, whatever its age
    assert {k[1] for k in protected} == {"pre-key", "app-state-sync-key", "app-state-sync-version", "lid-mapping"}
    assert len(doomed) == SESSIONS_BACKDATED + _deletable(SEED["by_company"][SMALL]) and len(doomed) <= 1000

    result, _command = run_like_cron(host, CLEANUP_CRON, "baileys-resilience cleanup")
    log = host.file("/var/log/baileys-resilience/cleanup.log").content_string
    assert result.rc == 0, log
    assert "baileys-resilience cleanup: deleted %d keys" % len(doomed) in log, log
    remaining = _keys(host)
    assert remaining == everything - doomed
    assert protected <= remaining
    assert _creds(host) == creds_before  # all creds, unchanged
    # what is left of the small company: its pre-keys (all of them), app-state rows and lid-mappings
    assert {k for k in remaining if k[0] == SMALL} == {k for k in protected if k[0] == SMALL}
    for company in (SMALL, BIG):
        pre_keys = {k[2] for k in remaining if k[0] == company and k[1] == "pre-key"}
        assert pre_keys == {str(i) for i in range(1, SEED["by_company"][company]["pre-key"] + 1)}
    sessions = [k for k in remaining if k[0] == BIG and k[1] == "session"]
    assert len(sessions) == SEED["by_company"][BIG]["session"] - SESSIONS_BACKDATED
