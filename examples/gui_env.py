"""A simulated GUI for the GUI agent example: a profile form drawn with Pillow.

examples/gui_agent.py (agent -> proxy -> vLLM) sends `FormApp.screenshot()` to the model
and feeds the model's answer to `FormApp.act()`; the screen after the action is the
turn's next state. The app is deterministic (same actions, same PNG bytes) and needs
nothing but Pillow, so tests drive it with scripted actions.

The window has a name field, a Save and a Clear button, and a modal dialog:

    +---------------------------------------+
    | Profile                               |   title bar
    |  Name: [__________________________]   |   click to focus, then type("...")
    |        [ Save ]   [ Clear ]           |
    |        (dialog: message + [ OK ])     |   modal: only OK answers
    +---------------------------------------+

Save with an empty field opens an error dialog (OK closes it); Save with a name opens the
confirmation and ends the episode: a success when the name is the task's.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

WIDTH, HEIGHT = 320, 200
MAX_NAME = 24
VALID_ACTIONS = 'Answer with one action: click(x, y) or type("text").'

Box = tuple[int, int, int, int]  # left, top, right, bottom (inclusive), in pixels
FIELD: Box = (70, 44, 300, 68)
SAVE: Box = (70, 84, 150, 108)
CLEAR: Box = (170, 84, 250, 108)
DIALOG: Box = (40, 70, 280, 180)
OK: Box = (130, 140, 190, 166)

# The first action in the reply, so that a model may think aloud before acting.
_CLICK = re.compile(r"click\(\s*(-?\d+)\s*,\s*(-?\d+)\s*\)")
_TYPE = re.compile(r"""type\(\s*(?:"([^"]*)"|'([^']*)')\s*\)""")


@dataclass(frozen=True, slots=True)
class Click:
    x: int
    y: int

    def __str__(self) -> str:
        return f"click({self.x}, {self.y})"


@dataclass(frozen=True, slots=True)
class Type:
    text: str

    def __str__(self) -> str:
        return f'type("{self.text}")'


Action = Click | Type


def parse_action(reply: str) -> Action | None:
    """The first ``click(x, y)`` or ``type("...")`` in the reply, or None."""
    found = [m for m in (_CLICK.search(reply), _TYPE.search(reply)) if m]
    if not found:
        return None
    first = min(found, key=lambda m: m.start())
    if first.re is _CLICK:
        return Click(int(first.group(1)), int(first.group(2)))
    return Type(first.group(1) if first.group(1) is not None else first.group(2))


def inside(box: Box, x: int, y: int) -> bool:
    left, top, right, bottom = box
    return left <= x <= right and top <= y <= bottom


def png_bytes(image: Image.Image) -> bytes:
    """The screen as PNG, encoded the same way every time (no metadata, fixed settings)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


@dataclass(slots=True)
class FormState:
    name: str = ""
    focused: bool = False
    dialog: str | None = None  # "error" or "saved"
    saved: str | None = None


class FormApp:
    """The profile form; the task is to save ``target`` as the name."""

    def __init__(self, target: str = "Ada") -> None:
        self.target = target
        self.state = FormState()
        self._font = ImageFont.load_default(size=13)

    @property
    def task(self) -> str:
        return f'Set the profile name to "{self.target}" and save it.'

    def reset(self) -> Image.Image:
        self.state = FormState()
        return self.screenshot()

    def act(self, reply: str) -> tuple[Image.Image | str, bool, bool]:
        """Apply the model's reply: (the next screen, or what the valid actions are when
        the reply holds none; done; success)."""
        action = parse_action(reply)
        if action is None:
            return f"No action found. {VALID_ACTIONS}", False, False
        if isinstance(action, Click):
            self._click(action.x, action.y)
        elif self.state.focused and self.state.dialog is None:
            self.state.name = (self.state.name + action.text)[:MAX_NAME]
        done = self.state.dialog == "saved"
        return self.screenshot(), done, done and self.state.saved == self.target

    def _click(self, x: int, y: int) -> None:
        state = self.state
        if state.dialog is not None:  # modal: only its OK button answers
            if inside(OK, x, y) and state.dialog == "error":
                state.dialog = None
            return
        state.focused = inside(FIELD, x, y)
        if inside(SAVE, x, y):
            if state.name.strip():
                state.dialog, state.saved = "saved", state.name
            else:
                state.dialog = "error"
        elif inside(CLEAR, x, y):
            state.name = ""

    def screenshot(self) -> Image.Image:
        image = Image.new("RGB", (WIDTH, HEIGHT), (236, 236, 236))
        draw = ImageDraw.Draw(image)
        draw.rectangle((0, 0, WIDTH - 1, 26), fill=(40, 70, 140))
        draw.text((10, 6), "Profile", fill="white", font=self._font)
        draw.text((16, 49), "Name:", fill="black", font=self._font)
        border = (30, 110, 230) if self.state.focused else (120, 120, 120)
        draw.rectangle(FIELD, fill="white", outline=border, width=2)
        caret = "|" if self.state.focused else ""
        draw.text((FIELD[0] + 6, FIELD[1] + 5), self.state.name + caret, fill="black",
                  font=self._font)
        self._button(draw, SAVE, "Save")
        self._button(draw, CLEAR, "Clear")
        if self.state.dialog is not None:
            self._dialog(draw)
        return image

    def _button(self, draw: ImageDraw.ImageDraw, box: Box, label: str) -> None:
        draw.rectangle(box, fill=(210, 210, 210), outline=(90, 90, 90))
        draw.text(((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), label, fill="black",
                  font=self._font, anchor="mm")

    def _dialog(self, draw: ImageDraw.ImageDraw) -> None:
        error = self.state.dialog == "error"
        draw.rectangle(DIALOG, fill=(250, 250, 250), outline=(60, 60, 60), width=2)
        title_bar = (DIALOG[0], DIALOG[1], DIALOG[2], DIALOG[1] + 22)
        draw.rectangle(title_bar, fill=(170, 40, 40) if error else (40, 130, 60))
        draw.text((DIALOG[0] + 8, DIALOG[1] + 4), "Error" if error else "Saved",
                  fill="white", font=self._font)
        message = "Name is required." if error else f"Saved {self.state.saved}."
        draw.text((DIALOG[0] + 16, DIALOG[1] + 38), message, fill="black", font=self._font)
        self._button(draw, OK, "OK")
