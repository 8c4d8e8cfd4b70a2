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
the EMA update) with the compiled model: after 3 warm-up steps, BENCH_STEPS timed in each form, alternating, twice:
as shipped (`shipped`), with each micro-batch's gradients added to the .grad buffers by autograd, one kernel per
parameter (`autogradacc`, before PERF #40), with the per-step sync waited for after the whole step, which drains the
GPU at every step's end (`latesync`, before PERF #38), and that with the host-side ops as before PERF #37 too
(`hostbefore`: torch's clip_grad_norm_, each optimizer's own zero_grad, the EMA's lerp sources rebuilt each step, the
clock sent up from pageable memory); BENCH_FORMS (a comma list) times only those, in its order (the line's ms/step
and tok/s are then its first form's).  Then per form a CUDA profile of 2 steps (BENCH_PROFILE_STEPS; so for each
profile below): the wall time per step against the time the GPU's compute kernels are busy and NCCL's kernels are
busy (`idle` = wall - compute: what the GPU spends waiting for the host, for other ranks, or for collectives it
cannot overlap), and from the profile's timeline the GPU's idle gaps between its first and last op (`gaps`: all of
them, and those of at least 20 us; OUT gets each such gap with the ops on either side).  Last, 2 steps of the first
form traced with the host too: each gap of at least 20 us is put on the part of the step that launched the op after
it (`gaps_by_launcher`, ms/step: run_train_step, agree_step, ema_update; the host runs slower when traced); OUT gets
each gap with the launching host events.  Then 2 more traced with Python functions too (`with_stack`): what the
launching thread did while the GPU waited, from each gap's start to the launch of the op after it, as self time per
host event (`longest_gap_host`: the longest gap's top three, µs; OUT: gap_hosts_world{W}.txt).  Before the
profiles, one step under torch's sync debug mode: `host_syncs`, the synchronizing CUDA calls it made (OUT:
host_syncs_world{W}.txt, where each came from).  Needs DATA_PATH's shards.

One process (plain `python3 scripts/dist_bench.py`) times the same with no collectives, for the difference.
Env: BENCH_REPS (timed optimizer steps, default 20), BENCH_STEPS (timed training steps, default 8), BENCH_FORMS
(train's forms, default all this train_gpt.py has), BENCH_PROFILE_STEPS (steps per profile, default 2), OUT (the
rank-0 profile tables) and every train_gpt.py env var (model shape, data).
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
import warnings

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


GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
HOST_CATS = ("cpu_op", "user_annotation")
LAUNCH_CATS = ("cuda_runtime", "cuda_driver")


def _gaps(trace: dict, min_us: float) -> tuple[float, list[tuple[float, dict, dict]]]:
    """The GPU's idle time between its first and last op, and each gap of at least min_us as (µs, the event that ended
    last before it, the event after it), longest first."""
    ops = sorted((e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and e.get("cat") in GPU_CATS),
                 key=lambda e: (e["ts"], e["ts"] + e.get("dur", 0.0)))
    idle, gaps = 0.0, []
    if not ops:
        return idle, gaps
    end, last = ops[0]["ts"] + ops[0].get("dur", 0.0), ops[0]
    for e in ops[1:]:
        start, stop = e["ts"], e["ts"] + e.get("dur", 0.0)
        if start > end:
            idle += start - end
            if start - end >= min_us:
                gaps.append((start - end, last, e))
        if stop >= end:
            end, last = stop, e
    return idle, sorted(gaps, key=lambda g: -g[0])


def gpu_gaps(trace: dict, min_us: float = 20.0) -> tuple[float, list[tuple[float, str, str]]]:
    """From a torch-profiler chrome trace: the GPU's idle time between its first and last op (kernels, copies, memsets
    merged into busy intervals) and each gap of at least min_us as (µs, the op before, the op after), longest first."""
    idle, gaps = _gaps(trace, min_us)
    return idle, [(us, a.get("name", "?"), b.get("name", "?")) for us, a, b in gaps]


def _launches_and_host(trace: dict, host_cats: tuple) -> tuple[dict, dict]:
    """A trace's launch calls by correlation id, and its host events of host_cats by (pid, tid)."""
    events = trace.get("traceEvents", [])
    launches = {e["args"]["correlation"]: e for e in events if e.get("ph") == "X" and e.get("cat") in LAUNCH_CATS
                and "correlation" in e.get("args", {})}
    host: dict = {}
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in host_cats:
            host.setdefault((e.get("pid"), e.get("tid")), []).append(e)
    return launches, host


def gap_launchers(trace: dict, min_us: float = 20.0) -> list[tuple[float, float, str, list[str]]]:
    """For a trace with CPU activity too: each GPU gap of at least min_us as (µs, lag µs, the op after it, the host
    events that launched that op, outermost first).  The launch call (cuda_runtime / cuda_driver event) is found by
    the op's correlation id; the host events are the cpu_op and user_annotation events of its thread whose span holds
    it.  lag = the op's GPU start - the launch call's start: a few µs means the GPU waited for the host to launch it
    (the gap is host time); a long lag means the op was queued early and waited for something else."""
    launches, host = _launches_and_host(trace, HOST_CATS)
    out = []
    for us, _, op in _gaps(trace, min_us)[1]:
        launch = launches.get(op.get("args", {}).get("correlation"))
        if launch is None:
            out.append((us, float("nan"), op.get("name", "?"), ["(launch not traced)"]))
            continue
        t = launch["ts"]
        chain = sorted((e for e in host.get((launch.get("pid"), launch.get("tid")), [])
                        if e["ts"] <= t <= e["ts"] + e.get("dur", 0.0)), key=lambda e: (e["ts"], -e.get("dur", 0.0)))
        out.append((us, op["ts"] - t, op.get("name", "?"), [e.get("name", "?") for e in chain] or ["(no host op)"]))
    return out


def host_during_gaps(trace: dict, min_us: float = 20.0,
                     top: int = 6) -> list[tuple[float, str, list[tuple[str, float]]]]:
    """For a trace with CPU activity too (python_function events as well, with with_stack=True): what the launching
    thread did while the GPU sat idle, per gap of at least min_us: (µs, the op after it, [(host event, µs), ...]).
    The window runs from the gap's start to the launch call of the op after it; each of that thread's host events
    inside it counts its self time there (its time in the window less that of the events that start inside it,
    nested or overlapping, as traced: before clipping), summed by name; the `top` largest, then `(none traced)`: the
    window's time no event covers.  An op launched before its gap began waited on something else (another stream, a
    collective): its entry is `(launched before the gap)` with how long before."""
    launches, host = _launches_and_host(trace, (*HOST_CATS, "python_function"))

    def union(spans):
        total, end = 0.0, float("-inf")
        for a, b in sorted(spans):
            if b > end:
                total += b - max(a, end)
                end = b
        return total

    out = []
    for us, _, op in _gaps(trace, min_us)[1]:
        launch = launches.get(op.get("args", {}).get("correlation"))
        if launch is None:
            continue
        lo, hi = op["ts"] - us, launch["ts"]
        if hi <= lo:
            out.append((us, op.get("name", "?"), [("(launched before the gap)", lo - hi)]))
            continue
        # by the traced extents, each event before those that start inside it (equal spans: the first listed outer)
        spans = sorted((e["ts"], -(e["ts"] + e.get("dur", 0.0)), k, e.get("name", "?"))
                       for k, e in enumerate(host.get((launch.get("pid"), launch.get("tid")), []))
                       if e["ts"] < hi and e["ts"] + e.get("dur", 0.0) > lo)
        selfs: dict[str, float] = {}
        for n, (a, neg_b, _, name) in enumerate(spans):
            b = -neg_b
            inner = [(max(a2, lo), min(-nb2, b, hi)) for a2, nb2, _, _ in spans[n + 1:] if a2 < b]
            selfs[name] = selfs.get(name, 0.0) + (min(b, hi) - max(a, lo)) - union([s for s in inner if s[1] > s[0]])
        ranked = sorted(selfs.items(), key=lambda kv: -kv[1])[:top]
        out.append((us, op.get("name", "?"), ranked + [("(none traced)", (hi - lo) - union(
            [(max(a, lo), min(-nb, hi)) for a, nb, _, _ in spans]))]))
    return out


def _before_host_ops(tg, opt, ema):
    """The host side of a step as it was before PERF #37, on these objects: torch's clip_grad_norm_, each
    optimizer's own zero_grad, the EMA's lerp sources rebuilt each update, the clock sent up from pageable memory.
    Returns the per-step sync to use (None where this train_gpt.py has no PERF #37: nothing to undo)."""
    if not hasattr(tg.Optimizers, "clip_grads"):
        return None
    opt.clip_grads = lambda max_norm: torch.nn.utils.clip_grad_norm_(opt.params, max_norm)
    opt.zero_grad = lambda: [o.zero_grad(set_to_none=False) for o in opt.optimizers]

    def ema_update(step):
        with torch.no_grad():
            torch._foreach_copy_(ema.previous, ema.shadow)
            torch._foreach_lerp_(ema.shadow, [p.detach().float() for p in ema.params], 1.0 - tg.ema_decay(step))

    ema.update = ema_update

    def agree(train_ms, loss, device):
        t = torch.stack([torch.tensor(train_ms, device=device, dtype=torch.float32),
                         (~torch.isfinite(loss.detach())).to(device=device, dtype=torch.float32).reshape(())])
        tg.all_reduce_(t, dist.ReduceOp.MAX)
        agreed_ms, bad = t.tolist()
        return agreed_ms, bool(bad)

    return agree


def _undo(*objs) -> None:
    for o in objs:
        for name in ("clip_grads", "zero_grad", "update", "backward"):
            o.__dict__.pop(name, None)


def bench_train_loop(tg, h, d, device) -> str:
    n = int(os.environ.get("BENCH_STEPS", "8"))
    if n < 1:
        raise ValueError(f"BENCH_STEPS={n} must be at least 1")
    ps = int(os.environ.get("BENCH_PROFILE_STEPS", "2"))
    if ps < 1:
        raise ValueError(f"BENCH_PROFILE_STEPS={ps} must be at least 1")
    torch.manual_seed(h.seed)
    base = tg.build_model(h, device)
    model = train_compile(tg, base, device)
    opt = tg.build_optimizers(h, base, d)
    loader = tg.TrainLoader(tg.list_shards(h.train_files), h.seed, d.rank, d.world_size, device)
    ema = tg.EMA(base)
    base.set_qat(0.0)
    count = [0]
    # shipped: train_model's loop as it is; autogradacc: the gradients accumulated by autograd (before PERF #40);
    # latesync: the per-step sync after the step, which drains the GPU (before PERF #38); hostbefore: latesync with
    # the host-side ops as before PERF #37 (_before_host_ops).  A train_gpt.py from before runs only the forms it has.
    has_agree = hasattr(tg, "StepAgreement")
    prefetch = {"prefetch": True} if "prefetch" in inspect.signature(tg.run_train_step).parameters else {}
    forms = ("shipped", *(("autogradacc",) if hasattr(tg.Optimizers, "backward") else ()),
             *(("latesync",) if has_agree else ()), *(("hostbefore",) if hasattr(tg.Optimizers, "clip_grads") else ()))
    wanted = [f for f in os.environ.get("BENCH_FORMS", "").split(",") if f]
    if set(wanted) - set(forms):
        raise ValueError(f"BENCH_FORMS={','.join(wanted)}: this train_gpt.py has the forms {', '.join(forms)}")
    if len(set(wanted)) < len(wanted):
        raise ValueError(f"BENCH_FORMS={','.join(wanted)} names a form twice")
    forms = tuple(wanted) or forms

    def step(form):  # train_model's loop body, less the logging and the stop test
        agree = tg.StepAgreement(lambda: 0.0, device) if form in ("shipped", "autogradacc") and has_agree else None
        late = _before_host_ops(tg, opt, ema) if form == "hostbefore" else tg._agree_step
        if form == "autogradacc":
            opt.backward = lambda loss: loss.backward()
        try:
            with torch.profiler.record_function("bench:run_train_step"):
                loss = tg.run_train_step(model, opt, loader, h, d, device, count[0], 1.0, **prefetch,
                                         **({"agree": agree} if agree is not None else {}))
            count[0] += 1
            with torch.profiler.record_function("bench:agree_step"):
                agree.result() if agree is not None else late(0.0, loss, device)
            with torch.profiler.record_function("bench:ema_update"):
                ema.update(count[0])
        finally:
            _undo(opt, ema)

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
        out = os.environ.get("OUT") if d.is_main else None
        # host syncs in a step (the GPU drained under the host): torch's sync debug mode warns at each
        torch.cuda.synchronize(device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step(forms[0])
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [f"{os.path.basename(w.filename)}:{w.lineno}: {str(w.message).splitlines()[0][:100]}"
                 for w in caught if "called a synchronizing" in str(w.message)]
        line += f" host_syncs[{forms[0]}]:{len(syncs)}"
        if out and syncs:
            with open(os.path.join(out, f"host_syncs_world{d.world_size}.txt"), "w") as f:
                f.write("".join(f"{m}\n" for m in syncs))
        for form in forms:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                t0 = time.perf_counter()
                for _ in range(ps):
                    step(form)
                torch.cuda.synchronize(device)
                wall = 1000.0 * (time.perf_counter() - t0) / ps
            busy = {"compute": 0.0, "nccl": 0.0}
            for e in prof.key_averages():
                busy["nccl" if "nccl" in e.key.lower() else "compute"] += self_device_us(e) / 1000 / ps
            with tempfile.TemporaryDirectory() as tmp:  # the trace's timeline: where between its ops the GPU waits
                prof.export_chrome_trace(os.path.join(tmp, "trace.json"))
                with open(os.path.join(tmp, "trace.json")) as f:
                    idle_us, gaps = gpu_gaps(json.load(f))
            line += (f" profiled[{form}]:{wall:.1f}ms compute:{busy['compute']:.1f}ms nccl:{busy['nccl']:.1f}ms "
                     f"idle:{wall - busy['compute']:.1f}ms gaps:{idle_us / 1000 / ps:.2f}ms/step"
                     f"({len(gaps)} of >=20us, {sum(g[0] for g in gaps) / 1000 / ps:.2f}ms/step)")
            if out:
                with open(os.path.join(out, f"profile_train_world{d.world_size}_{form}.txt"), "w") as f:
                    f.write(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=80,
                                                      max_name_column_width=100))
                    f.write(f"\nGPU idle gaps of >= 20 us over the {ps} profiled steps, longest first (us, op before, "
                            "op after):\n" + "".join(f"{us:9.1f}  {a[:90]}  ->  {b[:90]}\n" for us, a, b in gaps))
        def host_trace(with_stack: bool) -> dict:  # ps steps of the first form, host activity traced too
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                    torch.profiler.ProfilerActivity.CUDA], with_stack=with_stack) as p:
                for _ in range(ps):
                    step(forms[0])
                torch.cuda.synchronize(device)
            with tempfile.TemporaryDirectory() as tmp:
                p.export_chrome_trace(os.path.join(tmp, "trace.json"))
                with open(os.path.join(tmp, "trace.json")) as f:
                    return json.load(f)

        # who launched the op after each gap (the host runs slower traced than untraced)
        found = gap_launchers(host_trace(False))
        by_part: dict[str, float] = {}
        for us, _, _, chain in found:
            part = next((c[len("bench:"):] for c in chain if c.startswith("bench:")), "other")
            by_part[part] = by_part.get(part, 0.0) + us / 1000 / ps
        line += f" gaps_by_launcher[{forms[0]}]:" + ",".join(f"{k}={v:.2f}" for k, v in sorted(by_part.items()))
        if out:
            with open(os.path.join(out, f"gap_launchers_world{d.world_size}.txt"), "w") as f:
                f.write(f"GPU idle gaps of >= 20 us over {ps} traced steps, longest first: gap us, lag us (op start - "
                        "launch call), the op after the gap, the host events that launched it (outermost first)\n")
                f.write("".join(f"{us:9.1f} {lag:9.1f}  {op[:70]}  <-  {' > '.join(c[:60] for c in chain)}\n"
                                for us, lag, op, chain in found))
        # what the host did during each gap, Python functions included (traced, so slower still)
        during = host_during_gaps(host_trace(True))
        if during:
            us, op, ranked = during[0]
            line += f" longest_gap_host[{forms[0]}]:{us:.0f}us:" + ",".join(
                f"{n.split('/')[-1][:48]}={t:.0f}" for n, t in sorted(ranked, key=lambda kv: -kv[1])[:3])
        if out:
            with open(os.path.join(out, f"gap_hosts_world{d.world_size}.txt"), "w") as f:
                f.write(f"GPU idle gaps of >= 20 us over {ps} steps traced with Python functions, longest first: "
                        "gap us, the op after it; then what the launching thread did from the gap's start to that op's "
                        "launch (self us of each host event inside the window, largest first)\n")
                for us, op, ranked in during:
                    f.write(f"{us:9.1f}  {op[:90]}\n" + "".join(f"          {t:9.1f}  {n[:140]}\n" for n, t in ranked))
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
