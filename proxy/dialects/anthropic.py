"""Anthropic Messages over chat completions: the request, the answer, the stream, errors.

agent ─(POST /v1/messages)─> proxy ─(POST /v1/chat/completions)─> vLLM. `to_chat` turns a
Messages request into the chat request vLLM itself would build for it; `from_chat` turns
the chat answer into the Messages answer vLLM would give (``anthropic_stream.py`` does the
same for a stream); `error_from_chat` reshapes vLLM's errors. Each step mirrors vLLM
0.32's ``entrypoints/anthropic/serving.py``, which converts the same way internally, so
a client sees what vLLM's own ``/v1/messages`` would have shown it (ids and timestamps
aside). Where vLLM decides, we follow:

- ``system`` (a string or text blocks) becomes one leading system message, the blocks
  joined without a separator; Claude Code's ``x-anthropic-billing-header`` block is
  dropped (it changes every request and defeats the prefix cache). System messages
  inside ``messages`` stay in place, or are merged into the leading one when the chat
  template needs a single leading system message (``merge_inline_system``; vLLM probes
  its template for this, the proxy is told).
- ``tool_use`` blocks become the assistant's ``tool_calls``, arguments as
  ``json.dumps(input)`` (Python's separators: the template renders this string).
  A user's ``tool_result`` becomes a ``tool`` message (list content: its text parts
  joined by newlines; its images follow in a user message). ``is_error`` does not reach
  the model (vLLM drops it too); the recorded request keeps it for the next state.
- ``stop_reason``: ``max_tokens`` on length; ``tool_use`` when complete tool calls were
  made; ``stop_sequence`` (with the string) when a stop string matched; else ``end_turn``.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from nextstate.proxy.dialects import JSON, chat_error
from nextstate.proxy.errors import InvalidRequest

BILLING_HEADER = "x-anthropic-billing-header"
BLOCK_TYPES = frozenset({"text", "image", "tool_use", "tool_result", "tool_reference",
                         "thinking", "redacted_thinking", "tool_addition", "tool_removal"})
TOOL_CHOICES = {"auto": "auto", "any": "required", "none": "none"}
# Passed to the chat request as they are (vLLM's own extensions of the Messages API).
VLLM_FIELDS = ("watermarking", "cache_salt", "kv_transfer_params", "ec_transfer_params",
               "vllm_xargs", "chat_template_kwargs")


class UnusableAnswer(InvalidRequest):
    """The model's answer cannot be put in Anthropic's shape (a tool call whose arguments
    are not a JSON object); vLLM's own ``/v1/messages`` answers this 400 too."""

    anthropic_type = "BadRequestError"


def to_chat(body: JSON, *, merge_inline_system: bool = False,
            disabled_thinking_effort: str = "none") -> JSON:
    """The chat completions request vLLM builds for the Messages request ``body``."""
    _check_request(body)
    messages: list[JSON] = []
    system = _system_text(body, merge_inline_system)
    if system:
        messages.append({"role": "system", "content": system})
    for message in body["messages"]:
        _convert_message(message, messages, merge_inline_system)
    chat: JSON = {"model": body["model"], "messages": messages,
                  "max_tokens": body["max_tokens"], "max_completion_tokens": body["max_tokens"]}
    for ours, theirs in (("stop_sequences", "stop"), ("temperature", "temperature"),
                         ("top_p", "top_p"), ("top_k", "top_k")):
        if body.get(ours) is not None:
            chat[theirs] = body[ours]
    chat.update((k, body[k]) for k in VLLM_FIELDS if body.get(k) is not None)
    if body.get("stream"):
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    _output_config(body.get("output_config"), chat)
    thinking = body.get("thinking")
    if isinstance(thinking, dict):
        if thinking.get("type") == "disabled":
            chat["reasoning_effort"] = disabled_thinking_effort
        elif thinking.get("type") == "enabled":
            chat["thinking_token_budget"] = thinking.get("budget_tokens")
    _tools(body, chat)
    return chat


def _check_request(body: JSON) -> None:
    if not body.get("model") or not isinstance(body["model"], str):
        raise InvalidRequest("model: a model name is required", param="model")
    tokens = body.get("max_tokens")
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens <= 0:
        raise InvalidRequest("max_tokens: a positive integer is required", param="max_tokens")
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise InvalidRequest("messages: a list of messages is required", param="messages")
    for i, message in enumerate(messages):
        where = f"messages.{i}"
        if not isinstance(message, dict) or message.get("role") not in (
                "user", "assistant", "system"):
            raise InvalidRequest(f"{where}: role must be user, assistant or system",
                                 param=where)
        _check_content(message.get("content"), where, message["role"] == "system")
    if body.get("system") is not None:
        _check_content(body["system"], "system", False)
    thinking = body.get("thinking")
    if isinstance(thinking, dict) and thinking.get("type") == "enabled":
        budget = thinking.get("budget_tokens")
        if not isinstance(budget, int) or budget < 1024 or budget >= tokens:
            raise InvalidRequest("thinking.budget_tokens must be at least 1024 and less "
                                 "than max_tokens", param="thinking.budget_tokens")
    choice = body.get("tool_choice")
    if choice is not None and (not isinstance(choice, dict) or choice.get("type") not in (
            "auto", "any", "tool", "none") or (choice["type"] == "tool"
                                               and not choice.get("name"))):
        raise InvalidRequest("tool_choice: type auto, any or none, or tool with a name",
                             param="tool_choice")
    for i, tool in enumerate(body.get("tools") or []):
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str) \
                or not isinstance(tool.get("input_schema"), dict):
            raise InvalidRequest(f"tools.{i}: a name and an input_schema object are required",
                                 param=f"tools.{i}")


def _check_content(content: Any, where: str, tool_changes: bool) -> None:
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise InvalidRequest(f"{where}.content: a string or a list of content blocks",
                             param=where)
    for j, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind not in BLOCK_TYPES:
            raise InvalidRequest(f"{where}.content.{j}: unsupported content block type "
                                 f"{kind!r}", param=f"{where}.content.{j}")
        if kind in ("tool_addition", "tool_removal") and not tool_changes:
            raise InvalidRequest(f'{kind} blocks are only allowed in messages with role '
                                 f'"system"', param=f"{where}.content.{j}")
        if kind == "tool_use" and block.get("input") is not None \
                and not isinstance(block["input"], dict):
            raise InvalidRequest(f"{where}.content.{j}.input: an object",
                                 param=f"{where}.content.{j}.input")


def _system_text(body: JSON, merge_inline_system: bool) -> str:
    parts: list[str] = []
    system = body.get("system")
    if isinstance(system, str) and system:
        parts.append(system)
    elif isinstance(system, list):
        parts.extend(b["text"] for b in system if b.get("type") == "text" and b.get("text")
                     and not b["text"].startswith(BILLING_HEADER))
    if merge_inline_system:
        parts.extend(t for m in body["messages"] if m["role"] == "system"
                     if (t := _inline_system_text(m["content"])))
    return "".join(parts)


def _inline_system_text(content: str | list[JSON]) -> str | None:
    if isinstance(content, str):
        return None if content.startswith(BILLING_HEADER) else content
    parts = [b["text"] for b in content if b.get("type") == "text" and b.get("text")
             and not b["text"].startswith(BILLING_HEADER)]
    return "".join(parts) or None


def _convert_message(message: JSON, out: list[JSON], merge_inline_system: bool) -> None:
    role, content = message["role"], message["content"]
    if role == "system":
        text = None if merge_inline_system else _inline_system_text(content)
        if text:
            out.append({"role": "system", "content": text})
        return
    converted: JSON = {"role": role}
    if isinstance(content, str):
        converted["content"] = content
    else:
        parts: list[JSON] = []
        calls: list[JSON] = []
        reasoning: list[str] = []
        for block in content:
            _convert_block(block, role, parts, calls, reasoning, out)
        if reasoning:
            converted["reasoning"] = "".join(reasoning)
        if calls:
            converted["tool_calls"] = calls
        if len(parts) == 1 and parts[0]["type"] == "text":
            converted["content"] = parts[0]["text"]
        elif parts:
            converted["content"] = parts
    if not (role == "user" and "content" not in converted):
        out.append(converted)


def _convert_block(block: JSON, role: str, parts: list[JSON], calls: list[JSON],
                   reasoning: list[str], out: list[JSON]) -> None:
    kind = block["type"]
    if kind == "text" and block.get("text"):
        parts.append({"type": "text", "text": block["text"]})
    elif kind == "image" and block.get("source"):
        parts.append({"type": "image_url", "image_url": {"url": _image_url(block["source"])}})
    elif kind == "thinking" and block.get("thinking") is not None:
        reasoning.append(block["thinking"])
    elif kind == "tool_use":
        calls.append({"id": block.get("id") or f"call_{int(time.time())}", "type": "function",
                      "function": {"name": block.get("name") or "",
                                   "arguments": json.dumps(block.get("input") or {})}})
    elif kind == "tool_result" and role == "user":
        _tool_result(block, out)
    elif kind == "tool_result":
        text = str(block["content"]) if block.get("content") else ""
        parts.append({"type": "text", "text": f"Tool result: {text}"})


def _image_url(source: JSON) -> str:
    if source.get("type") == "url":
        return str(source.get("url", ""))
    return f"data:{source.get('media_type', 'image/jpeg')};base64,{source.get('data', '')}"


def _tool_result(block: JSON, out: list[JSON]) -> None:
    content = block.get("content")
    text, images, references = "", [], []
    if isinstance(content, str):
        text = content
    elif isinstance(content, list):
        texts = []
        for item in content:
            kind = item.get("type") if isinstance(item, dict) else None
            if kind == "text":
                texts.append(item.get("text", ""))
            elif kind == "image" and (url := _image_url(item.get("source", {}))):
                images.append(url)
            elif kind == "tool_reference" and (name := item.get("tool_name")
                                               or item.get("name")):
                references.append({"type": "tool_reference", "name": name})
        text = "\n".join(texts)
    call_id = block.get("tool_use_id") or ""
    out.append({"role": "tool", "tool_call_id": call_id, "content": text or ""})
    if images:
        out.append({"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}} for url in images]})
    if references:
        out.append({"role": "tool", "tool_call_id": call_id, "content": references})


def _output_config(config: Any, chat: JSON) -> None:
    if not isinstance(config, dict):
        return
    form = config.get("format")
    if isinstance(form, dict) and form.get("schema"):
        kind = form.get("type", "json_schema")
        chat["response_format"] = {"type": kind,
                                   "json_schema": {"name": kind, "schema": form["schema"]}}
    if config.get("effort") is not None:
        chat["reasoning_effort"] = config["effort"]


def _tools(body: JSON, chat: JSON) -> None:
    choice = body.get("tool_choice")
    if choice is not None:
        chat["parallel_tool_calls"] = not choice.get("disable_parallel_tool_use")
        if choice["type"] == "tool":
            chat["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
        else:
            chat["tool_choice"] = TOOL_CHOICES[choice["type"]]
    tools = _resolve_tools(body)
    if tools is None:
        return
    chat["tools"] = [{"type": "function", "function": _function(tool)} for tool in tools]
    chat.setdefault("tool_choice", "auto")


def _function(tool: JSON) -> JSON:
    schema = dict(tool["input_schema"])
    schema.setdefault("type", "object")  # vLLM's default, appended last like vLLM's
    function: JSON = {"name": tool["name"], "description": tool.get("description"),
                      "parameters": schema}
    for key in ("strict", "defer_loading"):
        if tool.get(key) is not None:
            function[key] = tool[key]
    return function


def _resolve_tools(body: JSON) -> list[JSON] | None:
    """``tools`` after the ``tool_addition``/``tool_removal`` blocks of system messages:
    the template sees the tools in effect at the end of the conversation."""
    changes = [b for m in body["messages"] if isinstance(m["content"], list)
               for b in m["content"] if b["type"] in ("tool_addition", "tool_removal")]
    if not changes:
        return body.get("tools")
    tools = {t["name"]: t for t in body.get("tools") or []}
    removed: set[str] = set()
    for block in changes:
        change = block.get("tool") or {}
        if change.get("type") == "tool_definition":
            definition = change.get("definition") or {}
            name = definition.get("name", "")
            tools[name] = definition
        else:
            name = change.get("name", "")
            if name not in tools:
                raise InvalidRequest(f"{block['type']} references tool {name!r}, which is "
                                     "not declared in tools", param="messages")
            if block["type"] == "tool_addition":
                tools[name] = {**tools[name], "defer_loading": None}
        (removed.add if block["type"] == "tool_removal" else removed.discard)(name)
    return [t for name, t in tools.items() if name not in removed]


def stop_reason(finish: str | None, matched: Any, tool_used: bool,
                tool_complete: bool) -> tuple[str | None, str | None]:
    """Anthropic's ``(stop_reason, stop_sequence)`` for a chat finish: ``max_tokens``
    always wins; a matched stop string wins unless the tool calls are complete."""
    if finish == "length":
        return "max_tokens", None
    if finish not in ("stop", "tool_calls"):
        return None, None
    if tool_complete:
        return "tool_use", None
    if isinstance(matched, str):  # an int is a stop token id, not a stop sequence
        return "stop_sequence", matched
    return ("tool_use" if finish == "tool_calls" or tool_used else "end_turn"), None


def usage(chat_usage: JSON | None) -> JSON:
    """Anthropic usage: ``input_tokens`` excludes the cached part, which it reports apart
    (when vLLM reports it: ``--enable-prompt-tokens-details``)."""
    if not chat_usage:
        return {"input_tokens": 0, "output_tokens": 0}
    out: JSON = {"input_tokens": chat_usage.get("prompt_tokens") or 0,
                 "output_tokens": chat_usage.get("completion_tokens") or 0}
    details = chat_usage.get("prompt_tokens_details") or {}
    for theirs, ours in (("created_cache_tokens", "cache_creation_input_tokens"),
                         ("cached_tokens", "cache_read_input_tokens")):
        if details.get(theirs) is not None:
            out["input_tokens"] -= details[theirs]
            out[ours] = details[theirs]
    out["input_tokens"] = max(0, out["input_tokens"])
    return out


def from_chat(chat: JSON) -> JSON:
    """The Messages answer for a whole chat completion."""
    choice = chat["choices"][0]
    message = choice.get("message") or {}
    calls = message.get("tool_calls") or []
    reason, sequence = stop_reason(choice.get("finish_reason"), choice.get("stop_reason"),
                                   bool(calls), bool(calls))
    content: list[JSON] = []
    if message.get("reasoning"):
        content.append({"type": "thinking", "thinking": message["reasoning"],
                        "signature": uuid.uuid4().hex})
    if message.get("content"):
        content.append({"type": "text", "text": message["content"]})
    for call in calls:
        content.append({"type": "tool_use", "id": call["id"],
                        "name": call["function"]["name"],
                        "input": _tool_input(call["function"]["arguments"])})
    answer: JSON = {"id": chat["id"], "type": "message", "role": "assistant",
                    "content": content or [{"type": "text", "text": ""}],
                    "model": chat["model"]}
    if reason is not None:
        answer["stop_reason"] = reason
    if sequence is not None:
        answer["stop_sequence"] = sequence
    answer["usage"] = usage(chat.get("usage"))
    for key in ("kv_transfer_params", "ec_transfer_params"):
        if chat.get(key) is not None:
            answer[key] = chat[key]
    return answer


def _tool_input(arguments: str) -> JSON:
    try:
        parsed = json.loads(arguments)
    except json.JSONDecodeError as exc:
        raise UnusableAnswer(f"the model's tool call arguments are not JSON: {exc}") from exc
    if not isinstance(parsed, dict):
        raise UnusableAnswer("the model's tool call arguments are not a JSON object: "
                             f"{arguments[:200]}")
    return parsed


def error_from_chat(status: int, body: bytes) -> bytes:
    """vLLM's chat error, in the shape vLLM's ``/v1/messages`` gives it (same status)."""
    error = chat_error(body)
    return json.dumps({"type": "error", "error": {
        "type": str(error.get("type") or "api_error"),
        "message": str(error.get("message") or f"the model backend answered {status}")},
    }).encode()
