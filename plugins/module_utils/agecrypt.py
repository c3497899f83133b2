# -*- coding: utf-8 -*-
# Copyright: baileys.resilience contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""age public-key encryption (https://age-encryption.org/v1) of backups, through ``pyrage``.

Recipients (``age1...`` X25519 public keys) are parsed and checked here, each named by a short
fingerprint (:func:`fingerprint`) that manifests and object metadata record; identities
(``AGE-SECRET-KEY-1...``) come from a file or from their content and are never echoed.  Files are
encrypted and decrypted as streams (``pyrage.encrypt_io``/``decrypt_io``: the Rust side copies
through 8 KiB buffers, so memory stays flat whatever the size); a stream of chunks pushed by an S3
download is decrypted by :class:`StreamDecryptor` (a pipe and one thread).  pyrage is the only
engine (never a cipher of our own): docs/encryption.md says why pyrage and not the ``age`` binary.

No Ansible, boto3 or backup import: backupseal.py (backups) and the S3 rooms use it.  Without
pyrage the room still imports; :func:`require_pyrage` says what to install.

Guarantees
----------
* :class:`Encryption` refuses an unknown option name, a recipient that does not parse (naming it
  by position and its first characters, never a secret key), a secret key given as a recipient,
  and ``required: true`` or ``encrypt_local: true`` with no recipient, before anything is encrypted
  or uploaded.
* :func:`encrypt_file` reads the plaintext once, hashing it as it encrypts, and writes
  ``<dest>.partial`` (0600) then renames it, only when the plaintext hashed as the caller expected;
  :func:`decrypt_file` and :class:`StreamDecryptor` leave no output file when the identity does not
  match or the ciphertext is damaged, and say which recipient fingerprints the object was made for.
"""
from __future__ import absolute_import, division, print_function

import hashlib
import io
import os
import re
import threading

from . import errors

__metaclass__ = type

try:
    import pyrage
    from pyrage import x25519

    HAS_PYRAGE = True
    PYRAGE_IMPORT_ERROR = None
except ImportError as exc:  # pragma: no cover - exercised on hosts without pyrage
    pyrage = x25519 = None
    HAS_PYRAGE = False
    PYRAGE_IMPORT_ERROR = exc

HEADER = b"age-encryption.org/v1\n"
FORMAT = "age-v1"  # the ``encryption.format`` of a manifest
OPTIONS = {"recipients": list, "required": bool, "encrypt_local": bool}
FINGERPRINT_PREFIX = "age:"
_RECIPIENT_RE = re.compile(r"^age1[02-9ac-hj-np-z]{58}$")
_SECRET_PREFIX = "AGE-SECRET-KEY-1"
_BUF = 1024 * 1024


class AgeError(errors.BaileysResilienceError, RuntimeError):
    """Encryption settings, keys or ciphertext an operator must fix; never carries a secret."""


class WrongIdentity(AgeError):
    """The identity given is not one the object was encrypted to."""


class PlaintextMismatch(AgeError):
    """What :func:`encrypt_file` read does not hash to what the caller expected: nothing was kept."""

    def __init__(self, src, sha256, size):
        self.sha256, self.size = sha256, size
        AgeError.__init__(self, "%s read as %d bytes with sha256 %s, not what was expected: not encrypted"
                          % (src, size, sha256))


def require_pyrage():
    if not HAS_PYRAGE:
        raise AgeError("backup encryption needs the Python package 'pyrage' on the host that runs this: "
                       "'pip install pyrage' (%s)" % PYRAGE_IMPORT_ERROR)


# --------------------------------------------------------------------------- recipients and identities


def fingerprint(recipient):
    """``age:<16 hex>``: the first 64 bits of the sha256 of the recipient string (``age1...``)."""
    return FINGERPRINT_PREFIX + hashlib.sha256(str(recipient).strip().encode("ascii")).hexdigest()[:16]


def _shown(text):
    return "%r" % (text[:12] + "..." if len(text) > 12 else text)


def parse_recipient(text, index=0):
    """A pyrage X25519 recipient from ``age1...`` text; :class:`AgeError` naming the bad one."""
    require_pyrage()
    where = "recipient %d" % (index + 1)
    if not isinstance(text, str):
        raise AgeError("%s must be a string (an age1... public key), got %s" % (where, type(text).__name__))
    value = text.strip()
    if value.upper().startswith(_SECRET_PREFIX):
        raise AgeError("%s is an age SECRET key (AGE-SECRET-KEY-1...), not a public key: keep identities off the "
                       "backup host and give their public key (age-keygen -y)" % where)
    if not _RECIPIENT_RE.match(value):
        raise AgeError("%s %s is not an age X25519 public key (62 characters, 'age1' then bech32)"
                       % (where, _shown(value)))
    try:
        return x25519.Recipient.from_str(value)
    except Exception as exc:  # noqa: BLE001 - pyrage.RecipientError, ValueError: a bad checksum, a short key
        raise AgeError("%s %s does not parse: %s" % (where, _shown(value), exc))


class Encryption:
    """Validated encryption settings: ``recipients`` (texts), ``required``, ``encrypt_local``.

    :attr:`enabled` is true when there is at least one recipient; ``encrypt_local`` (the backup job
    encrypts the local dump too, backupseal.encrypt_local_dump) needs one.  :meth:`from_options` is the
    only way in from user settings (the CLI config's ``s3.encryption``, the modules' options).
    """

    def __init__(self, recipients=(), required=False, encrypt_local=False):
        self.texts = []
        self.recipients = []
        for i, text in enumerate(recipients or ()):
            self.recipients.append(parse_recipient(text, i))
            self.texts.append(text.strip())
        if len(set(self.texts)) != len(self.texts):
            raise AgeError("the same recipient is listed twice")
        self.required = bool(required)
        self.encrypt_local = bool(encrypt_local)
        if self.required and not self.recipients:
            raise AgeError("encryption is required but no recipient is configured: refusing to copy plaintext")
        if self.encrypt_local and not self.recipients:
            raise AgeError("encrypt_local is true but no recipient is configured: a local dump cannot be encrypted "
                           "to nobody (set recipients, or encrypt_local: false)")
        self.fingerprints = sorted(fingerprint(t) for t in self.texts)

    @property
    def enabled(self):
        return bool(self.recipients)

    @classmethod
    def from_options(cls, options, where="encryption"):
        """From a dict of options; ``None`` or ``{}`` is no encryption.  Unknown names are refused."""
        if options is None:
            return cls()
        if not isinstance(options, dict):
            raise AgeError("%s must be a mapping with %s" % (where, ", ".join(sorted(OPTIONS))))
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise AgeError("unknown option(s) %s in %s (known: %s): nothing was encrypted or uploaded"
                           % (", ".join("%s.%s" % (where, u) for u in unknown), where, ", ".join(sorted(OPTIONS))))
        recipients = options.get("recipients") or []
        if isinstance(recipients, str):
            recipients = [recipients]
        if not isinstance(recipients, (list, tuple)):
            raise AgeError("%s.recipients must be a list of age1... public keys" % where)
        for key in ("required", "encrypt_local"):
            if options.get(key) is not None and not isinstance(options[key], bool):
                raise AgeError("%s.%s must be true or false" % (where, key))
        return cls(recipients, options.get("required", False), options.get("encrypt_local", False))


def parse_identities(text, source="identity"):
    """``[(pyrage identity, fingerprint of its public key)]`` from identity text (comments allowed)."""
    require_pyrage()
    found = []
    for line in (text or "").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not line.upper().startswith(_SECRET_PREFIX):
            raise AgeError("%s holds a line that is not an age identity (AGE-SECRET-KEY-1...)" % source)
        try:
            ident = x25519.Identity.from_str(line)
        except Exception:  # noqa: BLE001 - pyrage.IdentityError; its text may quote the key
            raise AgeError("%s holds an age identity that does not parse" % source)
        found.append((ident, fingerprint(str(ident.to_public()))))
    if not found:
        raise AgeError("%s holds no age identity (AGE-SECRET-KEY-1...)" % source)
    return found


def load_identities(identity_file=None, identity=None):
    """Identities from a file or from content (exactly one of them), or ``None`` when neither is given."""
    if identity_file and identity:
        raise AgeError("give identity_file or identity, not both")
    if identity:
        return parse_identities(identity, "the identity given")
    if not identity_file:
        return None
    try:
        with open(identity_file, "r", encoding="ascii") as fh:
            text = fh.read(1 << 20)
    except (OSError, UnicodeDecodeError) as exc:
        raise AgeError("cannot read identity_file %s: %s" % (identity_file, getattr(exc, "strerror", None) or exc))
    return parse_identities(text, "identity_file %s" % identity_file)


def identity_objects(identities):
    return [i for i, _fp in identities]


def wrong_identity(identities, made_for, what):
    """The :class:`WrongIdentity` for an object encrypted to ``made_for`` (fingerprints) that
    ``identities`` cannot open."""
    return WrongIdentity("%s cannot be decrypted with the identity given (%s): it was encrypted to %s"
                         % (what, ", ".join(fp for _i, fp in identities),
                            ", ".join(made_for) if made_for else "recipients not recorded"))


# --------------------------------------------------------------------------- headers


def is_age(data):
    return bytes(data[:len(HEADER)]) == HEADER


def file_is_age(path):
    with open(path, "rb") as fh:
        return is_age(fh.read(len(HEADER)))


# --------------------------------------------------------------------------- bytes and files


def encrypt_bytes(data, encryption):
    require_pyrage()
    out = pyrage.encrypt(bytes(data), encryption.recipients)
    if not is_age(out):  # fail closed: never hand on anything but age ciphertext
        raise AgeError("encryption produced no age header")
    return out


def decrypt_bytes(data, identities, made_for=(), what="object"):
    require_pyrage()
    if not is_age(data):
        raise AgeError("%s is not age ciphertext (no %r header)" % (what, HEADER.strip().decode()))
    try:
        return pyrage.decrypt(bytes(data), identity_objects(identities))
    except pyrage.DecryptError as exc:
        if "No matching keys" in str(exc):
            raise wrong_identity(identities, made_for, what)
        raise AgeError("%s does not decrypt: %s" % (what, exc))


def _open_partial(partial):
    try:
        os.unlink(partial)
    except FileNotFoundError:
        pass
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    os.fchmod(fd, 0o600)
    return fd


def _unlink_quiet(path):
    try:
        os.unlink(path)
    except OSError:
        pass


class _HashingRaw(io.RawIOBase):
    """A raw file that hashes the bytes read from ``reader`` or written to ``fd``.  Under a 1 MiB
    ``io.Buffered*``, pyrage's 8 KiB reads and writes stay in C and this Python code runs once per MiB
    (a Python call per 8 KiB would hand the GIL to the upload threads thousands of times a file)."""

    def __init__(self, reader=None, fd=None):
        io.RawIOBase.__init__(self)
        self._reader, self._fd = reader, fd
        self.digest = hashlib.sha256()
        self.size = 0

    def readable(self):
        return self._reader is not None

    def writable(self):
        return self._fd is not None

    def readinto(self, b):
        n = self._reader.readinto(b)
        if n:
            self.digest.update(memoryview(b)[:n])
            self.size += n
        return n

    def write(self, b):
        n = os.write(self._fd, b)
        self.digest.update(memoryview(b)[:n])
        self.size += n
        return n


def _encrypt_to_fd(reader, fd, encryption):
    """Encrypt all of ``reader`` into ``fd``: ``{"plain_sha256", "plain_size", "sha256", "size"}``."""
    plain, cipher = _HashingRaw(reader=reader), _HashingRaw(fd=fd)
    with io.BufferedReader(plain, _BUF) as r, io.BufferedWriter(cipher, _BUF) as w:
        pyrage.encrypt_io(r, w, encryption.recipients)
    return {"plain_sha256": plain.digest.hexdigest(), "plain_size": plain.size,
            "sha256": cipher.digest.hexdigest(), "size": cipher.size}


def _encrypt_to_partial(src, partial, encryption, expect=None):
    """Encrypt ``src`` (a path, or a binary file open for reading) into the new file ``partial`` (0600, a stale
    one removed first, fsynced, its age header checked), hashing the plaintext as it is read and the ciphertext
    as it is written; with ``expect`` (``(sha256, size)``) a plaintext that read otherwise raises
    :class:`PlaintextMismatch`.  On any failure ``partial`` is removed.  Returns the hashes (:func:`encrypt_file`)."""
    require_pyrage()
    what = src if isinstance(src, str) else getattr(src, "name", "plaintext")
    reader = open(src, "rb", buffering=0) if isinstance(src, str) else src
    try:
        fd = _open_partial(partial)
        try:
            info = _encrypt_to_fd(reader, fd, encryption)
            if expect is not None and (info["plain_sha256"], info["plain_size"]) != tuple(expect):
                raise PlaintextMismatch(what, info["plain_sha256"], info["plain_size"])
            os.fsync(fd)
            os.close(fd)
            fd = None
            if not file_is_age(partial):
                raise AgeError("encryption of %s produced no age header" % what)
        except BaseException as exc:
            if fd is not None:
                os.close(fd)
            _unlink_quiet(partial)
            if (HAS_PYRAGE and isinstance(exc, pyrage.EncryptError)) or isinstance(exc, ValueError):
                raise AgeError("cannot encrypt %s: %s" % (what, exc))
            raise
    finally:
        if reader is not src:
            reader.close()
    return info


def encrypt_file(src, dest, encryption, expect=None):
    """Encrypt ``src`` (a path, or a binary file open for reading) to ``dest`` in one pass: the plaintext is
    hashed as it is read, the ciphertext as it is written (``dest.partial``, 0600, fsynced, renamed).

    Returns ``{"plain_sha256", "plain_size", "sha256", "size"}`` (the last two: the ciphertext's).  With
    ``expect`` (``(sha256, size)``) a plaintext that read otherwise raises :class:`PlaintextMismatch` and
    nothing is kept.  On any failure the partial file is removed.  Memory stays flat (1 MiB blocks).
    """
    partial = dest + ".partial"
    info = _encrypt_to_partial(src, partial, encryption, expect)
    try:
        os.rename(partial, dest)
    except BaseException:
        _unlink_quiet(partial)
        raise
    return info


class _HashingWriter:
    """A binary writer that hashes what goes through it (the plaintext of a decryption)."""

    def __init__(self, fh):
        self.fh = fh
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data):
        self.digest.update(data)
        self.size += len(data)
        return self.fh.write(data)

    def flush(self):
        self.fh.flush()


def decrypt_file(src, dest, identities, made_for=(), what=None):
    """Decrypt ``src`` into ``dest`` (through ``dest.partial``, 0600); returns ``(plaintext sha256, size)``."""
    require_pyrage()
    what = what or src
    if not file_is_age(src):
        raise AgeError("%s is not age ciphertext" % what)
    partial = dest + ".partial"
    fd = _open_partial(partial)
    try:
        with open(src, "rb", buffering=_BUF) as reader, os.fdopen(fd, "wb", buffering=_BUF) as out:
            fd = None
            writer = _HashingWriter(out)
            _decrypt_io(reader, writer, identities, made_for, what)
            out.flush()
            os.fsync(out.fileno())
        os.rename(partial, dest)
        return writer.digest.hexdigest(), writer.size
    except BaseException:
        if fd is not None:
            os.close(fd)
        _unlink_quiet(partial)
        raise


def _decrypt_io(reader, writer, identities, made_for, what):
    try:
        pyrage.decrypt_io(reader, writer, identity_objects(identities))
    except pyrage.DecryptError as exc:
        if "No matching keys" in str(exc):
            raise wrong_identity(identities, made_for, what)
        raise AgeError("%s does not decrypt: %s" % (what, exc))
    except OSError as exc:  # pyrage's read/write errors (a damaged or truncated stream among them)
        raise AgeError("%s does not decrypt: %s" % (what, exc))


class _PipeWorker:
    """What both stream classes share: the pipe's write end (``_in``) and the pyrage thread (``_thread``)."""

    def _close_and_join(self):
        if not self._in.closed:
            try:
                self._in.close()
            except BrokenPipeError:
                pass
        self._thread.join()

    def finish(self):  # pragma: no cover - each stream defines it
        raise NotImplementedError

    def abort(self):
        try:
            self.finish()
        except Exception:  # noqa: BLE001 - the caller is already failing
            pass


class StreamDecryptor(_PipeWorker):
    """Decrypt ciphertext pushed in chunks (:meth:`feed`) into a binary writer, on one thread.

    :meth:`finish` waits for the thread and raises what it raised (:class:`WrongIdentity`,
    :class:`AgeError`); :attr:`sha256` and :attr:`size` are then the plaintext's.  A feed after
    the decryption failed (wrong identity: it fails on the header) raises at once, so a large
    download stops early.  Memory: the pipe and two 1 MiB buffers.
    """

    def __init__(self, writer, identities, made_for=(), what="object"):
        require_pyrage()
        self.writer = _HashingWriter(writer)
        self.error = None
        rfd, wfd = os.pipe()
        self._in = os.fdopen(wfd, "wb", buffering=0)
        self._reader = os.fdopen(rfd, "rb", buffering=_BUF)
        self._thread = threading.Thread(target=self._run, args=(identities, made_for, what), daemon=True)
        self._thread.start()

    def _run(self, identities, made_for, what):
        try:
            _decrypt_io(self._reader, self.writer, identities, made_for, what)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller by finish()
            self.error = exc
        finally:
            self._reader.close()

    def feed(self, chunk):
        view = memoryview(chunk)
        try:
            while view:
                view = view[self._in.write(view):]
        except (BrokenPipeError, ValueError):
            self.finish()
            raise AgeError("decryption stopped early")

    def finish(self):
        self._close_and_join()
        if self.error is not None:
            raise self.error
        return self.writer.digest.hexdigest(), self.writer.size


class StreamEncryptor(_PipeWorker):
    """Encrypt plaintext pushed in chunks (:meth:`feed`, or :meth:`write` as a file) into a binary
    writer, on one thread; :meth:`finish` returns the plaintext's ``(sha256, size)``."""

    def __init__(self, writer, encryption):
        require_pyrage()
        self.digest = hashlib.sha256()
        self.size = 0
        self.error = None
        rfd, wfd = os.pipe()
        self._in = os.fdopen(wfd, "wb", buffering=0)
        self._reader = os.fdopen(rfd, "rb", buffering=_BUF)
        self._thread = threading.Thread(target=self._run, args=(writer, encryption), daemon=True)
        self._thread.start()

    def _run(self, writer, encryption):
        try:
            pyrage.encrypt_io(self._reader, writer, encryption.recipients)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller by finish()
            self.error = exc
        finally:
            self._reader.close()

    def write(self, data):
        self.digest.update(data)
        self.size += len(data)
        view = memoryview(data)
        try:
            while view:
                view = view[self._in.write(view):]
        except (BrokenPipeError, ValueError):
            self.finish()
            raise AgeError("encryption stopped early")
        return len(data)

    def flush(self):
        pass

    def finish(self):
        self._close_and_join()
        if self.error is not None:
            raise AgeError("encryption failed: %s" % self.error)
        return self.digest.hexdigest(), self.size


# --------------------------------------------------------------------------- a file encrypted with both sides hashed


def encrypt_file_hashed(src, partial, encryption):
    """Encrypt ``src`` as a stream into the new file ``partial`` (0600, created exclusively after a stale one is
    removed, fsynced; the caller renames it), hashing the plaintext read and the ciphertext written on the way.

    Returns ``{"plain_sha256", "plain_size", "sha256", "size"}`` (the last two: the ciphertext's).  On any
    failure ``partial`` is removed.  Memory stays flat (1 MiB blocks; the one pass of :func:`encrypt_file`).
    """
    return _encrypt_to_partial(src, partial, encryption)
