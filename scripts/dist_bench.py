"""Two measurements at this world size (`optimizer`, `train`; both without an argument).

optimizer: what a training step's optimizer costs: the whole Optimizers.step of the record config (gradient
clipping, the banks' bf16 reduce-scatter, the fp32 all-reduce of the replicated parameters, AdamW, Newton-Schulz on
this rank's share of the matrices, the all-gather of the updates) and its collectives alone, with the bytes each
moves (each bank padded to a multiple of the world size, as the optimizer pads it) and the bus bandwidth (NCCL's
definition: (world - 1) / world of the full buffer per rank for reduce-scatter and all-gather, twice that for
all-reduce).  On a GPU it also reports how long the GPU is busy in the step (`gpu_busy`, over `gpu_ops` kernels,
copies and memsets); at more than one rank that includes NCCL's kernels, waiting for the other ranks included.

    torchrun --standalone --nproc_per_node=2 scripts/dist_bench.py
    NCCL_DEBUG=INFO torchrun ... 2>&1 | grep -E "dist_bench| via "   # which transport NCCL picked (P2P, SHM, NET)

train: whole training steps as train_model runs them (run_train_step, the next batch prefetched, the per-step sync,
the EMA update) with the compiled model: after 3 warm-up steps, BENCH_STEPS timed as shipped (`prefetch`: the next
batch built once the last backward is queued) and with it built after the sync instead (`noprefetch`, the form
before), alternating, twice; then per form a CUDA profile of 2 steps: the wall time per step against the time the
GPU's compute kernels are busy and NCCL's kernels are busy (`idle` = wall - compute: what the GPU spends waiting for
the host, for other ranks, or for collectives it cannot overlap), and from the profile's timeline the GPU's idle
gaps between its first and last op (`gaps`: all of them, and those of at least 20 us; OUT gets each such gap with
the ops on either side).  Needs DATA_PATH's shards.

One process (plain `python3 scripts/dist_bench.py`) times the same with no collectives, for the difference.
Env: BENCH_REPS (timed optimizer steps, default 20), BENCH_STEPS (timed training steps, default 8), OUT (the rank-0
profile tables) and every train_gpt.py env var (model shape, data).
Not counted code: loads train_gpt.py (or the file named by TRAIN_GPT) by path.
"""

from __future__ import annotations

import inspect
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist

from gpu_bench import load_train_gpt, self_device_us, train_compile


def median_ms(tg, fn, reps: int, device) -> float:
    times = []
    for _ in range(reps):
        tg.cuda_sync(device)
        t0 = time.perf_counter()
        fn()
        tg.cuda_sync(device)
        times.append(1000.0 * (time.perf_counter() - t0))
    return statistics.median(times)


def bench_optimizer(tg, h, d, device) -> str:
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
        events = [(e.count, self_device_us(e)) for e in prof.key_averages()]  # CUDA activity: kernels, memsets, copies
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
    return line


def gpu_gaps(trace: dict, min_us: float = 20.0) -> tuple[float, list[tuple[float, str, str]]]:
    """From a torch-profiler chrome trace: the GPU's idle time between its first and last op (kernels, copies, memsets
    merged into busy intervals) and each gap of at least min_us as (µs, the op before, the op after), longest first."""
    ops = sorted((e["ts"], e["ts"] + e.get("dur", 0.0), e.get("name", "?")) for e in trace.get("traceEvents", [])
                 if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    idle, gaps = 0.0, []
    if not ops:
        return idle, gaps
    end, last = ops[0][1], ops[0][2]
    for start, stop, name in ops[1:]:
        if start > end:
            idle += start - end
            if start - end >= min_us:
                gaps.append((start - end, last, name))
        if stop >= end:
            end, last = stop, name
    return idle, sorted(gaps, reverse=True)


def bench_train_loop(tg, h, d, device) -> str:
    n = int(os.environ.get("BENCH_STEPS", "8"))
    if n < 1:
        raise ValueError(f"BENCH_STEPS={n} must be at least 1")
    torch.manual_seed(h.seed)
    base = tg.build_model(h, device)
    model = train_compile(tg, base, device)
    opt = tg.build_optimizers(h, base, d)
    loader = tg.TrainLoader(tg.list_shards(h.train_files), h.seed, d.rank, d.world_size, device)
    ema = tg.EMA(base)
    base.set_qat(0.0)
    count = [0]
    # prefetch: train_model as shipped, the next batch built once the step's last backward is queued; noprefetch:
    # built at the next step's start, after the sync (the form before; the only one of a train_gpt.py without
    # run_train_step(prefetch=...))
    forms = ("prefetch", "noprefetch") if "prefetch" in inspect.signature(tg.run_train_step).parameters \
        else ("noprefetch",)

    def step(form):  # train_model's loop body, less the logging and the stop test
        loss = tg.run_train_step(model, opt, loader, h, d, device, count[0], 1.0,
                                 **({"prefetch": True} if form == "prefetch" else {}))
        count[0] += 1
        tg._agree_step(0.0, loss, device)
        ema.update(count[0])

    for _ in range(3):  # compile; CUDA graphs record at the second call
        step(forms[0])
    runs = {f: [] for f in forms}
    for _ in range(2):  # alternating, twice, against drift
        for form in forms:
            tg.cuda_sync(device)
            t0 = time.perf_counter()
            for _ in range(n):
                step(form)
            tg.cuda_sync(device)
            runs[form].append(1000.0 * (time.perf_counter() - t0) / n)
    ms = statistics.mean(runs[forms[0]])
    line = (f"dist_bench_train world:{d.world_size} grad_accum:{d.grad_accum_steps} ms/step:{ms:.1f} "
            f"tok/s:{h.train_batch_tokens / (ms / 1000):.0f} " + " ".join(
                f"{f}:{'/'.join(f'{x:.1f}' for x in v)}" for f, v in runs.items()))
    if device.type == "cuda":
        for form in forms:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                t0 = time.perf_counter()
                for _ in range(2):
                    step(form)
                torch.cuda.synchronize(device)
                wall = 1000.0 * (time.perf_counter() - t0) / 2
            busy = {"compute": 0.0, "nccl": 0.0}
            for e in prof.key_averages():
                busy["nccl" if "nccl" in e.key.lower() else "compute"] += self_device_us(e) / 1000 / 2
            with tempfile.TemporaryDirectory() as tmp:  # the trace's timeline: where between its ops the GPU waits
                prof.export_chrome_trace(os.path.join(tmp, "trace.json"))
                with open(os.path.join(tmp, "trace.json")) as f:
                    idle_us, gaps = gpu_gaps(json.load(f))
            line += (f" profiled[{form}]:{wall:.1f}ms compute:{busy['compute']:.1f}ms nccl:{busy['nccl']:.1f}ms "
                     f"idle:{wall - busy['compute']:.1f}ms gaps:{idle_us / 1000 / 2:.2f}ms/step"
                     f"({len(gaps)} of >=20us, {sum(g[0] for g in gaps) / 1000 / 2:.2f}ms/step)")
            out = os.environ.get("OUT")
            if out and d.is_main:
                with open(os.path.join(out, f"profile_train_world{d.world_size}_{form}.txt"), "w") as f:
                    f.write(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=80,
                                                      max_name_column_width=100))
                    f.write("\nGPU idle gaps of >= 20 us over the 2 profiled steps, longest first (us, op before, "
                            "op after):\n" + "".join(f"{us:9.1f}  {a[:90]}  ->  {b[:90]}\n" for us, a, b in gaps))
    return line


def main() -> None:
    modes = ("optimizer", "train")
    what = sys.argv[1:] or list(modes)
    if set(what) - set(modes):
        raise ValueError(f"dist_bench.py: unknown modes {sorted(set(what) - set(modes))}; it has {', '.join(modes)}")
    tg = load_train_gpt()
    h = tg.Hyperparameters.from_env()
    h.validate()
    d = tg.dist_info()
    device = tg.setup_runtime(h, d)
    try:
        for mode in modes:
            if mode in what:
                line = (bench_optimizer if mode == "optimizer" else bench_train_loop)(tg, h, d, device)
                if d.is_main:
                    print(line, flush=True)
        if tg.is_distributed():
            dist.barrier()  # every rank past its last collective before the group goes
    finally:
        if tg.is_distributed():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
