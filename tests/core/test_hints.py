"""The hint placement the teacher and the proxy's memory share (core/hints.py)."""

from nextstate.core.hints import HINT_MARKER, joined, place_hint, prompt_with_hint, with_hint


def test_a_hint_goes_after_the_marker_at_the_end_of_the_last_user_message():
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"}, {"role": "tool", "content": "t"}]
    out, where = place_hint(messages, "Be brief.")
    assert out[2] == {"role": "user", "content": "c" + HINT_MARKER + "Be brief."}
    assert (where.message, where.part, where.offset, where.added) == (2, None, 1, 0)
    assert out[2]["content"][where.offset:] == HINT_MARKER + "Be brief."
    assert messages[2]["content"] == "c"  # the caller's messages are untouched
    assert out[0] is messages[0]  # and the others shared, not copied


def test_list_content_gets_the_hint_as_a_text_part_of_its_own():
    out, where = place_hint([{"role": "user", "content": [{"type": "text", "text": "q"}]}],
                            "h")
    assert out[0]["content"][-1] == {"type": "text", "text": HINT_MARKER + "h"}
    assert (where.message, where.part) == (0, 1)


def test_without_a_user_message_the_hint_is_one():
    out, where = place_hint([{"role": "system", "content": "s"}], "h")
    assert out[-1] == {"role": "user", "content": HINT_MARKER.lstrip("\n") + "h"}
    assert where.added == 1 and where.message == 1


def test_several_hints_are_one_hint_a_line_each():
    assert joined(["Be brief.", None, "  ", "Say thanks. "]) == "Be brief.\nSay thanks."
    assert joined([None, ""]) is None
    assert with_hint([{"role": "user", "content": "q"}], "x")[0]["content"] == (
        "q" + HINT_MARKER + "x")
    assert prompt_with_hint("p", "x") == "p" + HINT_MARKER + "x"
