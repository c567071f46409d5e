#!/usr/bin/env bash
# Every GPU figure of the README in one run on a machine with torch + onnxruntime but no
# Ray (the lent H100/H200): the paper-scale CSS reproduction first (the figure that
# matters most), then training throughput (eager/graph x stream/cache), evaluation at
# Fashion200k's size, serving and export latency.
#
#   OUT=results/gpu bash bench/gpu_suite.sh [TRAIN_SECONDS] [SEEDS] [MODELS] [EVAL_EVERY] \
#       2>&1 | tee results/gpu/suite.log
#
# The reproduction trains MODELS (default all registered) x SEEDS (default 2) at once,
# one process per run on the one GPU (--parallel): at the paper's batch of 32 a run is
# bound by the host's kernel launches (~31 ms a step, the GPU mostly idle), so concurrent
# runs add up almost linearly until the CPU cores are spent. Each run trains for TRAIN_SECONDS
# (default 200, train.time_limit_s) or the paper's 160k iterations, whichever comes
# first, then evaluates (also every EVAL_EVERY steps, default 0 = only at the end, for a
# learning curve in the log); the table states the iterations each reached. Where CUDA MPS
# can be started, the runs share the GPU through it (kernels of several processes run
# at once instead of time-sliced); the log says which. Each later stage has its own time
# limit, so a slow stage never costs the others; REPRODUCE_ONLY=1 skips them and
# SKIP_REPRODUCE=1 runs only them. On a lent device (at most 600 s per command) that is
# two commands: `REPRODUCE_ONLY=1 bash bench/gpu_suite.sh 400 3`, then
# `SKIP_REPRODUCE=1 bash bench/gpu_suite.sh` (~6 min).
# webdataset/braceexpand wheels may be carried in .whl/ (see README).
set -uo pipefail
OUT=${OUT:-results/gpu}
TRAIN_SECONDS=${1:-200}
SEEDS=${2:-2}
MODELS=${3:-all}
EVAL_EVERY=${4:-0}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
t0=$(date +%s)
stage() { echo "=== [$(( $(date +%s) - t0 )) s] $*"; }

stage environment
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, onnxruntime; print('torch', torch.__version__, 'ort', onnxruntime.__version__)"
nproc

stage "CUDA MPS (optional: the reproduction runs without it too)"
stop_mps() {
    echo quit | timeout 10 nvidia-cuda-mps-control
    unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
}
mps_started=0
if command -v nvidia-cuda-mps-control >/dev/null; then
    export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
    mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
    if nvidia-cuda-mps-control -d && timeout 40 python3 -c \
        "import torch; print('MPS client ok:', float(torch.ones(4, device='cuda').sum()))"; then
        mps_started=1
    else
        stop_mps
    fi
fi
echo "mps_started=$mps_started"

stage data: CSS default size at 64 px
timeout 90 python3 -m shards.css --out /tmp/css64 --render-processes 16 2>&1 | tail -2

if [ "${SKIP_REPRODUCE:-0}" != 1 ]; then
    models=$(python3 -c "from bench.reproduce import resolve_models; print(len(resolve_models('$MODELS')))")
    runs=$(( models * SEEDS ))
    stage "paper-scale CSS reproduction: $models models ($MODELS) x $SEEDS seeds, $runs runs at once, ${TRAIN_SECONDS} s of training each"
    # The CSS configs' defaults (batch classification, trunk at 1 x lr, the authors' sampler:
    # docs/reproduce.md "CSS defaults"), each run's step as one CUDA graph and its images
    # cached on the GPU (train.step_graph / train.image_cache: auto). One CPU thread per run.
    repro_flags=(--data /tmp/css64 --models "$MODELS" --seeds "$SEEDS" --steps 160000
        --in-process --paper-scale --parallel "$runs" --out /tmp/reproduce
        --set train.threads=1 --set train.loader_workers=1
        --set train.log_every=500 --set train.checkpoint_every=0
        --set "train.time_limit_s=$TRAIN_SECONDS" --set "train.eval_every=$EVAL_EVERY")
    timeout $(( TRAIN_SECONDS + 150 )) python3 -m bench.reproduce "${repro_flags[@]}" \
        > /tmp/reproduce.log 2>&1
    echo "reproduce exit code $?"
    grep -E "bench.reproduce: \[|time_limit_s| eval R@|Error|error" /tmp/reproduce.log | tail -60
    python3 -m bench.reproduce "${repro_flags[@]}" --report-only 2>&1 | tail -16
    # the device returns at most 8 files: these four and four bench JSONs (train
    # throughput x 2, evaluation speed, serving latency; the log is the command's output)
    gzip -c /tmp/reproduce.log > "$OUT/reproduce.log.gz"
    cp /tmp/reproduce/table.md "$OUT/reproduce_table.md"
    cp /tmp/reproduce/runs.json "$OUT/reproduce_runs.json"
    cp /tmp/reproduce/recalls.png "$OUT/reproduce_recalls.png"
fi
if [ "$mps_started" = 1 ]; then  # the benches below time one process on the GPU
    stop_mps
    sleep 1
fi
if [ "${REPRODUCE_ONLY:-0}" = 1 ]; then
    stage done
    exit 0
fi

stage "training throughput: eager vs graph, streamed vs cached (TIRG 64/224 px, CCNet 224 px)"
# 64 px from the PNG shards of the reproduction; 224 px from JPEG shards, as photo
# catalogues (Fashion-IQ, Fashion200k) hold them: streamed, they are decoded by nvJPEG
timeout 60 python3 -m shards.css --small --image-size 224 --image-format jpg --out /tmp/css224 \
    --render-processes 16 2>&1 | tail -2
timeout 150 python3 bench/train_throughput.py --data /tmp/css64 --cases tirg:64:32 \
    --steps 60 --warmup 15 --set train.loader_workers=8 \
    --out "$OUT/train_throughput_64.json" 2>&1 | grep -v "image cache" | tail -8
timeout 240 python3 bench/train_throughput.py --data /tmp/css224 \
    --cases tirg:224:32 tirg:224:256 ccnet:224:32 --steps 50 --warmup 15 \
    --set train.loader_workers=8 --out "$OUT/train_throughput_224.json" 2>&1 | grep -v "image cache" | tail -16

stage "evaluation at Fashion200k's size: 33,480 queries x 29,789 cached gallery images, 224 px, one pass"
timeout 120 python3 -m bench.eval_speed --device cuda --out "$OUT/eval_speed.json" 2>&1 | tail -12

stage serving latency: search over 10k/100k/1M fp16 embeddings and the query network
timeout 70 python3 bench/serve_latency.py --device cuda --seconds 0.5 --no-faiss \
    --json-out "$OUT/serve_latency.json" 2>&1 | grep -v "^INFO" | tail -30

stage export latency: torch eager on the GPU vs ONNX Runtime
timeout 35 python3 -m bench.export_latency --random-model tirg --image-size 224 --device cuda \
    --backends torch onnxruntime --batches 1 64 --iters 30 --json /tmp/export_latency.json \
    2>&1 | tail -15
stage done
