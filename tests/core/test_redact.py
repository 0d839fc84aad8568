"""Redaction of secrets and personal data before storing."""

from hypothesis import given, settings
from hypothesis import strategies as st

from nextstate.core.redact import MASK, Redactor


def test_default_patterns_catch_keys_tokens_and_emails():
    text = ("my key is sk-abcdefghijklmnopqrstuv, aws AKIAABCDEFGHIJKLMNOP, "
            "mail me at jane.doe+x@example.co.uk, Authorization: Bearer abcdefghijklmnop1234")
    scrubbed, hits = Redactor().text(text)
    assert hits == 4
    assert "sk-" not in scrubbed and "AKIA" not in scrubbed and "@" not in scrubbed
    assert scrubbed.count(MASK) == 4


def test_ordinary_text_is_untouched():
    text = "Ask at the desk (task-list item 4); 2+2=4; see https://example.com/docs."
    assert Redactor().text(text) == (text, 0)


def test_scrub_walks_json_and_counts():
    value = {"messages": [{"role": "user", "content": "a@b.io"}], "n": 1, "x": None}
    out, hits = Redactor().scrub(value)
    assert out == {"messages": [{"role": "user", "content": MASK}], "n": 1, "x": None}
    assert hits == 1 and value["messages"][0]["content"] == "a@b.io"


def test_configured_patterns_replace_the_defaults():
    assert Redactor([r"secret\d+"]).text("secret42 a@b.io") == (f"{MASK} a@b.io", 1)
    assert Redactor([]).text("sk-abcdefghijklmnopqrstuv") == ("sk-abcdefghijklmnopqrstuv", 0)


def test_a_value_that_cannot_match_is_returned_as_is_without_a_walk():
    value = {"messages": [{"role": "user", "content": "plain words, no secrets"}], "n": 1}
    out, hits = Redactor().scrub(value)
    assert out is value and hits == 0


_PIECES = ["sk-", "AKIA", "ASIA", "ghp_", "xoxb-", "Bearer ", "bEaReR\t", "@", "a@b.io",
           "abcdefghijklmnop0123456789ABCD", "ABCDEFGHIJKLMNOP", ".", " ", "é", "\n", '"', "x"]


@settings(deadline=None)  # a busy machine must not fail it
@given(st.recursive(
    st.lists(st.sampled_from(_PIECES), max_size=12).map("".join) | st.integers() | st.none(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner,
                                                                 max_size=4),
    max_leaves=12))
def test_the_quick_check_never_misses_what_the_patterns_find(value):
    redactor = Redactor()
    assert redactor.scrub(value) == redactor._scrub(value)
