#!/usr/bin/env bash
# `milan bench speed` on a GPU in one go: bf16 ViT-B/16 step, eager then torch.compile'd, each
# against the bf16 matmul peak measured in the same run (MFU), plus the GPU's name.
#
#   bash benchmarks/gpu.sh [OUT_DIR]        # default runs/bench_gpu; ≈ 5 min on one H100/H200
#
# Env: MODEL (milan_vit_base_patch16), BATCH (128), STEPS (10), DEVICE (cuda), PYTHON (python3).
# Runs from a source checkout without installing (PYTHONPATH=src); needs torch, timm, open_clip.
set -euo pipefail
out=${1:-runs/bench_gpu}
model=${MODEL:-milan_vit_base_patch16}
batch=${BATCH:-128}
steps=${STEPS:-10}
device=${DEVICE:-cuda}
py=${PYTHON:-python3}
root=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$out"
if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > "$out/gpu.csv" || true
fi
common=(-m milan bench speed --device "$device" --model "$model" --batch-size "$batch" --steps "$steps")
"$py" "${common[@]}" --out "$out/eager.json" | tee "$out/eager.md"
"$py" "${common[@]}" --compile --out "$out/compiled.json" | tee "$out/compiled.md"
echo "wrote $out/{eager,compiled}.{json,md}"
