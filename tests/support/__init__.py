"""Helpers shared by the tests, the molecule verifiers, the benchmarks and the demo.

Importable as ``support`` with ``tests/`` on ``sys.path``: pytest adds it (pyproject.toml
``pythonpath``), molecule's verifier gets it through PYTHONPATH (.config/molecule/config.yml).

* :mod:`support.authgen`       realistic auth states (creds and keys) and loading them into PostgreSQL
* :mod:`support.pgserver`      a throwaway PostgreSQL server
* :mod:`support.s3fixtures`    moto S3 servers, a fault-injecting proxy, fake backups
* :mod:`support.baileys_node`  Node.js running the pinned Baileys of tests/compat
* :mod:`support.journal_check` the stand-in writer's journal checker (lost / resurrected / wrong); also a script
* :mod:`support.molecule_seed` the seed SQL of the molecule scenarios; also a script
* :mod:`support.molecule_cron` cron helpers of the molecule verifiers (testinfra)
"""
import os

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(TESTS)
"""The checkout (the collection's root)."""
COLLECTIONS = os.path.join(ROOT, ".build", "collections")
"""Where the checkout is linked as ansible_collections/baileys/resilience (``make collection``)."""
