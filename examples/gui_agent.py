"""A GUI agent through nextstate: the model sees screenshots and answers with actions.

Serve the vision-language toy behind the proxy (see README, "GUI agents"), then:

    OPENAI_BASE_URL=http://127.0.0.1:8400/v1 python examples/gui_agent.py --steps 5

Each step sends the current screen of a simulated form (`gui_env.FormApp`, drawn with
Pillow) as a PNG ``data:`` URL with the task, asks the model for one action,
``click(x, y)`` or ``type("text")``, and applies it. The screen after the action is the
next user message, and so the turn's next state; a reply with no action gets the same
screen back with a line saying what the valid actions are. The agent's own signals go
to nextstate as feedback: -1 with a hint on the turn that opened the error dialog, and
the episode's outcome (+1 when the name was saved, else -1) for the whole session. The
last screen is sent with the session's end, so the final action is judged too. (The
toy has random weights, so its actions are mostly not actions at all: that is a next
state too.)
"""

from __future__ import annotations

import argparse
import base64
import time
from typing import Any

from gui_env import HEIGHT, WIDTH, FormApp, parse_action, png_bytes
from PIL import Image

from nextstate.adapters.openai import Session

SYSTEM = (f"You operate a desktop app through its screenshots ({WIDTH}x{HEIGHT} pixels, "
          'origin at the top left). Answer with one action: click(x, y) or type("text").')
ERROR_HINT = "Click the name field and type the name before clicking Save."


def data_url(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def screen_message(image: Image.Image, text: str) -> dict[str, Any]:
    """A user message with the screen first, then the words about it."""
    return {"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(image)}},
        {"type": "text", "text": text}]}


def run_episode(session: Session, app: FormApp, *, model: str, steps: int,
                max_tokens: int, temperature: float) -> bool:
    """Up to ``steps`` actions; returns whether the task was done."""
    client = session.client()
    messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM},
                                      screen_message(app.reset(), app.task)]
    success = False
    for step in range(steps):
        reply = client.chat.completions.create(model=model, messages=messages,
                                               max_tokens=max_tokens, temperature=temperature)
        text = reply.choices[0].message.content or ""
        error_before = app.state.dialog == "error"
        observation, done, success = app.act(text)
        if isinstance(observation, str):  # not an action: the screen is unchanged
            note, observation = observation, app.screenshot()
        else:
            note = f"The screen after {parse_action(text)}."
        messages += [{"role": "assistant", "content": text},
                     screen_message(observation, note)]
        print(f"step {step}: {text!r} -> {note}")
        if app.state.dialog == "error" and not error_before:
            session.feedback(-1, hint=ERROR_HINT)  # about the turn that caused it
        if done:
            break
    # No further request carries the last screen: report it, and end the session.
    session.next_state([messages[-1]], done=True)
    session.outcome(1 if success else -1)
    return success


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="nextstate-vlm-toy")
    parser.add_argument("--name", default="Ada", help="The name the task asks to save.")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--temperature", type=float, default=0.7)
    args = parser.parse_args()
    session = Session()
    started = time.monotonic()
    success = run_episode(session, FormApp(args.name), model=args.model, steps=args.steps,
                          max_tokens=args.max_tokens, temperature=args.temperature)
    print(f"success: {success}; {time.monotonic() - started:.1f} s")
    print(f"session: {session.id}")


if __name__ == "__main__":
    main()
