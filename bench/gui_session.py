"""A GUI agent's session, for the image store's benchmark and tests (agent -> proxy ->
store): one 640x400 PNG screenshot a step (Pillow), each request resending every earlier
one with the agent's action after it, as computer-use agents do."""

from __future__ import annotations

import base64
import io
from typing import Any

from nextstate.core.records import TurnRecord


def screenshot(step: int, size: tuple[int, int] = (640, 400)) -> bytes:
    """A distinct, GUI-like PNG: a window, a title bar, a few widgets, the step written."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, (236, 236, 236))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, size[0], 28), fill=(40, 44, 52))
    draw.text((10, 8), f"Settings - step {step}", fill=(255, 255, 255))
    for row in range(6):
        y = 50 + row * 48
        draw.rectangle((30, y, 300 + (step * 7 + row * 13) % 250, y + 30),
                       outline=(120, 120, 120), fill=(255, 255, 255))
        draw.text((40, y + 10), f"field {row}: value {step * row}", fill=(0, 0, 0))
    draw.ellipse((500, 300, 520 + step % 40, 320 + step % 40), fill=(30, 120, 220))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def screen_message(png: bytes, text: str | None = None) -> dict[str, Any]:
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
    parts.append({"type": "image_url", "image_url": {"url": data_url(png)}})
    return {"role": "user", "content": parts}


def reply(step: int) -> str:
    return f"click({100 + step}, {60 + step})"


def gui_turn(step: int, shots: list[bytes], *, turn_id: str | None = None,
             session_id: str | None = None, **fields: Any) -> TurnRecord:
    """Step ``step``'s request: the task, then every screenshot so far with the agent's
    action after each (no session id: the store pairs it by the conversation)."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": "You operate a GUI."}]
    for i in range(step + 1):
        messages.append(screen_message(shots[i], "Turn on dark mode." if i == 0 else None))
        if i < step:
            messages.append({"role": "assistant", "content": reply(i)})
    return TurnRecord(
        turn_id=turn_id or f"{session_id or 'gui'}-{step}", endpoint="chat",
        created_at=1000.0 + step, request={"model": "m", "messages": messages},
        session_id=session_id, **fields,
        response={"model": "m", "prompt_token_ids": [1, 2], "choices": [{
            "index": 0, "message": {"role": "assistant", "content": reply(step)},
            "token_ids": [7], "logprobs": {"content": [{"logprob": -0.5}]},
            "finish_reason": "stop"}], "usage": {"prompt_tokens": 2, "completion_tokens": 1}})


def gui_session(steps: int, **fields: Any) -> tuple[list[bytes], list[TurnRecord]]:
    shots = [screenshot(i) for i in range(steps)]
    return shots, [gui_turn(i, shots, **fields) for i in range(steps)]
