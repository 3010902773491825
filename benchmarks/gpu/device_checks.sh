#!/usr/bin/env bash
# The GPU checks of issue 12, in its order, for one lent GPU without network, in two calls of under ten
# minutes each (the device tool's limit):
#
#   OUT=/tmp/out bash benchmarks/gpu/device_checks.sh first    # preflight of gpt2-speedrun, the GPU tests
#   OUT=/tmp/out bash benchmarks/gpu/device_checks.sh second   # benchmarks: with and without the kernel, CIFAR
#
# Run from the repository root with data/tinyshakespeare/input.txt carried along (the GPU tests build
# their shards from it). Each step has its own time limit, and a failure does not stop the next one, so
# that a call brings back all it can; the outputs go to $OUT, to be committed under benchmarks/gpu/.
set -u
cd "$(dirname "$0")/../.."
out=${OUT:?set OUT to the folder for the outputs}
export PYTHON=${PYTHON:-python3} TINYSHAKESPEARE=$PWD/data/tinyshakespeare/input.txt
step() {  # name, seconds, command...
    local name=$1 limit=$2 started=$SECONDS
    shift 2
    echo "== $name: $*" | tee -a "$out/summary.txt"
    timeout "$limit" "$@" > "$out/$name.txt" 2>&1
    echo "   exit $? after $((SECONDS - started)) s" | tee -a "$out/summary.txt"
}
case "${1:-}" in
    first)
        { nvidia-smi; "$PYTHON" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda,
"triton", triton.__version__)'; } > "$out/environment.txt" 2>&1
        step preflight-gpt2-speedrun 300 ./run.sh preflight --preset gpt2-speedrun --no-data --log_dir="$out/logs"
        step test-gpu 270 ./run.sh test -m gpu -q -rs ;;
    second)
        step benchmark-triton 200 ./run.sh benchmark --preset gpt2-speedrun --log_dir="$out/logs"
        step benchmark-torch 200 ./run.sh benchmark --preset gpt2-speedrun --muon_triton=false --log_dir="$out/logs"
        step benchmark-cifar 150 ./run.sh benchmark cifar --log-dir "$out/logs" ;;
    *) echo "usage: OUT=DIR $0 first|second" >&2; exit 2 ;;
esac
