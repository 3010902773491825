#!/usr/bin/env bash
# The main job, and the tests.
#
#   ./run.sh [--key=value ...]   with GPUs: the GPT speedrun with torchrun on every local GPU,
#                                fetching the FineWeb shards first if they are missing;
#                                without: the CPU track on tiny Shakespeare, data preparation included.
#   ./run.sh cifar [args]        the CIFAR-10 speedrun (train_cifar.py), downloading CIFAR-10 first
#                                if data/cifar10 lacks it.
#   ./run.sh data [args]         only prepares the data the trainer would read with these arguments.
#   ./run.sh preflight [args]    checks that this node can run the preset (--preset NAME, --no-data,
#                                --key=value as for the trainer): versions, data, numerics, collectives,
#                                the real step, a checkpoint; launched as the run is. Fetches nothing.
#   ./run.sh benchmark [args]    speed of train_gpt.py's steps on random tokens (--profile: a trace too);
#   ./run.sh benchmark cifar     ... and of train_cifar.py's.
#   ./run.sh test [pytest args]  the test suite (CPU only, offline); `./run.sh test -m gpu`: the GPU tests.
#
# Several nodes: run the same command on each, with torchrun's usual environment:
#   NNODES=2 NODE_RANK=0|1 MASTER_ADDR=<node 0's address> [MASTER_PORT=29500] ./run.sh
# NPROC_PER_NODE overrides the number of processes per node (all local GPUs; on CPU, 1 unless set).
# Under Slurm (`srun ./run.sh`), the job gives these: with one task per node, each starts torchrun on its
# node (NNODES, NODE_RANK, MASTER_ADDR from SLURM_NNODES, SLURM_NODEID, the job's first host); with a
# task per process, srun starts the processes and each runs the trainer itself (RANK, WORLD_SIZE,
# LOCAL_RANK from SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID). Settings of your own win. slurm/ has an
# example batch script.
#
# Arguments after the command go to the trainer (or pytest). The first run installs requirements.txt
# into .venv unless the current python already has them; set PYTHON to use another interpreter.
set -euo pipefail
cd "$(dirname "$0")"

# Offline copies beside the checkout (as on build machines without internet) are used when present.
SHARED=../shared
if [ -z "${TIKTOKEN_CACHE_DIR:-}" ] && [ -d "$SHARED/tiktoken" ]; then
    export TIKTOKEN_CACHE_DIR="$SHARED/tiktoken"
fi

python_ready() { "$1" -c 'import torch, numpy, tqdm, huggingface_hub, tiktoken, pytest, scipy, matplotlib' 2>/dev/null; }

PYTHON=${PYTHON:-python3}
if ! python_ready "$PYTHON"; then
    [ -x .venv/bin/python ] || python3 -m venv .venv
    PYTHON=.venv/bin/python
    if ! python_ready "$PYTHON"; then
        echo "run.sh: installing requirements.txt into .venv"
        "$PYTHON" -m pip install --quiet "$(grep '^torch==' requirements.txt)"  # before anything can pull another
        "$PYTHON" -m pip install --quiet -r requirements.txt
    fi
fi

if [ "${1:-}" = "test" ]; then
    shift
    exec "$PYTHON" -m pytest tests "$@"
fi

if [ "${1:-}" = "cifar" ]; then
    shift
    case " $* " in
        *" --data-dir"*) ;;  # the user's own copy
        *) [ -f data/cifar10/cifar-10-batches-py/test_batch ] || "$PYTHON" data/cifar10.py ;;
    esac
    exec "$PYTHON" train_cifar.py "$@"
fi

if [ "${1:-}" = "benchmark" ] && [ "${2:-}" = "cifar" ]; then
    shift 2
    exec "$PYTHON" -m tools.benchmark cifar "$@"
fi

# What runs on every process: the trainer, or the preflight or benchmark, which take the trainer's flags.
prepare_only=""
case "${1:-}" in
    data) shift; target=(train_gpt.py); prepare_only=1 ;;
    preflight) shift; target=(-m tools.preflight) ;;
    benchmark) shift; target=(-m tools.benchmark) ;;
    *) target=(train_gpt.py) ;;
esac

per_task=""
if [ -n "${SLURM_STEP_ID:-}" ]; then  # a task of srun: the job's layout says what torchrun would need
    if [ -z "${MASTER_ADDR:-}" ]; then  # the step's first host: gpu-[a17,b03] and node[001-004] start a17, 001
        nodes=${SLURM_STEP_NODELIST:-${SLURM_JOB_NODELIST:?}}
        prefix=${nodes%%[\[,]*}
        rest=${nodes#"$prefix"}
        MASTER_ADDR=$prefix
        if [ "${rest:0:1}" = "[" ]; then inner=${rest#\[}; MASTER_ADDR=$prefix${inner%%[],-]*}; fi
    fi
    MASTER_PORT=${MASTER_PORT:-$(( 20000 + ${SLURM_JOB_ID:-0} % 20000 ))}  # jobs sharing a node do not collide
    export MASTER_ADDR MASTER_PORT
    if [ "${SLURM_NTASKS:-1}" -gt "${SLURM_NNODES:-1}" ]; then
        per_task=1
        export RANK=${RANK:-$SLURM_PROCID} WORLD_SIZE=${WORLD_SIZE:-$SLURM_NTASKS} LOCAL_RANK=${LOCAL_RANK:-${SLURM_LOCALID:-0}}
    else
        NNODES=${NNODES:-${SLURM_NNODES:-1}}
        NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
    fi
elif [ "${SLURM_NNODES:-1}" -gt 1 ] && [ -z "${NNODES:-}" ] && [ -z "$prepare_only" ]; then
    echo "run.sh: this Slurm job has $SLURM_NNODES nodes: start run.sh on each with srun (see slurm/record.sbatch)" >&2
    exit 2
fi

gpus=0
if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then  # the GPUs this job or container was given, not all the node has
    IFS=, read -ra visible <<< "$CUDA_VISIBLE_DEVICES"
    gpus=${#visible[@]}
elif command -v nvidia-smi >/dev/null 2>&1; then
    gpus=$(nvidia-smi --list-gpus 2>/dev/null | wc -l)
fi
nproc=${NPROC_PER_NODE:-$gpus}
nnodes=${NNODES:-1}
for setting in "NPROC_PER_NODE=$nproc" "NNODES=$nnodes"; do
    [[ ${setting#*=} =~ ^[0-9]+$ ]] || { echo "run.sh: ${setting%%=*} must be a whole number, got '${setting#*=}'" >&2; exit 2; }
done
if [ "$nnodes" -gt 1 ]; then
    : "${NODE_RANK:?set NODE_RANK (0 on the node at MASTER_ADDR, 1 .. NNODES-1 on the others)}"
    : "${MASTER_ADDR:?set MASTER_ADDR to the address of node 0, reachable from every node}"
fi

fineweb() {  # the 100M-token shards the run reads (10 for the record; FineWeb-10B has 103)
    local n
    n=$("$PYTHON" -c 'import sys, train_gpt; _, c = train_gpt.parse_config(sys.argv[1:])
print(min(103, train_gpt.shards_to_read(c)))' "$@")
    if [ ! -f data/fineweb10B/fineweb_val_000000.bin ] || [ ! -f "data/fineweb10B/fineweb_train_$(printf %06d "$n").bin" ]; then
        "$PYTHON" data/cached_fineweb10B.py "$n"
    fi
}
shakespeare() {
    if [ ! -f data/shakespeare_char/val_000000.bin ]; then
        text=data/tinyshakespeare/input.txt
        [ -f "$text" ] || [ ! -f "$SHARED/data/tinyshakespeare/input.txt" ] || text="$SHARED/data/tinyshakespeare/input.txt"
        "$PYTHON" data/tinyshakespeare.py --input "$text"
    fi
}
# The data the preset reads, unless the arguments name their own shards. The preflight prepares tiny
# Shakespeare as a run would, but checks FineWeb's shards rather than fetch gigabytes; the benchmark needs no data.
case " $* " in
    *" --train_files"*" --val_files"*|*" --val_files"*" --train_files"*) data="" ;;
    *" --preset cpu-shakespeare "*|*" --preset=cpu-shakespeare "*) data=shakespeare ;;
    *" --preset"*) data=fineweb ;;
    *) if [ "$gpus" -gt 0 ]; then data=fineweb; else data=shakespeare; fi ;;
esac
case "${target[*]} $data" in  # one process at a time: tasks of one job may share the folder
    "train_gpt.py fineweb"|"train_gpt.py shakespeare"|"-m tools.preflight shakespeare")
        mkdir -p data
        if [ -w data ] && command -v flock >/dev/null; then  # where locks fail (some network filesystems), go on
            ( flock 9 || true; "$data" "$@" ) 9>data/.prepare.lock
        else
            "$data" "$@"
        fi ;;
esac
[ -z "$prepare_only" ] || exit 0

if [ -n "$per_task" ]; then  # srun started every process; torchrun has nothing to do
    exec "$PYTHON" "${target[@]}" "$@"
fi

if [ "$nnodes" -gt 1 ]; then
    # Static rendezvous: ranks follow NODE_RANK, so rank 0 (the log and the checkpoints) is on node 0.
    exec "$PYTHON" -m torch.distributed.run --nnodes="$nnodes" --node_rank="$NODE_RANK" \
        --master_addr="$MASTER_ADDR" --master_port="${MASTER_PORT:-29500}" \
        --nproc_per_node="$(( nproc > 0 ? nproc : 1 ))" "${target[@]}" "$@"
fi
if [ "$nproc" -gt 1 ] || [ "$gpus" -gt 0 ]; then
    exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$nproc" "${target[@]}" "$@"
fi
exec "$PYTHON" "${target[@]}" "$@"
