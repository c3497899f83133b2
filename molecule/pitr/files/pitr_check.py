"""The pitr scenario's checker: the store (or a recovered instance) against the baseline and the writer's journal.

    python3 pitr_check.py baseline OUT.json                         all key rows now (before the writer starts)
    python3 pitr_check.py victim BASELINE JOURNAL COMPANY TARGET_EPOCH OUT.json
        the company's rows in production equal the baseline plus every journaled write acknowledged by TARGET
        (a write that straddles TARGET, started before and acknowledged after, may be either way)
    python3 pitr_check.py latest BASELINE JOURNAL VICTIM TARGET_EPOCH OUT.json
        a recovered instance (libpq environment): the victim as at TARGET (the import), every other company equal
        to the baseline plus the journal up to the newest write it holds (no gap); reports the writes acknowledged
        after it (lost) and the recovery point (seconds from the last recovered write's ack to the last ack)

Connection from the libpq environment. Prints and writes a JSON result with ok and the differences.
"""
import base64
import json
import sys

import psycopg


def _buffer_bytes(value):
    """The bytes of a legacy Buffer form ({"type": "Buffer", "data": [...]} or {"0": .., "1": ..}), else None
    (the rule of plugins/module_utils/baileys_codec.py)."""
    if value.get("type") == "Buffer" and len(value) == 2 and isinstance(value.get("data"), list):
        items = value["data"]
    elif "0" in value:
        try:
            items = [value[str(i)] for i in range(len(value))]
        except KeyError:
            return None
    else:
        return None
    # an exact int (a bool is not a byte), as Baileys' Buffer form is read by the core's codec
    if not all(type(i) is int and 0 <= i <= 255 for i in items):  # pylint: disable=unidiomatic-typecheck
        return None
    return bytes(items)


def canonical(value):
    """Every Buffer in Baileys' own base64 form: how auth_export writes the files auth_import reads (a PITR import
    goes through them), so a legacy array form in the store comes back as the same Buffer in base64."""
    if isinstance(value, dict):
        raw = _buffer_bytes(value)
        if raw is not None:
            return {"type": "Buffer", "data": base64.b64encode(raw).decode("ascii")}
        return {k: canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return [canonical(v) for v in value]
    return value


def rows(companies=None):
    with psycopg.connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT company_id, key_type, key_id, value::text FROM whatsapp_keys")
        out = {}
        for cid, kt, kid, value in cur.fetchall():
            if companies is None or cid in companies:
                out.setdefault(cid, {})["%s/%s" % (kt, kid)] = json.loads(value)
        return out


def read_journal(path):
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def apply(state, entry):
    if entry["op"] == "delete_company":
        state[entry["company"]] = {}
    else:
        state.setdefault(entry["company"], {})["%s/%s" % (entry["key_type"], entry["key_id"])] = entry["value"]


def replay(baseline, entries):
    state = {cid: dict(keys) for cid, keys in baseline.items()}
    for entry in entries:
        apply(state, entry)
    return state


def diff(expected, actual):
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    wrong = sorted(k for k in set(expected) & set(actual) if canonical(expected[k]) != canonical(actual[k]))
    return {"missing": len(missing), "extra": len(extra), "wrong": len(wrong),
            "examples": (missing[:3] + extra[:3] + wrong[:3])}


def company_at(baseline, journal, company, target):
    """Candidate expected states of a company at target: without and with the straddling write(s)."""
    sure = [e for e in journal if e["ack"] <= target]
    straddle = [e for e in journal if e["start"] <= target < e["ack"]]
    base = replay(baseline, sure).get(company, {})
    candidates = [base]
    if straddle:
        candidates.append(replay({company: base}, [e for e in straddle if e["company"] == company]).get(company, {}))
    return candidates, len(straddle)


def main(argv):
    mode = argv[1]
    if mode == "baseline":
        result = {"rows": rows()}
        out = argv[2]
    elif mode == "victim":
        baseline = json.load(open(argv[2]))["rows"]
        journal, company, target, out = read_journal(argv[3]), argv[4], float(argv[5]), argv[6]
        candidates, straddling = company_at(baseline, journal, company, target)
        actual = rows([company]).get(company, {})
        diffs = [diff(c, actual) for c in candidates]
        best = min(diffs, key=lambda d: d["missing"] + d["extra"] + d["wrong"])
        result = {"company": company, "rows": len(actual), "expected_rows": len(candidates[0]),
                  "straddling": straddling, "diff": best, "ok": best["missing"] + best["extra"] + best["wrong"] == 0,
                  "journal_writes_before_target": sum(1 for e in journal
                                                      if e["ack"] <= target and e["company"] == company)}
    elif mode == "latest":
        baseline = json.load(open(argv[2]))["rows"]
        journal, victim, target, out = read_journal(argv[3]), argv[4], float(argv[5]), argv[6]
        actual = rows()
        # the newest journaled write the recovered instance holds
        recovered_seq = 0
        for e in journal:
            key = "%s/%s" % (e.get("key_type"), e.get("key_id"))
            if e["op"] == "upsert" and actual.get(e["company"], {}).get(key) == e["value"]:
                recovered_seq = max(recovered_seq, e["seq"])
        upto = [e for e in journal if e["seq"] <= recovered_seq]
        expected = replay(baseline, upto)
        others = {}
        for cid in sorted(set(expected) | set(actual)):
            if cid == victim:
                continue
            d = diff(expected.get(cid, {}), actual.get(cid, {}))
            if d["missing"] or d["extra"] or d["wrong"]:
                others[cid] = d
        candidates, _s = company_at(baseline, journal, victim, target)
        victim_diff = min((diff(c, actual.get(victim, {})) for c in candidates),
                          key=lambda d: d["missing"] + d["extra"] + d["wrong"])
        last = journal[-1]
        at = next((e for e in journal if e["seq"] == recovered_seq), None)
        lost = [e for e in journal if e["seq"] > recovered_seq]
        result = {"recovered_seq": recovered_seq, "journal_last_seq": last["seq"], "lost_acknowledged": len(lost),
                  "recovery_point_seconds": round(last["ack"] - at["ack"], 3) if at else None,
                  "others_differing": others, "victim_diff": victim_diff,
                  "ok": not others and victim_diff["missing"] + victim_diff["extra"] + victim_diff["wrong"] == 0}
    else:
        raise SystemExit("unknown mode %s" % mode)
    with open(out, "w") as fh:
        json.dump(result, fh, indent=1, sort_keys=True)
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
