#!/usr/bin/env bash
# The GPU path in minutes, on a lent GPU machine (see bench/gpu_check.py):
#
#   bench/gpu_check.sh [--out DIR]      trainer sizes, one learner round, sharded if >1 GPU
#   bench/gpu_check.sh --tiny           the same on the CPU with a tiny model (make test)
#   bench/gpu_check.sh --fetch-wheels   here: the wheels that machine lacks, into .whl/
#
# That machine has torch, transformers, peft and accelerate (Python 3.12) but no network
# and not nextstate's own needs: SQLAlchemy and orjson travel as wheels in .whl/ (carry
# it), installed into /tmp/site when missing. nextstate itself runs from this checkout,
# through a tree of links with its installed names (no install there).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ "${1:-}" = "--fetch-wheels" ]; then
  mkdir -p .whl
  for want in "sqlalchemy==2.1.9" "orjson==3.13.0"; do  # the lock's versions
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d .whl "$want"
  done
  ls .whl
  exit 0
fi

if ! "$PY" -c "import sqlalchemy, orjson, httpx" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
tree=$(mktemp -d)
mkdir -p "$tree/nextstate"
for d in core learner proxy experiment; do ln -s "$PWD/$d" "$tree/nextstate/$d"; done
export PYTHONPATH="$tree:$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m bench.gpu_check "$@"
