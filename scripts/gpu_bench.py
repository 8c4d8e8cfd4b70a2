"""GPU micro-benchmarks of the record config, one process, one GPU: training ms/step (with a torch-profiler table of
the top CUDA kernels), peak memory, sliding-eval throughput per SLOT mode with the projection to the full FineWeb val
on 8 GPUs, and GPTQ calibration / quantisation / compression times.

    DATA_PATH=data/datasets/proxy_sp1024 python3 scripts/gpu_bench.py [train] [eval] [gptq]

Env: BENCH_STEPS (timed steps, default 8), BENCH_EVAL_BATCHES (32-window batches per mode, default 24), and every
train_gpt.py env var.  Not counted code: loads train_gpt.py by path.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

import torch

FULL_VAL_WINDOWS = 969_057  # windows of the 62,021,632-token FineWeb val at stride 64 (every target once, D10)


def load_train_gpt():
    path = os.environ.get("TRAIN_GPT", str(Path(__file__).resolve().parents[1] / "train_gpt.py"))
    spec = importlib.util.spec_from_file_location("train_gpt", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["train_gpt"] = mod
    spec.loader.exec_module(mod)
    return mod


def timed(fn, device):
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize(device)
    return out, time.perf_counter() - t0


def bench_train(tg, h, d, device, base, model):
    opt = tg.build_optimizers(h, base, d)
    loader = tg.TrainLoader(tg.list_shards(h.train_files), h.seed, 0, 1, device)
    step = lambda i: tg.run_train_step(model, opt, loader, h, d, device, i, 1.0)
    _, t_compile = timed(lambda: [step(i) for i in range(3)], device)
    print(f"bench_train compile+3 steps: {t_compile:.1f}s")
    n = int(os.environ.get("BENCH_STEPS", "8"))
    torch.cuda.reset_peak_memory_stats(device)
    _, t = timed(lambda: [step(i) for i in range(3, 3 + n)], device)
    ms = 1000 * t / n
    print(f"bench_train ms/step:{ms:.1f} tok/s:{h.train_batch_tokens / (ms / 1000):.0f} "
          f"peak_alloc:{torch.cuda.max_memory_allocated(device) // 2**20}MiB")
    base.set_qat(1.0)
    _, t = timed(lambda: [step(i) for i in range(3 + n, 3 + 2 * n)], device)
    base.set_qat(0.0)
    print(f"bench_train qat_on ms/step:{1000 * t / n:.1f}")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for i in range(2):
            step(100 + i)
        torch.cuda.synchronize(device)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=90))
    return ms


def bench_eval(tg, h, d, device, model, val_data):
    n_batches = int(os.environ.get("BENCH_EVAL_BATCHES", "24"))
    T, stride = h.eval_seq_len, h.eval_stride
    n_tok = min(val_data.tokens.numel() - 1, T + stride * (n_batches * tg.SLIDING_BATCH_WINDOWS - 1))
    sub = type(val_data)(val_data.tokens[: n_tok + 1], val_data.base_bytes, val_data.has_leading_space,
                         val_data.is_boundary)
    hidden_fn = tg.maybe_compile(model.forward_hidden, device)
    n_windows = tg.plan_windows(n_tok, T, stride, 0, 1)[0].numel()
    for mode in ("off", "causal", "standard"):
        kw = dict(hidden_fn=hidden_fn, slot_enabled=mode != "off", slot_mode="causal" if mode == "off" else mode)
        tg.eval_val_sliding(h, model, d, device, sub, **kw)  # warm-up / compile
        (loss, bpb), t = timed(lambda: tg.eval_val_sliding(h, model, d, device, sub, **kw), device)
        proj = t / n_windows * FULL_VAL_WINDOWS / 8
        print(f"bench_eval slot:{mode} windows:{n_windows} time:{t:.2f}s tokens_scored/s:{n_tok / t:.0f} "
              f"window_tokens/s:{n_windows * T / t:.0f} projected_full_val_8gpu:{proj:.0f}s bpb:{bpb:.4f}")


def bench_gptq(tg, h, d, device, base):
    batches, t_load = timed(lambda: tg.calibration_batches(h, d, device, base), device)
    hess, t_h = timed(lambda: tg.collect_hessians(base, batches, device), device)
    sd = {k: v.detach().cpu() for k, v in base.state_dict().items()}
    qsd, t_q = timed(lambda: tg.quantize_state_dict(tg.unbank_state_dict(sd, h.num_layers), hess, h, device=device), device)
    blob, t_c = timed(lambda: tg.compress(tg.serialize(qsd)), device)
    print(f"bench_gptq batches:{len(batches)} load:{t_load:.2f}s hessians:{t_h:.2f}s quantize:{t_q:.2f}s "
          f"compress:{t_c:.2f}s blob_bytes:{len(blob)}")


def main():
    tg = load_train_gpt()
    what = set(sys.argv[1:]) or {"train", "eval", "gptq"}
    h = tg.Hyperparameters.from_env()
    h.validate()
    d = tg.DistInfo()
    device = tg.setup_runtime(h, d)
    print(f"device:{torch.cuda.get_device_name(device)} torch:{torch.__version__} "
          f"attention_backend:{tg.attention_backend_name(device)}")
    torch.manual_seed(h.seed)
    base = tg.build_model(h, device)
    model = tg.maybe_compile(base, device)
    if "train" in what:
        bench_train(tg, h, d, device, base, model)
    if "eval" in what:
        val_data = tg.load_validation_data(h, device, h.train_seq_len)
        bench_eval(tg, h, d, device, base.eval(), val_data)
    if "gptq" in what:
        bench_gptq(tg, h, d, device, base)


if __name__ == "__main__":
    main()
