#!/usr/bin/env bash
# Proof run on a GPU box, in one command: carried wheels, proxy shards built on the box, the default config under
# torchrun for a set wallclock through GPTQ, packing, round-trip and sliding+SLOT eval; then the same artifact scored
# with the other SLOT modes.  Logs land in $OUT (default ./gpu_out).
#
#   bash scripts/gpu_proof.sh     # MAX_WALLCLOCK_SECONDS=200 WARMDOWN_ITERS=200 NPROC=1 by default; any train_gpt.py env var
#   SKIP_TRAIN=1 ARTIFACT=path/final_model.int6.ptz bash scripts/gpu_proof.sh    # only re-score an artifact
#   SCRIPT=dist/train_gpt.py bash scripts/gpu_proof.sh   # run the minified build (python build_submission.py)
#
# WARMDOWN_ITERS is scaled to the short run (the record's 4000 of ~6700 steps would put a 200 s run entirely in the
# warmdown, starting at ~10% of the peak LR); EXTRA_SLOT_MODES="standard off" re-scores the artifact in those modes.
#
# Needs, in the repo root (both git-ignored; see README "GPU proof run"):
#   .whl/               brotli and python-minifier wheels for the box's Python (only if they are not installed there)
#   .carry/proxy_text/  val_mixed.jsonl.xz and some train_mix_*.jsonl.xz from ../shared/data/proxy_text/
set -euo pipefail
OUT=${OUT:-./gpu_out}
mkdir -p "$OUT"
source scripts/gpu_setup.sh
export MAX_WALLCLOCK_SECONDS=${MAX_WALLCLOCK_SECONDS:-200} WARMDOWN_ITERS=${WARMDOWN_ITERS:-200}
export RUN_ID=${RUN_ID:-proxy_1xH200}
ARTIFACT=${ARTIFACT:-final_model.int6.ptz}
NPROC=${NPROC:-1}
SCRIPT=${SCRIPT:-train_gpt.py}
export TRAIN_GPT=$SCRIPT  # scripts/eval_artifact.py reuses the same file's functions
if [ "${SKIP_TRAIN:-0}" != 1 ]; then
  torchrun --standalone --nproc_per_node="$NPROC" "$SCRIPT"
  cp "logs/$RUN_ID.txt" "$OUT/train_seed${SEED:-1337}.log"
  cp final_model.int6.ptz "$OUT/"
fi
for mode in ${EXTRA_SLOT_MODES-standard off}; do
  if [ "$mode" = off ]; then flags="SLOT_ENABLED=0"; else flags="SLOT_ENABLED=1 SLOT_MODE=$mode"; fi
  env $flags RUN_ID="${RUN_ID}_slot_$mode" torchrun --standalone --nproc_per_node="$NPROC" \
    scripts/eval_artifact.py "$ARTIFACT"
  cp "logs/${RUN_ID}_slot_$mode.txt" "$OUT/eval_slot_$mode.log"
done
