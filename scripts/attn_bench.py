"""Attention kernels at the record shapes (micro-batch 48 x 2048, 8 query / 4 KV heads, head dim 64, causal, bf16):
forward+backward time of each PyTorch SDPA backend, with the KV heads expanded or via enable_gqa, and the
achieved TFLOP/s (causal: 2*B*H*T^2*D forward, 2.5x that backward); then cuDNN with grouped heads on q/k/v/dO laid
out (B, H, T, D) contiguous against (B, T, H, D) seen through a transpose (how the model calls it), with the time of
each kernel cuDNN launches; then cuDNN with the KV heads grouped (4, enable_gqa) against K/V already expanded to 8
contiguous heads (no copy in the timing), to price cuDNN's own KV-head reduction kernels.
    python3 scripts/attn_bench.py [main] [layouts] [kv]   (all three by default)"""

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

B, T, H, HKV, D = 48, 2048, 8, 4, 64


def bench(fn, n=10):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def main():
    dev = torch.device("cuda")
    q = torch.randn(B, H, T, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, HKV, T, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, HKV, T, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(B, H, T, D, device=dev, dtype=torch.bfloat16)
    flops = 2 * B * H * T * T * D * 3.5
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        for gqa in (False, True):
            def step():
                with sdpa_kernel([backend]):
                    if gqa:
                        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                    else:
                        o = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                           is_causal=True)
                    # grad, not backward: no accumulation into q/k/v.grad (an add per tensor, ~140 us per call,
                    # was in this bench's timings up to 2026-11-29)
                    torch.autograd.grad(o, (q, k, v), g)
            try:
                ms = bench(step)
                print(f"attn {backend.name:22s} gqa:{int(gqa)} fwd+bwd {ms:7.2f} ms  {flops / ms / 1e9:6.0f} TFLOP/s"
                      f"  per-train-step(x8 micro x11 layers) {ms * 88:6.0f} ms")
            except RuntimeError as e:
                print(f"attn {backend.name:22s} gqa:{int(gqa)} unavailable: {str(e).splitlines()[0][:100]}")


def cudnn_kernels(label: str, q, k, v, g) -> None:
    """cuDNN fwd+bwd of q/k/v (grouped KV heads when k has fewer heads than q): time, TFLOP/s, and each kernel."""
    flops = 2 * B * H * T * T * D * 3.5

    def step():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.size(1) != q.size(1))
        torch.autograd.grad(o, (q, k, v), g)
    ms = bench(step)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(4):
            step()
        torch.cuda.synchronize()
    print(f"{label} cudnn fwd+bwd {ms:7.3f} ms  {flops / ms / 1e9:6.0f} TFLOP/s")
    for e in sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total):
        if e.self_device_time_total > 0:
            print(f"{label}   {e.self_device_time_total / 4:9.1f} us/call x{e.count // 4}  {e.key[:110]}")


def layouts():
    dev = torch.device("cuda")
    for layout in ("bhsd", "bshd"):
        def make(h, grad=True):
            shape = (B, h, T, D) if layout == "bhsd" else (B, T, h, D)
            t = torch.randn(shape, device=dev, dtype=torch.bfloat16)
            t = t if layout == "bhsd" else t.transpose(1, 2)
            return t.requires_grad_(grad)
        cudnn_kernels(f"attn_layout {layout} gqa", make(H), make(HKV), make(HKV), make(H, False))


def kv_heads():
    dev = torch.device("cuda")
    for hkv in (HKV, H):
        def make(h, grad=True):  # (B, T, h, D) seen through a transpose, as the model calls it
            return torch.randn(B, T, h, D, device=dev, dtype=torch.bfloat16).transpose(1, 2).requires_grad_(grad)
        cudnn_kernels(f"attn_kv {hkv} kv heads", make(H), make(hkv), make(hkv), make(H, False))


if __name__ == "__main__":
    import sys
    parts = sys.argv[1:] or ["main", "layouts", "kv"]
    for part in parts:
        {"main": main, "layouts": layouts, "kv": kv_heads}[part]()
