"""The import's fast reader against the codec it must agree with."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from ansible_collections.baileys.resilience.plugins.module_utils import authstate
from ansible_collections.baileys.resilience.plugins.module_utils import baileys_codec as codec

SETTINGS = settings(max_examples=300, deadline=None)
ID_CHARS = st.sampled_from(list("az09@._+=-:/ \\\t\n\r") + ["__", "--", "::", ".json", "é"])
IDS = st.lists(ID_CHARS, min_size=1, max_size=10).map("".join)
KEY_NAMES = st.builds(lambda t, i: codec.fix_file_name("%s-%s.json" % (t, i)), st.sampled_from(codec.KEY_TYPES), IDS)
OTHER_NAMES = st.one_of(st.text(min_size=1, max_size=20), st.sampled_from(
    ["pre-key-.json", "pre-key-1.JSON", "sender-key.json", "creds.json", "pre-key-1.json\n", "x\npre-key-1.json"]))


def parse(names):
    return authstate._parse_key_names(names, "\n".join(names))


def one_by_one(names):
    try:
        return [codec.parse_key_file_name(n) for n in names]
    except codec.CodecError:
        return None


@SETTINGS
@given(st.lists(st.one_of(KEY_NAMES, KEY_NAMES, KEY_NAMES, OTHER_NAMES), max_size=8))
def test_parse_key_names_matches_the_codec_name_by_name(names):
    assert parse(names) == one_by_one(names)


def test_parse_key_names_examples():
    names = ["sender-key-group@g.us--5511-0.json", "app-state-sync-key-AAA__B.json", "sender-key-memory-x.json",
             "tctoken-1__index.json"]
    assert parse(names) == [
        ("sender-key", "group@g.us::5511-0"), ("app-state-sync-key", "AAA/B"), ("sender-key-memory", "x"),
        ("tctoken", "1__index")]
    assert parse([]) == []
    assert parse(["pre-key-1.json", "notes.txt"]) is None
