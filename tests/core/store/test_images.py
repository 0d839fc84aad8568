"""Images stored once, referenced from turns, restored exactly, forgotten with their last
turn (core.store.images, on SQLite and PostgreSQL)."""

from __future__ import annotations

import base64
import copy
import hashlib
import threading

import orjson
import pytest
from sqlalchemy import func, select

from bench.gui_session import data_url, gui_session, gui_turn, screen_message, screenshot
from nextstate.core.records import NextStateRecord, TurnRecord
from nextstate.core.store import Store
from nextstate.core.store.images import (
    PREFIX,
    ImageMissing,
    Images,
    externalize,
    reference,
    references,
    restore,
)
from nextstate.core.store.schema import turn_images


def sha(png: bytes) -> str:
    return hashlib.sha256(png).hexdigest()


def test_a_30_step_gui_session_stores_30_images_not_465(store):
    shots, records = gui_session(30)
    sent = sum(len(orjson.dumps(r.request)) for r in records)
    assert sum(len(r.request["messages"]) for r in records) > 30
    store.turns.write(records)
    count, size = store.turns.images.usage()
    assert count == 30  # the requests carried 465 copies of them
    assert size == sum(len(s) for s in shots)
    rows = list(store.turns.iterate())
    assert len({r["session_id"] for r in rows}) == 1  # paired by the conversation
    kept = sum(len(orjson.dumps(r["request"])) for r in rows)
    assert kept + size < sent / 10  # ~465 inline copies, in base64, against 30 raw ones
    last = rows[-1]["request"]["messages"]
    urls = [m["content"][-1]["image_url"]["url"] for m in last if m["role"] == "user"]
    assert urls == [reference(sha(s)) for s in shots]


def test_turns_read_with_images_are_exactly_what_the_client_sent(store):
    shots, records = gui_session(4)
    originals = [copy.deepcopy(r.request) for r in records]
    store.turns.write(records)
    assert [t["request"] for t in store.turns.iterate(with_images=True)] == originals
    assert [r.request for r in records] == originals  # the records were not changed
    one = store.turns.get(records[2].turn_id)
    assert store.turns.images.inline(one)["request"] == originals[2]


def test_a_screenshot_in_the_next_user_message_is_the_turns_next_state(store):
    shots, records = gui_session(3)
    store.turns.write(records)
    rows = {r["turn_id"]: r for r in store.turns.iterate()}
    first = rows[records[0].turn_id]
    assert first["next_state_status"] == "paired"
    assert first["next_state_kind"] == "user"
    assert first["next_state"] == [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": reference(sha(shots[1]))}}]}]
    assert store.turns.images.inline(first["next_state"]) == [screen_message(shots[1])]


def test_a_screenshot_after_a_tool_result_is_in_the_next_state(store):
    shot = screenshot(1)
    call = {"id": "c1", "type": "function", "function": {"name": "click", "arguments": "{}"}}
    first = [{"role": "user", "content": "Open settings."}]
    t1 = TurnRecord(turn_id="a", endpoint="chat", created_at=1.0, request={"messages": first},
                    response={"choices": [{"index": 0, "message": {
                        "role": "assistant", "content": None, "tool_calls": [call]}}]})
    following = [*first, {"role": "assistant", "content": None, "tool_calls": [call]},
                 {"role": "tool", "tool_call_id": "c1", "content": "clicked"},
                 screen_message(shot, "The screen now:")]
    t2 = TurnRecord(turn_id="b", endpoint="chat", created_at=2.0,
                    request={"messages": following}, response={"choices": []})
    store.turns.write([t1, t2])
    row = store.turns.get("a")
    assert row["next_state_kind"] == "tool"
    assert list(references(row["next_state"])) == [sha(shot)]
    assert store.turns.images.inline(row["next_state"]) == following[2:]


def test_a_reported_next_state_stores_its_screenshot_once(store):
    shot = screenshot(5)
    store.turns.write([TurnRecord(
        turn_id="a", endpoint="chat", created_at=1.0, session_id="s",
        request={"messages": [{"role": "user", "content": "go"}]},
        response={"choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}]})])
    store.turns.write([NextStateRecord(record_id="n", created_at=2.0, session_id="s",
                                       source="endpoint", messages=[screen_message(shot)])])
    row = store.turns.get("a")
    assert list(references(row["next_state"])) == [sha(shot)]
    assert store.turns.images.usage() == (1, len(shot))


def test_anthropic_and_responses_turns_store_their_images_once_and_restore_them(store):
    shot = screenshot(2)
    b64 = base64.b64encode(shot).decode()
    chat = {"messages": [screen_message(shot, "what now?")]}
    anthropic = {"model": "m", "max_tokens": 9, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what now?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                     "data": b64}}]}]}
    responses = {"model": "m", "input": [{"role": "user", "content": [
        {"type": "input_text", "text": "what now?"},
        {"type": "input_image", "image_url": data_url(shot), "detail": "auto"}]}]}
    answer = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "click"}}]}
    store.turns.write([
        TurnRecord(turn_id="m1", endpoint="messages", created_at=1.0, request=chat,
                   response=answer, dialect={"request": anthropic, "response": {}}),
        TurnRecord(turn_id="r1", endpoint="responses", created_at=2.0, request=chat,
                   response=answer, dialect={"request": responses, "store": True,
                                             "response": {"id": "resp_1"}})])
    assert store.turns.images.usage() == (1, len(shot))
    m1 = store.turns.get("m1")
    assert m1["dialect"]["request"]["messages"][0]["content"][1]["source"] == {
        "type": "base64", "media_type": "image/png", "data": reference(sha(shot))}
    assert b64 not in orjson.dumps(m1).decode()
    assert store.turns.images.inline(m1)["dialect"]["request"] == anthropic
    # previous_response_id: the proxy forwards the kept request again, images inline
    assert store.responses.find(None, "resp_1")["request"] == responses


def test_remote_urls_and_images_that_could_not_be_rebuilt_stay_as_sent(store):
    shot = screenshot(3)
    b64 = base64.b64encode(shot).decode()
    odd = [
        "https://example.com/screen.png",  # never fetched
        f"data:image/png;name=s.png;base64,{b64}",  # a parameter: kept whole
        "data:image/png;base64," + b64[:-2],  # broken base64
        "data:image/png;base64,QR==",  # decodes, but not canonically ("QQ==")
    ]
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": u}}
                                              for u in odd]}]
    store.turns.write([TurnRecord(turn_id="a", endpoint="chat", created_at=1.0,
                                  request={"messages": messages}, response={"choices": []})])
    assert store.turns.get("a")["request"]["messages"] == messages
    assert store.turns.images.usage() == (0, 0)


def test_a_clients_own_reference_string_is_kept_as_sent_and_never_inlined(store):
    shot = screenshot(7)
    store.turns.write([gui_turn(0, [shot], turn_id="owner", tenant="a")])
    theirs = reference(sha(shot))  # another tenant names the stored image
    request = {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": theirs}},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                     "data": theirs}}]}]}
    store.turns.write([TurnRecord(turn_id="probe", endpoint="chat", created_at=9.0,
                                  tenant="b", request=request, response={"choices": []})])
    probe = store.turns.get("probe")
    assert list(references(probe)) == []
    assert store.turns.images.inline(probe)["request"] == request  # no image given away
    assert [t["request"] for t in store.turns.iterate(tenant="b", with_images=True)] == [
        request]


def test_the_same_bytes_under_another_media_type_stay_inline(store):
    shot = screenshot(4)
    b64 = base64.b64encode(shot).decode()
    as_jpeg = f"data:image/jpeg;base64,{b64}"
    store.turns.write([gui_turn(0, [shot], turn_id="png")])
    store.turns.write([TurnRecord(turn_id="jpeg", endpoint="chat", created_at=5.0, request={
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": as_jpeg}}]}]}, response={"choices": []})])
    url = store.turns.get("jpeg")["request"]["messages"][0]["content"][0]["image_url"]["url"]
    assert url == as_jpeg  # a reference would come back as image/png


def test_forgetting_a_session_deletes_the_images_only_it_referenced(store):
    shared = screenshot(0)
    shots_a = [shared, screenshot(1)]
    shots_b = [shared, screenshot(2)]
    store.turns.write([gui_turn(i, shots_a, session_id="a") for i in range(2)]
                      + [gui_turn(i, shots_b, session_id="b") for i in range(2)])
    assert store.turns.images.usage()[0] == 3
    forgotten = store.retention.forget(session_id="a")
    assert (forgotten.turns, forgotten.images) == (2, 1)
    assert set(store.turns.images.blobs([sha(s) for s in shots_a + shots_b])) == {
        sha(shared), sha(shots_b[1])}
    assert [t["request"] for t in store.turns.iterate(with_images=True)] == [
        gui_turn(i, shots_b, session_id="b").request for i in range(2)]
    forgotten = store.retention.forget(session_id="b")
    assert forgotten.images == 2
    assert store.turns.images.usage() == (0, 0)
    with store.db.connect() as conn:
        assert conn.execute(select(func.count()).select_from(turn_images)).scalar_one() == 0


def test_forgetting_a_tenant_or_a_user_or_by_age_takes_their_images(store):
    store.turns.write([gui_turn(0, [screenshot(10)], turn_id="t", tenant="acme"),
                       gui_turn(0, [screenshot(11)], turn_id="u", user="bob"),
                       gui_turn(0, [screenshot(12)], turn_id="old")])
    assert store.retention.forget(tenant="acme").images == 1
    assert store.retention.forget(user="bob").images == 1
    assert store.retention.forget(older_than=2000.0).images == 1
    assert store.turns.images.usage() == (0, 0)


def test_a_next_state_keeps_its_screenshot_when_the_next_turn_is_forgotten(store):
    shots, records = gui_session(2)
    store.turns.write(records)
    with store.db.begin() as conn:  # what forgetting the second turn alone leaves
        conn.execute(turn_images.delete().where(turn_images.c.turn_id == records[1].turn_id))
        assert Images.collect_garbage(conn) == 0
    first = store.turns.get(records[0].turn_id)
    assert store.turns.images.inline(first)["next_state"] == [screen_message(shots[1])]


def test_forgetting_waits_for_a_writer_that_reuses_a_stored_image(postgres_url):
    # Two processes on PostgreSQL: one writes a turn that reuses an image already stored
    # while the other forgets the only turn that referenced it.
    forgetter, writer = Store(postgres_url), Store(postgres_url)
    shot = screenshot(8)
    forgetter.turns.write([gui_turn(0, [shot], session_id="a")])
    transaction = writer.db.begin()
    conn = transaction.__enter__()
    _, hashes = writer.turns.images.store(conn, {"messages": [screen_message(shot)]})
    assert hashes == {sha(shot)}
    done = threading.Event()

    def forget() -> None:
        forgetter.retention.forget(session_id="a")
        done.set()

    thread = threading.Thread(target=forget)
    thread.start()
    assert not done.wait(1.0)  # the collector waits for the writer to commit
    Images.link(conn, "b-0", hashes)
    transaction.__exit__(None, None, None)
    thread.join(10)
    assert done.is_set()
    assert set(writer.turns.images.blobs(hashes)) == hashes  # still there for b-0
    forgetter.close()
    writer.close()


def test_a_reference_to_a_forgotten_image_is_a_clear_error(store):
    missing = reference("0" * 64)
    with pytest.raises(ImageMissing, match="not in the store"):
        store.turns.images.inline({"url": missing})


def test_externalize_leaves_text_alone_and_never_changes_its_input():
    request = {"messages": [{"role": "user", "content": "no images here"}]}
    assert externalize(request) == (request, {})
    assert externalize(request)[0] is request  # nothing copied when nothing changes
    shot = screenshot(6)
    with_image = {"messages": [screen_message(shot)]}
    before = copy.deepcopy(with_image)
    swapped, found = externalize(with_image)
    assert with_image == before
    assert found == {sha(shot): ("image/png", shot)}
    assert restore(swapped, found) == with_image
    assert PREFIX in orjson.dumps(swapped).decode()


def test_one_image_is_read_by_its_hash_and_only_by_a_tenant_whose_turn_has_it(store):
    shots, records = gui_session(2, session_id="a", tenant="alice")
    store.turns.write(records)
    _, theirs = gui_session(1, session_id="b", tenant="bob")
    store.turns.write(theirs)  # the same first screen: bob's turn references it too
    first, second = sha(shots[0]), sha(shots[1])
    assert store.turns.images.image(second) == ("image/png", shots[1])
    assert store.turns.images.image(second, tenant="alice") == ("image/png", shots[1])
    assert store.turns.images.image(second, tenant="bob") is None  # not in bob's turns
    assert store.turns.images.image(first, tenant="bob") == ("image/png", shots[0])
    assert store.turns.images.image("0" * 64) is None
