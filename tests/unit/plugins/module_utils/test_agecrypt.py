"""agecrypt: recipients, fingerprints, fail-closed settings, identities, streamed files; the CLI config's
``s3.encryption`` section."""
from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
import textwrap

import pytest

from ansible_collections.baileys.resilience.plugins.module_utils import agecrypt, cliconfig, errors

pyrage = pytest.importorskip("pyrage")


def keypair():
    ident = pyrage.x25519.Identity.generate()
    return str(ident), str(ident.to_public())


def test_fingerprint_is_short_and_stable():
    _secret, public = keypair()
    fp = agecrypt.fingerprint(public)
    assert fp == agecrypt.fingerprint(" %s\n" % public)
    assert fp.startswith("age:") and len(fp) == 4 + 16
    assert fp[4:] == hashlib.sha256(public.encode()).hexdigest()[:16]


@pytest.mark.parametrize("text, match", [
    ("age1", "is not an age X25519 public key"),
    ("age1qqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqq", "is not an age X25519 public key"),
    ("ssh-ed25519 AAAA", "is not an age X25519 public key"),
    ("", "is not an age X25519 public key"),
    (42, "must be a string"),
])
def test_bad_recipients_are_refused_by_position(text, match):
    _s, good = keypair()
    with pytest.raises(agecrypt.AgeError, match="recipient 2 .*" if text != 42 else "recipient 2") as err:
        agecrypt.Encryption([good, text])
    assert match.split()[0] in str(err.value) or match in str(err.value)


def test_a_corrupted_checksum_is_refused():
    _s, good = keypair()
    bad = good[:10] + ("q" if good[10] != "q" else "p") + good[11:]
    with pytest.raises(agecrypt.AgeError, match="recipient 1 .* does not parse"):
        agecrypt.Encryption([bad])


def test_a_secret_key_as_recipient_is_refused_without_echoing_it():
    secret, _p = keypair()
    with pytest.raises(agecrypt.AgeError, match="SECRET key") as err:
        agecrypt.Encryption.from_options({"recipients": [secret]})
    assert secret not in str(err.value) and secret[16:30] not in str(err.value)


@pytest.mark.parametrize("options, match", [
    ({"recipents": ["x"]}, "unknown option.*encryption.recipents"),
    ({"recipients": [], "required": True}, "no recipient is configured"),
    ({"required": True}, "no recipient is configured"),
    ({"recipients": ["a"], "required": "yes"}, "required must be true or false"),
    ({"encrypt_local": True, "recipients": []}, "encrypt_local"),
    ("age1...", "must be a mapping"),
])
def test_settings_fail_closed(options, match):
    with pytest.raises(agecrypt.AgeError, match=match):
        agecrypt.Encryption.from_options(options)


def test_settings_off_and_on():
    assert not agecrypt.Encryption.from_options(None).enabled
    assert not agecrypt.Encryption.from_options({}).enabled
    _s1, p1 = keypair()
    _s2, p2 = keypair()
    enc = agecrypt.Encryption.from_options({"recipients": [p1, p2], "required": True})
    assert enc.enabled and enc.fingerprints == sorted([agecrypt.fingerprint(p1), agecrypt.fingerprint(p2)])
    with pytest.raises(agecrypt.AgeError, match="twice"):
        agecrypt.Encryption([p1, p1])


def test_identities_from_file_and_content(tmp_path):
    secret, public = keypair()
    path = tmp_path / "key.txt"
    path.write_text("# created: now\n# public key: %s\n%s\n" % (public, secret))
    ids = agecrypt.load_identities(identity_file=str(path))
    assert [fp for _i, fp in ids] == [agecrypt.fingerprint(public)]
    assert agecrypt.load_identities(identity=secret)[0][1] == agecrypt.fingerprint(public)
    assert agecrypt.load_identities() is None
    with pytest.raises(agecrypt.AgeError, match="not both"):
        agecrypt.load_identities(str(path), secret)
    with pytest.raises(agecrypt.AgeError, match="holds a line that is not an age identity"):
        agecrypt.load_identities(identity=public)
    with pytest.raises(agecrypt.AgeError, match="does not parse") as err:
        agecrypt.load_identities(identity=secret[:-3] + "QQQ")
    assert secret[:-3] not in str(err.value)
    with pytest.raises(agecrypt.AgeError, match="cannot read identity_file"):
        agecrypt.load_identities(identity_file=str(tmp_path / "missing"))


def test_file_round_trip_and_wrong_identity_leaves_nothing(tmp_path):
    secret, public = keypair()
    enc = agecrypt.Encryption([public])
    src = tmp_path / "plain"
    data = b"PGDMP" + os.urandom(300_000)
    src.write_bytes(data)
    agecrypt.encrypt_file(str(src), str(tmp_path / "ct"), enc)
    ct = (tmp_path / "ct").read_bytes()
    assert ct.startswith(agecrypt.HEADER) and b"PGDMP" not in ct
    assert stat.S_IMODE(os.stat(tmp_path / "ct").st_mode) == 0o600
    sha, size = agecrypt.decrypt_file(str(tmp_path / "ct"), str(tmp_path / "out"),
                                      agecrypt.load_identities(identity=secret))
    assert (tmp_path / "out").read_bytes() == data and size == len(data)
    assert sha == hashlib.sha256(data).hexdigest()
    stranger = agecrypt.load_identities(identity=keypair()[0])
    with pytest.raises(agecrypt.WrongIdentity, match=agecrypt.fingerprint(public)):
        agecrypt.decrypt_file(str(tmp_path / "ct"), str(tmp_path / "out2"), stranger, enc.fingerprints)
    assert sorted(os.listdir(tmp_path)) == ["ct", "out", "plain"]
    with pytest.raises(agecrypt.AgeError, match="not age ciphertext"):
        agecrypt.decrypt_file(str(src), str(tmp_path / "out3"), stranger)


def test_truncated_ciphertext_fails_and_leaves_nothing(tmp_path):
    secret, public = keypair()
    data = os.urandom(200_000)
    ct = agecrypt.encrypt_bytes(data, agecrypt.Encryption([public]))
    (tmp_path / "ct").write_bytes(ct[:-1000])
    with pytest.raises(agecrypt.AgeError):
        agecrypt.decrypt_file(str(tmp_path / "ct"), str(tmp_path / "out"), agecrypt.load_identities(identity=secret))
    assert os.listdir(tmp_path) == ["ct"]


def test_stream_decryptor_and_encryptor(tmp_path):
    secret, public = keypair()
    enc = agecrypt.Encryption([public])
    data = os.urandom(3_000_000)
    with open(tmp_path / "ct", "wb") as out:
        e = agecrypt.StreamEncryptor(out, enc)
        for i in range(0, len(data), 100_000):
            e.write(data[i:i + 100_000])
        assert e.finish() == (hashlib.sha256(data).hexdigest(), len(data))
    ct = (tmp_path / "ct").read_bytes()
    with open(tmp_path / "pt", "wb") as out:
        d = agecrypt.StreamDecryptor(out, agecrypt.load_identities(identity=secret))
        for i in range(0, len(ct), 65_536):
            d.feed(ct[i:i + 65_536])
        assert d.finish() == (hashlib.sha256(data).hexdigest(), len(data))
    assert (tmp_path / "pt").read_bytes() == data
    with open(tmp_path / "pt2", "wb") as out:
        d = agecrypt.StreamDecryptor(out, agecrypt.load_identities(identity=keypair()[0]), enc.fingerprints)
        with pytest.raises(agecrypt.WrongIdentity, match=enc.fingerprints[0]):
            for i in range(0, len(ct), 65_536):
                d.feed(ct[i:i + 65_536])
            d.finish()


def test_errors_derive_from_the_common_parent():
    assert issubclass(agecrypt.AgeError, errors.BaileysResilienceError)
    assert issubclass(agecrypt.WrongIdentity, agecrypt.AgeError)


def test_memory_stays_flat_for_a_large_file(tmp_path):
    """200 MB encrypted and decrypted in a child process: its peak RSS grows by far less than the file."""
    src = tmp_path / "big"
    with open(src, "wb") as fh:
        block = os.urandom(1 << 20)
        for _block in range(200):
            fh.write(block)
    script = textwrap.dedent("""
        import resource, sys
        from ansible_collections.baileys.resilience.plugins.module_utils import agecrypt
        import pyrage
        ident = pyrage.x25519.Identity.generate()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        enc = agecrypt.Encryption([str(ident.to_public())])
        agecrypt.encrypt_file(sys.argv[1], sys.argv[1] + ".age", enc)
        agecrypt.decrypt_file(sys.argv[1] + ".age", sys.argv[1] + ".out", agecrypt.parse_identities(str(ident)))
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
    """)
    out = subprocess.run([sys.executable, "-c", script, str(src)], check=True, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    grown_kib = int(out.stdout.strip().splitlines()[-1])
    assert grown_kib < 40 * 1024, "peak RSS grew by %d KiB for a 200 MiB file" % grown_kib
    assert os.path.getsize(str(src) + ".out") == 200 << 20


def test_config_section_is_checked_at_load(tmp_path):
    _s, public = keypair()

    def load(body):
        path = tmp_path / "config.yml"
        path.write_text(body)
        path.chmod(0o600)
        return cliconfig.load_config(str(path))

    cfg = load("s3:\n  targets: [{bucket: b}]\n  encryption:\n    recipients: [%s]\n    required: true\n" % public)
    assert cfg["s3"]["encryption"]["recipients"] == [public]
    with pytest.raises(cliconfig.ConfigError, match="unknown option.*s3.encryption.recipient"):
        load("s3:\n  encryption:\n    recipient: [%s]\n" % public)
    with pytest.raises(cliconfig.ConfigError, match="recipient 1 .*not an age X25519"):
        load("s3:\n  encryption:\n    recipients: [age1short]\n")
    with pytest.raises(cliconfig.ConfigError, match="no recipient is configured"):
        load("s3:\n  encryption:\n    required: true\n")


def test_encrypt_local_needs_recipients():
    _s, public = keypair()
    enc = agecrypt.Encryption.from_options({"recipients": [public], "encrypt_local": True})
    assert enc.encrypt_local and enc.enabled
    assert not agecrypt.Encryption.from_options({"recipients": [public]}).encrypt_local
    for options in ({"encrypt_local": True}, {"recipients": [], "encrypt_local": True, "required": False}):
        with pytest.raises(agecrypt.AgeError, match="encrypt_local is true but no recipient is configured"):
            agecrypt.Encryption.from_options(options)
    with pytest.raises(agecrypt.AgeError, match="encrypt_local must be true or false"):
        agecrypt.Encryption.from_options({"recipients": [public], "encrypt_local": "yes"})


def test_encrypt_file_hashed_hashes_both_sides_and_leaves_nothing_on_failure(tmp_path):
    secret, public = keypair()
    data = b"PGDMP" + os.urandom(700_000)
    (tmp_path / "plain").write_bytes(data)
    (tmp_path / "ct.partial").write_bytes(b"stale")
    info = agecrypt.encrypt_file_hashed(str(tmp_path / "plain"), str(tmp_path / "ct.partial"),
                                        agecrypt.Encryption([public]))
    ct = (tmp_path / "ct.partial").read_bytes()
    assert ct.startswith(agecrypt.HEADER) and stat.S_IMODE(os.stat(tmp_path / "ct.partial").st_mode) == 0o600
    assert info == {"plain_sha256": hashlib.sha256(data).hexdigest(), "plain_size": len(data),
                    "sha256": hashlib.sha256(ct).hexdigest(), "size": len(ct)}
    assert pyrage.decrypt(ct, [pyrage.x25519.Identity.from_str(secret)]) == data
    with pytest.raises(FileNotFoundError):
        agecrypt.encrypt_file_hashed(str(tmp_path / "missing"), str(tmp_path / "x.partial"),
                                     agecrypt.Encryption([public]))
    assert not (tmp_path / "x.partial").exists()


def test_config_encrypt_local_is_checked_at_load(tmp_path):
    _s, public = keypair()
    path = tmp_path / "config.yml"
    path.write_text("s3:\n  encryption:\n    encrypt_local: true\n")
    path.chmod(0o600)
    with pytest.raises(cliconfig.ConfigError, match="encrypt_local is true but no recipient"):
        cliconfig.load_config(str(path))
    path.write_text("s3:\n  targets: [{bucket: b}]\n  encryption:\n    recipients: [%s]\n    encrypt_local: true\n"
                    % public)
    assert cliconfig.load_config(str(path))["s3"]["encryption"]["encrypt_local"] is True
