#!/usr/bin/env bash
# Everything that can only be checked on a GPU, in one run (under 10 minutes on a lent GPU), ending in
# one short table: the exit kernel against its reference and copy bandwidth, decode at batch 1/16/64
# against the bytes-read floor, and the server answering the openai client. See bench/gpu_check.py.
#   bash bench/gpu_check.sh                          # on the GPU machine
#   bash bench/gpu_check.sh --dry-run --model DIR    # the same steps on the CPU, tiny sizes (the tests)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
for arg in "$@"; do
  # the Triton kernel runs on the CPU only under the interpreter, which must be set before triton loads
  [ "$arg" = "--dry-run" ] && export TRITON_INTERPRET=1
done
exec "$PYTHON" -m bench.gpu_check "$@"
