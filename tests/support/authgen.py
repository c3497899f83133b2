"""Generate realistic Baileys auth states (creds + signal keys) for tests, demo and benchmarks.

Shapes follow Baileys 7's SignalDataTypeMap and initAuthCreds.  Buffers are
written in the base64 form, the legacy array form or as numeric-keyed
objects, as the stores of the reference system hold them.
"""
from __future__ import annotations

import base64
import json
import random

# 1,650 keys per company, the mix of the reference production system.
REFERENCE_MIX = {
    "pre-key": 812,
    "session": 402,
    "sender-key": 160,
    "sender-key-memory": 48,
    "app-state-sync-key": 12,
    "app-state-sync-version": 5,
    "lid-mapping": 120,
    "device-list": 60,
    "tctoken": 28,
    "identity-key": 3,
}
assert sum(REFERENCE_MIX.values()) == 1650

FORMS = ("base64", "array", "numeric")


class Gen:
    def __init__(self, seed=0, form="mixed"):
        self.rnd = random.Random(seed)
        self.form = form

    def _form(self):
        return self.rnd.choice(FORMS) if self.form == "mixed" else self.form

    def buf(self, n):
        data = bytes(self.rnd.getrandbits(8) for _byte in range(n))
        form = self._form()
        if form == "array":
            return {"type": "Buffer", "data": list(data)}
        if form == "numeric":
            return {str(i): b for i, b in enumerate(data)}
        return {"type": "Buffer", "data": base64.b64encode(data).decode()}

    def keypair(self):
        return {"private": self.buf(32), "public": self.buf(32)}

    def phone(self):
        return "55%011d" % self.rnd.randrange(10**10, 10**11)

    def lid(self):
        return "%015d" % self.rnd.randrange(10**14, 10**15)

    def creds(self, next_pre_key_id):
        me = self.phone()
        return {
            "noiseKey": self.keypair(),
            "pairingEphemeralKeyPair": self.keypair(),
            "signedIdentityKey": self.keypair(),
            "signedPreKey": {"keyPair": self.keypair(), "signature": self.buf(64), "keyId": 1},
            "registrationId": self.rnd.randrange(1, 16380),
            "advSecretKey": base64.b64encode(bytes(self.rnd.getrandbits(8) for _byte in range(32))).decode(),
            "processedHistoryMessages": [
                {"key": {"remoteJid": me + "@s.whatsapp.net", "fromMe": True, "id": "3EB0%012X" % i},
                 "messageTimestamp": 1760000000 + i} for i in range(3)
            ],
            "nextPreKeyId": next_pre_key_id,
            "firstUnuploadedPreKeyId": next_pre_key_id,
            "accountSyncCounter": 1,
            "accountSettings": {"unarchiveChats": False},
            "registered": True,
            "pairingCode": "ABCD1234",
            "lastPropHash": "2Vsq1e",
            "routingInfo": self.buf(24),
            "me": {"id": "%s:12@s.whatsapp.net" % me, "lid": "%s:12@lid" % self.lid(), "name": "Acme Support"},
            "account": {"details": self.buf(80), "accountSignatureKey": self.buf(32),
                        "accountSignature": self.buf(64), "deviceSignature": self.buf(64)},
            "signalIdentities": [{"identifier": {"name": "%s:12@s.whatsapp.net" % me, "deviceId": 0},
                                  "identifierKey": self.buf(33)}],
            "platform": "android",
            "myAppStateKeyId": "AAAAAB7V",
            "lastAccountSyncTimestamp": 1760000000,
            "additionalData": {"note": "unicode ✓ \"quoted\" <>|?"},
        }

    def key(self, key_type, i):
        r = self.rnd
        if key_type == "pre-key":
            return str(i + 1), self.keypair()
        if key_type == "session":
            jid = self.lid() if r.random() < 0.5 else self.phone()
            suffix = "_1" if r.random() < 0.5 else ""
            return "%s%s.%d" % (jid, suffix, r.randrange(0, 30)), self.buf(r.randrange(400, 1400))
        if key_type == "sender-key":
            group = "1203630%011d@g.us" % r.randrange(10**10)
            return "%s::%s::%d" % (group, self.lid() + "@lid", r.randrange(0, 40)), self.buf(r.randrange(100, 600))
        if key_type == "sender-key-memory":
            group = "1203630%011d@g.us" % r.randrange(10**10)
            return group, {"%s:%d@s.whatsapp.net" % (self.phone(), d): True for d in range(r.randrange(1, 6))}
        if key_type == "app-state-sync-key":
            key_id = base64.b64encode(bytes(r.getrandbits(8) for _byte in range(6))).decode()
            return key_id, {"keyData": self.buf(32), "fingerprint": {"rawId": r.randrange(10**9), "currentIndex": 3,
                                                                     "deviceIndexes": [0, 1, 3]},
                            "timestamp": str(1760000000000 + i)}
        if key_type == "app-state-sync-version":
            name = ("critical_block", "critical_unblock_low", "regular", "regular_high", "regular_low")[i % 5]
            return name, {"version": r.randrange(1, 900), "hash": self.buf(128),
                          "indexValueMap": {base64.b64encode(bytes(r.getrandbits(8) for _byte in range(32))).decode():
                                            {"valueMac": self.buf(32)} for _entry in range(4)}}
        if key_type == "lid-mapping":
            if i % 2:
                return "%s_reverse" % self.lid(), self.phone()
            return self.phone(), self.lid()
        if key_type == "device-list":
            return self.phone(), [str(d) for d in range(r.randrange(1, 5))]
        if key_type == "tctoken":
            if i == 0:
                return "__index", {"token": self.buf(16), "timestamp": "1760000000"}
            return self.lid() + "@lid", {"token": self.buf(24), "timestamp": str(1760000000 + i),
                                         "senderTimestamp": 1760000000 + i}
        if key_type == "identity-key":
            return "%s.%d" % (self.phone(), i), self.buf(33)
        raise ValueError(key_type)

    def company(self, mix=None):
        mix = mix or REFERENCE_MIX
        keys = {}
        for key_type, n in mix.items():
            i = 0
            while sum(1 for k in keys if k[0] == key_type) < n:
                key_id, value = self.key(key_type, i)
                keys[(key_type, key_id)] = value
                i += 1
        return self.creds(mix.get("pre-key", 0) + 1), keys


def load_into(conn, companies, store_schema="public", auth="whatsapp_auth", keys="whatsapp_keys"):
    """Bulk-load ``{company_id: (creds, keys)}`` with COPY (psycopg 3 connection)."""
    with conn.cursor() as cur:
        with cur.copy('COPY "%s"."%s" (company_id, creds) FROM STDIN' % (store_schema, auth)) as cp:
            for cid, (creds, _k) in companies.items():
                cp.write_row((cid, json.dumps(creds)))
        with cur.copy('COPY "%s"."%s" (company_id, key_type, key_id, value) FROM STDIN' % (store_schema, keys)) as cp:
            for cid, (_c, kv) in companies.items():
                for (key_type, key_id), value in kv.items():
                    cp.write_row((cid, key_type, key_id, json.dumps(value)))
    conn.commit()


def generate(n_companies=1, seed=1, form="mixed", mix=None, prefix="company-"):
    g = Gen(seed, form)
    return {"%s%03d" % (prefix, i + 1): g.company(mix) for i in range(n_companies)}
