"""OpenAPI description of the proxy's own endpoints (client -> proxy), served at
``/openapi.json`` and fuzzed by the tests (schemathesis), the dashboard's data and
``/metrics`` included. The OpenAI endpoints are described as far as the proxy itself
looks at them; everything else passes to vLLM."""

from __future__ import annotations

from typing import Any

ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]},
                   "code": {"type": ["string", "integer", "null"]}}}}}
MESSAGE = {"type": "object", "required": ["role"], "properties": {
    "role": {"type": "string", "enum": ["system", "user", "assistant", "tool", "developer"]},
    "content": {"type": ["string", "null"]}, "tool_call_id": {"type": "string"}}}
SESSION_FIELDS = {"session_id": {"type": "string"},
                  "turn_type": {"type": "string", "enum": ["main", "side"]},
                  "session_done": {"type": "boolean"}}
SAMPLING = {"model": {"type": "string"}, "stream": {"type": "boolean"},
            "max_tokens": {"type": "integer", "minimum": 1, "maximum": 64},
            "temperature": {"type": "number", "minimum": 0, "maximum": 2},
            "n": {"type": "integer", "minimum": 1, "maximum": 4}}
HEADERS = [
    {"name": "X-Session-Id", "in": "header", "schema": {"type": "string"}},
    {"name": "X-Turn-Type", "in": "header", "schema": {"type": "string",
                                                        "enum": ["main", "side"]}},
    {"name": "X-Session-Done", "in": "header", "schema": {"type": "string"}},
    {"name": "X-NextState-Record", "in": "header", "schema": {"type": "string",
                                                               "enum": ["on", "off"]}},
    {"name": "X-NextState-Feedback", "in": "header",
     "schema": {"type": "string", "enum": ["+1", "0", "-1"]}},
    {"name": "X-NextState-Hint", "in": "header", "schema": {"type": "string"}},
]
TARGET = {"turn_id": {"type": "string", "minLength": 1, "maxLength": 128},
          "session_id": {"type": "string", "minLength": 1, "maxLength": 128}}


LESSON = {"text": {"type": "string", "minLength": 1, "maxLength": 2000},
          "user": {"type": "string"}, "pinned": {"type": "boolean"}}
LESSON_ID = {"name": "lesson_id", "in": "path", "required": True,
             "schema": {"type": "string", "minLength": 1}}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(c): {"description": "an OpenAI-style error",
                     "content": {"application/json": {"schema": ERROR}}} for c in codes}


def _json_body(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": {
        "type": "object", "properties": properties, "required": required}}}}


def _ok(description: str, media: str = "application/json") -> dict[str, Any]:
    return {"200": {"description": description, "content": {media: {"schema": {}}}}}


def _dashboard() -> dict[str, Any]:
    """The dashboard's data endpoints (proxy/dashboard/)."""
    def get(name: str, *parameters: dict[str, Any], missing: bool = False) -> dict[str, Any]:
        return {"get": {"operationId": f"dashboard_{name}", "parameters": list(parameters),
                        "responses": {**_ok("the dashboard's data"),
                                      **_errors(400, 401, *([404] if missing else []), 503)}}}

    def path(name: str) -> dict[str, Any]:
        return {"name": name, "in": "path", "required": True,
                "schema": {"type": "string", "minLength": 1}}

    query = [{"name": "q", "in": "query", "schema": {"type": "string"}},
             {"name": "offset", "in": "query", "schema": {"type": "integer"}},
             {"name": "limit", "in": "query", "schema": {"type": "integer"}}]
    base = "/v1/dashboard"
    return {f"{base}/me": get("me"), f"{base}/funnel": get("funnel"),
            f"{base}/curves": get("curves"), f"{base}/adapters": get("adapters"),
            f"{base}/sessions": get("sessions", *query),
            f"{base}/sessions/{{session_id}}": get("session", path("session_id"),
                                                   missing=True),
            f"{base}/turns/{{turn_id}}/tokens": get("tokens", path("turn_id"), missing=True)}


def openapi_schema() -> dict[str, Any]:
    generation = {**_ok("vLLM's answer (JSON, or an SSE stream when stream is true)"),
                  **_errors(400, 401, 404, 408, 413, 502)}
    return {
        "openapi": "3.1.0",
        "info": {"title": "nextstate proxy", "version": "1"},
        "paths": {
            "/v1/chat/completions": {"post": {
                "operationId": "chat", "parameters": HEADERS, "responses": generation,
                "requestBody": _json_body({**SAMPLING, **SESSION_FIELDS, "messages": {
                    "type": "array", "items": MESSAGE, "minItems": 1}}, ["model", "messages"])}},
            "/v1/completions": {"post": {
                "operationId": "completions", "parameters": HEADERS, "responses": generation,
                "requestBody": _json_body({**SAMPLING, **SESSION_FIELDS,
                                           "prompt": {"type": "string"}}, ["model", "prompt"])}},
            "/v1/feedback": {"post": {
                "operationId": "feedback",
                "requestBody": _json_body({**TARGET, "score": {"type": "integer",
                                                               "enum": [-1, 0, 1]},
                                           "hint": {"type": "string"},
                                           "comment": {"type": "string"}}, ["score"]),
                "responses": {**_ok("accepted"), **_errors(400, 401, 404, 408, 409, 413,
                                                           503)}}},
            "/v1/next_state": {"post": {
                "operationId": "next_state",
                "requestBody": _json_body({**TARGET, "done": {"type": "boolean"},
                                           "messages": {"type": "array", "items": MESSAGE,
                                                        "minItems": 1}}, ["messages"]),
                "responses": {**_ok("accepted"), **_errors(400, 401, 404, 408, 409, 413,
                                                           503)}}},
            "/v1/learner/status": {"get": {"operationId": "learner_status", "responses": {
                **_ok("what the learner reports"), **_errors(401, 503)}}},
            "/v1/export": {"get": {
                "operationId": "export",
                "parameters": [{"name": "session_id", "in": "query",
                                "schema": {"type": "string"}}],
                "responses": {**_ok("turns, one JSON object per line", "application/x-ndjson"),
                              **_errors(401)}}},
            "/v1/sessions/{session_id}": {"delete": {
                "operationId": "delete_session",
                "parameters": [{"name": "session_id", "in": "path", "required": True,
                                "schema": {"type": "string", "minLength": 1}}],
                "responses": {**_ok("deleted"), **_errors(401, 404)}}},
            "/metrics": {"get": {"operationId": "metrics", "responses": {
                **_ok("Prometheus text", "text/plain"), **_errors(401, 403)}}},
            **_dashboard(),
            "/v1/memory": {
                "get": {"operationId": "list_lessons", "parameters": [
                    {"name": n, "in": "query", "schema": {"type": "string"}}
                    for n in ("user", "status", "tenant")],
                    "responses": {**_ok("lessons"), **_errors(400, 401, 403)}},
                "post": {"operationId": "add_lesson",
                         "requestBody": _json_body(LESSON, ["text"]),
                         "responses": {**_ok("the lesson"), **_errors(400, 401, 403, 408,
                                                                      413)}}},
            "/v1/memory/{lesson_id}": {
                "patch": {"operationId": "edit_lesson", "parameters": [LESSON_ID],
                          "requestBody": _json_body({**LESSON, "status": {
                              "type": "string", "enum": ["active", "retired", "dropped"]}},
                              []),
                          "responses": {**_ok("the lesson"), **_errors(400, 401, 404, 408,
                                                                       413)}},
                "delete": {"operationId": "forget_lesson", "parameters": [LESSON_ID],
                           "responses": {**_ok("forgotten"), **_errors(401, 404)}}},
            "/health": {"get": {"operationId": "health", "responses": {
                **_ok("the backend and the recorder"),
                "503": {"description": "the backend is down",
                        "content": {"application/json": {"schema": {}}}}}}},
        },
    }
