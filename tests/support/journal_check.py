"""Check a writer journal against the final auth state: nothing lost, nothing resurrected, nothing wrong.

The service stand-in (tests/standin/server.mjs, ``WRITER=on``) appends one JSON line per write the store
acknowledged::

    {"seq": 17, "t": <ms epoch>, "pid": 4242, "mode": "files"|"postgres", "company": "c1",
     "op": "set"|"del", "type": "pre-key", "id": "9000003", "value": <BufferJSON.replacer JSON or null>}

(creds changes: ``"type": "creds"``, ``"id"`` the creds field, ``"value"`` its new value).  Replaying the
journal (the last op per (company, type, id) wins, creds per field) gives what the store must hold; the final
state is read from PostgreSQL (``--pg``), a useMultiFileAuthState directory tree (``--dir``) or a JSON-lines dump
(``--store-jsonl``) and every journaled key is classified:

* lost         the journal's last op set it, the store does not have it
* resurrected  the journal's last op deleted it, the store has it
* wrong        the store has it with another value (compared as parsed JSON, Buffers in any stored form)

With ``--rpo-window T0,T1`` (ms epoch) a discrepancy whose last journal op falls in [T0, T1] is counted under
``rpo_window`` instead: a write acknowledged between the last backup and the outage, inside the recovery point.

Exit status: 0 all main counts are 0, 1 some is not, 2 bad input (journal, store or options).

Usage::

    python3 tests/support/journal_check.py JOURNAL --pg 'host=127.0.0.1 port=5432 dbname=whatsapp user=baileys'
    python3 tests/support/journal_check.py JOURNAL --dir /srv/whatsapp/sessions --company-dir 'session-{company_id}'
    python3 tests/support/journal_check.py JOURNAL --store-jsonl dump.jsonl --rpo-window 1760000000000,1760000090000

Python 3 only, no Ansible import: the Buffer and file-name rules come from the collection's
plugins/module_utils/baileys_codec.py, loaded by path.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.machinery
import importlib.util
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
MODULE_UTILS = os.path.join(os.path.dirname(os.path.dirname(HERE)), "plugins", "module_utils")
CODEC_PATH = os.path.join(MODULE_UTILS, "baileys_codec.py")
EXAMPLES = 10
KINDS = ("lost", "resurrected", "wrong")


def _load_codec():
    if os.path.exists(CODEC_PATH):
        # module_utils by path as a private package, so that baileys_codec's relative imports resolve
        package = "_journal_check_module_utils"
        if package not in sys.modules:
            module = importlib.util.module_from_spec(importlib.machinery.ModuleSpec(package, None, is_package=True))
            module.__path__ = [MODULE_UTILS]
            sys.modules[package] = module
        return importlib.import_module(package + ".baileys_codec")
    from ansible_collections.baileys.resilience.plugins.module_utils import baileys_codec  # pragma: no cover

    return baileys_codec  # pragma: no cover


codec = _load_codec()


class InputError(ValueError):
    """Bad input: the journal, the store or an option (exit status 2)."""


class _Unreadable:
    """A store entry that exists but does not parse."""

    def __init__(self, reason):
        self.reason = reason

    def __repr__(self):
        return "<unreadable: %s>" % self.reason


# --------------------------------------------------------------------------- journal


class Journal:
    """The replayed journal: ``final[(company, type, id)] = last entry`` (creds: type "creds", id the field)."""

    def __init__(self, path):
        self.path = path
        self.ops = 0
        self.final = {}
        self.by_kind = {}
        self.duplicate_seq = 0
        self.torn_tail = False
        self.first_t = None
        self.last_t = None
        self.pids = set()


_REQUIRED = ("seq", "t", "company", "op", "type", "id")


def _entry(obj, where):
    if not isinstance(obj, dict):
        raise InputError("%s: not a JSON object" % where)
    missing = [k for k in _REQUIRED if k not in obj]
    if missing:
        raise InputError("%s: missing %s" % (where, ", ".join(missing)))
    # pylint: disable-next=unidiomatic-typecheck  # exactly int: JSON true/false (bools, an int subclass) are no seq
    if type(obj["seq"]) is not int:
        raise InputError("%s: seq %r is not an integer" % (where, obj["seq"]))
    if type(obj["t"]) not in (int, float):
        raise InputError("%s: t %r is not a number (ms since the epoch)" % (where, obj["t"]))
    if obj["op"] not in ("set", "del"):
        raise InputError("%s: op %r is neither 'set' nor 'del'" % (where, obj["op"]))
    for field in ("company", "type", "id"):
        if not isinstance(obj[field], str) or not obj[field]:
            raise InputError("%s: %s %r is not a non-empty string" % (where, field, obj[field]))
    if obj["type"] != "creds" and obj["type"] not in codec.KEY_TYPES:
        raise InputError("%s: unknown key type %r" % (where, obj["type"]))
    if obj["op"] == "set" and "value" not in obj:
        raise InputError("%s: a set without a value" % where)
    return obj


def read_journal(path):
    """Replay the journal at ``path``; raises :class:`InputError` when it is not a writer journal."""
    journal = Journal(path)
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise InputError("cannot read the journal %s: %s" % (path, exc.strerror or exc))
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    elif lines:
        # no newline at the end: the writer died while appending; that op was never acknowledged
        lines.pop()
        journal.torn_tail = True
    seen = set()
    for n, raw in enumerate(lines, 1):
        where = "%s line %d" % (path, n)
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except ValueError as exc:
            raise InputError("%s: not JSON (%s): %r" % (where, exc, raw[:80]))
        entry = _entry(obj, where)
        journal.ops += 1
        if entry["seq"] in seen:
            journal.duplicate_seq += 1
        seen.add(entry["seq"])
        journal.pids.add(entry.get("pid"))
        journal.first_t = entry["t"] if journal.first_t is None else min(journal.first_t, entry["t"])
        journal.last_t = entry["t"] if journal.last_t is None else max(journal.last_t, entry["t"])
        kind = "creds" if entry["type"] == "creds" else "%s %s" % (entry["op"], entry["type"])
        journal.by_kind[kind] = journal.by_kind.get(kind, 0) + 1
        # file order is acknowledgement order: the later line wins
        journal.final[(entry["company"], entry["type"], entry["id"])] = entry
    return journal


# --------------------------------------------------------------------------- stores


class StoreView:
    """The final state: ``keys[(company, type, id)] = value``, ``creds[company] = dict``."""

    def __init__(self, label, keys=None, creds=None):
        self.label = label
        self.keys = keys if keys is not None else {}
        self.creds = creds if creds is not None else {}


def _parse(text, where):
    try:
        return json.loads(text)
    except ValueError as exc:
        return _Unreadable("%s: %s" % (where, exc))


_LIBPQ = {"login_host": "host", "login_port": "port", "login_user": "user", "login_password": "password",
          "login_db": "dbname", "login_unix_socket": "host", "ssl_mode": "sslmode", "ca_cert": "sslrootcert"}


def libpq_kwargs(params):
    """libpq keywords from a dict of libpq keywords or of the collection's login_* options."""
    out = {}
    for key, value in (params or {}).items():
        if value is None or value == "":
            continue
        if key == "connect_params":
            out.update({str(k): v for k, v in value.items() if v is not None})
        elif key == "login_unix_socket":
            continue
        else:
            out[_LIBPQ.get(key, key)] = value
    if (params or {}).get("login_unix_socket"):
        out["host"] = params["login_unix_socket"]
    return out


def load_pg(params, wanted, schema="public", auth_table="whatsapp_auth", keys_table="whatsapp_keys"):
    """Read the journaled keys and the creds of their companies from PostgreSQL.

    ``params`` is a libpq connection string ("" for libpq's environment) or a dict (libpq keywords or login_*).
    """
    try:
        import psycopg
        from psycopg import sql
    except ImportError as exc:
        raise InputError("--pg needs the Python package psycopg (version 3): %s" % exc)
    try:
        if isinstance(params, dict):
            conn = psycopg.connect(**libpq_kwargs(params))
        else:
            conn = psycopg.connect(params or "")
    except psycopg.Error as exc:
        raise InputError("cannot connect to PostgreSQL: %s" % str(exc).strip())
    view = StoreView("postgres %s.%s/%s" % (schema, auth_table, keys_table))
    key_rows = [k for k in wanted if k[1] != "creds"]
    companies = sorted({k[0] for k in wanted})
    try:
        with conn.cursor() as cur:
            cur.execute(sql.SQL(
                "SELECT k.company_id, k.key_type, k.key_id, k.value::text FROM {} k "
                "JOIN unnest(%s::text[], %s::text[], %s::text[]) AS w(c, t, i) "
                "ON k.company_id = w.c AND k.key_type = w.t AND k.key_id = w.i").format(
                    sql.Identifier(schema, keys_table)),
                ([k[0] for k in key_rows], [k[1] for k in key_rows], [k[2] for k in key_rows]))
            for company, key_type, key_id, text in cur:
                view.keys[(company, key_type, key_id)] = _parse(text, "%s %s/%s" % (company, key_type, key_id))
            cur.execute(sql.SQL("SELECT company_id, creds::text FROM {} WHERE company_id = ANY(%s)").format(
                sql.Identifier(schema, auth_table)), (companies,))
            for company, text in cur:
                view.creds[company] = _parse(text, "%s creds" % company)
    except psycopg.Error as exc:
        raise InputError("cannot read the store: %s" % str(exc).strip())
    finally:
        conn.close()
    return view


def _read_json_file(path):
    try:
        with open(path, "rb") as fh:
            return _parse(fh.read(), path)
    except OSError as exc:
        return _Unreadable("%s: %s" % (path, exc.strerror or exc))


def load_dir(root, wanted, company_dir="{company_id}"):
    """Read the journaled keys from a tree of useMultiFileAuthState directories (``root/<company_dir>``)."""
    if company_dir.count("{company_id}") != 1 or "/" in company_dir:
        raise InputError("--company-dir %r must contain {company_id} exactly once and no '/'" % company_dir)
    if not os.path.isdir(root):
        raise InputError("--dir %s is not a directory" % root)
    view = StoreView("directory %s/%s" % (root, company_dir))
    by_company = {}
    for key in wanted:
        by_company.setdefault(key[0], []).append(key)
    for company, keys in sorted(by_company.items()):
        directory = os.path.join(root, company_dir.replace("{company_id}", company))
        try:
            names = set(os.listdir(directory))
        except FileNotFoundError:
            continue  # no directory: the company has nothing
        except OSError as exc:
            raise InputError("cannot list %s: %s" % (directory, exc.strerror or exc))

        if codec.CREDS_FILE in names:
            view.creds[company] = _read_json_file(os.path.join(directory, codec.CREDS_FILE))
        for key in keys:
            if key[1] == "creds":
                continue
            name = codec.key_file_name(key[1], key[2])
            if name in names:
                view.keys[key] = _read_json_file(os.path.join(directory, name))
    return view


def _copy_text_unescape(line):
    """Undo the backslash escaping of COPY ... TO in text format."""
    out, i = [], 0
    escapes = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\"}
    while i < len(line):
        ch = line[i]
        if ch == "\\" and i + 1 < len(line):
            out.append(escapes.get(line[i + 1], line[i + 1]))
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def load_jsonl(path, escaping="auto"):
    """Read a JSON-lines dump: {"company_id","key_type","key_id","value"} and {"company_id","creds":{...}} rows.

    ``escaping``: ``none`` (plain JSON lines, e.g. psql -Atc "SELECT json_build_object(...)"), ``copy-text``
    (written by COPY ... TO in text format, which doubles every backslash) or ``auto`` (plain when the line
    parses, else COPY text).
    """
    if escaping not in ("auto", "none", "copy-text"):
        raise InputError("escaping must be auto, none or copy-text, not %r" % escaping)
    view = StoreView("json lines %s" % path)
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError("cannot read %s: %s" % (path, getattr(exc, "strerror", None) or exc))
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = "%s line %d" % (path, n)
        text = _copy_text_unescape(line) if escaping == "copy-text" else line
        try:
            row = json.loads(text)
        except ValueError as exc:
            if escaping != "auto":
                raise InputError("%s: not JSON (%s)" % (where, exc))
            try:
                row = json.loads(_copy_text_unescape(line))
            except ValueError:
                raise InputError("%s: not JSON (%s)" % (where, exc))
        if not isinstance(row, dict) or not isinstance(row.get("company_id"), str):
            raise InputError("%s: a row needs a string company_id" % where)
        if "creds" in row:
            creds = row["creds"]
            if isinstance(creds, str):
                creds = _parse(creds, "%s creds" % where)
            view.creds[row["company_id"]] = creds
        elif {"key_type", "key_id", "value"} <= set(row):
            view.keys[(row["company_id"], str(row["key_type"]), str(row["key_id"]))] = row["value"]
        else:
            raise InputError("%s: neither a key row (company_id, key_type, key_id, value) nor a creds row" % where)
    return view


# --------------------------------------------------------------------------- comparison


def _canonical(value):
    """Buffers in one form (base64), whatever form the store holds them in."""
    try:
        return codec.normalise(value)[0]
    except codec.CodecError:
        return value


def same(a, b):
    """Structural JSON equality: numbers by value, but a bool is not a number."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _short(value, limit=200):
    text = repr(value) if isinstance(value, _Unreadable) else json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[:limit] + "..."


def parse_window(text):
    """``T0,T1`` (ms epoch) -> (T0, T1)."""
    try:
        t0, t1 = (float(x) for x in str(text).split(","))
    except ValueError:
        raise InputError("--rpo-window %r must be T0,T1 in ms since the epoch" % (text,))
    if t0 > t1:
        raise InputError("--rpo-window %r: T0 is after T1" % (text,))
    return (int(t0) if t0.is_integer() else t0, int(t1) if t1.is_integer() else t1)


def check(journal, store, rpo_window=None, examples=EXAMPLES):
    """Compare; returns the summary dict (main counts, rpo_window counts, examples)."""
    main = {k: [] for k in KINDS}
    window = {k: [] for k in KINDS}
    for key in sorted(journal.final, key=lambda k: journal.final[k]["seq"]):
        entry = journal.final[key]
        company, key_type, key_id = key
        if key_type == "creds":
            creds = store.creds.get(company)
            if isinstance(creds, _Unreadable):
                present, found = True, creds
            else:
                present = isinstance(creds, dict) and key_id in creds
                found = creds.get(key_id) if present else None
        else:
            present = key in store.keys
            found = store.keys.get(key)
        kind = None
        if entry["op"] == "set":
            if not present:
                kind = "lost"
            elif isinstance(found, _Unreadable) or not same(_canonical(found), _canonical(entry["value"])):
                kind = "wrong"
        elif present:
            kind = "resurrected"
        if kind is None:
            continue
        item = {"company": company, "type": key_type, "id": key_id, "op": entry["op"], "seq": entry["seq"],
                "t": entry["t"], "pid": entry.get("pid"), "mode": entry.get("mode")}
        if kind == "wrong":
            item["expected"] = _short(entry.get("value"))
            item["found"] = _short(found)
        in_window = rpo_window is not None and rpo_window[0] <= entry["t"] <= rpo_window[1]
        (window if in_window else main)[kind].append(item)
    summary = {
        "journal": journal.path,
        "store": store.label,
        "ops": journal.ops,
        "keys_checked": len(journal.final),
        "lost": len(main["lost"]),
        "resurrected": len(main["resurrected"]),
        "wrong": len(main["wrong"]),
        "rpo_window": None,
        "examples": {k: main[k][:examples] for k in KINDS},
        "by_kind": dict(sorted(journal.by_kind.items())),
        "duplicate_seq": journal.duplicate_seq,
        "torn_tail": journal.torn_tail,
        "processes": len(journal.pids),
        "first_t": journal.first_t,
        "last_t": journal.last_t,
    }
    if rpo_window is not None:
        summary["rpo_window"] = {"from": rpo_window[0], "to": rpo_window[1],
                                 **{k: len(window[k]) for k in KINDS},
                                 "examples": {k: window[k][:examples] for k in KINDS}}
    summary["ok"] = not any(summary[k] for k in KINDS)
    return summary


def human(summary):
    lines = ["journal check: ops %d, keys %d, lost %d, resurrected %d, wrong %d" % (
        summary["ops"], summary["keys_checked"], summary["lost"], summary["resurrected"], summary["wrong"])]
    if summary.get("rpo_window") is not None:
        w = summary["rpo_window"]
        lines.append("rpo window: lost %d, resurrected %d, wrong %d" % (w["lost"], w["resurrected"], w["wrong"]))
    return "\n".join(lines)


def run(journal_path, pg=None, directory=None, company_dir="{company_id}", store_jsonl=None, rpo_window=None,
        schema="public", auth_table="whatsapp_auth", keys_table="whatsapp_keys", escaping="auto",
        examples=EXAMPLES):
    """Read the journal and one store, compare; returns the summary.  Raises :class:`InputError`."""
    if sum(x is not None for x in (pg, directory, store_jsonl)) != 1:
        raise InputError("give exactly one store: --pg, --dir or --store-jsonl")
    if isinstance(rpo_window, str):
        rpo_window = parse_window(rpo_window)
    journal = read_journal(journal_path)
    wanted = set(journal.final)
    if pg is not None:
        store = load_pg(pg, wanted, schema, auth_table, keys_table)
    elif directory is not None:
        store = load_dir(directory, wanted, company_dir)
    else:
        store = load_jsonl(store_jsonl, escaping)
    return check(journal, store, rpo_window, examples)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="journal_check.py",
        description="Compare a writer journal with the final auth state: lost, resurrected and wrong must be 0.")
    parser.add_argument("journal", help="the writer's journal (JSON lines)")
    store = parser.add_mutually_exclusive_group(required=True)
    store.add_argument("--pg", metavar="CONNINFO",
                       help="libpq connection string ('' for libpq's PG* environment and ~/.pgpass)")
    store.add_argument("--dir", metavar="SESSIONS", help="the sessions directory (useMultiFileAuthState layout)")
    store.add_argument("--store-jsonl", metavar="FILE", help="a JSON-lines dump of the store")
    parser.add_argument("--company-dir", default="{company_id}", help="with --dir: the company directory's name, "
                        "a template with {company_id} (default %(default)s)")
    parser.add_argument("--schema", default="public")
    parser.add_argument("--auth-table", default="whatsapp_auth")
    parser.add_argument("--keys-table", default="whatsapp_keys")
    parser.add_argument("--jsonl-escaping", choices=("auto", "none", "copy-text"), default="auto",
                        help="with --store-jsonl: copy-text for a dump written by COPY ... TO in text format")
    parser.add_argument("--rpo-window", metavar="T0,T1",
                        help="ms epoch: discrepancies whose last op falls in [T0,T1] are counted apart")
    parser.add_argument("--examples", type=int, default=EXAMPLES, help="examples listed per count")
    parser.add_argument("--output", metavar="FILE", help="also write the JSON summary to FILE")
    args = parser.parse_args(argv)
    try:
        summary = run(args.journal, pg=args.pg, directory=args.dir, company_dir=args.company_dir,
                      store_jsonl=args.store_jsonl, rpo_window=args.rpo_window, schema=args.schema,
                      auth_table=args.auth_table, keys_table=args.keys_table, escaping=args.jsonl_escaping,
                      examples=args.examples)
    except (InputError, codec.CodecError) as exc:
        print("journal check: error: %s" % exc, file=sys.stderr)
        return 2
    text = json.dumps(summary, indent=2, sort_keys=True)
    if args.output:
        try:
            with open(args.output, "w") as fh:
                fh.write(text + "\n")
        except OSError as exc:
            print("journal check: error: cannot write %s: %s" % (args.output, exc.strerror or exc), file=sys.stderr)
            return 2
    print(text)
    print(human(summary), file=sys.stderr)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
