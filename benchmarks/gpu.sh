#!/usr/bin/env bash
# `milan bench speed` on a GPU in one go: bf16 ViT-B/16 step, eager then torch.compile'd, each
# against the bf16 matmul peak measured in the same run (MFU), plus the GPU's name; then the input
# path: the CUDA-only tests of the fast path (nvJPEG decoding) and `milan bench data` on the device,
# with the compiled step rate as the rate to feed (cores per GPU).
#
#   bash benchmarks/gpu.sh [OUT_DIR]        # default runs/bench_gpu; ≈ 5 min on one H100/H200
#
# Env: MODEL (milan_vit_base_patch16), BATCH (128), STEPS (10), DEVICE (cuda), PYTHON (python3),
#      DATA (a folder or shards for `bench data`; default: generated ImageNet-like JPEGs),
#      DATA_IMAGES (256), SKIP_SPEED=1 (only the data part: tests + bench data, ≈ 2 min).
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
if [ "${SKIP_SPEED:-0}" != 1 ]; then
    "$py" "${common[@]}" --out "$out/eager.json" | tee "$out/eager.md"
    "$py" "${common[@]}" --compile --out "$out/compiled.json" | tee "$out/compiled.md"
    echo "wrote $out/{eager,compiled}.{json,md}"
fi

# --- the input path: GPU JPEG decoding tests, then images/s per core and cores per GPU -------------
"$py" -m pytest -q -p no:cacheprovider -rs "$root/tests/test_fast_path.py" -k "gpu or cuda" | tee "$out/fast_path_tests.txt"
rate=()
if [ -f "$out/compiled.json" ]; then rate=(--step-rate "$out/compiled.json"); else rate=(--step-rate 3000); fi
data_args=(--images "${DATA_IMAGES:-256}" --rounds 3 --workers 4,8)
if [ -n "${DATA:-}" ]; then data_args+=(--data "$DATA"); fi
"$py" -m milan bench data --device "$device" "${rate[@]}" "${data_args[@]}" --out "$out/data.json" | tee "$out/data.md"
echo "wrote $out/data.{json,md}"
