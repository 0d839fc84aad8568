"""Session headers, conversation keys and next states."""

import pytest

from nextstate.core.sessions import (
    conversation_key,
    image_urls,
    next_state_kind,
    next_state_of,
    only_images,
    read_session_meta,
)


def test_headers_win_over_body_fields_and_body_fields_are_removed():
    body = {"session_id": "b", "turn_type": "side", "session_done": True, "model": "m"}
    meta = read_session_meta({"x-session-id": "h"}, body)
    assert meta.session_id == "h"
    assert meta.turn_type == "side"
    assert meta.done is True
    assert body == {"model": "m"}


def test_defaults_are_main_recorded_and_open():
    meta = read_session_meta({}, {})
    assert (meta.session_id, meta.turn_type, meta.done, meta.record) == (None, "main", False,
                                                                         True)


def test_record_off_header_opts_out():
    assert read_session_meta({"x-nextstate-record": "off"}, {}).record is False


def test_conversation_key_ignores_what_clients_rewrite():
    ours = [{"role": "user", "content": "hi"},
            {"role": "assistant", "content": None, "refusal": None, "tool_calls": [
                {"id": "a", "type": "function",
                 "function": {"name": "f", "arguments": '{"x": 1,"y":2}'}}]}]
    theirs = [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
              {"role": "assistant", "content": "", "tool_calls": [
                  {"id": "other", "type": "function",
                   "function": {"name": "f", "arguments": '{"y": 2, "x": 1}'}}]}]
    assert conversation_key(ours) == conversation_key(theirs)


def test_conversation_key_sees_different_text():
    a = [{"role": "user", "content": "hi"}]
    b = [{"role": "user", "content": "hi!"}]
    assert conversation_key(a) != conversation_key(b)


def test_next_state_is_everything_after_the_last_reply():
    messages = [{"role": "user", "content": "q"},
                {"role": "assistant", "content": "", "tool_calls": []},
                {"role": "tool", "content": "42", "tool_call_id": "c"},
                {"role": "tool", "content": "43", "tool_call_id": "d"}]
    state = next_state_of(messages)
    assert [m["content"] for m in state] == ["42", "43"]
    assert next_state_kind(state) == "tool"


def test_next_state_without_history_is_the_new_user_message():
    state = next_state_of([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}])
    assert state == [{"role": "user", "content": "u"}]
    assert next_state_kind(state) == "user"


def test_a_turn_belongs_to_the_named_user_within_its_tenant():
    from nextstate.core.sessions import owner, read_session_meta

    assert read_session_meta({"x-nextstate-user": " alice "}, {}).user == "alice"
    assert read_session_meta({}, {}).user is None
    assert owner("alice", None) == "alice"
    assert owner("alice", "team-a") == "team-a:alice"
    assert owner(None, "team-a") == "team-a"
    assert owner(None, None) is None


def test_openclaws_session_key_names_the_session_after_x_session_id_before_the_body():
    assert read_session_meta({"x-openclaw-session-key": "oc-1"}, {}).session_id == "oc-1"
    both = {"x-session-id": "ours", "x-openclaw-session-key": "oc-1"}
    assert read_session_meta(both, {"session_id": "body"}).session_id == "ours"
    assert read_session_meta({"x-openclaw-session-key": "oc-1"},
                             {"session_id": "body"}).session_id == "oc-1"
    assert read_session_meta({}, {"session_id": "body"}).session_id == "body"


def test_a_coding_agents_own_session_header_is_left_to_conversation_matching():
    """Claude Code sends x-claude-code-session-id on its title and summary calls too: read
    as the session, those calls would become the conversation's next states."""
    for header in ("x-claude-code-session-id", "session-id", "x-session-affinity"):
        assert read_session_meta({header: "s-1"}, {}).session_id is None


def test_image_urls_are_read_in_order_from_image_parts_only():
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "data:image/png;base64,AA=="},
                                     {"type": "image_url", "image_url": {"url": "data:a"}}]},
        {"role": "assistant", "content": "click"},
        {"role": "user", "content": [{"type": "image_url", "image_url": "https://x/b.png"},
                                     {"type": "image_url", "image_url": {}}]},
        "garbage",
    ]
    assert image_urls(messages) == ["data:a", "https://x/b.png"]


IMAGE = {"type": "image_url", "image_url": {"url": "nextstate-image:sha256:" + "0" * 64}}


@pytest.mark.parametrize(("messages", "bare"), [
    ([{"role": "user", "content": [IMAGE]}], True),
    ([{"role": "tool", "content": " "}, {"role": "user", "content": [IMAGE, IMAGE]}], True),
    ([{"role": "user", "content": [{"type": "text", "text": "done"}, IMAGE]}], False),
    ([{"role": "tool", "content": "exit code 1"}, {"role": "user", "content": [IMAGE]}], False),
    ([{"role": "user", "content": "no image"}], False),
    ([], False),
])
def test_only_images_is_a_screenshot_with_nothing_said(messages, bare):
    assert only_images(messages) is bare

