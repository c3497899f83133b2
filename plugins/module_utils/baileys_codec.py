# -*- coding: utf-8 -*-
# Copyright: baileys.resilience contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The Baileys multi-file auth state format: file names and JSON values.

Pure Python, no Ansible import: the same code runs inside the modules and in
the ``baileys-resilience`` command-line tool.

File names follow Baileys' ``useMultiFileAuthState``: ``creds.json`` and one
``<type>-<id>.json`` per key, where the whole name goes through
``fixFileName`` (``/`` becomes ``__``, ``:`` becomes ``-``).

Values are JSON.  Baileys writes every Buffer as
``{"type": "Buffer", "data": "<base64>"}`` and its reviver no longer accepts
the array form ``{"type": "Buffer", "data": [1, 2]}``.  Stores written by
older code may also hold numeric-keyed objects ``{"0": 1, "1": 2}``.  Both
legacy forms are normalised to the base64 form on export.
"""
from __future__ import absolute_import, division, print_function

import base64
import decimal
import json
import re

from . import errors

__metaclass__ = type

CREDS_FILE = "creds.json"
MANIFEST_FILE = ".baileys-resilience-manifest.json"

KEY_TYPES = (
    "pre-key",
    "session",
    "sender-key",
    "sender-key-memory",
    "app-state-sync-key",
    "app-state-sync-version",
    "lid-mapping",
    "device-list",
    "tctoken",
    "identity-key",
)
# longest first, so that "sender-key-memory-x" is not read as sender-key "memory-x"
_TYPES_LONGEST_FIRST = tuple(sorted(KEY_TYPES, key=len, reverse=True))

# Only these two legacy forms make a value need rewriting; everything else is
# written exactly as the store renders it.  A false positive costs a parse.
_NEEDS_NORMALISE = re.compile(r'"data"\s*:\s*\[|[{,]\s*"0"\s*:')


class CodecError(errors.BaileysResilienceError, ValueError):
    """A value or a file name that is not part of the Baileys format."""


def fix_file_name(name):
    """Baileys' fixFileName: '/' -> '__', ':' -> '-'."""
    return name.replace("/", "__").replace(":", "-")


def key_file_name(key_type, key_id):
    """The file name Baileys uses for key ``key_id`` of ``key_type``."""
    if key_type not in KEY_TYPES:
        raise CodecError("unknown key type %r" % (key_type,))
    if not key_id:
        raise CodecError("empty key id for type %r" % (key_type,))
    return fix_file_name("%s-%s.json" % (key_type, key_id))


def parse_key_file_name(file_name):
    """Reverse of :func:`key_file_name`: ``(key_type, key_id)``.

    Raises :class:`CodecError` for a name that is not a key file.
    The reverse is the documented one: sender-key ids turn ``--`` back into
    ``::``, app-state-sync-key ids turn ``__`` back into ``/``; other ids are
    unchanged (tctoken's ``__index`` stays literal).
    """
    if not file_name.endswith(".json"):
        raise CodecError("not a .json file: %r" % (file_name,))
    stem = file_name[: -len(".json")]
    for key_type in _TYPES_LONGEST_FIRST:
        prefix = key_type + "-"
        if stem.startswith(prefix) and len(stem) > len(prefix):
            key_id = stem[len(prefix):]
            if key_type == "sender-key":
                key_id = key_id.replace("--", "::")
            elif key_type == "app-state-sync-key":
                key_id = key_id.replace("__", "/")
            return key_type, key_id
    raise CodecError("unknown key file name %r" % (file_name,))


def round_trips(key_type, key_id):
    """True when the file name of this key reads back as the same id."""
    try:
        return parse_key_file_name(key_file_name(key_type, key_id)) == (key_type, key_id)
    except CodecError:
        return False


def _byte_values(items):
    """``bytes(items)`` when every item is an int from 0 to 255 (not a bool), else None."""
    try:
        raw = bytes(items)  # checks the range in C
    except (TypeError, ValueError):
        return None
    if raw and set(map(type, items)) != {int}:  # bytes() also takes bools and other int subclasses
        return None
    return raw


def _as_buffer_bytes(value):
    """The bytes of a legacy Buffer form, or None when ``value`` is not one."""
    if not isinstance(value, dict):
        return None
    if value.get("type") == "Buffer" and len(value) == 2 and isinstance(value.get("data"), list):
        return _byte_values(value["data"])
    if "0" in value:
        # numeric-keyed: exactly the keys "0" .. "n-1" (the dict has n keys and all of them are there)
        try:
            ordered = [value[str(i)] for i in range(len(value))]
        except KeyError:
            return None  # other keys too, or not contiguous from 0: not a Buffer we recognise
        return _byte_values(ordered)
    return None


def buffer_json(data, encoding="base64"):
    """A Buffer as Baileys' BufferJSON.replacer writes it (or the array form)."""
    if encoding == "array":
        return {"type": "Buffer", "data": list(bytearray(data))}
    return {"type": "Buffer", "data": base64.b64encode(data).decode("ascii")}


def normalise(value, encoding="base64"):
    """Return ``value`` with every Buffer in one form; count the conversions.

    ``encoding`` is ``base64`` (Baileys' own form, the default) or ``array``
    (for stores whose readers expect the legacy form).
    """
    converted = [0]

    def walk(v):
        if isinstance(v, dict):
            raw = _as_buffer_bytes(v)
            if raw is not None:
                converted[0] += 1
                return buffer_json(raw, encoding)
            if encoding == "array" and v.get("type") == "Buffer" and isinstance(v.get("data"), str) and len(v) == 2:
                try:
                    raw = base64.b64decode(v["data"], validate=True)
                except (ValueError, TypeError):
                    raise CodecError("Buffer data %r is not valid base64" % (v["data"][:40],))
                converted[0] += 1
                return buffer_json(raw, encoding)
            return {k: walk(x) for k, x in v.items()}
        if isinstance(v, list):
            return [walk(x) for x in v]
        return v

    result = walk(value)
    return result, converted[0]


def _jsonb_key_order(key):
    # PostgreSQL's jsonb orders object keys by length, then bytewise.
    raw = key.encode("utf-8")
    return (len(raw), raw)


def _render_into(value, out):
    kind = type(value)
    if kind is dict:
        out.append("{")
        for n, key in enumerate(sorted(value, key=_jsonb_key_order)):
            if n:
                out.append(", ")
            out.append(json.dumps(key, ensure_ascii=False))
            out.append(": ")
            _render_into(value[key], out)
        out.append("}")
    elif kind is list:
        out.append("[")
        for n, item in enumerate(value):
            if n:
                out.append(", ")
            _render_into(item, out)
        out.append("]")
    elif kind is decimal.Decimal:
        if not value.is_finite():
            raise ValueError("%s is not valid JSON" % value)
        out.append(format(value.copy_abs() if value.is_zero() else value, "f"))  # as numeric_out does
    elif kind is float:
        _render_into(decimal.Decimal(repr(value)), out)
    else:
        out.append(json.dumps(value, ensure_ascii=False, allow_nan=False))


def render(value):
    """Render ``value`` as PostgreSQL renders jsonb as text.

    Files therefore hold exactly what ``value::text`` returns for the same
    jsonb, so a store -> files -> store -> files round trip is byte-stable.
    Numbers parsed as :class:`decimal.Decimal` keep every digit.
    """
    out = []
    _render_into(value, out)
    return "".join(out)


def file_text(source_text, encoding="base64"):
    """The file content for a value read from the store as text.

    Returns ``(text, conversions)``.  The common case (nothing to normalise)
    returns the store's own text untouched, without parsing it.
    """
    if encoding == "base64" and not _NEEDS_NORMALISE.search(source_text):
        return source_text, 0
    value, converted = normalise(json.loads(source_text, parse_float=decimal.Decimal), encoding)
    if not converted:
        return source_text, 0
    return render(value), converted


def loads_strict(text):
    """Parse JSON the way Baileys' JSON.parse would accept it (no NaN)."""

    def bad_constant(name):
        raise ValueError("invalid JSON constant %s" % name)

    return json.loads(text, parse_constant=bad_constant, parse_float=decimal.Decimal)
