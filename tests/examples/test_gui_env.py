"""The GUI example's simulated form, driven by scripted actions (no model, no server)."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from examples.gui_env import (
    CLEAR,
    DIALOG,
    FIELD,
    HEIGHT,
    MAX_NAME,
    OK,
    SAVE,
    WIDTH,
    Box,
    Click,
    FormApp,
    Type,
    parse_action,
    png_bytes,
)


def center(box: Box) -> str:
    return f"click({(box[0] + box[2]) // 2}, {(box[1] + box[3]) // 2})"


def run(app: FormApp, *replies: str) -> tuple[object, bool, bool]:
    result: tuple[object, bool, bool] = (None, False, False)
    for reply in replies:
        result = app.act(reply)
    return result


@pytest.mark.parametrize(("reply", "action"), [
    ("click(10, 20)", Click(10, 20)),
    ("I will click( 5 ,6 ) now", Click(5, 6)),
    ('type("Ada")', Type("Ada")),
    ("type('Bo Li')", Type("Bo Li")),
    ('type("x") and then click(1, 2)', Type("x")),  # the first action in the reply
    ('click(1, 2) and then type("x")', Click(1, 2)),
    ('type("")', Type("")),
    ("clack(1, 2)", None),
    ("click(1)", None),
    ("type(Ada)", None),
    ("", None),
])
def test_the_first_action_in_a_reply_is_parsed(reply: str, action: object) -> None:
    assert parse_action(reply) == action


def test_actions_print_as_the_model_should_write_them() -> None:
    assert str(Click(3, 4)) == "click(3, 4)" and str(Type("Ada")) == 'type("Ada")'
    assert parse_action(str(Click(3, 4))) == Click(3, 4)


def test_focus_type_and_save_the_task_name_succeeds() -> None:
    app = FormApp("Ada")
    app.reset()
    assert run(app, center(FIELD), 'type("Ad")')[1:] == (False, False)
    screen, done, success = run(app, 'type("a")', center(SAVE))
    assert (done, success) == (True, True)
    assert app.state.saved == "Ada" and app.state.dialog == "saved"
    assert isinstance(screen, Image.Image)
    assert screen.getpixel((DIALOG[0] + 5, DIALOG[1] + 5)) == (40, 130, 60)  # green title


def test_saving_another_name_ends_the_episode_as_a_failure() -> None:
    app = FormApp("Ada")
    assert run(app, center(FIELD), 'type("Bob")', center(SAVE))[1:] == (True, False)
    assert app.state.saved == "Bob"


def test_save_with_an_empty_field_opens_a_modal_error_that_ok_closes() -> None:
    app = FormApp()
    screen, done, success = app.act(center(SAVE))
    assert (done, success) == (False, False) and app.state.dialog == "error"
    assert isinstance(screen, Image.Image)
    assert screen.getpixel((DIALOG[0] + 5, DIALOG[1] + 5)) == (170, 40, 40)  # red title
    # Modal: the form under the dialog does not answer, and typing goes nowhere.
    run(app, center(FIELD), 'type("Ada")', center(CLEAR))
    assert app.state.dialog == "error" and app.state.name == "" and not app.state.focused
    app.act(center(OK))
    assert app.state.dialog is None
    assert run(app, center(FIELD), 'type("Ada")', center(SAVE))[1:] == (True, True)


def test_typing_goes_to_the_field_only_when_it_has_the_focus() -> None:
    app = FormApp()
    app.act('type("Ada")')
    assert app.state.name == ""
    run(app, center(FIELD), 'type("Ada")', "click(5, 190)", 'type("x")')
    assert app.state.name == "Ada" and not app.state.focused  # a click elsewhere blurs


def test_clear_empties_the_field_and_names_are_capped() -> None:
    app = FormApp()
    run(app, center(FIELD), 'type("' + "x" * 40 + '")')
    assert app.state.name == "x" * MAX_NAME
    app.act(center(CLEAR))
    assert app.state.name == ""


def test_a_reply_without_an_action_says_what_the_actions_are_and_changes_nothing() -> None:
    app = FormApp()
    before = png_bytes(app.reset())
    observation, done, success = app.act("the blue button, I think")
    assert isinstance(observation, str)
    assert "click(x, y)" in observation and 'type("text")' in observation
    assert (done, success) == (False, False)
    assert png_bytes(app.screenshot()) == before


def test_screens_are_deterministic_png_bytes_that_follow_the_state() -> None:
    script = [center(FIELD), 'type("Ada")', center(CLEAR), center(SAVE), center(OK)]
    first, second = FormApp(), FormApp()
    screens = [png_bytes(first.reset())]
    assert png_bytes(second.reset()) == screens[0]
    for reply in script:
        mine, theirs = first.act(reply)[0], second.act(reply)[0]
        assert isinstance(mine, Image.Image) and isinstance(theirs, Image.Image)
        assert png_bytes(mine) == png_bytes(theirs)
        screens.append(png_bytes(mine))
    # initial, focused, typed, cleared (Clear also blurs: the initial screen), error, closed
    initial, focused, typed, cleared, error, closed = screens
    assert len({initial, focused, typed, error}) == 4
    assert cleared == closed == initial  # the same state draws the same bytes
    assert png_bytes(first.reset()) == screens[0]
    image = Image.open(io.BytesIO(screens[0]))
    assert image.format == "PNG" and image.size == (WIDTH, HEIGHT)
