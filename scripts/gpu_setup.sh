#!/usr/bin/env bash
# Source this on a GPU box (from the repo root) before the GPU scripts: installs carried wheels (.whl/) into
# /tmp/site, sets the NCCL safety variables, and builds the proxy shards from .carry/proxy_text/ once.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c 'import torch, sys; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.device_count(), "python", sys.version.split()[0])'
export DATA_PATH=${DATA_PATH:-data/datasets/proxy_sp1024}
export TOKENIZER_PATH=${TOKENIZER_PATH:-data/tokenizers/fineweb_1024_bpe.model}
if [ ! -f "$DATA_PATH/fineweb_val_000000.bin" ]; then
  _t0=$(date +%s)
  python3 data/build_shards.py --tokenizer "$TOKENIZER_PATH" --out "$DATA_PATH" \
    --shard-tokens 10000000 --val .carry/proxy_text/val_mixed.jsonl.xz --workers "$(nproc)" .carry/proxy_text/train_mix_*.jsonl.xz
  echo "proxy shards built in $(( $(date +%s) - _t0 ))s"
fi
