"""Property tests (hypothesis) of the codec's round trips."""
from __future__ import annotations

import base64
import json
from decimal import Decimal

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from ansible_collections.baileys.resilience.plugins.module_utils import baileys_codec as codec

# per test, not a global profile: other modules keep their own settings
SETTINGS = settings(max_examples=200, deadline=None)

KEY_TYPES = st.sampled_from(codec.KEY_TYPES)

# characters of real ids plus the ones the file names rewrite
ID_CHARS = st.sampled_from(list("az09AZ@._+=-:/ ") + ["__", "--", "::", "é", "✓", "🚀"])
IDS = st.lists(ID_CHARS, min_size=1, max_size=12).map("".join)
SAFE_SEGMENT = st.text(alphabet="abcxyz0123456789@._+=", min_size=1, max_size=20)


def baileys_fix_file_name(name):
    # useMultiFileAuthState: file?.replace(/\//g, '__')?.replace(/:/g, '-')
    return name.replace("/", "__").replace(":", "-")


def as_numbers(value):
    """Compare numbers as jsonb does (by value): 1e16, 1.0e16 and 10000000000000000 are one number."""
    if isinstance(value, dict):
        return {k: as_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [as_numbers(v) for v in value]
    if type(value) in (int, float):
        return Decimal(repr(value))
    return value


# --------------------------------------------------------------------------- file names


@SETTINGS
@given(KEY_TYPES, IDS)
def test_file_name_is_baileys_name(key_type, key_id):
    name = codec.key_file_name(key_type, key_id)
    assert name == baileys_fix_file_name("%s-%s.json" % (key_type, key_id))
    assert "/" not in name and ":" not in name and name.endswith(".json")


@SETTINGS
@given(KEY_TYPES, IDS)
def test_file_name_round_trip_when_round_trips(key_type, key_id):
    name = codec.key_file_name(key_type, key_id)
    if codec.round_trips(key_type, key_id):
        assert codec.parse_key_file_name(name) == (key_type, key_id)
    else:
        assert codec.parse_key_file_name(name) != (key_type, key_id)


@SETTINGS
@given(st.sampled_from([t for t in codec.KEY_TYPES if t not in ("sender-key", "app-state-sync-key")]),
       st.text(alphabet=st.characters(blacklist_characters="/:", blacklist_categories=("Cs",)), min_size=1))
def test_ids_without_slash_or_colon_round_trip(key_type, key_id):
    # for every type but sender-key, the id is read back literally ("__index" included)
    assert codec.round_trips(key_type, key_id)
    assert codec.parse_key_file_name(codec.key_file_name(key_type, key_id)) == (key_type, key_id)


@SETTINGS
@given(st.lists(SAFE_SEGMENT, min_size=1, max_size=4))
def test_sender_key_ids_round_trip(segments):
    # Baileys' shape: "<group>::<participant>::<device>"
    key_id = "::".join(segments)
    assert codec.round_trips("sender-key", key_id)
    assert "::" not in codec.key_file_name("sender-key", key_id)


@SETTINGS
@given(st.binary(min_size=1, max_size=32))
def test_app_state_sync_key_ids_round_trip(raw):
    # ids are base64 key ids: '/' in them becomes '__' in the file name
    key_id = base64.b64encode(raw).decode("ascii")
    assert codec.round_trips("app-state-sync-key", key_id)
    assert codec.key_file_name("app-state-sync-key", key_id) == \
        "app-state-sync-key-%s.json" % key_id.replace("/", "__")


@SETTINGS
@given(KEY_TYPES, st.text(alphabet=st.characters(blacklist_characters="/:", blacklist_categories=("Cs",)),
                          min_size=1))
def test_every_name_baileys_can_write_maps_back_to_itself(key_type, rest):
    # a file name holds no '/' or ':'; whatever it parses to is written back under the same name
    name = "%s-%s.json" % (key_type, rest)
    parsed = codec.parse_key_file_name(name)
    assert codec.key_file_name(*parsed) == name


@SETTINGS
@given(st.text())
def test_parse_only_raises_codec_error(name):
    try:
        key_type, key_id = codec.parse_key_file_name(name)
    except codec.CodecError:
        return
    assert key_type in codec.KEY_TYPES and key_id


# --------------------------------------------------------------------------- Buffer forms


def base64_form(data):
    return {"type": "Buffer", "data": base64.b64encode(data).decode("ascii")}


def array_form(data):
    return {"type": "Buffer", "data": list(data)}


def numeric_form(data):
    return {str(i): b for i, b in enumerate(data)}


FORMS = {"base64": base64_form, "array": array_form, "numeric": numeric_form}


@st.composite
def buffers(draw):
    data = draw(st.binary(max_size=64))
    form = draw(st.sampled_from(sorted(FORMS)))
    assume(data or form != "numeric")  # an empty numeric-keyed object is just {}
    return FORMS[form](data)


SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2 ** 70), 2 ** 70), st.text(max_size=20),
                    st.floats(allow_nan=False, allow_infinity=False))
KEYS = st.one_of(st.text(max_size=8), st.sampled_from(["type", "data", "0", "1", "Buffer", "keyData"]))
VALUES = st.recursive(
    st.one_of(SCALARS, buffers()),
    lambda children: st.one_of(st.lists(children, max_size=5), st.dictionaries(KEYS, children, max_size=5)),
    max_leaves=25,
)


@SETTINGS
@given(VALUES, st.sampled_from(["base64", "array"]))
def test_normalise_is_idempotent(value, encoding):
    once, _converted = codec.normalise(value, encoding)
    twice, converted = codec.normalise(once, encoding)
    assert twice == once
    if encoding == "base64":
        assert converted == 0


@SETTINGS
@given(st.binary(max_size=300), st.sampled_from(sorted(FORMS)), st.sampled_from(["base64", "array"]))
def test_bytes_preserved_through_every_form(data, form, encoding):
    assume(data or form != "numeric")
    value = {"outer": [FORMS[form](data), {"k": FORMS[form](data)}]}
    out, converted = codec.normalise(value, encoding)
    assert converted == (0 if (form, encoding) == ("base64", "base64") else 2)
    for buf in (out["outer"][0], out["outer"][1]["k"]):
        assert set(buf) == {"type", "data"} and buf["type"] == "Buffer"
        if encoding == "base64":
            assert base64.b64decode(buf["data"], validate=True) == data
        else:
            assert bytes(buf["data"]) == data


@SETTINGS
@given(st.binary(max_size=64), st.sampled_from(sorted(FORMS)))
def test_bytes_preserved_through_json_text(data, form):
    assume(data or form != "numeric")
    source = json.dumps({"v": FORMS[form](data)}, separators=(",", ":"))
    text, _conversions = codec.file_text(source)
    assert base64.b64decode(json.loads(text)["v"]["data"]) == data
    text_array, _conversions = codec.file_text(source, "array")
    assert bytes(json.loads(text_array)["v"]["data"]) == data


@SETTINGS
@given(VALUES, st.sampled_from(["base64", "array"]), st.sampled_from(["compact", "spaced", "jsonb", "indent"]))
def test_file_text_parses_to_normalised_value(value, encoding, layout):
    if layout == "compact":
        source = json.dumps(value, separators=(",", ":"))
    elif layout == "spaced":
        source = json.dumps(value, ensure_ascii=False)
    elif layout == "indent":
        source = json.dumps(value, indent=1, sort_keys=True)
    else:
        source = codec.render(value)
    text, converted = codec.file_text(source, encoding)
    expected, expected_converted = codec.normalise(json.loads(source), encoding)
    assert as_numbers(json.loads(text)) == as_numbers(expected)
    assert converted == expected_converted
    if not converted:
        assert text is source


@SETTINGS
@given(VALUES)
def test_render_is_stable(value):
    text = codec.render(value)
    assert codec.render(json.loads(text)) == text
    assert as_numbers(json.loads(text)) == as_numbers(value)
