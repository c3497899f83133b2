"""Write the SQL that seeds the emergency_rollback scenario's store (run on the controller by prepare.yml).

One company with the reference mix (tests/authgen.py REFERENCE_MIX, 1,650 keys), the schema of
plugins/module_utils/pgconn.py SCHEMA_SQL, the rows as COPY text; loaded into the pg18 container with psql.

    python3 seed_sql.py <out.sql> <db role>
"""
import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "tests"))
import authgen  # noqa: E402


def schema_sql():
    spec = importlib.util.spec_from_file_location("pgconn", ROOT / "plugins/module_utils/pgconn.py")
    pgconn = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pgconn)
    return pgconn.SCHEMA_SQL.format(auth='"public"."whatsapp_auth"', keys='"public"."whatsapp_keys"')


def copy_text(value):
    return value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def main(out, role):
    companies = authgen.generate(1, seed=11, form="mixed")
    lines = ["\\set ON_ERROR_STOP on", "BEGIN;", "SET ROLE %s;" % role, schema_sql()]
    lines.append("TRUNCATE whatsapp_auth, whatsapp_keys;")
    lines.append("COPY public.whatsapp_auth (company_id, creds) FROM STDIN;")
    for cid, (creds, _keys) in companies.items():
        lines.append("%s\t%s" % (cid, copy_text(json.dumps(creds))))
    lines.append("\\.")
    lines.append("COPY public.whatsapp_keys (company_id, key_type, key_id, value) FROM STDIN;")
    n = 0
    for cid, (_creds, keys) in companies.items():
        for (key_type, key_id), value in keys.items():
            lines.append("\t".join(copy_text(v) for v in (cid, key_type, key_id, json.dumps(value))))
            n += 1
    lines.append("\\.")
    lines.append("COMMIT;")
    Path(out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(json.dumps({"companies": sorted(companies), "keys": n}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
