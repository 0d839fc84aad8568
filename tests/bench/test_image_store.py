"""The image store benchmark's own parts: both stores hold the same session, and the
numbers it reports are the ones measured."""

from __future__ import annotations

from bench.image_store import measure, report


def test_both_stores_are_measured_on_the_same_session(tmp_path):
    once, inline = (measure(6, dedup, tmp_path) for dedup in (True, False))
    assert once["copies_sent"] == inline["copies_sent"] == 21
    assert once["images"] == 6 and inline["images"] == 0
    assert once["image_bytes"] == once["screenshot_bytes"]
    assert once["stored_bytes"] < inline["stored_bytes"] / 2
    assert inline["json_bytes"] >= inline["sent_bytes"]
    assert "| once | 6 |" in report([once, inline])
