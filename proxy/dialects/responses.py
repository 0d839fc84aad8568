"""OpenAI Responses over chat completions: the request and the whole answer.

agent ─(POST /v1/responses)─> proxy ─(POST /v1/chat/completions)─> vLLM. `to_chat` turns
a Responses request (already expanded by `conversation.expand`) into the chat request
whose prompt is the one vLLM's own ``/v1/responses`` renders; `frame` is the Responses
object's echo of the request; `from_chat` fills it from the chat answer. The stream is
``responses_stream.py``. This mirrors vLLM 0.32's non-Harmony Responses path
(``entrypoints/openai/responses``: ``utils.construct_input_messages``,
``serving.responses_full_generator``, ``protocol.ResponsesResponse.from_request``):

- ``instructions`` become a leading system message; a string ``input`` one user
  message; ``function_call`` items the assistant's ``tool_calls`` (merged into the
  assistant message before them, as vLLM merges); ``function_call_output`` items
  ``tool`` messages; assistant messages their first text part. Content parts
  ``input_text``/``output_text`` become chat ``text`` parts and ``input_image`` an
  ``image_url`` part (vLLM's renderer treats them alike; the chat route's validation
  wants the chat names). A last assistant message left ``in_progress``/``incomplete``
  is continued, not answered.
- Function tools become chat tools; other built-in tool types are not shown to the
  model (vLLM drops them too); custom and namespace tools are refused (not yet built).
- Output: a message item when there is text, a function_call item per tool call, a
  reasoning item first when the model reasoned; ``status`` is ``incomplete`` (reason
  ``max_output_tokens``) when the answer hit the length limit.

What cannot be identical: ``usage.input_tokens_details.cached_tokens`` and
``cache_write_tokens`` come from vLLM's prefix cache, which the chat route reports only
when vLLM runs with ``--enable-prompt-tokens-details`` (else they read 0 here); the
echoed ``max_output_tokens`` needs the server's ``max_model_len`` when the client set
none (`Served`).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from nextstate.proxy.dialects import JSON
from nextstate.proxy.dialects.conversation import input_items
from nextstate.proxy.errors import InvalidRequest

# Sent on to the chat request as they are: the same sampling fields, same meaning.
SAME_FIELDS = ("model", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
               "presence_penalty", "frequency_penalty", "seed", "stop", "stop_token_ids",
               "ignore_eos", "logit_bias", "skip_special_tokens", "include_stop_str_in_output",
               "vllm_xargs", "kv_transfer_params", "ec_transfer_params", "chat_template_kwargs",
               "cache_salt", "priority", "structured_outputs", "mm_processor_kwargs",
               "media_io_kwargs", "watermarking", "user", "parallel_tool_calls",
               "include_reasoning")
LOGPROBS = "message.output_text.logprobs"
# The fields vLLM's echo of a function tool carries (openai 3.57's FunctionTool).
FUNCTION_TOOL_FIELDS = ("name", "parameters", "strict", "type", "allowed_callers", "async",
                        "defer_loading", "description", "output_schema")
REFUSED_TOOLS = ("custom", "namespace")


@dataclass(frozen=True)
class Served:
    """Facts about the server the echo needs: vLLM fills them from its own config."""

    max_model_len: int | None = None  # the default max_output_tokens is what is left
    defaults: dict[str, float] = field(default_factory=lambda: {
        "temperature": 1.0, "top_p": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0})
    parser: bool = True  # vLLM runs a tool or reasoning parser (nextstate's default)


def to_chat(body: JSON) -> JSON:
    """The chat completions request for the (expanded) Responses request ``body``."""
    _check_request(body)
    messages: list[JSON] = []
    if body.get("instructions"):
        messages.append({"role": "system", "content": body["instructions"]})
    items = input_items(body.get("input"))
    for item in items:
        _convert_item(item, messages)
    chat: JSON = {k: body[k] for k in SAME_FIELDS if body.get(k) is not None}
    chat["messages"] = messages
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    if _continues(items):
        chat["add_generation_prompt"] = False
        chat["continue_final_message"] = True
    reasoning = body.get("reasoning")
    if isinstance(reasoning, dict) and reasoning.get("effort") is not None:
        chat["reasoning_effort"] = reasoning["effort"]
    if body.get("truncation") == "auto":
        chat["truncate_prompt_tokens"] = -1
    _text_format(body.get("text"), chat)
    if LOGPROBS in (body.get("include") or []):
        chat["logprobs"] = True
        chat["top_logprobs"] = body.get("top_logprobs") or 0
    tools = [_function(t) for t in body.get("tools") or [] if t.get("type") == "function"]
    if tools:
        chat["tools"] = tools
        chat["tool_choice"] = _tool_choice(body.get("tool_choice", "auto"))
    if body.get("stream"):
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    return chat


def _check_request(body: JSON) -> None:
    if "input" not in body:
        raise InvalidRequest("input: required", param="input")
    if body.get("prompt") is not None:
        raise InvalidRequest("prompt template is not supported", param="prompt")
    if body.get("background"):
        raise InvalidRequest("background responses are not supported", param="background")
    tools = body.get("tools") or []
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise InvalidRequest("tools: a list of tools", param="tools")
    for i, tool in enumerate(tools):
        if tool.get("type") in REFUSED_TOOLS:
            raise InvalidRequest(f"tools.{i}: {tool['type']} tools are not supported yet",
                                 param=f"tools.{i}")
        if tool.get("type") == "function" and not isinstance(tool.get("name"), str):
            raise InvalidRequest(f"tools.{i}.name: required", param=f"tools.{i}.name")
    choice = body.get("tool_choice", "auto")
    named = isinstance(choice, dict) and choice.get("type") == "function"
    if not tools and choice == "required":
        raise InvalidRequest("Tool choice 'required' must be specified with 'tools' "
                             "parameter.", param="tool_choice")
    if named and choice.get("name") not in {t.get("name") for t in tools}:
        raise InvalidRequest("Tool choice 'function' not found in 'tools' parameter.",
                             param="tool_choice")


def _convert_item(item: Any, out: list[JSON]) -> None:
    """One input item onto the chat messages (vLLM's ``_construct_message_from_response_
    item``: tool calls and text join the assistant message just before them)."""
    if not isinstance(item, dict):
        raise InvalidRequest("input: each item must be an object", param="input")
    kind = item.get("type")
    last = out[-1] if out and out[-1].get("role") == "assistant" else None
    if kind == "function_call":
        call = {"id": item.get("call_id"), "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments")}}
        if not all(isinstance(v, str) for v in (item.get("call_id"), item.get("name"),
                                                 item.get("arguments"))):
            raise InvalidRequest("function_call items need call_id, name and arguments",
                                 param="input")
        if last is not None:
            last.setdefault("tool_calls", []).append(call)
        else:
            out.append({"role": "assistant", "tool_calls": [call]})
    elif kind == "reasoning":
        if item.get("encrypted_content"):
            raise InvalidRequest("Encrypted content is not supported.", param="input")
        parts = item.get("content") or item.get("summary") or [{}]
        text = parts[0].get("text", "")
        if last is not None and last.get("reasoning") is None:
            last["reasoning"] = text
        else:
            out.append({"role": "assistant", "reasoning": text})
    elif kind in ("function_call_output", "custom_tool_call_output"):
        out.append({"role": "tool", "content": _tool_output(item.get("output")),
                    "tool_call_id": item.get("call_id")})
    elif item.get("role") == "assistant":
        content = item.get("content")
        text = content if isinstance(content, str) else (
            content[0].get("text") if isinstance(content, list) and content else None)
        if text is None:
            return
        if last is not None and last.get("content") is None:
            last["content"] = text
        else:
            out.append({"role": "assistant", "content": text})
    elif "role" in item:
        message = {k: v for k, v in item.items() if k in ("role", "content", "name")}
        if isinstance(message.get("content"), list):
            message["content"] = [_part(p) for p in message["content"]]
        out.append(message)
    else:
        raise InvalidRequest(f"Unsupported input item type: {kind}", param="input")


def _tool_output(output: Any) -> Any:
    if isinstance(output, list):
        return [_part(p) for p in output]
    return output


def _part(part: Any) -> Any:
    if not isinstance(part, dict):
        return part
    kind = part.get("type")
    if kind in ("input_text", "output_text"):
        return {"type": "text", "text": part.get("text")}
    if kind == "input_image":
        image: JSON = {"url": part.get("image_url")}
        if part.get("detail") is not None:
            image["detail"] = part["detail"]
        return {"type": "image_url", "image_url": image}
    return part


def _continues(items: list[JSON]) -> bool:
    last = items[-1] if items else None
    return isinstance(last, dict) and last.get("type", "message") in ("message", "reasoning") \
        and last.get("status") in ("in_progress", "incomplete")


def _text_format(text: Any, chat: JSON) -> None:
    form = text.get("format") if isinstance(text, dict) else None
    if not isinstance(form, dict):
        return
    if form.get("type") == "json_object":
        chat["response_format"] = {"type": "json_object"}
    elif form.get("type") == "json_schema" and form.get("schema") is not None:
        schema = {"name": form.get("name") or "schema", "schema": form["schema"]}
        if form.get("strict") is not None:
            schema["strict"] = form["strict"]
        chat["response_format"] = {"type": "json_schema", "json_schema": schema}


def _function(tool: JSON) -> JSON:
    function: JSON = {"name": tool["name"], "description": tool.get("description"),
                      "parameters": tool.get("parameters")}
    for key in ("strict", "defer_loading"):
        if tool.get(key) is not None:
            function[key] = tool[key]
    return {"type": "function", "function": function}


def _tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice["name"]}}
    return choice


def new_id(prefix: str) -> str:
    """An id shaped as vLLM's (``resp_``, ``msg_``, ``fc_``, ``rs_`` + 16 hex digits)."""
    return f"{prefix}_{uuid.uuid4().hex[:16]}"


def frame(body: JSON, *, response_id: str, created_at: int, model: str | None,
          prompt_tokens: int | None, served: Served) -> JSON:
    """The Responses object before any output: what it echoes of the request, with the
    sampling values vLLM used (its defaults where the request set none)."""
    def sampled(name: str) -> float | None:
        value = body.get(name)
        value = served.defaults.get(name) if value is None else value
        return float(value) if isinstance(value, int | float) else None

    tools = [_echo_tool(t) for t in body.get("tools") or []]
    choice = body.get("tool_choice", "auto")
    if not tools and choice in ("auto", "none"):
        choice = "none"
    elif isinstance(choice, dict) and choice.get("type") == "function":
        choice = {"name": choice.get("name"), "type": "function"}
    logprobs = LOGPROBS in (body.get("include") or [])
    return {
        "id": response_id, "created_at": created_at, "incomplete_details": None,
        "instructions": body.get("instructions"), "metadata": body.get("metadata"),
        "model": model, "object": "response", "output": [],
        "parallel_tool_calls": body.get("parallel_tool_calls") is not False,
        "temperature": sampled("temperature"), "tool_choice": choice, "tools": tools,
        "top_p": sampled("top_p"), "background": False,
        "max_output_tokens": _max_tokens(body.get("max_output_tokens"), prompt_tokens, served),
        "max_tool_calls": body.get("max_tool_calls"),
        "previous_response_id": body.get("previous_response_id"), "prompt": None,
        "reasoning": _echo_reasoning(body.get("reasoning")),
        "service_tier": body.get("service_tier") or "auto", "status": "in_progress",
        "text": _echo_text(body.get("text")),
        "top_logprobs": (body.get("top_logprobs") or 0) if logprobs else None,
        "truncation": body.get("truncation") or "disabled", "usage": None,
        "user": body.get("user"), "presence_penalty": sampled("presence_penalty"),
        "frequency_penalty": sampled("frequency_penalty"), "kv_transfer_params": None,
        "ec_transfer_params": None, "input_messages": None, "output_messages": None,
    }


def _max_tokens(asked: int | None, prompt_tokens: int | None, served: Served) -> int | None:
    left = None if served.max_model_len is None or prompt_tokens is None \
        else served.max_model_len - prompt_tokens
    if asked is None:
        return left
    return asked if left is None else min(asked, left)


def _echo_tool(tool: JSON) -> JSON:
    if tool.get("type") != "function":
        return tool
    return {k: tool.get(k) for k in FUNCTION_TOOL_FIELDS}


def _echo_reasoning(reasoning: Any) -> Any:
    if not isinstance(reasoning, dict):
        return None
    return {k: reasoning.get(k) for k in ("context", "effort", "generate_summary", "mode",
                                          "summary")}


def _echo_text(text: Any) -> Any:
    if not isinstance(text, dict):
        return None
    form = text.get("format")
    if isinstance(form, dict) and form.get("type") == "json_schema":
        form = {"name": form.get("name"), "schema": form.get("schema"), "type": "json_schema",
                "description": form.get("description"), "strict": form.get("strict")}
    return {"format": form, "verbosity": text.get("verbosity")}


def finished(response: JSON, output: list[JSON], finish_reason: str | None,
             chat_usage: JSON | None) -> JSON:
    """``response`` (a `frame`) completed with its output, status and usage."""
    status = "incomplete" if finish_reason == "length" else "completed"
    return {**response, "output": output, "status": status, "usage": usage(chat_usage),
            "incomplete_details": {"reason": "max_output_tokens"}
            if status == "incomplete" else None}


def usage(chat_usage: JSON | None) -> JSON | None:
    if chat_usage is None:
        return None
    prompt = chat_usage.get("prompt_tokens") or 0
    completion = chat_usage.get("completion_tokens") or 0
    details = chat_usage.get("prompt_tokens_details") or {}
    reasoning = (chat_usage.get("completion_tokens_details") or {}).get("reasoning_tokens")
    return {"input_tokens": prompt, "input_tokens_details": {
                "cached_tokens": details.get("cached_tokens") or 0,
                "cache_write_tokens": details.get("created_cache_tokens") or 0,
                "input_tokens_per_turn": [], "cached_tokens_per_turn": []},
            "output_tokens": completion, "output_tokens_details": {
                "reasoning_tokens": reasoning or 0, "tool_output_tokens": 0,
                "output_tokens_per_turn": [], "tool_output_tokens_per_turn": []},
            "total_tokens": prompt + completion}


def from_chat(chat: JSON, body: JSON, served: Served, *, response_id: str | None = None,
              ) -> JSON:
    """The Responses object for a whole chat completion answering ``to_chat(body)``."""
    choice = chat["choices"][0]
    message = choice.get("message") or {}
    prompt_ids = chat.get("prompt_token_ids")
    prompt_tokens = len(prompt_ids) if isinstance(prompt_ids, list) else (
        (chat.get("usage") or {}).get("prompt_tokens"))
    base = frame(body, response_id=response_id or body.get("request_id") or new_id("resp"),
                 created_at=int(chat.get("created") or 0), model=chat.get("model"),
                 prompt_tokens=prompt_tokens, served=served)
    logprobs = None
    if LOGPROBS in (body.get("include") or []) and body.get("include_reasoning") is not False:
        logprobs = [logprob(t) for t in (choice.get("logprobs") or {}).get("content") or []]
    if served.parser:
        output = output_items(message.get("reasoning"), message.get("content"),
                              message.get("tool_calls") or [], logprobs)
    else:
        text = message.get("content") or ""
        output = [message_item(new_id("msg"), [text_part(text, logprobs)] if text else [],
                               "completed")]
    return finished(base, output, choice.get("finish_reason"), chat.get("usage"))


def output_items(reasoning: str | None, content: str | None, calls: list[JSON],
                 logprobs: list[JSON] | None) -> list[JSON]:
    """vLLM's ``build_response_output_items``: reasoning, then text, then tool calls."""
    items = []
    if reasoning:
        items.append(reasoning_item(new_id("rs"), reasoning, None))
    if content:
        items.append(message_item(new_id("msg"), [text_part(content, logprobs)], "completed"))
    for call in calls:
        function = call.get("function") or {}
        items.append(call_item(new_id("fc"), call.get("id") or new_id("call"),
                               function.get("name") or "", function.get("arguments") or "",
                               "completed"))
    return items


def message_item(item_id: str, content: list[JSON], status: str) -> JSON:
    return {"id": item_id, "content": content, "role": "assistant", "status": status,
            "type": "message", "phase": None}


def text_part(text: str, logprobs: list[JSON] | None) -> JSON:
    return {"annotations": [], "text": text, "type": "output_text", "logprobs": logprobs}


def call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> JSON:
    return {"arguments": arguments, "call_id": call_id, "name": name,
            "type": "function_call", "id": item_id, "async": None, "caller": None,
            "namespace": None, "status": status}


def reasoning_item(item_id: str, text: str | None, status: str | None) -> JSON:
    content = None if text is None else [{"text": text, "type": "reasoning_text"}]
    return {"id": item_id, "summary": [], "type": "reasoning", "content": content,
            "encrypted_content": None, "status": status}


def logprob(entry: JSON) -> JSON:
    """A chat logprob entry in the Responses shape (vLLM floors logprobs at -9999)."""
    token = str(entry.get("token", ""))
    return {"token": token, "bytes": entry.get("bytes") or list(token.encode()),
            "logprob": max(float(entry.get("logprob", -9999.0)), -9999.0),
            "top_logprobs": [{"token": t.get("token"), "bytes": t.get("bytes"),
                              "logprob": max(float(t.get("logprob", -9999.0)), -9999.0)}
                             for t in entry.get("top_logprobs") or []]}
