"""What a training step's optimizer costs at this world size: the whole Optimizers.step of the record config (gradient
clipping, the banks' bf16 reduce-scatter, the fp32 all-reduce of the replicated parameters, AdamW, Newton-Schulz on
this rank's share of the matrices, the all-gather of the updates) and its collectives alone, with the bytes each
moves (each bank padded to a multiple of the world size, as the optimizer pads it) and the bus bandwidth (NCCL's
definition: (world - 1) / world of the full buffer per rank for reduce-scatter and all-gather, twice that for
all-reduce).  On a GPU it also reports how long the GPU is busy in the step (`gpu_busy`, over `gpu_ops` kernels,
copies and memsets); at more than one rank that includes NCCL's kernels, waiting for the other ranks included.

    torchrun --standalone --nproc_per_node=2 scripts/dist_bench.py
    NCCL_DEBUG=INFO torchrun ... 2>&1 | grep -E "dist_bench| via "   # which transport NCCL picked (P2P, SHM, NET)

One process (plain `python3 scripts/dist_bench.py`) times the same step with no collectives, for the difference.
Env: BENCH_REPS (timed repetitions, default 20) and every train_gpt.py env var for the model shape.
Not counted code: loads train_gpt.py (or the file named by TRAIN_GPT) by path.
"""

from __future__ import annotations

import os
import statistics
import time

import torch
import torch.distributed as dist

from gpu_bench import load_train_gpt


def median_ms(tg, fn, reps: int, device) -> float:
    times = []
    for _ in range(reps):
        tg.cuda_sync(device)
        t0 = time.perf_counter()
        fn()
        tg.cuda_sync(device)
        times.append(1000.0 * (time.perf_counter() - t0))
    return statistics.median(times)


def main() -> None:
    tg = load_train_gpt()
    h = tg.Hyperparameters.from_env()
    d = tg.dist_info()
    device = tg.setup_runtime(h, d)
    reps = int(os.environ.get("BENCH_REPS", "20"))
    if reps < 1:
        raise ValueError(f"BENCH_REPS={reps} must be at least 1")
    model = tg.build_model(h, device)
    opt = tg.build_optimizers(h, model, d)
    gen = torch.Generator(device=device).manual_seed(1234 + d.rank)  # each rank its own gradients, as in training
    for p in opt.params:
        p.grad.copy_(1e-3 * torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32))
    median_ms(tg, lambda: opt.step(100, 1.0), 3, device)  # warm-up: Newton-Schulz compiles here
    step_ms = median_ms(tg, lambda: opt.step(100, 1.0), reps, device)
    line = f"dist_bench world:{d.world_size} optimizer_step:{step_ms:.3f}ms"
    if device.type == "cuda":  # how much of that the GPU is busy (the rest: the host issuing small kernels)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                opt.step(100, 1.0)
            torch.cuda.synchronize(device)
        events = [(e.count, getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0))
                  for e in prof.key_averages()]  # CUDA activity only: kernels, memsets and copies
        events = [(n, us) for n, us in events if us > 0]
        busy = sum(us for _, us in events) / 5 / 1000
        line += f" gpu_busy:{busy:.3f}ms gpu_ops:{sum(n for n, _ in events) // 5}"
        out = os.environ.get("OUT")
        if out and d.is_main:
            with open(os.path.join(out, f"profile_optimizer_world{d.world_size}.txt"), "w") as f:
                f.write(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=60,
                                                  max_name_column_width=100))
    if d.world_size > 1:
        world, use_rs = d.world_size, opt.muon.use_reduce_scatter  # the optimizer's own choice of collective
        parts = []
        banks = sorted(((n, p) for n, p in model.named_parameters() if p.ndim == 3), key=lambda t: -t[1].numel())
        for name, p in banks:
            k = -(-p.shape[0] // world)
            full = torch.zeros((k * world, *p.shape[1:]), dtype=torch.bfloat16, device=device)
            shard = torch.empty((k, *p.shape[1:]), dtype=torch.bfloat16, device=device)
            rs = median_ms(tg, lambda: tg._reduce_scatter_sum(shard, full, use_rs).wait(), reps, device)
            ag = median_ms(tg, lambda: tg._all_gather(full, shard, use_rs).wait(), reps, device)
            mb = full.numel() * full.element_size() / 1e6
            rs_bw, ag_bw = (mb * (world - 1) / world / ms for ms in (rs, ag))  # MB/ms == GB/s
            parts.append(f"{name}:{mb:.2f}MB rs:{rs:.3f}ms({rs_bw:.0f}GB/s) ag:{ag:.3f}ms({ag_bw:.0f}GB/s)")
        flat = torch.zeros(sum(p.numel() for p in opt.replicated), dtype=torch.float32, device=device)
        ar = median_ms(tg, lambda: dist.all_reduce(flat), reps, device)
        mb = flat.numel() * 4 / 1e6
        parts.append(f"replicated:{mb:.2f}MB all_reduce:{ar:.3f}ms({2 * mb * (world - 1) / world / ar:.0f}GB/s)")
        line += " " + " ".join(parts)
    if d.is_main:
        print(line, flush=True)
    if tg.is_distributed():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
