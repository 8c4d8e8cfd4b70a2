"""GPU micro-benchmarks of the record config, one process, one GPU: training ms/step (with a torch-profiler table of
the top CUDA kernels, and the train loop's per-step sync, EMA update and batch prefetch in five orders), peak memory,
sliding-eval throughput per SLOT mode with the projection to the full FineWeb val on 8 GPUs, and GPTQ calibration /
quantisation / compression times.

    DATA_PATH=data/datasets/proxy_sp1024 python3 scripts/gpu_bench.py [kernels] [ce] [resid] [power] [train] [eval] [gptq]

(no mode: all but power)

Env: BENCH_STEPS (timed steps, default 8), BENCH_EVAL_BATCHES (32-window batches per mode, default 24),
BENCH_POWER_SECONDS (seconds per kernel class in power mode, default 4),
BENCH_QK_SWEEP (0 skips the q/k kernels' launch-shape sweep in kernels mode),
BENCH_VARIANTS (comma-separated training variants, see apply_variant; default "base"; eval and GPTQ use the first),
OUT (folder for the full profile tables), and every train_gpt.py env var.  Not counted code: loads train_gpt.py by path.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch._inductor.config

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


# Triton first: inductor names its kernels after the ops they fuse ("triton_..._cudnn_attention_backward_...").
KERNEL_KINDS = (("triton", ("triton_", "qk_fwd", "qk_bwd", "xsa_fwd", "xsa_bwd", "softcap_ce", "res_mix_", "res_add_")),
                ("attention", ("sdpa", "fmha", "flash", "cudnn")),
                ("gemm", ("nvjet", "gemm", "sm90_xmma", "cutlass")))


def self_device_us(event) -> float:
    """A profiler event's own device time in µs (self_cuda_time_total in torch versions before the rename)."""
    return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)


def profile_summary(prof, steps: int, out_path: str | None) -> None:
    """Self CUDA ms per step by kernel kind (attention / GEMM / Triton / other); the full table to out_path."""
    kinds: dict[str, float] = {}
    for e in prof.key_averages():
        us = self_device_us(e)
        kind = next((k for k, keys in KERNEL_KINDS if any(x in e.key for x in keys)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + us
    print("bench_profile ms/step " + " ".join(f"{k}:{v / 1000 / steps:.1f}" for k, v in sorted(kinds.items()))
          + f" total:{sum(kinds.values()) / 1000 / steps:.1f}")
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=-1, max_name_column_width=160)
    if out_path:
        Path(out_path).write_text(table)
    print("\n".join(table.splitlines()[:34]))


# nvidia-smi's throttle-reason bits that mean "held below the clock it could run at to stay within power"
POWER_CAP_BITS = {0x4: "SW power cap", 0x80: "HW power brake"}


class GpuClocks:
    """Samples the GPU's SM clock, board power and clock-throttle reasons with nvidia-smi every 200 ms while the
    block runs (summary() after it).  A training step is power-bound on an H200 (PERF "Clocks and power"): SW power
    cap at 700 W with the SM clock below its 1,980 MHz, so variants timed at different clocks are not comparable.
    nvidia-smi writes into temporary files (a pipe read only at the end would fill after ~6 minutes of samples and
    stall it); one that outlives SIGTERM by STOP_SECONDS is killed, one that outlives that too is left behind with its
    samples read so far.  power.draw is the driver's reading, averaged over up to a second on recent drivers."""
    STOP_SECONDS = 10.0
    FIELDS = "clocks.sm,power.draw,clocks_throttle_reasons.active"  # the old name of clocks_event_reasons: both work

    def __init__(self, gpu: str):
        self.gpu = gpu  # nvidia-smi's -i: an index or a UUID (gpu_uuid)
        self.proc, self.text, self.why = None, "", ""

    def __enter__(self):
        cmd = ["nvidia-smi", f"--query-gpu={self.FIELDS}", "--format=csv,noheader,nounits", "-lms", "200",
               "-i", self.gpu]
        self.out, self.err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        try:
            self.proc = subprocess.Popen(cmd, stdout=self.out, stderr=self.err, text=True)
        except OSError as e:
            self.why = f"nvidia-smi did not start ({e})"
        return self

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=self.STOP_SECONDS)
            except subprocess.TimeoutExpired:  # an nvidia-smi that ignores SIGTERM: killed, the run goes on
                self.proc.kill()
                try:
                    self.proc.wait(timeout=self.STOP_SECONDS)
                except subprocess.TimeoutExpired:
                    pass
        self.out.seek(0)
        self.err.seek(0)
        self.text, err = self.out.read(), self.err.read().strip()
        self.out.close()
        self.err.close()
        if self.proc is not None and not self.why and smi_stats(self.text) is None:
            said = (self.text.strip().splitlines() or [""])[0] or err  # nvidia-smi prints its errors to stdout
            self.why = NO_SAMPLES + (f" (nvidia-smi: {said[:200]})" if said else "")
        return False

    def summary(self) -> str:
        return self.why or smi_summary(self.text)


NO_SAMPLES = "no readable nvidia-smi samples"


def back_to_back(fn, reps: int) -> None:
    """fn() reps times, each call's outputs freed before the next."""
    for _ in range(reps):
        fn()


def reps_for(seconds: float, t_call: float) -> int:
    return max(1, int(seconds / max(t_call, 1e-4)))


def gpu_uuid(device: torch.device) -> str:
    """The device as nvidia-smi names it whatever CUDA_VISIBLE_DEVICES says: GPU-<uuid>."""
    return "GPU-" + str(torch.cuda.get_device_properties(device).uuid)


def smi_stats(text: str) -> dict | None:
    """nvidia-smi's csv samples (clocks.sm MHz, power.draw W, throttle-reason bit mask) as numbers: SM clock mean,
    min and max, mean power, percentage of samples held by a power limit, sample count; None if none is readable."""
    clocks, powers, capped = [], [], 0
    for line in text.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 3:
            continue
        try:
            mhz, watts, reasons = float(fields[0]), float(fields[1]), int(fields[2], 16)
        except ValueError:  # "[N/A]" and the like
            continue
        clocks.append(mhz)
        powers.append(watts)
        capped += any(reasons & bit for bit in POWER_CAP_BITS)
    if not clocks:
        return None
    return dict(mhz=sum(clocks) / len(clocks), mhz_min=min(clocks), mhz_max=max(clocks),
                watts=sum(powers) / len(powers), capped_pct=100 * capped / len(clocks), n=len(clocks))


def smi_summary(text: str) -> str:
    """One line from nvidia-smi's csv samples (smi_stats)."""
    st = smi_stats(text)
    if st is None:
        return NO_SAMPLES
    return (f"sm_clock_mhz:{st['mhz']:.0f} ({st['mhz_min']:.0f}-{st['mhz_max']:.0f}) power_w:{st['watts']:.0f} "
            f"power_capped:{st['capped_pct']:.0f}% of {st['n']} samples")


def bench_train(tg, h, d, device, base, model, tag: str = ""):
    # peak from the variant's first step: the CUDA graphs' memory pools are allocated then (PERF #27), not in the
    # timed steps, which replay them
    torch.cuda.reset_peak_memory_stats(device)
    base.set_qat(0.0)  # as train_model does before its loop (and what the qatgraph variant hooks)
    opt = tg.build_optimizers(h, base, d)
    loader = tg.TrainLoader(tg.list_shards(h.train_files), h.seed, 0, 1, device)
    step = lambda i: tg.run_train_step(model, opt, loader, h, d, device, i, 1.0)
    losses, t_compile = timed(lambda: [step(i) for i in range(3)], device)
    print(f"bench_train{tag} compile+3 steps: {t_compile:.1f}s")
    if hasattr(tg, "mlp_gluon_op"):  # the variant's MLP kernels, as train_gpt.py's log line says (PERF #29 on)
        fused = any(getattr(block, "fused_mlp", False) for block in base.blocks)
        why = tg._MLP_GLUON.get("why")
        print(f"bench_train{tag} mlp_act:{'gluon' if fused else 'torch'}" + (f" (self-test: {why})" if why else ""))
        if hasattr(tg, "RES_MLP_FUSED"):  # and whether the MLP's RMSNorm is in its GEMMs (PERF #49 on)
            why = tg._MLP_GLUON.get("scaled_why")
            on = fused and tg.RES_FUSED and tg.RES_MLP_FUSED and not why
            print(f"bench_train{tag} mlp_norm:{'gemm' if on else 'rows'}" + (f" (self-test: {why})" if why else ""))
    if hasattr(tg, "QKV_GLUON"):  # and its Q|K|V kernel (PERF #47 on)
        fused = any(getattr(block.attn, "fused_qkv", False) for block in base.blocks)
        why = tg.qkv_why(h.model_dim, h.num_heads, h.num_kv_heads, h.head_dim) if hasattr(tg, "qkv_why") else ""
        print(f"bench_train{tag} qkv_proj:{'gluon' if fused else 'torch'}" + (f" (self-test: {why})" if why else ""))
    n = int(os.environ.get("BENCH_STEPS", "8"))
    with GpuClocks(gpu_uuid(device)) as clocks:
        more, t = timed(lambda: [step(i) for i in range(3, 3 + n)], device)
    ms = 1000 * t / n
    # Same seed, data and init in every variant: equal math shows as equal losses up to bf16 noise.
    print(f"bench_train{tag} losses:" + ",".join(f"{x.item():.4f}" for x in losses + more))
    print(f"bench_train{tag} ms/step:{ms:.1f} tok/s:{h.train_batch_tokens / (ms / 1000):.0f} "
          f"peak_alloc:{torch.cuda.max_memory_allocated(device) // 2**20}MiB")
    print(f"bench_train{tag} gpu while timed: {clocks.summary()}")
    if hasattr(tg, "_agree_step"):  # train_model's loop: a host sync per step (the agreed clock) and the EMA update
        ema, order_ms = tg.EMA(base), {}

        def loop_step(i, order, prev):
            # prefetch: as train_model from PERF #36, the next batch built once the last backward is queued
            if order == "agree":  # as train_model from PERF #38: the sync waits only for the last forward
                agree = tg.StepAgreement(lambda: 0.0, device)
                tg.run_train_step(model, opt, loader, h, d, device, i, 1.0, prefetch=True, agree=agree)
                agree.result()
                ema.update(i + 1)
                return
            loss = tg.run_train_step(model, opt, loader, h, d, device, i, 1.0, prefetch=True) \
                if order == "prefetch" else step(i)
            if order == "ema_first":  # the EMA issued before the sync, so the host has less to do after it
                ema.update(i + 1)
            if order in ("loop", "ema_first", "prefetch"):
                tg._agree_step(0.0, loss, device)
            if order in ("loop", "nosync", "lag", "prefetch"):
                ema.update(i + 1)
            if order == "lag":  # the sync a step late: the flag goes to pinned host memory behind an event, and the
                # host waits for the previous step's event only once this step is issued, so the GPU never drains
                if prev:
                    event, flag = prev.pop()
                    event.synchronize()
                    float(flag)
                flag = torch.empty((), dtype=torch.float32, pin_memory=True)
                flag.copy_((~torch.isfinite(loss.detach())).float(), non_blocking=True)
                event = torch.cuda.Event()
                event.record()
                prev.append((event, flag))

        k = 3 + n
        prefetch = "prefetch" in inspect.signature(tg.run_train_step).parameters  # PERF #36 on
        orders = ("loop", "ema_first", "lag", "nosync") + (("prefetch",) if prefetch else ()) \
            + (("agree",) if hasattr(tg, "StepAgreement") else ())  # PERF #38 on
        for _ in range(2):  # alternating, twice, against drift
            for order in orders:
                prev = []
                _, t = timed(lambda: [loop_step(i, order, prev) for i in range(k, k + n)], device)
                order_ms.setdefault(order, []).append(1000 * t / n)
                k += n
        print(f"bench_train{tag} loop ms/step: " + " ".join(
            f"{o}:{'/'.join(f'{x:.1f}' for x in v)}" for o, v in order_ms.items())
            + " (loop: synced each step then the EMA, as train_model before PERF #36; ema_first: the EMA before the "
              "sync; lag: the sync a step late; nosync: none; prefetch: loop with the next batch built once the last "
              "backward is queued, as train_model from PERF #36; agree: prefetch with the sync's flag queued at the "
              "last forward and only that waited for, as train_model from PERF #38)")
        n_loop = k - 3 - n
    else:
        n_loop = 0
    base.set_qat(1.0)
    k = 3 + n + n_loop
    _, t_qc = timed(lambda: step(k), device)  # the QAT graph's compile (PERF #25 on), as in the warm-up
    _, t = timed(lambda: [step(i) for i in range(k + 1, k + 1 + n)], device)
    base.set_qat(0.0)
    print(f"bench_train{tag} qat_on ms/step:{1000 * t / n:.1f} (its first step, compile included: {t_qc:.1f}s)")
    k += 1 + n  # the profiled steps continue the count
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for i in range(2):
            step(k + i)
        torch.cuda.synchronize(device)
    out, name = os.environ.get("OUT"), tag.strip(" []").replace("+", "-") or "base"
    profile_summary(prof, 2, os.path.join(out, f"profile_{name}.txt") if out else None)
    if out:  # host ops (aten fallbacks, optimizer, custom ops) with the device time of what they launched
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts, record_shapes=True) as prof:
            for i in range(2):
                step(k + 2 + i)
            torch.cuda.synchronize(device)
        Path(out, f"profile_ops_{name}.txt").write_text(prof.key_averages(group_by_input_shape=True).table(
            sort_by="cuda_time_total", row_limit=150, max_name_column_width=100, max_shapes_column_width=120))
    return ms


ORIGINALS: dict = {}  # train_gpt's own functions, replaced per variant


# variant -> (MLP_TILES key, env var naming the tile)
TILE_VARIANTS = {"uptile": ("up", "BENCH_UP_TILE"), "dgtile": ("dgrad", "BENCH_DGRAD_TILE")}


def mlp_tile_from_env(var: str) -> tuple:
    """BENCH_UP_TILE / BENCH_DGRAD_TILE (variants uptile / dgtile) as a tuple of 8 integers: BM, BN, BK, STAGES,
    consumer warps, epilogue warps, their registers, elements per epilogue chunk."""
    raw = os.environ.get(var)
    flag = next(k for k, (_, v) in TILE_VARIANTS.items() if v == var)
    if not raw:
        raise ValueError(f"{var} is not set; variant {flag} needs a tile, e.g. (128, 128, 64, 5, 8, 2, 152, 2048)")
    try:
        tile = ast.literal_eval(raw)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as e:
        raise ValueError(f"{var}={raw!r} is not a Python tuple of 8 integers") from e
    # epilogue warps and their registers may be 0 (#29's form, in a train_gpt.py from before PERF #31); the rest not
    if not (isinstance(tile, tuple) and len(tile) == 8 and all(type(v) is int for v in tile)
            and all(v > 0 for i, v in enumerate(tile) if i not in (5, 6)) and min(tile[5:7]) >= 0):
        raise ValueError(f"{var}={raw!r} is not a tuple of 8 integers, all positive but the 6th and 7th "
                         "(epilogue warps and their registers, at least 0)")
    return tile


def apply_variant(tg, variant: str) -> None:
    """BENCH_VARIANTS entries: '+'-joined flags among base (train_gpt as is), expand (K/V expanded to H heads before
    cuDNN by torch ops, the form before grouped heads: implies kvgqa), xsatorch (XSA through the torch-ops
    autograd.Function instead of the Triton op), xsaref (XSA through autograd of F.normalize), qkref (q/k norm +
    RoPE, and XSA, through torch ops instead of the Triton ops), vsplit (one GEMM for Q|K, V's GEMM apart), aggr
    (inductor aggressive_fusion), autotune (torch.compile mode max-autotune-no-cudagraphs's options, under the
    training model's own: with CUDA graphs there from PERF #27 on), pdl (inductor's Programmatic Dependent Launch
    for its Triton kernels, config.triton.enable_pdl), split128 / split32 (inductor's mix-order reductions, the
    per-channel parameter gradients, in blocks of 128 / 32 rows instead of its 64 here: half / twice the partial
    sums left to one aten.sum each), stages (mix-order reduction kernels may software-pipeline their loads,
    config.triton.mix_order_reduction_allow_multi_stages: off in torch 2.11, on by default in later versions; the
    widest of them, 14 row loads and 8 per-channel sums, ran at 1.7 TB/s, PERF "What is left"; measured +3.7 to +6.0
    ms/step, PERF #23), maxreads6 (at most 6 external reads per mix-order reduction kernel,
    config.triton.mix_order_reduction_max_reads: absent in torch 2.11, the device image's, present in 2.13),
    autosplit (inductor autotunes the block of rows per mix-order reduction kernel, config.triton.
    mix_order_reduction_autotune_split_size), nomix (no mix-order reductions: the per-channel gradients summed by
    reductions of their own, config.triton.mix_order_reduction off: what train_gpt.py's training options do from
    PERF #23 on, so this flag matters only for a TRAIN_GPT from before), mix (the training model compiled with
    mix-order reductions again: the form before PERF #23, against the shipped one; split128, split32, stages and
    autosplit act on the training model only together with mix from then on), combo (inductor's combo kernels:
    independent kernels of a graph launched as one, config.combo_kernels), ceref (the training loss through torch
    ops: softcap, log-softmax and their backward compiled by inductor, the form before PERF #24), qatgraph (the QAT
    ops in the training graph while QAT is off, computed and discarded by torch.where: the one-graph form before
    PERF #25), nocg (the training model compiled without CUDA graphs, the gradients set to None after each step: the
    form before PERF #27), pwtune (inductor benchmarks several launch configs of each pointwise and reduction kernel
    and keeps the fastest, config.max_autotune_pointwise), mlpref (the MLP through torch ops, cuBLAS + inductor's
    LeakyReLU² kernels, instead of the Gluon GEMMs with the activation in their epilogues: the form before PERF
    #29), dgtile (the backward's dgrad kernel with another tile: MLP_TILES["dgrad"] = BENCH_DGRAD_TILE, a Python
    tuple of 8 integers as in train_gpt.py, e.g. (128, 128, 64, 5, 8, 2, 152, 2048)), uptile (the same for the
    forward's kernel: MLP_TILES["up"] = BENCH_UP_TILE; uptile+dgtile sets both), ballastcopy / ballastgemm (the same
    training, with extra memory-bound or tensor-core work before every micro-batch: with_ballast), kvgqa (K/V reach
    the attention at their own 4 heads, cuDNN summing the query heads' K/V gradients: the form before PERF #34,
    KV_REP off), tilered (inductor tiles reductions in two dimensions, config.triton.tile_reductions: the
    per-channel parameter-gradient sums reduce over the token rows of [tokens, 512] tensors, i.e. not along the
    contiguous dimension), ndtile (inductor prefers N-dimensional tiling where it can, config.triton.
    prefer_nd_tiling), qkvref (the Q|K|V projection by cuBLAS and the q/k op as a Triton kernel of its own: the form
    before PERF #47, QKV_GLUON off), resref (the residual mixing, skips and RMSNorms through torch ops, compiled by
    inductor: the form before PERF #48, RES_FUSED off), normref (the MLP's RMSNorm written out by res_add and read by
    the up GEMM, instead of applied to the GEMMs' rows: the form before PERF #49, RES_MLP_FUSED off).
    #29's form of the Gluon kernels, the epilogue in the consumer warps (mlpov here until PERF #31 removed it from
    train_gpt.py), runs in both directions with TRAIN_GPT = a train_gpt.py from before #30, and in the backward
    alone with TRAIN_GPT = one from #30 (commit 25890d9) and dgtile, BENCH_DGRAD_TILE = (128, 256, 64, 3, 8, 0, 0,
    8192)."""
    flags = set(variant.split("+"))
    unknown = flags - {"base", "expand", "xsatorch", "xsaref", "qkref", "vsplit", "aggr", "autotune", "pdl", "split128",
                       "split32", "stages", "maxreads6", "autosplit", "nomix", "mix", "combo", "ceref",
                       "qatgraph", "nocg", "pwtune", "mlpref", "dgtile", "uptile", "ballastcopy", "ballastgemm",
                       "kvgqa", "tilered", "ndtile", "qkvref", "resref", "normref"}
    if unknown:
        raise ValueError(f"BENCH_VARIANTS: unknown flags {sorted(unknown)}")
    if not ORIGINALS:
        qk = getattr(tg, "qk_norm_rope_op", None)
        if qk is not None:
            qk()  # builds the ops, so the XSA op (train_gpt.py from PERF #18 on) can be switched per variant
        ORIGINALS.update(xsa=tg.exclusive_self_attention, sdpa=tg.sdpa_attention, compile=tg.maybe_compile, qk=qk,
                         attn=tg.CausalSelfAttention.forward, xsa_op=getattr(tg, "_QK_KERNELS", {}).get("xsa"),
                         train_options=getattr(tg, "train_compile_options", None),  # None before PERF #23
                         ce_op=getattr(tg, "_QK_KERNELS", {}).get("ce"),  # None before PERF #24
                         set_qat=tg.GPT.set_qat, zero_grad=tg.Optimizers.zero_grad,
                         mlp=getattr(tg, "mlp_gluon_op", None),  # None before PERF #29
                         mlp_tiles=getattr(tg, "MLP_TILES", None))  # None before PERF #30
    tg.Optimizers.zero_grad = zero_grad_to_none if "nocg" in flags else ORIGINALS["zero_grad"]
    if ORIGINALS["mlp"] is not None:  # GPT.set_fused_qk asks mlp_gluon_op() whether the Gluon MLP kernels are there
        tg.mlp_gluon_op = (lambda: None) if "mlpref" in flags else ORIGINALS["mlp"]
    if ORIGINALS["mlp_tiles"] is not None:
        tg.MLP_TILES = ORIGINALS["mlp_tiles"]
    for flag in sorted(flags & TILE_VARIANTS.keys()):
        key, var = TILE_VARIANTS[flag]
        if ORIGINALS["mlp_tiles"] is None:
            raise ValueError(f"BENCH_VARIANTS: {flag} needs a train_gpt.py with MLP_TILES (PERF #30 on)")
        try:
            tg.MLP_TILES = {**tg.MLP_TILES, key: mlp_tile_from_env(var)}
            if not tg.mlp_tiles_fit(98_304, 512, 1536):  # else the torch MLP would run without a word
                raise ValueError(f"{var}={tg.MLP_TILES[key]} does not tile the record's micro-batch (98,304 x 512 @ "
                                 "512 x 1,536: whole tiles, at least STAGES k-steps)")
        except ValueError:
            tg.MLP_TILES = ORIGINALS["mlp_tiles"]
            raise
    if ORIGINALS["mlp"] is None and "mlpref" in flags:
        raise ValueError("BENCH_VARIANTS: mlpref needs a train_gpt.py with the Gluon MLP kernels (PERF #29 on)")
    if "qatgraph" in flags:  # qat_on follows QAT_ENABLED, not alpha: the graph keeps the QAT ops, as before #25
        def set_qat_one_graph(self, alpha):
            ORIGINALS["set_qat"](self, alpha)
            self.qat_on = self.qat_enabled
        tg.GPT.set_qat = set_qat_one_graph
    else:
        tg.GPT.set_qat = ORIGINALS["set_qat"]
    if ORIGINALS["xsa_op"] is not None:
        tg._QK_KERNELS["xsa"] = None if flags & {"xsatorch", "xsaref"} else ORIGINALS["xsa_op"]
    if ORIGINALS["ce_op"] is not None:
        tg._QK_KERNELS["ce"] = None if "ceref" in flags else ORIGINALS["ce_op"]
    elif "ceref" in flags:
        raise ValueError("BENCH_VARIANTS: ceref needs a train_gpt.py with the Triton loss (PERF #24 on); before it "
                         "the loss runs through torch ops anyway")
    tg.CausalSelfAttention.forward = (lambda self, *a: attn_v_apart(tg, self, *a)) if "vsplit" in flags \
        else ORIGINALS["attn"]
    if hasattr(tg, "KV_REP"):  # expand: K/V to the attention at 4 heads, expanded there (else it would find 8)
        tg.KV_REP = not flags & {"kvgqa", "expand"}
    elif "kvgqa" in flags:
        raise ValueError("BENCH_VARIANTS: kvgqa needs a train_gpt.py with KV_REP (PERF #34 on); before it K/V reach "
                         "the attention at their own heads anyway")
    if hasattr(tg, "QKV_GLUON"):  # read by GPT.set_fused_qk when the model is built
        tg.QKV_GLUON = "qkvref" not in flags
    elif "qkvref" in flags:
        raise ValueError("BENCH_VARIANTS: qkvref needs a train_gpt.py with QKV_GLUON (PERF #47 on); before it the "
                         "Q|K|V projection is cuBLAS's anyway")
    if hasattr(tg, "RES_FUSED"):  # read by GPT.forward_hidden per forward
        tg.RES_FUSED = "resref" not in flags
    elif "resref" in flags:
        raise ValueError("BENCH_VARIANTS: resref needs a train_gpt.py with RES_FUSED (PERF #48 on); before it the "
                         "residual stream is inductor's anyway")
    if hasattr(tg, "RES_MLP_FUSED"):  # read by GPT._hidden_fused per forward
        tg.RES_MLP_FUSED = "normref" not in flags
    elif "normref" in flags:
        raise ValueError("BENCH_VARIANTS: normref needs a train_gpt.py with RES_MLP_FUSED (PERF #49 on); before it "
                         "the MLP's RMSNorm is written out anyway")
    if ORIGINALS["qk"] is not None:  # GPT.__init__ asks qk_norm_rope_op() whether the Triton op is there
        tg.qk_norm_rope_op = (lambda: None) if "qkref" in flags else ORIGINALS["qk"]
    tg.exclusive_self_attention = xsa_autograd if "xsaref" in flags else ORIGINALS["xsa"]
    tg.sdpa_attention = (lambda q, k, v, prefer_cudnn: ORIGINALS["sdpa"](q, *expand_kv(q, k, v), prefer_cudnn)) \
        if "expand" in flags else ORIGINALS["sdpa"]
    torch._inductor.config.aggressive_fusion = "aggr" in flags
    torch._inductor.config.combo_kernels = "combo" in flags
    if {"mix", "nomix"} <= flags:
        raise ValueError("BENCH_VARIANTS: mix and nomix contradict each other; pick one")
    mix_knobs = flags & {"split128", "split32", "stages", "autosplit", "maxreads6"}
    if mix_knobs and "mix" not in flags and ORIGINALS["train_options"] is not None:
        raise ValueError(f"BENCH_VARIANTS: {'+'.join(sorted(mix_knobs))} tune mix-order reductions, which this "
                         "train_gpt.py compiles the training model without (PERF #23); add +mix")
    if {"split128", "split32"} <= flags:
        raise ValueError("BENCH_VARIANTS: split128 and split32 set the same knob; pick one")
    knobs = (("pdl", "enable_pdl", True), ("split128", "mix_order_reduction_split_size", 128),
             ("split32", "mix_order_reduction_split_size", 32),
             ("stages", "mix_order_reduction_allow_multi_stages", True),
             ("maxreads6", "mix_order_reduction_max_reads", 6),
             ("autosplit", "mix_order_reduction_autotune_split_size", True), ("nomix", "mix_order_reduction", False),
             ("tilered", "tile_reductions", True), ("ndtile", "prefer_nd_tiling", True))
    cfg = torch._inductor.config.triton
    for flag, name, _ in knobs:
        if not hasattr(cfg, name):
            if flag in flags:
                raise ValueError(f"BENCH_VARIANTS: {flag} needs torch._inductor.config.triton.{name} (torch too old)")
            continue
        ORIGINALS.setdefault(name, getattr(cfg, name))
        setattr(cfg, name, ORIGINALS[name])  # every knob back to torch's own value first: two flags may share one
    for flag, name, on in knobs:
        if flag in flags:
            setattr(cfg, name, on)
    extra = dict(torch._inductor.list_mode_options("max-autotune-no-cudagraphs")) if "autotune" in flags else {}
    extra.update({"max_autotune_pointwise": True} if "pwtune" in flags else {})
    tg.maybe_compile = (lambda fn, device, options=None: torch.compile(fn, dynamic=False, fullgraph=True,
                                                                       options={**extra, **(options or {})})) \
        if extra else ORIGINALS["compile"]
    if ORIGINALS["train_options"] is not None:
        drop = {"triton.cudagraphs"} if "nocg" in flags else set()
        opts = {k: v for k, v in ORIGINALS["train_options"]().items() if k not in drop}
        opts.update({"triton.mix_order_reduction": True} if "mix" in flags else {})
        tg.train_compile_options = lambda: dict(opts)
    elif "mix" in flags:
        raise ValueError("BENCH_VARIANTS: mix needs a train_gpt.py with train_compile_options (PERF #23 on); "
                         "before it the training model compiles with mix-order reductions anyway")


# ballast variants: extra work of one kind before every micro-batch's forward, (what, calls per micro-batch); the
# step-time difference against base, set against the same calls' time alone, says whether that kind of work costs a
# power-capped step its own time (PERF "Clocks and power")
BALLAST = {"ballastcopy": ("copy of 1 GiB", 2), "ballastgemm": ("cuBLAS x @ W_up.T at the record shape", 4)}


def with_ballast(model, flags: set, device, tag: str = ""):
    """model itself without a ballast flag; else a callable that runs the ballast, then model(x, y).  Prints the
    ballast's time per step alone: in bursts (one step's worth, after a warm-up) and held (back to back for ~2 s)."""
    kinds = sorted(flags & BALLAST.keys())
    if not kinds:
        return model
    if len(kinds) > 1:
        raise ValueError(f"BENCH_VARIANTS: {' and '.join(kinds)} are two ballasts; time one at a time")
    what, n = BALLAST[kinds[0]]
    g = torch.Generator(device=device).manual_seed(1)
    if kinds[0] == "ballastcopy":
        src = torch.randn(2 ** 29, device=device, generator=g, dtype=torch.bfloat16)
        dst = torch.empty_like(src)
        op = lambda: dst.copy_(src)
    else:
        x = torch.randn(98_304, 512, device=device, generator=g, dtype=torch.bfloat16)
        w = torch.randn(1536, 512, device=device, generator=g, dtype=torch.bfloat16)
        op = lambda: x @ w.T

    ballast = lambda: back_to_back(op, n)
    if device.type == "cuda":
        ga = 8  # the record's micro-batches per step on one GPU
        ballast()
        _, t_burst = timed(lambda: back_to_back(ballast, ga), device)
        reps = reps_for(2.0, t_burst)
        _, t_held = timed(lambda: back_to_back(ballast, ga * reps), device)
        print(f"bench_train{tag} ballast: {n} x {what} per micro-batch, alone {1000 * t_burst:.2f} ms per step in a "
              f"burst, {1000 * t_held / reps:.2f} held")

    def run(x, y):
        ballast()
        return model(x, y)

    return run


def zero_grad_to_none(self) -> None:
    """Optimizers.zero_grad before PERF #27 (the nocg variant): each step's first micro-batch allocates .grad anew."""
    for opt in self.optimizers:
        opt.zero_grad(set_to_none=True)


def train_compile(tg, base, device):
    """The training model compiled as train_gpt compiles it: with its training options (PERF #23 on), or as
    maybe_compile(base, device) for a train_gpt.py from before them (TRAIN_GPT)."""
    if hasattr(tg, "train_compile_options"):
        return tg.maybe_compile(base, device, tg.train_compile_options())
    return tg.maybe_compile(base, device)


def attn_v_apart(tg, self, h, wq, wk, wv, wo, rope, ve, store, prefix):
    """CausalSelfAttention.forward with one GEMM for Q|K and V's own GEMM (the op gets no v heads)."""
    B, T, _ = h.shape
    H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
    norm_rope = tg._QK_KERNELS["op"] if self.fused_qk and h.device.type in tg.FUSED_QK_DEVICES \
        else tg.qkv_norm_rope_ref
    qk = torch.nn.functional.linear(h, torch.cat((wq, wk))).view(B, T, H + Hkv, D)
    q, k, *_ = norm_rope(qk, *rope, self.q_gain, H, Hkv, *rep_arg(tg))
    v = torch.nn.functional.linear(h, wv)
    v = (v if ve is None else v + ve).view(B, T, Hkv, D)
    y = tg.causal_attention(q, k, v)
    if self.xsa:
        y = tg.exclusive_self_attention(y, v)
    return torch.nn.functional.linear(y.reshape(B, T, H * D), wo)


def rep_arg(tg) -> tuple:
    """The q/k op's rep argument (K/V repeat, PERF #34) where the train_gpt.py has it: (1,), else ()."""
    return (1,) if hasattr(tg, "KV_REP") else ()


def expand_kv(q, k, v):
    """K/V (B,T,Hkv,D) repeated to q's H heads (head h reads KV head h // (H/Hkv))."""
    rep = q.size(2) // k.size(2)
    return k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)


def xsa_autograd(y, v):
    """XSA through autograd of F.normalize (the form before the hand-written backward), for A/B timing."""
    B, T, H, D = y.shape
    yg = y.reshape(B, T, v.size(2), H // v.size(2), D)
    vn = torch.nn.functional.normalize(v, dim=-1).unsqueeze(3)
    return (yg - (yg * vn).sum(-1, keepdim=True) * vn).reshape(B, T, H, D)


def rel_err(a, ref) -> float:
    return ((a.double() - ref.double()).norm() / ref.double().norm()).item()


def bench_kernels(tg, device) -> None:
    """The Triton q/k/v op against the torch-ops reference: bf16 error against an fp64 reference (both paths), then
    forward and backward times at the record shape (48 x 2048 tokens, Q|K|V of 8 + 4 + 4 heads) over a sweep of
    launch shapes (BENCH_QK_SWEEP=0 skips it), probes of where the kernels' time goes, and the op through autograd
    against the torch reference compiled as the training step compiles it."""
    import triton.testing
    op = tg.qk_norm_rope_op()
    ra = rep_arg(tg)
    for B, T, heads, D, half in ((3, 100, (8, 4, 4), 64, 8), (2, 77, (4, 2, 2), 64, 0), (1, 130, (3, 1, 1), 32, 16)):
        x = torch.randn(B, T, sum(heads), D, device=device) * 3
        cos, sin = tg.rope_tables(T, 2 * half, 10000.0, device)
        gain = torch.randn(heads[0], device=device)
        ups = [torch.randn(B, T, n, D, device=device) for n in heads]
        for g in (gain, None):
            x64, g64 = x.double().requires_grad_(), g.double().requires_grad_() if g is not None else None
            ref = tg.qkv_norm_rope_ref(x64, cos.double(), sin.double(), g64, *heads[:2])[:3]
            sum((r * u.double()).sum() for r, u in zip(ref, ups)).backward()
            for name, fn in (("triton", op), ("torch", tg.qkv_norm_rope_ref)):
                xb = x.bfloat16().requires_grad_()
                gb = g.clone().requires_grad_() if g is not None else None
                out = fn(xb, cos.bfloat16(), sin.bfloat16(), gb, *heads[:2], *ra)[:3]  # bf16 tables, as in training
                sum((o * u.bfloat16()).sum() for o, u in zip(out, ups)).backward()
                errs = [rel_err(o, r) for o, r in zip(out, ref)] + [rel_err(xb.grad, x64.grad)]
                errs += [rel_err(gb.grad, g64.grad)] if g is not None else []
                print(f"bench_kernels check {name} shape:{(B, T, heads, D)} half:{half} gain:{g is not None} "
                      f"rel_err q/k/v/dx/dgain: " + " ".join(f"{e:.2e}" for e in errs))
    B, T, D, heads = 48, 2048, 64, (8, 4, 4)
    cos, sin = tg.rope_tables(T, 16, 22081.79, device)
    cb, sb = cos.bfloat16(), sin.bfloat16()  # the training step's tables
    gain = torch.full((8,), 1.5, device=device)
    x = torch.randn(B, T, sum(heads), D, device=device, dtype=torch.bfloat16)
    ups = [torch.randn(B, T, n, D, device=device, dtype=torch.bfloat16) for n in heads]
    ups += [x.new_empty(B, T, 0, D)] if ra else []  # v_rep's gradient (no heads at rep 1)
    bench = lambda fn: triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    # Launch shape sweep, at rep 1 and (where the op has it, PERF #34) at rep 2, the form 9 of the 11 training
    # layers run.  Bytes, rep 1: fwd reads x, writes q, k, v; bwd reads gq, gk, gv and the q/k part of x, writes dx.
    # rep 2 adds 12 heads' worth each way (fwd writes k at 8 heads and v_rep; bwd reads their gradients).
    nb, nqk, nh = x.numel() * 2, x.numel() * 2 * 12 // 16, x.numel() * 2 // 16
    g = torch.Generator(device=device).manual_seed(0)
    ups2 = (ups[0], *(torch.randn(B, T, n, D, device=device, generator=g, dtype=torch.bfloat16) for n in (8, 4, 8)))
    shipped = (tg.QK_BLOCK_ROWS, tg.QK_WARPS)
    sweep = os.environ.get("BENCH_QK_SWEEP", "1") != "0"
    for rep, grads, extra in ((1, ups, 0), (2, ups2, 12 * nh)) if ra else ((1, ups, 0),):
        best, rep_a = None, (rep,) if ra else ()
        for rows in (8, 16, 32, 64) if sweep else ():
            for warps in (1, 2, 4, 8):
                tg.QK_BLOCK_ROWS, tg.QK_WARPS = rows, warps
                t_f = bench(lambda: tg._qk_launch(x, cb, sb, gain, 8, 4, *rep_a))
                t_b = bench(lambda: tg._qk_launch(x, cb, sb, gain, 8, 4, *rep_a, grads=grads))
                print(f"bench_kernels sweep rep:{rep} rows:{rows} warps:{warps} fwd+bwd:{1000 * (t_f + t_b):.1f}us "
                      f"fwd:{1000 * t_f:.1f}us({(2 * nb + extra) / t_f / 1e9:.2f}TB/s) "
                      f"bwd:{1000 * t_b:.1f}us({(2 * nb + nqk + extra) / t_b / 1e9:.2f}TB/s)")
                if best is None or t_f + t_b < best[0]:
                    best = (t_f + t_b, rows, warps)
        if best:
            print(f"bench_kernels best rep:{rep} rows:{best[1]} warps:{best[2]} fwd+bwd:{1000 * best[0]:.1f}us "
                  f"(train_gpt.py ships rows:{shipped[0]} warps:{shipped[1]}, used from here on)")
        tg.QK_BLOCK_ROWS, tg.QK_WARPS = shipped
    # Where the kernels' time goes (timing only; some of these compute other math): without RoPE (no trig loads),
    # without the gain (no q_gain gradient), and both, against a plain copy of x (the forward's bytes).
    probes = [("as shipped", cb, sb, gain), ("no RoPE", cb[:, :0], sb[:, :0], gain), ("no gain", cb, sb, None),
              ("no RoPE, no gain", cb[:, :0], sb[:, :0], None)]
    for name, c_, s_, g_ in probes:
        t_f = bench(lambda: tg._qk_launch(x, c_, s_, g_, 8, 4))
        t_b = bench(lambda: tg._qk_launch(x, c_, s_, g_, 8, 4, grads=ups))
        print(f"bench_kernels probe {name}: fwd:{1000 * t_f:.1f}us({2 * nb / t_f / 1e9:.2f}TB/s) "
              f"bwd:{1000 * t_b:.1f}us({(2 * nb + nqk) / t_b / 1e9:.2f}TB/s)")
    t_copy = bench(lambda: x.clone())
    print(f"bench_kernels probe copy of x: {1000 * t_copy:.1f}us ({2 * nb / t_copy / 1e9:.2f}TB/s)")
    if ra:
        bench_kv_rep(tg, x, cb, sb, gain, ups, bench)
    if tg._QK_KERNELS.get("xsa") is not None:
        bench_xsa(tg, device, bench)
    # The op through autograd against the torch-ops reference compiled as the training step compiles it.
    ref_c = torch.compile(tg.qkv_norm_rope_ref, fullgraph=True, dynamic=False)
    x = x.detach().requires_grad_()
    g = gain.clone().requires_grad_()
    for name, fn in (("triton", op), ("torch_compiled", ref_c)):
        with torch.no_grad():
            t_f = bench(lambda: fn(x, cb, sb, g, 8, 4, *ra))
        t_fb = bench(lambda: torch.autograd.grad(fn(x, cb, sb, g, 8, 4, *ra)[:3], [x, g], ups[:3]))
        print(f"bench_kernels autograd {name} fwd:{1000 * t_f:.1f}us fwd+bwd:{1000 * t_fb:.1f}us")


def bench_kv_rep(tg, x, cos, sin, gain, ups, bench) -> None:
    """The q/k op with K/V repeated to the 8 query heads (PERF #34) at the record shape: its outputs against the
    rep-1 outputs repeated (bit-exact: the same rows written twice), dx against the rep-1 dx of the summed
    gradients (bf16 rounding once instead of per sum), and forward / backward time against rep 1."""
    B, T, _, D = x.shape
    g = torch.Generator(device=x.device).manual_seed(0)
    gk, gvr = (torch.randn(B, T, 8, D, device=x.device, generator=g, dtype=x.dtype) for _ in range(2))
    grads2 = (ups[0], gk, ups[2], gvr)
    out1, out2 = tg._qk_launch(x, cos, sin, gain, 8, 4), tg._qk_launch(x, cos, sin, gain, 8, 4, 2)
    same = all(torch.equal(a, b) for a, b in ((out2[0], out1[0]), (out2[1], out1[1].repeat_interleave(2, 2)),
                                              (out2[2], out1[2]), (out2[3], out1[2].repeat_interleave(2, 2))))
    pairs = lambda t: t.view(B, T, 4, 2, D).float().sum(3)
    summed = (ups[0], pairs(gk), ups[2].float() + pairs(gvr), ups[3])
    dx1 = tg._qk_launch(x, cos, sin, gain, 8, 4, grads=tuple(t.to(x.dtype) for t in summed))[0]
    dx2 = tg._qk_launch(x, cos, sin, gain, 8, 4, 2, grads2)[0]
    t = [bench(lambda: tg._qk_launch(x, cos, sin, gain, 8, 4, r)) for r in (1, 2)]
    t += [bench(lambda: tg._qk_launch(x, cos, sin, gain, 8, 4, grads=ups)),
          bench(lambda: tg._qk_launch(x, cos, sin, gain, 8, 4, 2, grads2))]
    print(f"bench_kernels kv_rep outputs bit-exact:{same} dx rel_err vs rep 1 of the summed gradients "
          f"{rel_err(dx2, dx1):.2e}; fwd rep1 {1000 * t[0]:.1f}us rep2 {1000 * t[1]:.1f}us, bwd rep1 "
          f"{1000 * t[2]:.1f}us rep2 {1000 * t[3]:.1f}us")


def bench_xsa(tg, device, bench) -> None:
    """The Triton XSA op (PERF #18): bf16 error against fp64 (and the torch path's), a launch-shape sweep, and forward /
    backward times against the torch autograd.Function compiled as the training step compiles it."""
    xsa = tg._QK_KERNELS["xsa"]
    B, T, H, Hkv, D = 48, 2048, 8, 4, 64
    y, v, g = (torch.randn(B, T, n, D, device=device, dtype=torch.bfloat16) for n in (H, Hkv, H))
    y64, v64 = y.double().requires_grad_(), v.double().requires_grad_()
    ref = tg.exclusive_self_attention(y64, v64)
    ref.backward(g.double())
    for name, fn in (("triton", xsa), ("torch", tg.exclusive_self_attention)):
        yb, vb = y.clone().requires_grad_(), v.clone().requires_grad_()
        out = fn(yb, vb)
        out.backward(g)
        errs = [rel_err(a, b) for a, b in ((out, ref), (yb.grad, y64.grad), (vb.grad, v64.grad))]
        print(f"bench_xsa check {name} rel_err out/dy/dv: " + " ".join(f"{e:.2e}" for e in errs))
    del y64, v64, ref
    nb_f, nb_b = (y.numel() * 2 + v.numel()) * 2, (y.numel() * 3 + v.numel() * 2) * 2
    shipped = (tg.XSA_BLOCK_ROWS, tg.XSA_WARPS)
    for rows in (8, 16, 32, 64):
        for warps in (1, 2, 4, 8):
            tg.XSA_BLOCK_ROWS, tg.XSA_WARPS = rows, warps
            t_f, t_b = bench(lambda: tg._xsa_launch(y, v)), bench(lambda: tg._xsa_launch(y, v, g))
            print(f"bench_xsa sweep rows:{rows} warps:{warps} fwd:{1000 * t_f:.1f}us({nb_f / t_f / 1e9:.2f}TB/s) "
                  f"bwd:{1000 * t_b:.1f}us({nb_b / t_b / 1e9:.2f}TB/s)")
    tg.XSA_BLOCK_ROWS, tg.XSA_WARPS = shipped
    ref_c = torch.compile(tg.exclusive_self_attention, fullgraph=True, dynamic=False)
    yr, vr = y.detach().requires_grad_(), v.detach().requires_grad_()
    for name, fn in (("triton", xsa), ("torch_compiled", ref_c)):
        with torch.no_grad():
            t_f = bench(lambda: fn(yr, vr))
        t_fb = bench(lambda: torch.autograd.grad(fn(yr, vr), [yr, vr], g))
        print(f"bench_xsa autograd {name} (rows:{shipped[0]} warps:{shipped[1]}) fwd:{1000 * t_f:.1f}us "
              f"fwd+bwd:{1000 * t_fb:.1f}us")


def bench_power(tg, device) -> None:
    """The step's kernel classes alone at the record's micro-batch shapes, each back to back for BENCH_POWER_SECONDS
    (default 4) while GpuClocks samples the GPU: time per call, throughput, SM clock, board power and energy per call
    (mean power x time).  Which work draws the power that holds a training step at the cap (PERF "Clocks and
    power")."""
    seconds = float(os.environ.get("BENCH_POWER_SECONDS", "4"))
    g = torch.Generator(device=device).manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, device=device, generator=g).bfloat16()
    M, D, F_ = 98_304, 512, 1536
    x, gy, w_up, w_down = rnd(M, D), rnd(M, D), rnd(F_, D) / D ** 0.5, rnd(D, F_) / F_ ** 0.5
    h = x @ w_up.T
    q = rnd(48, 2048, 8, 64).requires_grad_()
    k, v = rnd(48, 2048, 4, 64).requires_grad_(), rnd(48, 2048, 4, 64).requires_grad_()
    do = rnd(48, 2048, 8, 64)
    big = torch.randn(2 ** 29, device=device, generator=g, dtype=torch.bfloat16)  # 1 GiB of data, not zeros: DRAM
    big2 = torch.empty_like(big)  # power depends on the bits moved

    def attn():
        y = tg.sdpa_attention(q, k, v, prefer_cudnn=True)
        torch.autograd.grad(y, (q, k, v), do)

    attn_flops = 4 * 48 * 8 * 2048 * 2048 * 64 / 2 * 3.5  # causal forward (2 GEMMs) + backward (5 GEMMs)
    works = [("cudnn attention fwd+bwd", attn, attn_flops, 0),
             ("cuBLAS x @ W_up.T", lambda: x @ w_up.T, 2 * M * D * F_, 0),
             ("cuBLAS g @ W_down", lambda: gy @ w_down, 2 * M * D * F_, 0),
             ("cuBLAS W_up grad (x.T @ dh)", lambda: x.T @ h, 2 * M * D * F_, 0),
             ("copy 1 GiB", lambda: big2.copy_(big), 0, 2 * big.numel() * 2)]
    if hasattr(tg, "mlp_gluon_op") and tg.mlp_gluon_op() is not None:
        works += [("Gluon up (h, u)", lambda: tg._mlp_gemm_launch(x, w_up, 0.5), 2 * M * D * F_, 0),
                  ("Gluon dgrad (dh)", lambda: tg._mlp_gemm_launch(gy, w_down, 0.5, h), 2 * M * D * F_, 0)]
    for name, fn, flops, nbytes in works:
        back_to_back(fn, 3)
        _, t1 = timed(fn, device)
        reps = reps_for(seconds, t1)
        with GpuClocks(gpu_uuid(device)) as clocks:
            _, t = timed(lambda: back_to_back(fn, reps), device)
        per = t / reps
        rate = f"{flops / per / 1e12:.0f} TFLOP/s" if flops else f"{nbytes / per / 1e12:.2f} TB/s"
        st = smi_stats(clocks.text)
        watts = st["watts"] if st else float("nan")
        print(f"bench_power {name}: {1e6 * per:.1f}us {rate} {watts * per * 1e3:.1f}mJ/call {clocks.summary()}",
              flush=True)


def bench_ce(tg, device) -> None:
    """The Triton softcapped cross-entropy (PERF #24): loss and gradients against fp64 at a small shape (and the
    torch path's bf16 error), a launch-shape sweep of the kernel alone at the record shape (98,304 rows of a
    1,024-token vocabulary: reads the bf16 logits, writes their gradient), and the tied head + loss through autograd
    against the torch-ops form compiled as the training step compiles it."""
    import triton.testing
    tg.qk_norm_rope_op()
    fn = tg._SoftcapCrossEntropy.apply
    cap = 30.0

    def ref(h, w, t):
        z = torch.nn.functional.linear(h, w)
        return torch.nn.functional.cross_entropy((cap * torch.tanh(z / cap)).float(), t)

    h, w = torch.randn(4096, 512, device=device), torch.randn(1024, 512, device=device) * 0.2
    t = torch.randint(0, 1024, (4096,), device=device)
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    ref(h64, w64, t).backward()
    for name, f in (("triton", fn), ("torch", ref)):
        hb, wb = h.bfloat16().requires_grad_(), w.bfloat16().requires_grad_()
        loss = f(hb, wb, t, cap) if f is fn else f(hb, wb, t)
        (loss * 0.125).backward()
        errs = [rel_err(loss, ref(h64, w64, t)), rel_err(hb.grad * 8, h64.grad), rel_err(wb.grad * 8, w64.grad)]
        print(f"bench_ce check {name} rel_err loss/dh/dw: " + " ".join(f"{e:.2e}" for e in errs))
    bench = lambda f: triton.testing.do_bench(f, warmup=25, rep=200, return_mode="median")
    N, V, d = 98304, 1024, 512
    z = torch.randn(N, V, device=device, dtype=torch.bfloat16) * 20
    t = torch.randint(0, V, (N,), device=device)
    nb = z.numel() * 2 * 2
    shipped = (tg.CE_BLOCK_ELEMENTS, tg.CE_WARPS)
    for elements in (1024, 2048, 4096, 8192):
        for warps in (1, 2, 4, 8):
            tg.CE_BLOCK_ELEMENTS, tg.CE_WARPS = elements, warps
            if elements // (32 * warps) < 8:  # under one 16-byte load of bf16 per thread
                continue
            ms = bench(lambda: tg._softcap_ce_launch(z, t, cap))
            print(f"bench_ce sweep rows:{elements // V} warps:{warps} {1000 * ms:.1f}us ({nb / ms / 1e9:.2f}TB/s)")
    tg.CE_BLOCK_ELEMENTS, tg.CE_WARPS = shipped
    hr = torch.randn(N, d, device=device, dtype=torch.bfloat16, requires_grad=True)
    wr = (torch.randn(V, d, device=device) * 0.05).bfloat16().requires_grad_()
    ref_c = torch.compile(ref, fullgraph=True, dynamic=False)
    for name, f in (("triton", lambda: fn(hr, wr, t, cap)), ("torch_compiled", lambda: ref_c(hr, wr, t))):
        with torch.no_grad():
            t_f = bench(f)  # the Triton forward writes dz too
        t_fb = bench(lambda: torch.autograd.grad(f(), [hr, wr]))
        print(f"bench_ce autograd {name} (rows:{tg.CE_BLOCK_ELEMENTS // V} warps:{tg.CE_WARPS}) fwd:{1000 * t_f:.1f}us"
              f" fwd+bwd:{1000 * t_fb:.1f}us")


def bench_resid(tg, device, N: int = 98304, D: int = 512) -> None:
    """The residual-stream ops (PERF #48) at the record shape (98,304 tokens x 512, bf16): each kernel alone for
    each skip form, with its bytes per second, a launch-shape sweep of res_mix's backward, and one block's residual
    work (res_mix with a skip tensor, then res_add) forward + backward through autograd, compiled, against the same
    math in torch ops compiled by inductor (which fuses the two halves into one kernel here, where the attention sits
    between them in the model: an upper bound on what inductor gets, without CUDA graphs on either side)."""
    import triton.testing
    tg.qk_norm_rope_op()
    mix_op, add_op = tg._QK_KERNELS["res_mix"], tg._QK_KERNELS["res_add"]
    bench = lambda f: triton.testing.do_bench(f, warmup=25, rep=200, return_mode="median")
    g = torch.Generator(device=device).manual_seed(0)
    t = lambda *shape: torch.randn(*shape, device=device, generator=g).bfloat16()
    xa, xb, skip, x0, a, gx, gh, gxo = (t(N, D) for _ in range(8))
    mix, sw, gate = t(2, D) * 0.5 + 1, t(D).abs() + 0.5, t(D)
    row = N * D * 2
    for mode, has_b, store in ((0, False, False), (0, True, True), (1, True, False), (2, True, False)):
        args = (xa, xb if has_b else None, skip if mode == 1 else None, x0, mix, sw if mode else None,
                gate if mode else None, 0.7, mode, store)
        n_in = 2 + has_b + (mode == 1)
        ms = bench(lambda: tg._res_mix_launch(*args))
        nb = row * (n_in + 2 + store)
        print(f"bench_resid res_mix_fwd skip:{mode} add:{has_b} store:{store} {1000 * ms:.1f}us "
              f"({nb / ms / 1e9:.2f}TB/s)")
        grads = (gx, gh, gxo if store else None)
        ms = bench(lambda: tg._res_mix_launch(*args, grads))
        nb = row * (n_in + 2 + store + 2 + (mode == 1))
        print(f"bench_resid res_mix_bwd skip:{mode} add:{has_b} store:{store} {1000 * ms:.1f}us "
              f"({nb / ms / 1e9:.2f}TB/s, the per-channel sums' finish included)")
    ms = bench(lambda: tg._res_add_launch(xa, a, 0.7))
    print(f"bench_resid res_add_fwd {1000 * ms:.1f}us ({4 * row / ms / 1e9:.2f}TB/s)")
    ms = bench(lambda: tg._res_add_launch(xa, xa, 0.7, (gx, gh)))
    print(f"bench_resid res_add_bwd {1000 * ms:.1f}us ({4 * row / ms / 1e9:.2f}TB/s)")
    shipped = (tg.RES_BWD_BLOCK_ROWS, tg.RES_BWD_WARPS, tg.RES_PROGRAMS_PER_SM)
    args = (xa, xb, skip, x0, mix, sw, gate, 0.7, 1, False)
    for rows, warps, per_sm in ((1, 4, 5), (1, 4, 10), (1, 4, 20), (1, 2, 6), (1, 2, 12), (2, 4, 4), (2, 4, 12),
                                (1, 8, 4)):
        tg.RES_BWD_BLOCK_ROWS, tg.RES_BWD_WARPS, tg.RES_PROGRAMS_PER_SM = rows, warps, per_sm
        ms = bench(lambda: tg._res_mix_launch(*args, (gx, gh, None)))
        print(f"bench_resid sweep res_mix_bwd skip:1 rows:{rows} warps:{warps} programs/SM:{per_sm} {1000 * ms:.1f}us "
              f"({row * 9 / ms / 1e9:.2f}TB/s)")
    tg.RES_BWD_BLOCK_ROWS, tg.RES_BWD_WARPS, tg.RES_PROGRAMS_PER_SM = shipped

    def torch_block(xa, xb, skip, x0, mix, sw, gate, a):
        xo = xa + xb
        x = mix[0] * torch.lerp(sw * skip, xo, torch.sigmoid(gate)) + mix[1] * x0
        x2 = x + a
        return x, torch.nn.functional.rms_norm(x, (D,)) * 0.7, x2, torch.nn.functional.rms_norm(x2, (D,)) * 0.7

    def fused_block(xa, xb, skip, x0, mix, sw, gate, a):
        x, h, _ = mix_op(xa, xb, skip, x0, mix, sw, gate, 0.7, 1, False)
        x2, h2 = add_op(x, a, 0.7)
        return x, h, x2, h2

    leaves = [v.clone().requires_grad_() for v in (xa, xb, skip, x0, mix, sw, gate, a)]
    ups = [gx, gh, gxo, t(N, D)]
    outs = {}
    # both compiled (the custom ops as opaque calls), so neither timing is the eager host's launch overhead
    for name, f in (("fused", torch.compile(fused_block, fullgraph=True, dynamic=False)),
                    ("torch_compiled", torch.compile(torch_block, fullgraph=True, dynamic=False))):
        def run():
            y = f(*leaves)
            return torch.autograd.grad([y[1], y[2], y[3]], leaves, [ups[1], ups[2], ups[3]])
        outs[name] = run()
        with torch.no_grad():
            t_f = bench(lambda: f(*leaves))
        print(f"bench_resid block {name} fwd:{1000 * t_f:.1f}us "
              f"fwd+bwd:{1000 * bench(run):.1f}us")
    errs = [rel_err(p, q.double()) for p, q in zip(outs["fused"], outs["torch_compiled"])]
    print("bench_resid block fused vs torch_compiled rel_err per input gradient: " + " ".join(f"{e:.1e}" for e in errs))


def naive_sliding(tg, h, model, device, val_data, mode: str) -> tuple[float, float]:
    """The straightforward reference for the eval-throughput comparison (issue 7): the same windows, batches of 32
    and SLOT math, but an eager (uncompiled) model of torch ops (the hand-written Triton q/k and XSA kernels off;
    attention still SDPA), logits and CE at every position of every window, and the last batch at its own size.
    Its bpb must match train_gpt's within bf16 noise."""
    T, B = h.eval_seq_len, tg.SLIDING_BATCH_WINDOWS
    n_tok = val_data.tokens.numel() - 1
    starts, score_from = tg.plan_windows(n_tok, T, h.eval_stride, 0, 1)
    tok = val_data.tokens.to(device)
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    fused = model.blocks[0].attn.fused_qk
    model.set_fused_qk(False)
    try:
        with tg.eval_mode(model), torch.no_grad():
            for b in range(0, starts.numel(), B):
                ws, sf = starts[b : b + B].to(device), score_from[b : b + B].to(device)
                x, y, scored = tg._window_batch(tok, ws, sf, n_tok, T)
                with tg.autocast_ctx(device):
                    hidden = model.forward_hidden(x)
                if mode != "off":
                    ctx = None if mode == "standard" else torch.arange(T, device=device) < sf[:, None]
                    hidden = hidden.float()
                    hidden = hidden + tg._fit_slot_delta(model, hidden, y, ctx, ws.numel(), h.slot_lr, h.slot_steps)
                nll = tg.token_nll(model, hidden, y)
                sums[0] += torch.where(scored, nll, 0.0).sum(dtype=torch.float64)
                sums[1] += scored.sum()
                sums[2] += torch.where(scored, tg.count_target_bytes(val_data, x, y), 0).sum()
    finally:
        model.set_fused_qk(fused)
    return tg.loss_to_bpb(*sums.tolist())


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
        naive_sliding(tg, h, model, device, sub, mode)  # warm-up (cuDNN plans, allocator)
        (_, nbpb), tn = timed(lambda: naive_sliding(tg, h, model, device, sub, mode), device)
        print(f"bench_eval_naive slot:{mode} time:{tn:.2f}s window_tokens/s:{n_windows * T / tn:.0f} "
              f"speedup:{tn / t:.2f}x bpb:{nbpb:.4f} bpb_diff:{bpb - nbpb:+.5f}")


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
    modes = ("kernels", "ce", "resid", "power", "train", "eval", "gptq")
    what = set(sys.argv[1:]) or set(modes) - {"power"}  # power on request: 35 s of heat just before train
    if what - set(modes):
        raise ValueError(f"gpu_bench.py: unknown modes {sorted(what - set(modes))}; it has {', '.join(modes)}")
    variants = [v for v in os.environ.get("BENCH_VARIANTS", "base").split(",") if v]
    if not variants:
        raise ValueError("BENCH_VARIANTS names no variant (default: base)")
    for variant in variants:  # every variant checked before the GPU is touched (a knob may be missing in this torch)
        apply_variant(tg, variant)
    apply_variant(tg, "base")  # the kernel benches run train_gpt as it is
    h = tg.Hyperparameters.from_env()
    h.validate()
    d = tg.DistInfo()
    device = tg.setup_runtime(h, d)
    print(f"device:{torch.cuda.get_device_name(device)} torch:{torch.__version__} "
          f"attention_backend:{tg.attention_backend_name(device)}")
    if "kernels" in what:
        bench_kernels(tg, device)
    if "ce" in what:
        bench_ce(tg, device)
    if "resid" in what:
        bench_resid(tg, device)
    if "power" in what:
        bench_power(tg, device)
    if "train" in what:
        for variant in variants:
            apply_variant(tg, variant)
            torch._dynamo.reset()
            torch.manual_seed(h.seed)
            base = tg.build_model(h, device)
            model = with_ballast(train_compile(tg, base, device), set(variant.split("+")), device, f" [{variant}]")
            bench_train(tg, h, d, device, base, model, f" [{variant}]")
            del base, model
            torch.cuda.empty_cache()
    apply_variant(tg, variants[0])
    torch.manual_seed(h.seed)
    base = tg.build_model(h, device)
    if "eval" in what:
        val_data = tg.load_validation_data(h, device, h.train_seq_len)
        bench_eval(tg, h, d, device, base.eval(), val_data)
    if "gptq" in what:
        bench_gptq(tg, h, d, device, base)


if __name__ == "__main__":
    main()
