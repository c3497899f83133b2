"""Benchmark data: tests/support/authgen.py's realistic shapes, at benchmark scale.

authgen's ``Gen.company`` recounts every key on every insert (quadratic) and
draws random bytes one at a time; fine for tests, minutes at 200,000 keys.
This subclass keeps authgen's value shapes and key ids and changes only:

* the key mix, scaled from authgen.REFERENCE_MIX to ``keys`` per company;
* the Buffer form, chosen once per stored *value* (a store is written by one
  code version per write), with weights: by default 90% base64 (what a modern
  Baileys store holds), 7% legacy array form, 3% numeric-keyed objects;
* random bytes drawn with ``Random.randbytes`` (fast, still seeded).
"""
from __future__ import annotations

import _paths  # noqa: F401 - sets sys.path for the imports below  # pylint: disable=unused-import

from support import authgen  # noqa: E402

# app-state-sync-version has only five names in Baileys; identity-key stays tiny.
FIXED = {"app-state-sync-version": 5, "identity-key": 3}


def scaled_mix(keys):
    """REFERENCE_MIX scaled to ``keys`` per company (remainder goes to pre-key)."""
    ref = authgen.REFERENCE_MIX
    total = sum(ref.values())
    mix = {}
    for key_type, n in ref.items():
        mix[key_type] = min(FIXED.get(key_type, 10**9), max(1, round(n * keys / total)))
    mix["pre-key"] += keys - sum(mix.values())
    if mix["pre-key"] < 1:
        raise ValueError("need at least %d keys per company" % (sum(mix.values()) - mix["pre-key"] + 1))
    return mix


class BenchGen(authgen.Gen):
    def __init__(self, seed=1, legacy_array=0.07, legacy_numeric=0.03):
        authgen.Gen.__init__(self, seed, "base64")
        self.weights = (1.0 - legacy_array - legacy_numeric, legacy_array, legacy_numeric)
        self._value_form = "base64"

    def _form(self):
        return self._value_form

    def _pick_form(self):
        self._value_form = self.rnd.choices(authgen.FORMS, weights=self.weights)[0]

    def buf(self, n):
        data = self.rnd.randbytes(n)
        form = self._value_form
        if form == "array":
            return {"type": "Buffer", "data": list(data)}
        if form == "numeric":
            return {str(i): b for i, b in enumerate(data)}
        return {"type": "Buffer", "data": authgen.base64.b64encode(data).decode()}

    def company(self, mix):
        keys = {}
        for key_type, n in mix.items():
            i = 0
            count = 0
            while count < n:
                self._pick_form()
                key_id, value = self.key(key_type, i)
                if (key_type, key_id) not in keys:
                    count += 1
                keys[(key_type, key_id)] = value
                i += 1
        self._pick_form()
        return self.creds(mix.get("pre-key", 0) + 1), keys


def generate(n_companies, keys_per_company, seed=1, legacy_array=0.07, legacy_numeric=0.03):
    """``{company_id: (creds, {(key_type, key_id): value})}`` and the mix used."""
    mix = scaled_mix(keys_per_company)
    g = BenchGen(seed, legacy_array, legacy_numeric)
    return {"company-%03d" % (i + 1): g.company(mix) for i in range(n_companies)}, mix
