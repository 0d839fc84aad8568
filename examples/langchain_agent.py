"""A LangChain tool-calling agent through nextstate.

Run `make run` in another terminal, then:

    OPENAI_BASE_URL=http://127.0.0.1:8400/v1 python examples/langchain_agent.py "What is 6 * 7?"

The NextStateCallbackHandler ties every model call of the run to one session and makes
sure tool results are recorded as next states. (The embedded toy model is untrained and
will rarely call a tool; point `make run` at a real model with `nextstate up --model DIR
--vllm-arg=--enable-auto-tool-choice --vllm-arg=--tool-call-parser=hermes` to see it work.)
"""

from __future__ import annotations

import argparse

from langchain_core.messages import HumanMessage, ToolMessage
from langchain_core.runnables import chain
from langchain_core.tools import tool

from nextstate.adapters.langchain import NextStateCallbackHandler


@tool
def multiply(a: float, b: float) -> float:
    """Multiply two numbers."""
    return a * b


@tool
def divide(a: float, b: float) -> float:
    """Divide a by b."""
    return a / b


TOOLS = {t.name: t for t in (multiply, divide)}


def main() -> None:
    parser = argparse.ArgumentParser(description="A LangChain agent through nextstate")
    parser.add_argument("question", nargs="?", default="What is 6 * 7?")
    parser.add_argument("--model", default="nextstate-toy")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()

    handler = NextStateCallbackHandler()
    llm = handler.chat_openai(model=args.model, max_tokens=64).bind_tools(list(TOOLS.values()))

    @chain
    def agent(question: str) -> str:
        messages = [HumanMessage(question)]
        for _ in range(args.steps):
            reply = llm.invoke(messages)
            messages.append(reply)
            if not reply.tool_calls:
                return str(reply.content)
            for call in reply.tool_calls:
                try:
                    messages.append(TOOLS[call["name"]].invoke(call))
                except Exception as exc:  # the agent sees the error, and so does nextstate
                    messages.append(ToolMessage(f"Error: {exc!r}", tool_call_id=call["id"],
                                                status="error"))
        return "(gave up)"

    answer = agent.invoke(args.question, config={"callbacks": [handler]})
    print(f"answer: {answer}")
    print(f"session: {handler.last_session_id}  last turn: {handler.last_turn_id}")


if __name__ == "__main__":
    main()
