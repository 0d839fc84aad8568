"""The ``nextstate`` command line: the entry point to every part of the data flow.

    nextstate up          vLLM + toy model + learner + proxy, on the embedded defaults
    nextstate serve       the proxy in front of an existing vLLM
    nextstate learn       the learner: judge recorded turns, train and publish adapters
    nextstate status      what the learner is doing
    nextstate adapters    list the published adapter versions, or roll back to one
    nextstate doctor      why isn't it learning? every check of the loop, with its fix
    nextstate toy-model   build (or find in the cache) the embedded toy model
    nextstate bench learning / personal / following, nextstate demo   the experiments
    nextstate export      write recorded turns as JSON lines
    nextstate forget      delete a session, a user, a tenant, or turns past an age
    nextstate memory      the memory's lessons: list, add, edit, pin, forget

One module per area (stack, serve, learn, data, bench); the commands are listed here, not
registered by importing anything. Learner-side commands import torch inside themselves,
so the proxy's own install never needs it.
"""

from __future__ import annotations

import click

from nextstate.cli import bench, data, doctor, learn, memory, serve, stack

__all__ = ["main"]


@click.group(commands=[serve.serve, stack.up, learn.learn, learn.status, learn.adapters,
                       doctor.doctor,
                       data.export, data.forget, memory.memory, bench.toy_model, bench.bench,
                       bench.demo])
def main() -> None:
    """nextstate: turn ordinary agent traffic into training signal.

    \b
    Start here:
      nextstate up                          vLLM + toy model + learner + proxy
      export OPENAI_BASE_URL=http://127.0.0.1:8400/v1
      nextstate status                      what the learner is doing
    In front of a vLLM you run:  nextstate serve --backend http://HOST:8000
    """
