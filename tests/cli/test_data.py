"""``nextstate export`` and ``nextstate forget`` on a GUI session's turns (cli.data):
images as references by default, back inline with ``--with-images``, gone when forgotten."""

from __future__ import annotations

import orjson
from click.testing import CliRunner

from bench.gui_session import data_url, gui_session
from nextstate import cli
from nextstate.core.store import Store
from nextstate.core.store.images import PREFIX


def test_export_gives_references_and_with_images_the_images_as_sent(tmp_path):
    url = f"sqlite:///{tmp_path / 'store.db'}"
    shots, records = gui_session(3, session_id="s")
    store = Store(url)
    store.turns.write(records)
    store.close()
    plain = CliRunner().invoke(cli.main, ["export", "--store", url])
    assert plain.exit_code == 0, plain.output
    assert PREFIX in plain.output and data_url(shots[0]) not in plain.output
    full = CliRunner().invoke(cli.main, ["export", "--store", url, "--with-images"])
    assert full.exit_code == 0, full.output
    rows = [orjson.loads(line) for line in full.output.splitlines()]
    assert [r["request"] for r in rows] == [r.request for r in records]
    assert len(full.output) > 5 * len(plain.output)


def test_forget_says_how_many_images_went_with_the_turns(tmp_path):
    url = f"sqlite:///{tmp_path / 'store.db'}"
    store = Store(url)
    store.turns.write(gui_session(3, session_id="s")[1])
    store.close()
    result = CliRunner().invoke(cli.main, ["forget", "--store", url, "--session", "s"])
    assert result.exit_code == 0, result.output
    assert "deleted 3 turns and 3 images no other turn used" in result.output
    store = Store(url)
    assert store.turns.images.usage() == (0, 0)
    store.close()
