#!/usr/bin/env bash
# Every GPU figure of the README in one run on a machine with torch + onnxruntime but no
# Ray (our lent H100): training step profile and throughput, serving and export latency,
# and the paper-scale CSS reproduction for as many iterations as fits.
#
#   OUT=results/gpu bash bench/gpu_suite.sh [REPRODUCE_ITERATIONS] [REPRODUCE_SECONDS] 2>&1 | tee results/gpu/suite.log
#
# Each stage has its own time limit so a slow stage never costs the later ones; JSON and
# logs land in $OUT. webdataset/braceexpand wheels may be carried in .whl/ (see README).
set -uo pipefail
OUT=${OUT:-results/gpu}
ITERS=${1:-400}
REPRO_SECONDS=${2:-170}
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

stage data: CSS default size at 64 px, small at 224 px
timeout 90 python3 -m shards.css --out /tmp/css64 --workers 16 2>&1 | tail -2
timeout 40 python3 -m shards.css --small --image-size 224 --out /tmp/css224 --workers 16 2>&1 | tail -2

stage training step profile, TIRG ResNet-18 224 px, bf16, channels_last
timeout 60 python3 -m bench.profile_step --model tirg --image-size 224 --batches 32 256 \
    --cudnn-benchmark --json-out "$OUT/profile_step_tirg224.json" 2>&1 | head -40

stage training throughput through the training loop, 224 px
timeout 70 python3 bench/train_throughput.py --config configs/css_tirg.yaml --data /tmp/css224 \
    --modes synthetic shards loader --steps 40 --set image.size=224 --set train.loader_workers=8 \
    --out "$OUT/train_throughput_tirg224.json" 2>&1 | tail -12
timeout 40 python3 bench/train_throughput.py --config configs/css_tirg.yaml --modes synthetic \
    --steps 30 --batch-size 256 --set image.size=224 \
    --out /tmp/train_throughput_tirg224_b256.json 2>&1 | tail -6

stage serving latency: search over 10k/100k/1M fp16 embeddings and the query network
timeout 80 python3 bench/serve_latency.py --device cuda --seconds 0.5 --no-faiss \
    --json-out "$OUT/serve_latency.json" 2>&1 | grep -v "^INFO" | tail -30

stage export latency: torch eager on the GPU vs ONNX Runtime
timeout 40 python3 -m bench.export_latency --random-model tirg --image-size 224 --device cuda \
    --backends torch onnxruntime --batches 1 64 --iters 30 --json "$OUT/export_latency.json" \
    2>&1 | tail -15

stage paper-scale CSS reproduction, "$ITERS" iterations per model, 1 seed
timeout "$REPRO_SECONDS" python3 -m bench.reproduce --dataset /tmp/css64 --models all --seeds 1 \
    --iterations "$ITERS" --in-process --paper-scale --out /tmp/reproduce 2>&1 | tail -25
python3 -m bench.reproduce --dataset /tmp/css64 --models all --seeds 1 --iterations "$ITERS" \
    --in-process --paper-scale --out /tmp/reproduce --report-only 2>&1 | tail -20
# the device returns at most 8 files: the log, four bench JSONs and these three
cp /tmp/reproduce/table.md "$OUT/reproduce_table.md"
cp /tmp/reproduce/runs.json "$OUT/reproduce_runs.json"
cp /tmp/reproduce/recalls.png "$OUT/reproduce_recalls.png"
stage done
