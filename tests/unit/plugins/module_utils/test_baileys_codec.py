"""Unit tests of the Baileys multi-file format codec (file names and Buffer forms).

The expected values here are written out by hand from Baileys' own rules
(``fixFileName`` in useMultiFileAuthState, ``BufferJSON`` in Utils/generics)
and, for :func:`render`, checked against a real PostgreSQL server.
"""
from __future__ import annotations

import base64
import json
from decimal import Decimal

import pytest

from ansible_collections.baileys.resilience.plugins.module_utils import baileys_codec as codec
from ansible_collections.baileys.resilience.plugins.module_utils import fsutil, pgconn

from support import authgen

# --------------------------------------------------------------------------- helpers


def b64(data):
    return base64.b64encode(bytes(data)).decode("ascii")


def buffer_bytes(value):
    """The bytes of any of the three Buffer forms, decoded independently of the codec."""
    if isinstance(value, dict) and set(value) == {"type", "data"} and value["type"] == "Buffer":
        if isinstance(value["data"], str):
            return base64.b64decode(value["data"], validate=True)
        return bytes(value["data"])
    assert value and sorted(value, key=int) == [str(i) for i in range(len(value))], value
    return bytes(value[str(i)] for i in range(len(value)))


def is_buffer_form(value):
    if not isinstance(value, dict) or not value:
        return False
    if set(value) == {"type", "data"} and value["type"] == "Buffer":
        return True
    # pylint: disable-next=unidiomatic-typecheck  # exactly int: a bool (an int subclass) is not a Buffer byte
    return all(k.isdigit() for k in value) and all(type(v) is int for v in value.values())


def legacy_forms(value):
    """Count the array and numeric-keyed Buffers in a value."""
    if isinstance(value, list):
        return sum(legacy_forms(x) for x in value)
    if isinstance(value, dict):
        if is_buffer_form(value):
            return 0 if isinstance(value.get("data"), str) else 1
        return sum(legacy_forms(x) for x in value.values())
    return 0


def buffers(value, path=""):
    """{path: bytes} of every Buffer in a value, whatever its form."""
    out = {}
    if isinstance(value, list):
        for i, x in enumerate(value):
            out.update(buffers(x, "%s[%d]" % (path, i)))
    elif isinstance(value, dict):
        if is_buffer_form(value):
            out[path] = buffer_bytes(value)
        else:
            for k, x in value.items():
                out.update(buffers(x, "%s.%s" % (path, k)))
    return out


def strip_buffers(value):
    """The value with every Buffer replaced by a marker: what must not change."""
    if isinstance(value, list):
        return [strip_buffers(x) for x in value]
    if isinstance(value, dict):
        if is_buffer_form(value):
            return "<buffer>"
        return {k: strip_buffers(x) for k, x in value.items()}
    return value


# --------------------------------------------------------------------------- file names

# (key type, id as Baileys uses it, file name Baileys writes) -- one or more per key type
NAMES = [
    ("pre-key", "1", "pre-key-1.json"),
    ("pre-key", "812", "pre-key-812.json"),
    ("session", "5511987654321.0", "session-5511987654321.0.json"),
    ("session", "123456789012345_1.12", "session-123456789012345_1.12.json"),
    ("sender-key", "120363012345678901@g.us::123456789012345@lid::3",
     "sender-key-120363012345678901@g.us--123456789012345@lid--3.json"),
    ("sender-key", "120363012345678901@g.us::5511987654321@s.whatsapp.net::0",
     "sender-key-120363012345678901@g.us--5511987654321@s.whatsapp.net--0.json"),
    ("sender-key-memory", "120363012345678901@g.us", "sender-key-memory-120363012345678901@g.us.json"),
    ("app-state-sync-key", "AAAAAB7V", "app-state-sync-key-AAAAAB7V.json"),
    ("app-state-sync-key", "ab/cd+EF", "app-state-sync-key-ab__cd+EF.json"),
    ("app-state-sync-key", "//8AAQ==", "app-state-sync-key-____8AAQ==.json"),
    ("app-state-sync-version", "regular_high", "app-state-sync-version-regular_high.json"),
    ("app-state-sync-version", "critical_unblock_low", "app-state-sync-version-critical_unblock_low.json"),
    ("lid-mapping", "5511987654321", "lid-mapping-5511987654321.json"),
    ("lid-mapping", "123456789012345_reverse", "lid-mapping-123456789012345_reverse.json"),
    ("device-list", "5511987654321", "device-list-5511987654321.json"),
    ("tctoken", "__index", "tctoken-__index.json"),
    ("tctoken", "123456789012345@lid", "tctoken-123456789012345@lid.json"),
    ("identity-key", "5511987654321.0", "identity-key-5511987654321.0.json"),
    ("identity-key", "123456789012345_1.3", "identity-key-123456789012345_1.3.json"),
]


def test_names_cover_every_key_type():
    assert set(codec.KEY_TYPES) == {t for t, _i, _n in NAMES}
    assert len(codec.KEY_TYPES) == 10


@pytest.mark.parametrize("key_type,key_id,name", NAMES)
def test_key_file_name(key_type, key_id, name):
    assert codec.key_file_name(key_type, key_id) == name


@pytest.mark.parametrize("key_type,key_id,name", NAMES)
def test_parse_key_file_name(key_type, key_id, name):
    assert codec.parse_key_file_name(name) == (key_type, key_id)
    assert codec.round_trips(key_type, key_id)


@pytest.mark.parametrize("raw,fixed", [
    ("a/b", "a__b"),
    ("a:b", "a-b"),
    ("a//b::c", "a____b--c"),
    ("x/:y", "x__-y"),
    ("plain.json", "plain.json"),
    ("__index", "__index"),
    ("", ""),
])
def test_fix_file_name_is_baileys_rule(raw, fixed):
    # fixFileName = file?.replace(/\//g, '__')?.replace(/:/g, '-')
    assert codec.fix_file_name(raw) == fixed


def test_whole_name_goes_through_fix_file_name():
    # the type is part of what Baileys fixes, not just the id
    assert codec.key_file_name("session", "a/b:c") == "session-a__b-c.json"


@pytest.mark.parametrize("name,expected", [
    # sender-key: "--" back into "::" only
    ("sender-key-g@g.us--p@lid--0.json", ("sender-key", "g@g.us::p@lid::0")),
    ("sender-key-a__b.json", ("sender-key", "a__b")),
    ("sender-key-a-b.json", ("sender-key", "a-b")),
    # app-state-sync-key: "__" back into "/" only
    ("app-state-sync-key-a__b.json", ("app-state-sync-key", "a/b")),
    ("app-state-sync-key-a--b.json", ("app-state-sync-key", "a--b")),
    # other types: id unchanged
    ("session-a__b--c.json", ("session", "a__b--c")),
    ("tctoken-__index.json", ("tctoken", "__index")),
    ("tctoken-a--b__c.json", ("tctoken", "a--b__c")),
    ("lid-mapping-x__y.json", ("lid-mapping", "x__y")),
    ("device-list-a--b.json", ("device-list", "a--b")),
    ("identity-key-a__b.json", ("identity-key", "a__b")),
    ("pre-key-a__b.json", ("pre-key", "a__b")),
    ("sender-key-memory-a--b.json", ("sender-key-memory", "a--b")),
    ("app-state-sync-version-a__b.json", ("app-state-sync-version", "a__b")),
])
def test_reverse_rule_per_type(name, expected):
    assert codec.parse_key_file_name(name) == expected


@pytest.mark.parametrize("name,expected", [
    ("sender-key-memory-120363@g.us.json", ("sender-key-memory", "120363@g.us")),
    ("sender-key-memory-.json", ("sender-key", "memory-")),  # no id after the longer type
    ("app-state-sync-version-regular.json", ("app-state-sync-version", "regular")),
    ("app-state-sync-key-version.json", ("app-state-sync-key", "version")),
    ("pre-key-key-1.json", ("pre-key", "key-1")),
    ("identity-key-key.json", ("identity-key", "key")),
])
def test_longest_type_prefix_wins(name, expected):
    assert codec.parse_key_file_name(name) == expected


def test_sender_key_id_that_looks_like_memory_does_not_round_trip():
    name = codec.key_file_name("sender-key", "memory-x")
    assert name == "sender-key-memory-x.json"
    assert codec.parse_key_file_name(name) == ("sender-key-memory", "x")
    assert not codec.round_trips("sender-key", "memory-x")


@pytest.mark.parametrize("key_type,key_id", [
    ("session", "5511987654321:12.0"),  # ':' becomes '-' and stays '-'
    ("tctoken", "a/b"),  # '/' becomes '__' and stays '__'
    ("sender-key", "g@g.us:p"),  # a single ':' is not '::'
    ("app-state-sync-key", "a:b"),
    ("lid-mapping", "x/y"),
])
def test_ids_that_do_not_round_trip(key_type, key_id):
    name = codec.key_file_name(key_type, key_id)
    assert "/" not in name and ":" not in name
    assert codec.parse_key_file_name(name) != (key_type, key_id)
    assert codec.round_trips(key_type, key_id) is False


@pytest.mark.parametrize("name", [
    "creds.json",
    codec.MANIFEST_FILE,
    fsutil.TEMP_PREFIX + "pre-key-1.json",
    "pre-key-1",
    "pre-key-1.json.bak",
    "pre-key-1.JSON",
    "pre-key-.json",
    "pre-key.json",
    "Pre-key-1.json",
    "prekey-1.json",
    "signed-pre-key-1.json",
    "app-state-sync-1.json",
    "session.json",
    ".json",
    "",
    "-1.json",
])
def test_unknown_names_rejected(name):
    with pytest.raises(codec.CodecError):
        codec.parse_key_file_name(name)


def test_codec_error_is_a_value_error():
    assert issubclass(codec.CodecError, ValueError)


@pytest.mark.parametrize("key_type,key_id", [
    ("signed-pre-key", "1"),
    ("Session", "1"),
    ("", "1"),
    ("creds", "x"),
    ("pre-key", ""),
])
def test_key_file_name_refuses(key_type, key_id):
    with pytest.raises(codec.CodecError):
        codec.key_file_name(key_type, key_id)
    assert codec.round_trips(key_type, key_id) is False


# --------------------------------------------------------------------------- Buffer forms

DATA = bytes([1, 2, 3])
BASE64_FORM = {"type": "Buffer", "data": "AQID"}
ARRAY_FORM = {"type": "Buffer", "data": [1, 2, 3]}
NUMERIC_FORM = {"0": 1, "1": 2, "2": 3}


def test_buffer_json_forms():
    assert codec.buffer_json(DATA) == BASE64_FORM
    assert codec.buffer_json(DATA, "array") == ARRAY_FORM
    assert codec.buffer_json(b"") == {"type": "Buffer", "data": ""}
    assert codec.buffer_json(bytes(range(256)))["data"] == b64(range(256))


@pytest.mark.parametrize("form", [BASE64_FORM, ARRAY_FORM, NUMERIC_FORM], ids=["base64", "array", "numeric"])
def test_every_form_normalises_to_base64(form):
    value, converted = codec.normalise(form)
    assert value == BASE64_FORM
    assert converted == (0 if form is BASE64_FORM else 1)


@pytest.mark.parametrize("form", [BASE64_FORM, ARRAY_FORM, NUMERIC_FORM], ids=["base64", "array", "numeric"])
def test_every_form_normalises_to_array_on_request(form):
    value, converted = codec.normalise(form, "array")
    assert value == ARRAY_FORM
    assert converted == 1


def test_normalise_does_not_modify_its_argument():
    source = {"k": [dict(ARRAY_FORM), dict(NUMERIC_FORM)]}
    before = json.dumps(source)
    codec.normalise(source)
    codec.normalise(source, "array")
    assert json.dumps(source) == before


def test_normalise_nested_and_counts():
    value = {
        "keyPair": {"private": ARRAY_FORM, "public": NUMERIC_FORM},
        "signature": BASE64_FORM,
        "list": [ARRAY_FORM, [NUMERIC_FORM], "text", 7, None, True],
        "indexValueMap": {"AQID": {"valueMac": {"0": 255}}},
        "keyId": 1,
    }
    out, converted = codec.normalise(value)
    assert converted == 5
    assert out == {
        "keyPair": {"private": BASE64_FORM, "public": BASE64_FORM},
        "signature": BASE64_FORM,
        "list": [BASE64_FORM, [BASE64_FORM], "text", 7, None, True],
        "indexValueMap": {"AQID": {"valueMac": {"type": "Buffer", "data": "/w=="}}},
        "keyId": 1,
    }
    out_array, converted_array = codec.normalise(value, "array")
    assert converted_array == 6
    assert out_array["signature"] == ARRAY_FORM
    assert out_array["indexValueMap"]["AQID"]["valueMac"] == {"type": "Buffer", "data": [255]}


def test_empty_buffers():
    assert codec.normalise({"type": "Buffer", "data": []}) == ({"type": "Buffer", "data": ""}, 1)
    assert codec.normalise({"type": "Buffer", "data": ""}, "array") == ({"type": "Buffer", "data": []}, 1)
    # an empty object is not an empty numeric-keyed Buffer
    assert codec.normalise({}) == ({}, 0)
    assert codec.normalise({"a": {}}, "array") == ({"a": {}}, 0)


def test_large_numeric_keyed_buffer_is_ordered_by_index():
    data = bytes((i * 7) % 256 for i in range(300))
    # insertion order scrambled, and jsonb's order ("0".."9", "10".."99", ...) as well
    numeric = {str(i): data[i] for i in sorted(range(300), key=lambda i: (i % 13, i))}
    out, converted = codec.normalise(numeric)
    assert converted == 1
    assert base64.b64decode(out["data"]) == data


@pytest.mark.parametrize("value", [
    {"type": "Buffer", "data": [1, 256]},
    {"type": "Buffer", "data": [-1]},
    {"type": "Buffer", "data": [1.0, 2]},
    {"type": "Buffer", "data": [True, False]},
    {"type": "Buffer", "data": ["1", "2"]},
    {"type": "Buffer", "data": [[1]]},
    {"type": "Buffer", "data": [None]},
    {"type": "Buffer", "data": [1, 2], "extra": 1},
    {"type": "buffer", "data": [1, 2]},
    {"type": "Uint8Array", "data": [1, 2]},
    {"data": [1, 2]},
    [1, 2, 3],
    ["AQID"],
], ids=repr)
def test_non_byte_arrays_left_alone(value):
    assert codec.normalise(value) == (value, 0)
    assert codec.normalise({"wrapped": value}) == ({"wrapped": value}, 0)


@pytest.mark.parametrize("value", [
    {"0": 1, "2": 3},  # gap
    {"1": 1, "2": 2},  # does not start at 0
    {"0": 1, "01": 2},  # leading zero
    {"00": 1},
    {"0": 1, "1": 256},
    {"0": -1},
    {"0": True},
    {"0": 1.5},
    {"0": "1"},
    {"0": None},
    {"0": 1, "a": 2},
    {"0": 1, " 1": 2},
    {"0": {"0": 1, "x": 2}},
], ids=repr)
def test_numeric_keyed_non_buffers_left_alone(value):
    assert codec.normalise(value) == (value, 0)
    assert codec.normalise([value]) == ([value], 0)


def test_base64_form_left_alone_by_default():
    # the base64 form is the target form: never rewritten, even if odd
    for value in ({"type": "Buffer", "data": "AQID"}, {"type": "Buffer", "data": "not base64 at all"}):
        assert codec.normalise(value) == (value, 0)


# --------------------------------------------------------------------------- every key type


def _authgen_value(key_type, form, index=1):
    gen = authgen.Gen(seed=11, form=form)
    return gen.key(key_type, index)


@pytest.mark.parametrize("form", ["base64", "array", "numeric"])
@pytest.mark.parametrize("key_type", codec.KEY_TYPES)
def test_every_key_type_round_trips(key_type, form):
    for index in (0, 1, 2):  # tctoken 0 is "__index", lid-mapping alternates its id shape
        key_id, value = _authgen_value(key_type, form, index)
        name = codec.key_file_name(key_type, key_id)
        assert "/" not in name and ":" not in name
        assert codec.parse_key_file_name(name) == (key_type, key_id)

        source = json.dumps(value)
        text, converted = codec.file_text(source)
        parsed = json.loads(text)
        assert converted == legacy_forms(value)
        assert legacy_forms(parsed) == 0
        assert buffers(parsed) == buffers(value)
        assert strip_buffers(parsed) == strip_buffers(value)
        if converted == 0:
            assert text is source  # untouched, not even re-rendered

        as_array, _converted = codec.normalise(value, "array")
        assert buffers(as_array) == buffers(value)
        assert all(isinstance(b["data"], list) for b in _buffer_objects(as_array))


def _buffer_objects(value):
    if isinstance(value, list):
        return [b for x in value for b in _buffer_objects(x)]
    if isinstance(value, dict):
        if is_buffer_form(value):
            return [value]
        return [b for x in value.values() for b in _buffer_objects(x)]
    return []


def test_key_types_carry_buffers_where_baileys_has_them():
    # guards the test above against generated values without any Buffer
    with_buffers = {t for t in codec.KEY_TYPES if buffers(_authgen_value(t, "array")[1])}
    assert with_buffers == {"pre-key", "session", "sender-key", "app-state-sync-key", "app-state-sync-version",
                            "tctoken", "identity-key"}


@pytest.mark.parametrize("form", ["base64", "array", "numeric", "mixed"])
def test_creds_round_trip(form):
    creds = authgen.Gen(seed=5, form=form).creds(813)
    text, converted = codec.file_text(json.dumps(creds))
    parsed = json.loads(text)
    assert converted == legacy_forms(creds)
    assert (converted == 0) == (form == "base64")
    assert legacy_forms(parsed) == 0
    assert buffers(parsed) == buffers(creds)
    assert len(buffers(creds)) == 15
    assert strip_buffers(parsed) == strip_buffers(creds)


# --------------------------------------------------------------------------- file_text


def test_file_text_untouched_when_nothing_to_do():
    for source in ('{"type": "Buffer", "data": "AQID"}', '"5511987654321"', '["0", "1"]', "{}", "null",
                   '{"a": "\\"data\\": [1]"}'):
        text, converted = codec.file_text(source)
        assert text is source
        assert converted == 0


def test_file_text_false_positive_costs_a_parse_only():
    # looks like a legacy form to the quick scan, is not one
    source = '{"data": [1, 2], "type": "NotBuffer", "list": [{"0": "x"}]}'
    text, converted = codec.file_text(source)
    assert text is source
    assert converted == 0


def test_file_text_normalises_and_renders_like_jsonb():
    source = '{"public":{"1":2,"0":1},"private":{"type":"Buffer","data":[255,0]},"keyId":7}'
    text, converted = codec.file_text(source)
    assert converted == 2
    assert text == '{"keyId": 7, "public": {"data": "AQI=", "type": "Buffer"}, ' \
                   '"private": {"data": "/wA=", "type": "Buffer"}}'


def test_file_text_array_encoding():
    source = '{"token": {"type": "Buffer", "data": "AQID"}, "timestamp": "1760000000"}'
    text, converted = codec.file_text(source, "array")
    assert converted == 1
    assert json.loads(text) == {"token": ARRAY_FORM, "timestamp": "1760000000"}
    # nothing to convert in array mode either: the source comes back as it was
    plain = '{"a": 1}'
    assert codec.file_text(plain, "array") == (plain, 0)


def test_loads_strict():
    assert codec.loads_strict('{"a": [1, 2.5, "x"]}') == {"a": [1, 2.5, "x"]}
    for bad in ("NaN", "[Infinity]", '{"a": -Infinity}', "{'a': 1}", "", "[1,]"):
        with pytest.raises(ValueError):
            codec.loads_strict(bad)


# --------------------------------------------------------------------------- render() vs PostgreSQL


@pytest.fixture(scope="module")
def jsonb(pg):
    """A connection to the real server (no tables needed): one for the module, not a database per test."""
    conn = pgconn.connect(pg.params(), autocommit=True)
    yield lambda text: conn.execute("SELECT %s::jsonb::text", (text,)).fetchone()[0]
    conn.close()


RENDER_VALUES = [
    {},
    [],
    None,
    True,
    False,
    0,
    -1,
    2 ** 70,
    -(2 ** 63),
    "",
    "plain",
    "unicode: Açaí ✓ 日本語 🚀 \u2028\u2029 \ufeff \u00ad",
    "escapes: \" \\ / \n \r \t \b \f \x01 \x1f \x7f",
    {"a": 1, "b": 2},
    {"b": 1, "a": 2},
    {"bb": 1, "a": 2, "ccc": 3, "": 4, "c": 5},
    {"é": 1, "ab": 2, "z": 3, "zz": 4, "€": 5, "🚀": 6, "abc": 7},
    {"10": 1, "9": 2, "0": 3, "100": 4, "1": 5, "2": 6},
    {"type": "Buffer", "data": "AQID"},
    {"Z": 1, "a": 2, "_": 3, "A": 4, "0": 5},
    {"quote\"key": {"back\\slash": ["nested", {"deeper": [[], {}, [None, False]]}]}},
    {"noiseKey": {"private": {"type": "Buffer", "data": "AQID"}, "public": {"type": "Buffer", "data": "BAUG"}},
     "me": {"id": "5511987654321:12@s.whatsapp.net", "name": "Açaí \"Suporte\" ✓"},
     "processedHistoryMessages": [{"key": {"fromMe": True, "id": "3EB0"}, "messageTimestamp": 1760000000}],
     "accountSettings": {"unarchiveChats": False}, "registrationId": 12345, "pairingCode": None},
    [1, "two", [3, [4, {"five": 5}]], {"6": 6}],
]


@pytest.mark.parametrize("value", RENDER_VALUES, ids=lambda v: json.dumps(v, ensure_ascii=True)[:40])
def test_render_equals_jsonb_text(jsonb, value):
    pg_text = jsonb(json.dumps(value))
    assert codec.render(value) == pg_text


def test_render_equals_stored_value_text(dbconn):
    """Values stored in the real tables read back (as the export reads them) exactly as render() writes them."""
    companies = authgen.generate(1, seed=3, form="mixed", mix={t: 3 for t in codec.KEY_TYPES})
    (creds, keys), = companies.values()
    authgen.load_into(dbconn, companies)
    stored_creds = dbconn.execute("SELECT creds::text FROM whatsapp_auth").fetchone()[0]
    assert codec.render(creds) == stored_creds
    rows = dbconn.execute("SELECT key_type, key_id, value::text FROM whatsapp_keys").fetchall()
    assert len(rows) == len(keys) == 30
    for key_type, key_id, text in rows:
        value = keys[(key_type, key_id)]
        assert codec.render(value) == text
        # and a converted value is rendered as the store would render it
        for encoding in ("base64", "array"):
            normalised = codec.normalise(value, encoding)[0]
            assert codec.render(normalised) == dbconn.execute("SELECT %s::jsonb::text",
                                                              (json.dumps(normalised),)).fetchone()[0]
            out, _converted = codec.file_text(text, encoding)
            assert json.loads(out) == normalised


def test_render_of_jsonb_text_is_a_fixed_point(jsonb):
    # what the store returns, parsed and rendered again, is the same text
    for value in RENDER_VALUES:
        pg_text = jsonb(json.dumps(value))
        assert codec.render(json.loads(pg_text)) == pg_text


# Numbers as the store renders them (jsonb never writes an exponent and keeps
# the scale).  render() keeps non-integers as Decimal so that no digit is lost
# and no exponent appears.
NUMBER_TEXTS = [
    ("1.5", False),
    ("0.1", False),
    ("3.141592653589793", False),
    ("1.0", False),
    ("1.50", False),  # becomes 1.5: a different text, but the same number and stable
    ("-0", False),
    ("-0.0", False),
    ("1e5", False),
    ("1E+21", False),
    ("1.5e300", False),
    ("0.001", False),
    ("1e-7", True),
    ("0.00001", True),
    ("10000000000000000.5", True),
    ("12345678901234567890.5", True),
]


@pytest.mark.parametrize("number,diverges", NUMBER_TEXTS, ids=[n for n, _d in NUMBER_TEXTS])
def test_file_text_of_numbers_is_jsonb_stable(jsonb, number, diverges, request):
    del diverges, request  # every case must hold
    source = '{"n": %s, "b": {"type": "Buffer", "data": [1, 2, 3]}}' % number
    store_text = jsonb(source)
    text, converted = codec.file_text(store_text)
    assert converted == 1
    # the file must be exactly what the store will render after an import of it
    assert text == jsonb(text)
    # and it must hold the same number
    assert json.loads(text, parse_float=Decimal)["n"] == json.loads(store_text, parse_float=Decimal)["n"]
