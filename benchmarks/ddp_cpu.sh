#!/usr/bin/env bash
# 2-process gloo DDP vs 1 process on CPU, same global batch, on the built-in shapes data.
# Prints the mean img/s of the logged windows after the first (warm-up) one.
#   bash benchmarks/ddp_cpu.sh [steps] [global_batch]
set -euo pipefail
steps=${1:-40}; batch=${2:-128}
out=$(mktemp -d)
common=(--config pretrain_shapes "optim.steps=$steps" run.log_every=10 run.tensorboard=false
        monitor.every=0 data.num_workers=0 run.ckpt_every=100000 run.device=cpu ${MILAN_BENCH_ARGS:-})
rate() { python - "$1" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl") if '"loss"' in l]
rates = [r["img_per_s"] for r in rows[1:]]
print(f"{sum(rates) / len(rates):.1f}")
PY
}
OMP_NUM_THREADS=2 milan pretrain "${common[@]}" "optim.batch_size=$batch" "run.out_dir=$out/one" 2>/dev/null
OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 -m milan pretrain "${common[@]}" \
    "optim.batch_size=$((batch / 2))" "run.out_dir=$out/two" 2>/dev/null
echo "| setting | img/s |"
echo "|---|---:|"
echo "| 1 process × 2 threads, batch $batch | $(rate "$out/one") |"
echo "| 2 processes (gloo DDP) × 1 thread, batch $((batch / 2)) each | $(rate "$out/two") |"
rm -rf "$out"
