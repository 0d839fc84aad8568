"""The LangChain handler with a real ChatOpenAI, the real proxy and the real vLLM."""

from __future__ import annotations

import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.runnables import chain
from langchain_core.tools import tool

from nextstate.adapters.langchain import NextStateCallbackHandler
from tests.conftest import MODEL_NAME

pytestmark = pytest.mark.integration


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@tool
def divide(a: float, b: float) -> float:
    """Divide a by b."""
    return a / b


TOOLS = {t.name: t for t in (add, divide)}
# The toy model cannot call tools. After each real (recorded) reply, these scripted calls
# stand in for the ones a capable model would make; everything else is real.
SCRIPT = [[("add", {"a": 2, "b": 3}, "call_add")],
          [("divide", {"a": 5, "b": 0}, "call_div")]]


def scripted(real: AIMessage, calls) -> AIMessage:
    return AIMessage(content=real.content, tool_calls=[
        {"name": n, "args": a, "id": i, "type": "tool_call"} for n, a, i in calls])


def run_tool(name, args, call_id):
    """As agent loops do (LangGraph's ToolNode, for one): a raising tool answers with its
    error text."""
    try:
        return TOOLS[name].invoke({"name": name, "args": args, "id": call_id,
                                   "type": "tool_call"})
    except Exception as exc:
        return ToolMessage(f"Error: {exc!r}", tool_call_id=call_id, status="error")


def make_agent(llm):
    @chain
    def agent(question: str) -> list:
        messages = [HumanMessage(question)]
        for calls in SCRIPT:
            real = llm.bind_tools(list(TOOLS.values())).invoke(messages)
            messages.append(scripted(real, calls))
            for name, args, call_id in calls:
                messages.append(run_tool(name, args, call_id))
        llm.with_config(tags=["side"]).invoke([HumanMessage("Summarise the work.")])
        return messages  # the agent ends right after its tools ran

    return agent


def test_agent_run_is_one_session_with_tool_results_as_next_states(proxy):
    handler = NextStateCallbackHandler(base_url=proxy.base_url)
    llm = handler.chat_openai(model=MODEL_NAME, temperature=0, max_tokens=8)
    make_agent(llm).invoke("What is (2 + 3) / 0?", config={"callbacks": [handler]})
    turns = proxy.turns(3)
    main = [t for t in turns if t["turn_type"] == "main"]
    side = [t for t in turns if t["turn_type"] == "side"]
    assert len(main) == 2 and len(side) == 1
    assert {t["session_id"] for t in turns} == {handler.last_session_id}
    first, last = main
    assert first["next_state_kind"] == "tool"
    assert first["next_state"] == [{"role": "tool", "content": "5", "tool_call_id": "call_add"}]
    # The agent ended after the failing tool: the handler sent its result itself.
    deadline_turns = proxy.turns(3, next_state_status="paired")
    assert len(deadline_turns) == 2
    last = next(t for t in deadline_turns if t["turn_id"] == last["turn_id"])
    assert last["next_state_kind"] == "tool"
    [error] = last["next_state"]
    assert error["tool_call_id"] == "call_div" and error["status"] == "error"
    assert "division by zero" in error["content"]
    assert side[0]["next_state_status"] == "n/a"


def test_feedback_goes_to_the_last_main_turn(proxy):
    handler = NextStateCallbackHandler(session_id="lc-feedback", base_url=proxy.base_url)
    llm = handler.chat_openai(model=MODEL_NAME, temperature=0, max_tokens=4)
    llm.invoke("Hello!", config={"callbacks": [handler]})
    llm.invoke("Again?", config={"callbacks": [handler]})
    handler.feedback(-1, hint="Reply in French.")
    turns = proxy.turns(2, session_id="lc-feedback")
    assert turns[1]["turn_id"] == handler.last_turn_id
    for _ in range(100):
        turns = proxy.turns(2, session_id="lc-feedback")
        if turns[1]["feedback"]:
            break
    [given] = turns[1]["feedback"]
    assert (given["score"], given["hint"], given["source"]) == (-1, "Reply in French.",
                                                                "adapter:langchain")
    assert turns[0]["feedback"] == []


async def test_async_runs_carry_their_session_too(proxy):
    handler = NextStateCallbackHandler(session_id="lc-async", base_url=proxy.base_url)
    llm = handler.chat_openai(model=MODEL_NAME, temperature=0, max_tokens=4)
    await llm.ainvoke("Hello!", config={"callbacks": [handler]})
    [turn] = proxy.turns(1, session_id="lc-async")
    assert turn["turn_type"] == "main"
