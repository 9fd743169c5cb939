#!/usr/bin/env bash
# Everything that can only be checked on a GPU, in one run (under 10 minutes on a lent GPU), ending in
# one short table: the exit kernel against its reference and copy bandwidth, decode at batch 1/16/64
# against the bytes-read floor, and the server answering the openai client. See bench/gpu_check.py.
#
#   bash bench/gpu_check.sh --fetch-wheels out/gpu-wheels     # here, before: the server's packages the
#                                                             # GPU machine lacks (Python 3.12, ~25 MB)
#   bash bench/gpu_check.sh --wheels out/gpu-wheels           # on the GPU machine (carry out/gpu-wheels)
#   bash bench/gpu_check.sh --dry-run                         # the same steps on the CPU, tiny sizes
#
# Other arguments go to bench/gpu_check.py (--model DIR: serve that instead of the default).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
# what `offramp serve` and the openai client need beyond torch, numpy, tokenizers, transformers, httpx
SERVER_PACKAGES=(fastapi uvicorn pydantic gguf openai)

args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --fetch-wheels)
      "$PYTHON" -m pip download --quiet --dest "$2" --only-binary=:all: --python-version 3.12 \
        --implementation cp --abi cp312 --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux_2_17_x86_64 --platform any "${SERVER_PACKAGES[@]}"
      du -sh "$2"
      exit 0 ;;
    --wheels)
      # offline: packages already installed that satisfy a requirement are kept
      missing=$("$PYTHON" -c 'import importlib.util as u, sys
print(" ".join(p for p in sys.argv[1:] if u.find_spec(p) is None))' "${SERVER_PACKAGES[@]}")
      if [ -n "$missing" ]; then
        "$PYTHON" -m pip install --quiet --no-index --find-links "$2" $missing
      fi
      shift 2
      continue ;;
    --dry-run)
      # the Triton kernel runs on the CPU only under the interpreter, which must be set before triton loads
      export TRITON_INTERPRET=1
      args+=("$1") ;;
    *)
      args+=("$1") ;;
  esac
  shift
done
exec "$PYTHON" -m bench.gpu_check "${args[@]}"
