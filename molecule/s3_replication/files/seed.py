"""Seed of the molecule `s3_replication` scenario: one company with the reference 1,650-key mix.

    python molecule/s3_replication/files/seed.py OUT.sql

tests/molecule_seed.py (the `backup` scenario's seed: schema, COPY rendering) restricted to company-001,
so the restored database must hold exactly 1 creds row and 1,650 keys.
"""
import json
import os
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "tests"))

import molecule_seed  # noqa: E402

_ALL = molecule_seed.companies


def companies():
    """Only company-001 (tests/authgen.py REFERENCE_MIX, 1,650 keys)."""
    return {cid: state for cid, state in _ALL().items() if cid == "company-001"}


molecule_seed.companies = companies
expected = molecule_seed.expected

if __name__ == "__main__":
    counts = expected()["counts"]
    assert counts == {"auth": 1, "keys": 1650}, counts
    status = molecule_seed.main(sys.argv)
    print(json.dumps(counts))
    sys.exit(status)
