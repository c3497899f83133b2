"""The pitr scenario's writer: commits key changes continuously and journals every acknowledged one.

    python3 pitr_writer.py JOURNAL CONTROL_DIR COMPANY...

Connection from the libpq environment (PGHOST, PGUSER, PGPASSWORD, PGDATABASE). Every ~40 ms one upsert of a
key of one company (value {"seq": n}); the journal line ({"seq", "company", "key_type", "key_id", "value",
"start", "ack"}, epoch seconds) is written and flushed only after COMMIT returned. Control files in CONTROL_DIR:
``delete`` (a company id: DELETE all its keys, the accident, journaled as op delete_company; the writer stops
writing that company), ``stop`` (exit). Connection errors (the server killed) are retried; nothing unacknowledged
is journaled.
"""
import json
import os
import random
import sys
import time

import psycopg

journal_path, control, companies = sys.argv[1], sys.argv[2], list(sys.argv[3:])
rng = random.Random(15)
seq = 0
conn = None
with open(journal_path, "a", encoding="utf-8") as journal:
    while True:
        if os.path.exists(os.path.join(control, "stop")):
            break
        try:
            if conn is None:
                conn = psycopg.connect(connect_timeout=2)
            victim_file = os.path.join(control, "delete")
            if os.path.exists(victim_file):
                victim = open(victim_file).read().strip()
                start = time.time()
                with conn.cursor() as cur:
                    cur.execute("DELETE FROM whatsapp_keys WHERE company_id = %s", (victim,))
                    deleted = cur.rowcount
                conn.commit()
                ack = time.time()
                seq += 1
                journal.write(json.dumps({"seq": seq, "op": "delete_company", "company": victim, "rows": deleted,
                                          "start": start, "ack": ack}) + "\n")
                journal.flush()
                companies.remove(victim)
                os.unlink(victim_file)
                continue
            company = rng.choice(companies)
            key_id = "w-%d" % rng.randrange(40)
            value = {"seq": seq + 1, "writer": True}
            start = time.time()
            with conn.cursor() as cur:
                cur.execute("INSERT INTO whatsapp_keys (company_id, key_type, key_id, value) VALUES (%s, 'session', "
                            "%s, %s) ON CONFLICT (company_id, key_type, key_id) DO UPDATE SET value = excluded.value, "
                            "updated_at = now()", (company, key_id, json.dumps(value)))
            conn.commit()
            ack = time.time()
            seq += 1
            journal.write(json.dumps({"seq": seq, "op": "upsert", "company": company, "key_type": "session",
                                      "key_id": key_id, "value": value, "start": start, "ack": ack}) + "\n")
            journal.flush()
        except psycopg.Error:
            try:
                if conn is not None:
                    conn.close()
            except psycopg.Error:
                pass
            conn = None
            time.sleep(0.5)
            continue
        time.sleep(0.04)
