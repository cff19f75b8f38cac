#!/usr/bin/env bash
# Every GPU check of the project in one run, for a machine with one NVIDIA GPU and no network.
# Results (JSON lines, logs, summaries) go to $OUT (default /tmp/dpkit_gpu); record them in
# docs/benchmarks.md. What the GPU image lacks (deepspeed, pydantic, datasets, bitsandbytes …)
# travels as wheels in .whl/ (see docs/benchmarks.md, "GPU checks", for the download commands).
#
#   bash scripts/gpu_all.sh [quick|zero3|plan|qlora|rows|mfu|mfu_compile|mfu_ga4|mfu_dense|
#                            trainer_mfu ...]
#   (default: quick zero3 plan rows mfu qlora)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/dpkit_gpu}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" TORCH_EXTENSIONS_DIR=/tmp/torch_ext HF_HUB_OFFLINE=1 \
       PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
CHECKS=${*:-quick zero3 plan rows mfu qlora}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 - <<'PY' | tee -a "$OUT/gpu.txt"
import importlib
for name in ("torch", "deepspeed", "transformers", "accelerate", "peft", "datasets",
             "bitsandbytes", "pydantic"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as e:  # report, don't stop: each check says what it needs
        print(name, "MISSING", type(e).__name__, e)
import torch; print("cuda", torch.version.cuda, "nccl", torch.cuda.nccl.version())
PY

step() {  # step NAME TIMEOUT COMMAND...: run one check, keep its log and exit code
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "{\"check\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - t0))}" | tee -a "$OUT/steps.jsonl"
  tail -n 5 "$OUT/$name.log"
}

for check in $CHECKS; do case $check in
  quick)  # issue 2: the quickstart through `dpkit train` on the GPU: NCCL, bf16, ZeRO-2
    step quick 150 python3 -m dpkit.cli train recipes/quickstart/instruct-full-zero2.yaml \
      model.dtype=bfloat16 output.dir=/tmp/dpkit_quick output.overwrite=true --nproc-per-node 1
    cp /tmp/dpkit_quick/summary.json "$OUT/quick_summary.json" 2>/dev/null ;;
  zero3)  # issue 2: the same recipe under ZeRO-3, consolidated save
    step zero3 150 python3 -m dpkit.cli train recipes/quickstart/instruct-full-zero2.yaml \
      model.dtype=bfloat16 zero.stage=3 output.dir=/tmp/dpkit_zero3 output.overwrite=true \
      --nproc-per-node 1
    cp /tmp/dpkit_zero3/summary.json "$OUT/zero3_summary.json" 2>/dev/null ;;
  plan)   # issue 5: predicted peak vs torch.cuda.max_memory_allocated at two lengths
    step plan 150 python3 scripts/gpu_plan_check.py --seq 512,2048 ;;
  qlora)  # issue 4: a tiny QLoRA run, adapters verified and reloaded on the 4-bit base
    step qlora 150 python3 scripts/gpu_qlora_check.py --stages 2,3 --steps 8 ;;
  rows)   # issue 9: per-row attention (flash varlen) vs transformers' masked sdpa: loss, grads, time
    step rows 150 python3 scripts/gpu_rows_check.py ;;
  mfu)    # issue 9: MFU of a ~0.5B Llama, bf16, 2048 tokens, packed, ZeRO-2 (dpkit alone)
    step mfu 150 python3 scripts/gpu_mfu_dpkit.py --steps 20 --micro 8 ;;
  mfu_compile)  # the same with train.compile (regional torch.compile)
    step mfu_compile 240 python3 scripts/gpu_mfu_dpkit.py --steps 20 --micro 8 --compile ;;
  mfu_ga4)  # compiled, 4 micro-batches accumulated per optimizer step (global batch 32)
    step mfu_ga4 240 python3 scripts/gpu_mfu_dpkit.py --steps 10 --warmup 3 --micro 8 \
      --global-batch 32 --compile ;;
  mfu_dense)  # packed sdpa under transformers' dense block mask: what per-row attention gains
    step mfu_dense 150 python3 scripts/gpu_mfu_dpkit.py --steps 20 --micro 8 --dense-mask ;;
  trainer_mfu)  # dpkit vs Trainer + DataCollatorWithFlattening on the same rows
    step trainer_mfu 300 bash scripts/gpu_check.sh --variants dpkit,trainer_flattening,dpkit_dense ;;
esac; done
grep -h '^{' "$OUT"/*.log > "$OUT/results.jsonl" 2>/dev/null
echo "results in $OUT"
