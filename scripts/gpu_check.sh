#!/usr/bin/env bash
# GPU check (one H100/H200): first the longest trainable sequence of a ~0.5B and an 8B model
# with and without the tiled loss (scripts/gpu_long_seq.py, JSON lines, also written to
# docs/gpu/<date>-long-seq.jsonl; skip with GPU_CHECK_LONG_SEQ=0), then tokens/s and MFU of a
# ~0.5B Llama, bf16, packed 2048-token sequences, ZeRO-2, through dpkit and through transformers'
# Trainer with the padding-free collator (same rows): its JSON line is the LAST line printed
# (scripts/gpu_mfu.py). About 2-3 minutes on an H100 for the MFU part.
#
#   bash scripts/gpu_check.sh            # on the GPU machine
#   bash scripts/gpu_check.sh --smoke    # tiny sizes, 2 steps: any CPU machine
#
# Extra arguments go to scripts/gpu_mfu.py (--steps, --warmup, --micro-batch, --out DIR).
# PYTHON picks the interpreter (default: python3; a carried package folder can be put on
# PYTHONPATH, e.g. PYTHONPATH=/tmp/wheels-target).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1
"$PY" - <<'PY' || exit 3
import importlib, sys
import importlib.util
missing = [m for m in ("torch", "transformers", "accelerate", "deepspeed", "datasets",
                       "pydantic", "yaml") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_check: missing Python packages {missing} (bring their wheels; see "
             "/work/shared/CPU_DEEPSPEED.md, 'The GPU machines')")
PY
if [ "${GPU_CHECK_LONG_SEQ:-1}" = 1 ]; then
  if [[ " $* " == *" --smoke "* ]]; then LONG=(--smoke); else LONG=(--out docs/gpu); fi
  "$PY" scripts/gpu_long_seq.py "${LONG[@]}"
fi
exec "$PY" scripts/gpu_mfu.py "$@"
