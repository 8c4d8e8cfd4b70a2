#!/usr/bin/env bash
# Quickstart: install the requirements, then run the whole pipeline on the embedded sample (data/sample) with a
# small model: train -> EMA -> GPTQ int6 -> brotli -> reload -> round-trip and sliding+SLOT eval.
# Uses the GPU when there is one, else the CPU.  Any env var of train_gpt.py overrides the settings below.
set -euo pipefail
cd "$(dirname "$0")/.."
if python3 -c "import torch" 2>/dev/null; then
  # keep an installed (e.g. CUDA) PyTorch; install everything else
  grep -v '^torch' requirements.txt > /tmp/pg_requirements.txt
  python3 -m pip install -q --disable-pip-version-check -r /tmp/pg_requirements.txt
else
  python3 -m pip install -q --disable-pip-version-check -r requirements.txt
fi
export DATA_PATH=${DATA_PATH:-data/sample} TOKENIZER_PATH=${TOKENIZER_PATH:-data/tokenizers/fineweb_1024_bpe.model}
export RUN_ID=${RUN_ID:-quickstart}
export NUM_LAYERS=${NUM_LAYERS:-4} MODEL_DIM=${MODEL_DIM:-192} NUM_HEADS=${NUM_HEADS:-6} NUM_KV_HEADS=${NUM_KV_HEADS:-3}
export MLP_MULT=${MLP_MULT:-3} BIGRAM_VOCAB_SIZE=${BIGRAM_VOCAB_SIZE:-1024} BIGRAM_DIM=${BIGRAM_DIM:-64}
export VE_DIM=${VE_DIM:-32} VE_LAYERS=${VE_LAYERS:-2,3} XSA_LAST_N=${XSA_LAST_N:-4}
export TRAIN_SEQ_LEN=${TRAIN_SEQ_LEN:-256} EVAL_SEQ_LEN=${EVAL_SEQ_LEN:-256} EVAL_STRIDE=${EVAL_STRIDE:-128}
export TRAIN_BATCH_TOKENS=${TRAIN_BATCH_TOKENS:-16384} VAL_BATCH_SIZE=${VAL_BATCH_SIZE:-32768}
export ITERATIONS=${ITERATIONS:-120} WARMDOWN_ITERS=${WARMDOWN_ITERS:-50} WARMUP_STEPS=${WARMUP_STEPS:-0}
export MAX_WALLCLOCK_SECONDS=${MAX_WALLCLOCK_SECONDS:-0} VAL_LOSS_EVERY=${VAL_LOSS_EVERY:-40}
export TRAIN_LOG_EVERY=${TRAIN_LOG_EVERY:-25} GPTQ_CALIB_SAMPLES=${GPTQ_CALIB_SAMPLES:-8}
export MUON_MOMENTUM_WARMUP_STEPS=${MUON_MOMENTUM_WARMUP_STEPS:-50}
python3 train_gpt.py
