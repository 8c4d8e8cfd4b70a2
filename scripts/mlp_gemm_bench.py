"""Go/no-go measurement for the next speed lever (docs/PERF.md, "What is left"): can a Triton GEMM with LeakyReLU²
fused into its epilogue beat cuBLAS + inductor's separate elementwise kernel at the MLP shapes of the record config?

    python3 scripts/mlp_gemm_bench.py            # on a GPU box; TRITON_INTERPRET=1 on CPU checks the math on tiny shapes

Both MLP GEMMs that touch the activation have the shape [M, 512] @ [512, 1536] (M = 98,304 tokens per micro-batch):
  forward   h = x @ W_up.T, then u = leaky_relu(h, 0.5)²      -> fused: the epilogue stores h (for the backward) and u
  backward  g = dy @ W_down, then dh = g * d(u)/d(h) at h        -> fused: the epilogue loads h and stores dh only
Prints, per config, the Triton GEMM alone, each fused kernel, and the cuBLAS + compiled-elementwise pair it would
replace, in µs and TFLOP/s, after checking the fused outputs against the unfused path (relative error, bf16 noise).
The kernels read the weight as a row-major [N, K] matrix: W_up as it is, W_down transposed once (1.5 MB).
Not counted code; nothing in train_gpt.py uses it.
"""

from __future__ import annotations

import itertools
import os

import torch
import triton
import triton.language as tl

SLOPE = 0.5  # NEGATIVE_SLOPE of the record config


@triton.jit
def _tile_origin(tile, n_m, n_n, BM: tl.constexpr, BN: tl.constexpr, GROUP: tl.constexpr):
    """Row/column origin of output tile `tile`, GROUP row-tiles per band (L2 reuse); past-the-end tiles stay finite."""
    first_m = tile // (GROUP * n_n) * GROUP
    rows = tl.maximum(tl.minimum(n_m - first_m, GROUP), 1)
    return (first_m + (tile % (GROUP * n_n)) % rows) * BM, (tile % (GROUP * n_n)) // rows * BN


@triton.jit
def _mma(a, b, acc, F32_DOT: tl.constexpr):
    if F32_DOT:  # Triton's CPU interpreter multiplies bf16 bit patterns; only its math check takes this
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _act(c, slope):
    """leaky(c)^2 of the bf16-rounded GEMM output c, rounded to bf16."""
    h = c.to(tl.float32)
    y = tl.where(h > 0, h, h * slope)
    return (y * y).to(tl.bfloat16)


@triton.jit
def _act_grad(c, h, slope):
    """The GEMM output c (the gradient of u) times d leaky(h)^2 / dh, rounded to bf16."""
    h = h.to(tl.float32)
    return (c.to(tl.float32) * tl.where(h > 0, 2.0 * h, 2.0 * slope * slope * h)).to(tl.bfloat16)


@triton.jit
def mlp_gemm(A, B, H, U, M, N, K: tl.constexpr, slope, EPI: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
             GROUP: tl.constexpr, F32_DOT: tl.constexpr):
    """C = A [M, K] @ B [K, N] (B given as the row-major [N, K] weight, read transposed), bf16 in, fp32 accumulate.
    EPI 0: store C to H.  EPI 1: store C to H and leaky(C)^2 to U.  EPI 2: load h from H, store C * d leaky(h)^2/dh
    to U.  C is rounded to bf16 before the epilogue math, as the unfused path rounds the GEMM output."""
    om, on = _tile_origin(tl.program_id(0), tl.cdiv(M, BM), tl.cdiv(N, BN), BM, BN, GROUP)
    rm = (om + tl.arange(0, BM)).to(tl.int64)
    rn = (on + tl.arange(0, BN)).to(tl.int64)
    rk = tl.arange(0, BK)
    a_ptr = A + rm[:, None] * K + rk[None, :]
    b_ptr = B + rn[None, :] * K + rk[:, None]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BK)):
        kmask = rk < K - k * BK
        a = tl.load(a_ptr, mask=(rm < M)[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptr, mask=(rn < N)[None, :] & kmask[:, None], other=0.0)
        acc = _mma(a, b, acc, F32_DOT)
        a_ptr += BK
        b_ptr += BK
    c = acc.to(tl.bfloat16)
    off = rm[:, None] * N + rn[None, :]
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    if EPI == 0:
        tl.store(H + off, c, mask=mask)
    elif EPI == 1:
        tl.store(H + off, c, mask=mask)
        tl.store(U + off, _act(c, slope), mask=mask)
    else:
        tl.store(U + off, _act_grad(c, tl.load(H + off, mask=mask, other=0.0), slope), mask=mask)


@triton.jit
def mlp_gemm_tma(A, B, H, U, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr, slope, EPI: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                 BK: tl.constexpr, GROUP: tl.constexpr, PROGRAMS: tl.constexpr, F32_DOT: tl.constexpr):
    """mlp_gemm with TMA tensor descriptors (A [M, K], B [N, K], H/U [M, N]), persistent: PROGRAMS programs stride
    over the output tiles, so the next tile's loads can overlap this tile's epilogue.  M, N, K are constexpr."""
    n_m, n_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    # constant trip count (the interpreter wants it); a tile past the end loads zeros and its stores are clipped
    for t in tl.range(0, tl.cdiv(n_m * n_n, PROGRAMS), flatten=True):
        om, on = _tile_origin(tl.program_id(0) + t * PROGRAMS, n_m, n_n, BM, BN, GROUP)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, K, BK):
            acc = _mma(A.load([om, k]), B.load([on, k]).T, acc, F32_DOT)
        c = acc.to(tl.bfloat16)
        if EPI == 0:
            H.store([om, on], c)
        elif EPI == 1:
            H.store([om, on], c)
            U.store([om, on], _act(c, slope))
        else:
            U.store([om, on], _act_grad(c, H.load([om, on]), slope))


def launch(a, w, h, u, epi, cfg):
    M, K = a.shape
    N = w.shape[0]
    BM, BN, BK, GROUP, warps, stages, tma = cfg
    f32 = os.environ.get("TRITON_INTERPRET") == "1"
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor
        programs = torch.cuda.get_device_properties(a.device).multi_processor_count if a.is_cuda else 4
        descs = [TensorDescriptor.from_tensor(a, [BM, BK]), TensorDescriptor.from_tensor(w, [BN, BK]),
                 TensorDescriptor.from_tensor(h, [BM, BN]), TensorDescriptor.from_tensor(u, [BM, BN])]
        mlp_gemm_tma[(programs,)](*descs, M, N, K, SLOPE, EPI=epi, BM=BM, BN=BN, BK=BK, GROUP=GROUP,
                                  PROGRAMS=programs, F32_DOT=f32, num_warps=warps, num_stages=stages)
        return
    grid = (triton.cdiv(M, BM) * triton.cdiv(N, BN),)
    mlp_gemm[grid](a, w, h, u, M, N, K, SLOPE, EPI=epi, BM=BM, BN=BN, BK=BK, GROUP=GROUP, num_warps=warps,
                   num_stages=stages, F32_DOT=f32)


def unfused_fwd(a, w):
    h = a @ w.T
    return h, torch.nn.functional.leaky_relu(h, SLOPE).square()


def unfused_bwd(g_out, w, h):
    g = g_out @ w
    hf = h.float()
    return (g.float() * torch.where(hf > 0, 2 * hf, 2 * SLOPE * SLOPE * hf)).to(h.dtype)


def check(device, M, K, N, cfg):
    """The fused kernels against the unfused math on one shape; returns the worst relative error."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(M, K, device=device, generator=g).bfloat16()
    w = (torch.randn(N, K, device=device, generator=g) / K ** 0.5).bfloat16()
    dy = torch.randn(M, K, device=device, generator=g).bfloat16()
    w_down_t = (torch.randn(N, K, device=device, generator=g) / K ** 0.5).bfloat16()  # W_down [K, N] as [N, K].T
    h, u = torch.empty(M, N, device=device, dtype=torch.bfloat16), torch.empty(M, N, device=device, dtype=torch.bfloat16)
    launch(a, w, h, u, 1, cfg)
    ref_h, ref_u = unfused_fwd(a, w)
    dh = torch.empty_like(h)
    launch(dy, w_down_t, ref_h, dh, 2, cfg)
    ref_dh = unfused_bwd(dy, w_down_t.T, ref_h)
    errs = [((x.float() - y.float()).norm() / y.float().norm()).item() for x, y in ((h, ref_h), (u, ref_u), (dh, ref_dh))]
    return max(errs)


# (BM, BN, BK, GROUP, warps, stages, TMA): 12 configs, ~3 compiles each (one per epilogue), so the sweep fits a call
CONFIGS = [(bm, bn, 64, 8, w, s, tma) for tma, (bm, bn, w, s) in itertools.product(
    (False, True), ((128, 256, 8, 3), (128, 256, 8, 4), (256, 128, 8, 3), (128, 128, 4, 4), (128, 128, 8, 4),
                    (128, 192, 8, 3)))]


def main():
    if os.environ.get("TRITON_INTERPRET") == "1":  # CPU: the math only, on a ragged tiny shape
        for tma in (False, True):
            err = check(torch.device("cpu"), 70, 48, 40, (32, 32, 16, 2, 4, 2, tma))
            print(f"mlp_gemm_bench interpreter check tma:{tma} max rel err {err:.2e}")
            if err > 1e-2:  # the interpreter truncates to bf16 (GPUs round): ~2x the GPU's error, a wrong formula O(1)
                raise SystemExit("fused kernels disagree with the unfused math")
        return
    device = torch.device("cuda")
    from triton.testing import do_bench
    bench = lambda fn: do_bench(fn, warmup=25, rep=200, return_mode="median")
    M, K, N = 98304, 512, 1536
    flops = 2 * M * K * N
    a = torch.randn(M, K, device=device).bfloat16()
    w = (torch.randn(N, K, device=device) / K ** 0.5).bfloat16()
    h, u = torch.empty(M, N, device=device, dtype=torch.bfloat16), torch.empty(M, N, device=device, dtype=torch.bfloat16)
    act = torch.compile(lambda h: torch.nn.functional.leaky_relu(h, SLOPE).square())
    dact = torch.compile(lambda g, h: (g.float() * torch.where(h.float() > 0, 2 * h.float(),
                                                                2 * SLOPE * SLOPE * h.float())).to(h.dtype))
    w_down = (torch.randn(K, N, device=device) / N ** 0.5).bfloat16()  # as the model stores it: [512, 1536]
    ref_h = a @ w.T
    g = a @ w_down
    t_mm, t_mm_bwd = bench(lambda: a @ w.T), bench(lambda: a @ w_down)
    t_act, t_dact = bench(lambda: act(ref_h)), bench(lambda: dact(g, ref_h))
    print(f"mlp_gemm_bench cuBLAS [{M},{K}]@[{K},{N}]: x @ W_up.T {1000 * t_mm:.1f}us ({flops / t_mm / 1e9:.0f} "
          f"TFLOP/s), dy @ W_down {1000 * t_mm_bwd:.1f}us; compiled LeakyReLU² fwd {1000 * t_act:.1f}us, bwd "
          f"{1000 * t_dact:.1f}us; unfused pairs: fwd {1000 * (t_mm + t_act):.1f}us, bwd {1000 * (t_mm_bwd + t_dact):.1f}us")
    best = {}
    for cfg in CONFIGS:
        try:
            err = check(device, M, K, N, cfg)  # the bench shape (M is constexpr in the TMA kernel: no extra build)
            t = [bench(lambda: launch(a, w, h, u, epi, cfg)) for epi in (0, 1)]
            t.append(bench(lambda: launch(a, w, ref_h, u, 2, cfg)))
        except Exception as e:  # out of shared memory / registers for this config
            print(f"mlp_gemm_bench cfg {cfg}: failed ({type(e).__name__}: {str(e)[:120]})")
            continue
        if err > 1e-2:
            print(f"mlp_gemm_bench cfg {cfg}: wrong results, max rel err {err:.1e}")
            continue
        print(f"mlp_gemm_bench cfg BM,BN,BK,GROUP,warps,stages,tma={cfg} err {err:.1e} plain {1000 * t[0]:.1f}us "
              f"({flops / t[0] / 1e9:.0f} TFLOP/s) fused fwd {1000 * t[1]:.1f}us bwd {1000 * t[2]:.1f}us")
        for i, name in enumerate(("plain", "fwd", "bwd")):
            if name not in best or t[i] < best[name][0]:
                best[name] = (t[i], cfg)
    for name, (t, cfg) in best.items():
        print(f"mlp_gemm_bench best {name}: {1000 * t:.1f}us with {cfg}")
    if best:
        save = (t_mm + t_act - best["fwd"][0]) + (t_mm_bwd + t_dact - best["bwd"][0])
        print(f"mlp_gemm_bench fused saves {1000 * save:.1f}us per layer and micro-batch "
              f"= {save * 88:.1f} ms/step at the record config (negative: cuBLAS + inductor win)")


if __name__ == "__main__":
    main()
