"""Hand-written Triton kernels (docs/PERF.md), run on CPU through Triton's interpreter (TRITON_INTERPRET=1, set in
conftest before Triton is imported): the q/k RMSNorm + partial RoPE + q_gain op and the XSA op against their torch
references in fp64, their custom-op registration (schema, fake tensors, autograd), and the model with the ops
switched on."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from conftest import randomize_params, tiny_config

pytest.importorskip("triton", reason="Triton not installed: the kernel tests run it in interpreter mode")


def _rel_err(a, ref) -> float:
    return ((a.double() - ref).norm() / ref.norm()).item()


def _case(tg, B, T, heads, D, rope_dims, seed, dtype=torch.float32, scale=3.0, rep=1):
    """x of the fused Q|K|V projection with heads = (n_q, n_k, n_v), RoPE tables, a q gain, and gradients of the
    op's four outputs (q, k at n_k * rep heads, v, v_rep at n_v * rep heads or none for rep 1)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, T, sum(heads), D, generator=g) * scale).to(dtype)
    cos, sin = tg.rope_tables(T, rope_dims, 10000.0, torch.device("cpu"))
    gain = torch.randn(heads[0], generator=g)
    n_q, n_k, n_v = heads
    ups = [torch.randn(B, T, n, D, generator=g) for n in (n_q, n_k * rep, n_v, n_v * rep if rep > 1 else 0)]
    return x, cos, sin, gain, ups


def _triton_device() -> torch.device:
    """Where tensors for Triton kernels live: CPU under the interpreter (the default suite), CUDA where Triton compiles
    (TRITON_INTERPRET=0 on a GPU box, e.g. the `-k qkv` run of scripts' device calls): compiled Triton takes CUDA
    tensors only."""
    return torch.device("cuda" if os.environ.get("TRITON_INTERPRET") == "0" and torch.cuda.is_available() else "cpu")


def _loss(outs, ups):
    return sum((o * u.to(o.dtype)).sum() for o, u in zip(outs, ups))


@pytest.mark.parametrize("shape", [(2, 9, (4, 2, 2), 16, 8, 1), (1, 70, (3, 1, 0), 16, 0, 3),
                                   (2, 5, (2, 2, 2), 16, 16, 1), (1, 66, (2, 1, 1), 64, 16, 2),
                                   (1, 3, (2, 2, 1), 24, 8, 1), (1, 17, (0, 2, 1), 16, 8, 2),
                                   (1, 9, (2, 1, 1), 64, 24, 1), (2, 5, (2, 1, 1), 20, 12, 1),
                                   (1, 7, (1, 1, 1), 33, 0, 1), (2, 9, (4, 2, 2), 16, 8, 2)])
@pytest.mark.parametrize("with_gain", [True, False])
@pytest.mark.parametrize("scale", [3.0, 3e-4])
def test_qk_norm_rope_op_matches_reference(tg, shape, with_gain, scale):
    """Guards the Triton q/k/v kernel: q, k, v, dx and d_gain equal the torch-ops reference (RMSNorm at F.rms_norm's
    fp32 eps, rotate-half RoPE on the first rope_dims, per-head gain on q, v passed through) computed in fp64, for
    row counts that are not a multiple of the block, rope_dims 0 / partial / full, head dims that are not powers of
    two (24, 20, 33), RoPE halves that are not (12, 6) or do not divide the head dim (64 / 24: the last group of the
    two tiles is cut by the row's end), head groups with no v or no q heads, and inputs so small (3e-4) that the eps
    changes the result; and with K and V repeated (rep 2 or 3, PERF #34: k written at each of its rep heads, v also
    repeated into v_rep, and the gradients of the copies summed with v's own into dx)."""
    B, T, heads, D, R, rep = shape
    op = tg.qk_norm_rope_op()
    assert op is not None
    x, cos, sin, gain, ups = _case(tg, B, T, heads, D, R, seed=B * T + D + R, scale=scale, rep=rep)
    g = gain if with_gain else None  # heads[0] == 0 with a gain: a (0,) gain
    x64 = x.double().requires_grad_()
    g64 = g.double().requires_grad_() if g is not None else None
    ref = tg.qkv_norm_rope_ref(x64, cos.double(), sin.double(), g64, *heads[:2], rep)
    _loss(ref, [u.double() for u in ups]).backward()
    x32 = x.clone().requires_grad_()
    g32 = g.clone().requires_grad_() if g is not None else None
    out = op(x32, cos, sin, g32, *heads[:2], rep)
    _loss(out, ups).backward()
    assert [o.shape for o in out] == [r.shape for r in ref] and all(o.is_contiguous() for o in out)
    assert all(o.dtype == torch.float32 for o in out)
    pairs = [p for p in zip(out, ref) if p[1].numel()] + [(x32.grad, x64.grad)]
    pairs += [(g32.grad, g64.grad)] if g is not None and heads[0] else []
    if g is not None:
        assert g32.grad.shape == (heads[0],)
    for got, want in pairs:  # fp32 arithmetic against fp64: ~1e-7 relative; a wrong eps or sign is O(1)
        assert _rel_err(got, want) < 1e-5, _rel_err(got, want)


def test_qk_norm_rope_op_bf16_in_bf16_out(tg):
    """Guards the dtype contract the training step relies on: bf16 Q|K|V and bf16 RoPE tables in, bf16 q/k/v out and
    bf16 dx, fp32 d_gain (the q_gain parameter's dtype), each within bf16 rounding of the fp64 reference, v bit-exact;
    and the no-grad forward of the eval path gives the same outputs."""
    op = tg.qk_norm_rope_op()
    heads = (4, 2, 2)
    x, cos, sin, gain, ups = _case(tg, 2, 10, heads, 16, 8, seed=3, dtype=torch.bfloat16)
    xb, gb = x.clone().requires_grad_(), gain.clone().requires_grad_()
    out = op(xb, cos.bfloat16(), sin.bfloat16(), gb, 4, 2, 1)
    with torch.inference_mode():
        for a, b in zip(op(x, cos.bfloat16(), sin.bfloat16(), gain, 4, 2, 1), out):
            torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)
    _loss(out, ups).backward()
    assert all(o.dtype == torch.bfloat16 for o in out) and xb.grad.dtype == torch.bfloat16
    assert gb.grad.dtype == torch.float32
    torch.testing.assert_close(out[2], x[:, :, 6:], rtol=0, atol=0)
    torch.testing.assert_close(xb.grad[:, :, 6:], ups[2].bfloat16(), rtol=0, atol=0)
    x64, g64 = x.double().requires_grad_(), gain.double().requires_grad_()
    ref = tg.qkv_norm_rope_ref(x64, cos.double(), sin.double(), g64, 4, 2)
    _loss(ref, [u.bfloat16().double() for u in ups]).backward()
    for a, b in list(zip(out[:3], ref)) + [(xb.grad, x64.grad), (gb.grad, g64.grad)]:
        assert _rel_err(a, b) < 1e-2


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("rep", [1, 2])
def test_qk_norm_rope_op_with_unused_outputs_and_strided_gain(tg, compiled, rep):
    """Guards the backward when some outputs take no gradient (a loss over q and k only, as with V's GEMM apart; the
    v part of dx must then be zero; with K/V repeated, neither v nor v_rep takes one) and a non-contiguous gain (the
    kernel reads it with stride 1), eager and through a fullgraph compile (aot_eager)."""
    op = tg.qk_norm_rope_op()
    x, cos, sin, _, ups = _case(tg, 2, 9, (4, 2, 2), 16, 8, seed=11, rep=rep)
    base = torch.randn(8, generator=torch.Generator().manual_seed(12))

    def qk_loss(fn, x, gain, cos, sin):
        q, k, *_ = fn(x, cos, sin, gain, 4, 2, rep)
        return (q * ups[0].to(q.dtype)).sum() + (k * ups[1].to(k.dtype)).sum()

    x64, b64 = x.double().requires_grad_(), base.double().requires_grad_()
    qk_loss(tg.qkv_norm_rope_ref, x64, b64[::2], cos.double(), sin.double()).backward()
    if compiled:
        torch._dynamo.reset()
        op = torch.compile(op, backend="aot_eager", fullgraph=True, dynamic=False)
    x32, b32 = x.clone().requires_grad_(), base.clone().requires_grad_()
    assert not b32[::2].is_contiguous()
    qk_loss(op, x32, b32[::2], cos, sin).backward()
    assert torch.all(x32.grad[:, :, 6:] == 0) and torch.all(b32.grad[1::2] == 0)
    assert _rel_err(x32.grad, x64.grad) < 1e-5 and _rel_err(b32.grad, b64.grad) < 1e-5


def test_qk_norm_rope_op_copies_v_in_its_own_dtype(tg):
    """Guards the v heads' pass-through: copied (and their gradient copied back) in the input's own dtype, so fp64
    inputs come back bit-exact too (the q/k math runs in fp32)."""
    op = tg.qk_norm_rope_op()
    _, cos, sin, gain, _ = _case(tg, 1, 5, (2, 1, 2), 16, 8, seed=7)
    g = torch.Generator().manual_seed(8)
    x, up_v = (torch.randn(1, 5, n, 16, generator=g, dtype=torch.float64) for n in (5, 2))  # not fp32-representable
    x = x.requires_grad_()
    q, k, v, _ = op(x, cos, sin, gain.double(), 2, 1, 1)
    torch.testing.assert_close(v, x[:, :, 3:].detach(), rtol=0, atol=0)
    ((q.sum() + k.sum()) + (v * up_v).sum()).backward()
    torch.testing.assert_close(x.grad[:, :, 3:], up_v, rtol=0, atol=0)


def test_qk_norm_rope_op_registration(tg):
    """Guards the custom-op plumbing torch.compile relies on: schema, fake (meta) kernel and autograd registration
    pass torch.library.opcheck, with and without the gain."""
    op = tg.qk_norm_rope_op()
    x, cos, sin, gain, _ = _case(tg, 1, 6, (2, 1, 1), 16, 8, seed=5)
    torch.library.opcheck(op, (x.requires_grad_(), cos, sin, gain.requires_grad_(), 2, 1, 1))
    torch.library.opcheck(op, (x.detach(), cos, sin, None, 2, 1, 1))
    torch.library.opcheck(op, (x, cos, sin, gain, 2, 1, 2))  # K/V repeated (PERF #34)


def _xsa_case(B, T, H, Hkv, D, seed, dtype=torch.float32, v_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    y, gout = (torch.randn(B, T, H, D, generator=g).to(dtype) for _ in range(2))
    v = (torch.randn(B, T, Hkv, D, generator=g) * v_scale).to(dtype)
    return y, v, gout


def _xsa_run(fn, y, v, gout, dtype=None):
    """(output, dy, dv) of fn on leaf copies of y, v (in dtype if given) for the output gradient gout."""
    y, v = (t.to(dtype or t.dtype).clone().requires_grad_() for t in (y, v))
    out = fn(y, v)
    (out * gout.to(out.dtype)).sum().backward()
    return out, y.grad, v.grad


def _xsa_op(tg):
    tg.qk_norm_rope_op()
    return tg._QK_KERNELS["xsa"]


@pytest.mark.parametrize("shape", [(2, 9, 8, 4, 16), (1, 37, 3, 1, 24), (2, 5, 4, 4, 64), (1, 20, 4, 2, 32)])
def test_xsa_op_matches_reference(tg, shape):
    """Guards the Triton XSA kernels: the output, dy and dv equal the torch autograd.Function (itself checked against
    autograd of F.normalize in test_model.py) computed in fp64, for token counts that are not a multiple of the block,
    1, 2 and 3 query heads per KV head, a head dim that is not a power of two (24), and v rows of zero (unit vector 0,
    the output is y and dv is 0)."""
    B, T, H, Hkv, D = shape
    y, v, gout = _xsa_case(B, T, H, Hkv, D, seed=T + D)
    v[0, 1] = 0.0
    ref = _xsa_run(tg.exclusive_self_attention, y, v, gout, torch.float64)
    got = _xsa_run(_xsa_op(tg), y, v, gout)
    assert got[0].shape == y.shape and got[0].dtype == torch.float32 and got[0].is_contiguous()
    torch.testing.assert_close(got[0][0, 1], y[0, 1], rtol=0, atol=0)
    assert torch.all(got[2][0, 1] == 0)
    for a, b in zip(got, ref):
        assert _rel_err(a, b) < 1e-5, _rel_err(a, b)


def test_xsa_op_below_the_norm_floor_and_in_bf16(tg):
    """Guards the two other regimes: v with |v| under F.normalize's 1e-12 floor (vn = v / eps, dv = dvn / eps with
    the radial part kept) against the fp64 reference, and the training dtypes: bf16 in, bf16 out and gradients within
    bf16 rounding of fp64; the eval path's call under inference mode (no autograd context) runs and gives the same
    output."""
    op = _xsa_op(tg)
    y, v, gout = _xsa_case(1, 6, 4, 2, 16, seed=1, v_scale=1e-14)
    for a, b in zip(_xsa_run(op, y, v, gout), _xsa_run(tg.exclusive_self_attention, y, v, gout, torch.float64)):
        assert _rel_err(a, b) < 1e-5, _rel_err(a, b)
    y, v, gout = _xsa_case(2, 11, 8, 4, 64, seed=2, dtype=torch.bfloat16)
    got = _xsa_run(op, y, v, gout)
    with torch.inference_mode():
        torch.testing.assert_close(op(y, v), got[0].detach(), rtol=0, atol=0)
    assert all(t.dtype == torch.bfloat16 for t in got)
    for a, b in zip(got, _xsa_run(tg.exclusive_self_attention, y, v, gout, torch.float64)):
        assert _rel_err(a, b) < 1e-2, _rel_err(a, b)


def test_xsa_op_registration_and_errors(tg):
    """Guards the custom-op plumbing (opcheck: schema, fake kernel, autograd) and the launcher's shape errors."""
    op = _xsa_op(tg)
    y, v, _ = _xsa_case(1, 6, 4, 2, 16, seed=3)
    torch.library.opcheck(op, (y.requires_grad_(), v.requires_grad_()))
    with pytest.raises(ValueError, match="does not fit y"):
        tg._xsa_launch(y.detach(), v.detach()[:, :, :1].expand(1, 6, 3, 16))
    with pytest.raises(ValueError, match="gradient"):
        tg._xsa_launch(y.detach(), v.detach(), torch.zeros(1, 6, 4, 8))


def _ce_ref(h, w, targets, cap):
    """The torch-ops loss the op replaces (GPT.compute_logits + F.cross_entropy), in h's dtype."""
    z = torch.nn.functional.linear(h, w)
    return torch.nn.functional.cross_entropy(cap * torch.tanh(z / cap), targets)


def _ce_run(fn, h, w, targets, dtype=None, scale=1.0):
    """(loss, dh, dw) of fn on leaf copies of h, w (in dtype if given), the loss scaled by `scale` before backward."""
    h, w = (t.to(dtype or t.dtype).clone().requires_grad_() for t in (h, w))
    loss = fn(h, w, targets)
    (loss * scale).backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("N,V,zscale", [(37, 50, 1.0), (5, 64, 80.0), (9, 1024, 3.0), (3, 3000, 0.01)])
def test_softcap_ce_matches_reference(tg, N, V, zscale):
    """Guards the Triton softcapped cross-entropy (PERF #24): the mean loss and the gradients of h and the tied
    weight equal autograd through cap * tanh(z / cap) + F.cross_entropy in fp64, for row counts that are not a
    multiple of the block, vocabularies that are not powers of two (50, and 3000: one padded row of 4096 per program,
    with 4 warps), logits
    far past the cap (tanh saturates) and near zero, targets at both ends of the vocabulary, and an incoming gradient
    other than 1 (the 1/grad_accum of training)."""
    tg.qk_norm_rope_op()
    g = torch.Generator().manual_seed(N * V)
    h = torch.randn(N, 16, generator=g)
    w = torch.randn(V, 16, generator=g) * zscale / 4
    targets = torch.randint(0, V, (N,), generator=g)
    targets[0], targets[-1] = 0, V - 1
    cap = 30.0
    ref = _ce_run(lambda a, b, t: _ce_ref(a, b, t, cap), h, w, targets, torch.float64, scale=0.125)
    got = _ce_run(lambda a, b, t: tg._SoftcapCrossEntropy.apply(a, b, t, cap), h, w, targets, scale=0.125)
    assert all(t.dtype == torch.float32 for t in got)
    for a, b in zip(got, ref):
        assert _rel_err(a, b) < 1e-5, _rel_err(a, b)


def test_softcap_ce_in_bf16_registration_and_errors(tg):
    """Guards the training dtypes (bf16 h, w and logits: dz in bf16, the loss in fp32, within bf16 rounding of the
    fp64 reference), the custom op's plumbing (opcheck: schema and fake kernel) and the launcher's shape errors."""
    tg.qk_norm_rope_op()
    op = tg._QK_KERNELS["ce"]
    g = torch.Generator().manual_seed(5)
    h, w = torch.randn(40, 32, generator=g), torch.randn(96, 32, generator=g)
    targets = torch.randint(0, 96, (40,), generator=g)
    got = _ce_run(lambda a, b, t: tg._SoftcapCrossEntropy.apply(a, b, t, 30.0), h, w, targets, torch.bfloat16)
    ref = _ce_run(lambda a, b, t: _ce_ref(a, b, t, 30.0), h.bfloat16(), w.bfloat16(), targets, torch.float64)
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == torch.bfloat16
    for a, b in zip(got, ref):
        assert _rel_err(a, b) < 1e-2, _rel_err(a, b)
    z = torch.randn(7, 96, generator=g)
    torch.library.opcheck(op, (z, targets[:7], 30.0))
    rows, dz = op(z, targets[:7], 30.0)
    assert rows.shape == (7,) and rows.dtype == torch.float32 and dz.shape == z.shape
    for bad in (targets[:6], targets[:7].float(), targets[:7, None]):
        with pytest.raises(ValueError, match="softcap_cross_entropy: targets"):
            tg._softcap_ce_launch(z, bad, 30.0)


def _res_mix_ref(xa, xb, skip, x0, mix, sw, gate, scale, mode):
    """Block.forward's input mix with forward_hidden's add and skip before it, in torch ops: (x, h, xo)."""
    xo = xa if xb is None else xa + xb
    xi = xo if mode == 0 else torch.lerp(sw * (skip if mode == 1 else xo), xo, torch.sigmoid(gate))
    x = mix[0] * xi + mix[1] * x0
    return x, torch.nn.functional.rms_norm(x, (x.size(-1),)) * scale, xo


def _res_mix_case(N, D, mode, has_b, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    xa, skip, x0 = (torch.randn(N, D, generator=g) for _ in range(3))
    mix, sw = torch.randn(2, D, generator=g) * 0.5 + 1.0, torch.rand(D, generator=g) + 0.5
    gate = torch.randn(D, generator=g)
    xb = torch.randn(N, D, generator=g) if has_b else None
    ins = [xa, xb, skip if mode == 1 else None, x0, mix, sw if mode else None, gate if mode else None]
    ups = [torch.randn(N, D, generator=g).to(_triton_device()) for _ in range(3)]
    return [a.to(_triton_device(), dtype) if a is not None else None for a in ins], ups


def _res_mix_run(fn, ins, ups, scale, mode, store, dtype=None):
    """Outputs and input gradients of fn(*ins, scale, mode[, store]) under the loss sum(out * up) (xo's only where
    stored), with the inputs cast to dtype."""
    leaves = [a.detach().to(dtype or a.dtype).requires_grad_() if a is not None else None for a in ins]
    outs = fn(*leaves, scale, mode, store) if fn is not _res_mix_ref else fn(*leaves, scale, mode)
    used = outs[:2] + ((outs[2],) if store else ())
    sum((o * u.to(o.dtype)).sum() for o, u in zip(used, ups)).backward()
    return list(used) + [a.grad for a in leaves if a is not None]


@pytest.mark.parametrize("mode,has_b,store,N,D", [(0, False, False, 70, 64), (0, True, True, 23, 24),
                                                  (1, True, False, 150, 64), (2, True, False, 9, 32),
                                                  (1, False, True, 41, 16), (2, False, True, 70, 64)])
def test_res_mix_op_matches_reference(tg, monkeypatch, mode, has_b, store, N, D):
    """Guards the residual-stream kernels at a block's input (PERF #48): x, h, the stored block output and the
    gradients of all seven inputs (the two branches, the skip, x0, resid_mix, skip_weights, skip_gates) equal torch
    autograd of the same math in fp64, for each skip form (none, a skip tensor, the block's own input), with and
    without the add of the second branch, token counts that are not a multiple of the block and channel counts that
    are not a power of two (24).  One backward program per SM, so each runs several row blocks (and loads past the
    last row), on a GPU too."""
    monkeypatch.setattr(tg, "RES_PROGRAMS_PER_SM", 1)
    tg.qk_norm_rope_op()
    op = tg._QK_KERNELS["res_mix"]
    ins, ups = _res_mix_case(N, D, mode, has_b, torch.float32, seed=N + D + mode)
    ref = _res_mix_run(_res_mix_ref, ins, ups, 0.7, mode, store, torch.float64)
    got = _res_mix_run(op, ins, ups, 0.7, mode, store)
    assert len(got) == len(ref) == (3 if store else 2) + sum(a is not None for a in ins)
    for i, (a, b) in enumerate(zip(got, ref)):
        assert a.dtype == torch.float32 and a.shape == b.shape
        assert _rel_err(a, b) < 1e-5, (i, _rel_err(a, b))
    x, h, xo = op(*ins, 0.7, mode, store)
    assert xo.numel() == (x.numel() if store else 0)


def test_res_ops_in_bf16_registration_and_errors(tg):
    """Guards the training dtypes (bf16 in, bf16 out and gradients, the per-channel gradients summed in fp32, within
    bf16 rounding of fp64), res_add against torch (x + a and its RMSNorm; the gradient of x and of a is one tensor),
    the custom ops' plumbing (opcheck: schema, fake kernels, autograd) and the launchers' errors."""
    tg.qk_norm_rope_op()
    mix_op, add_op = tg._QK_KERNELS["res_mix"], tg._QK_KERNELS["res_add"]
    ins, ups = _res_mix_case(37, 64, 1, True, torch.bfloat16, seed=7)
    got = _res_mix_run(mix_op, ins, ups, 0.5, 1, True)
    assert all(t.dtype == torch.bfloat16 for t in got)
    for i, (a, b) in enumerate(zip(got, _res_mix_run(_res_mix_ref, ins, ups, 0.5, 1, True, torch.float64))):
        assert _rel_err(a, b) < 1e-2, (i, _rel_err(a, b))
    g = torch.Generator().manual_seed(8)
    x, a, gx2, gh2 = (torch.randn(2, 19, 48, generator=g).to(_triton_device()) for _ in range(4))

    def add_ref(x, a, scale):
        x2 = x + a
        return x2, torch.nn.functional.rms_norm(x2, (48,)) * scale

    res = []
    for fn, dt in ((add_op, torch.float32), (add_ref, torch.float64)):
        xl, al = x.detach().to(dt).requires_grad_(), a.detach().to(dt).requires_grad_()
        x2, h2 = fn(xl, al, 0.3)
        ((x2 * gx2.to(dt)).sum() + (h2 * gh2.to(dt)).sum()).backward()
        res.append([x2, h2, xl.grad, al.grad])
    for i, (p, q) in enumerate(zip(*res)):
        assert _rel_err(p, q) < 1e-5, (i, _rel_err(p, q))
    torch.library.opcheck(add_op, (x.requires_grad_(), a.requires_grad_(), 0.3))
    ins, _ = _res_mix_case(11, 16, 2, True, torch.float32, seed=9)
    torch.library.opcheck(mix_op, tuple(t.requires_grad_() if t is not None else None for t in ins) + (0.7, 2, True))
    ins, _ = _res_mix_case(11, 16, 1, False, torch.float32, seed=9)
    torch.library.opcheck(mix_op, tuple(ins) + (0.7, 1, False))
    xa, xb, skip, x0, mix, sw, gate = ins
    _, _, xo = mix_op(xa, xa, None, x0, mix, None, None, 0.7, 0, True)  # one tensor as both branches: still added
    torch.testing.assert_close(xo, 2 * xa, rtol=0, atol=0)
    with pytest.raises(ValueError, match="res_mix: skip_mode 1 with skip False"):
        tg._res_mix_launch(xa, None, None, x0, mix, sw, gate, 0.7, 1, False)
    with pytest.raises(ValueError, match="res_mix: skip_mode 2 with skip True, sw False"):
        tg._res_mix_launch(xa, None, skip, x0, mix, None, gate, 0.7, 2, False)
    with pytest.raises(ValueError, match=r"res_mix: x0 \(5, 16\) .* does not match"):
        tg._res_mix_launch(xa, None, skip, x0[:5], mix, sw, gate, 0.7, 1, False)
    with pytest.raises(ValueError, match=r"res_mix: mix \(1, 16\)"):
        tg._res_mix_launch(xa, None, skip, x0, mix[:1], sw, gate, 0.7, 1, False)
    with pytest.raises(ValueError, match=r"res_mix: gate \(16,\) torch.float64"):
        tg._res_mix_launch(xa, None, skip, x0, mix, sw, gate.double(), 0.7, 1, False)
    with pytest.raises(ValueError, match="res_mix: gh .* does not match"):
        tg._res_mix_launch(xa, None, skip, x0, mix, sw, gate, 0.7, 1, False, (x0, x0[:3], None))
    with pytest.raises(ValueError, match="res_add: a .* does not match"):
        tg._res_add_launch(x.detach(), a.detach().bfloat16(), 0.3)


def test_res_add_rstd_ops_match_reference(tg):
    """Guards PERF #49's form of res_add: s = scale * rstd of each row of x + a (fp32, one per row) in place of the
    normed rows, and its backward taking the normed rows' gradient already times s (what the scaled GEMM's input
    gradient is): x's gradient (a's is the same tensor) equals torch autograd of x + a and rms_norm(x + a) * scale in
    fp64, at a row count that is not a multiple of the block and a width that is not a power of two; the custom ops'
    plumbing (opcheck) and the launcher's error for a gradient of another shape."""
    import torch.nn.functional as F

    tg.qk_norm_rope_op()
    fwd, bwd = tg._QK_KERNELS["res_add_rstd"], tg._QK_KERNELS["res_add_rstd_bwd"]
    g = torch.Generator().manual_seed(11)
    x, a, gx2, gh2 = (torch.randn(3, 7, 48, generator=g).to(_triton_device()) for _ in range(4))
    x2, s = fwd(x, a, 0.3)
    assert x2.shape == x.shape and s.shape == (3, 7) and s.dtype == torch.float32
    xd, ad = x.double().requires_grad_(), a.double().requires_grad_()
    x2r = xd + ad
    h2r = F.rms_norm(x2r, (48,), eps=tg.RMS_EPS) * 0.3
    ((x2r * gx2.double()).sum() + (h2r * gh2.double()).sum()).backward()
    assert _rel_err(x2, x2r) < 1e-6
    assert _rel_err(s, 0.3 * torch.rsqrt(x2r.detach().square().mean(-1) + tg.RMS_EPS)) < 1e-6
    assert _rel_err(x2 * s[..., None], h2r) < 1e-6  # s * x2 is the normed rows
    dx = bwd(gx2, gh2 * s[..., None], x2)
    assert _rel_err(dx, xd.grad) < 1e-5
    torch.library.opcheck(fwd, (x, a, 0.3))
    torch.library.opcheck(bwd, (gx2, gh2, x2))
    with pytest.raises(ValueError, match="res_add: gh2 .* does not match"):
        tg._res_add_launch(x2, x2, 1.0, (gx2, gh2[:, :3]), rstd=True)


def _scaled_mlp_stand_ins(tg, calls: list | None):
    """The Gluon MLP ops' contract in torch ops (CPU): up(x, w, slope, s) -> (h, u) with h = s * (x @ w.T) in fp32
    before rounding, u = leaky(h)²; dgrad(g, w, h, slope, s) -> s * (g @ w) * d leaky(h)²/dh.  Each call appends
    ("up" | "dgrad", whether s was given) to calls unless it is None (dynamo traces no list append in a backward)."""
    import torch.nn.functional as F

    def up(x, w, slope, s=None):
        if calls is not None:
            calls.append(("up", s is not None))
        c = F.linear(x, w) if s is None else (F.linear(x.float(), w.float()) * s[:, None]).to(x.dtype)
        return c, F.leaky_relu(c, slope).square()

    def dgrad(g, w, h, slope, s=None):
        if calls is not None:
            calls.append(("dgrad", s is not None))
        c = (g @ w).float() if s is None else (g.float() @ w.float()) * s[:, None]
        hf = h.float()
        return (c * torch.where(hf > 0, 2 * hf, 2 * slope * slope * hf)).to(g.dtype)

    return up, dgrad


def test_gluon_res_mlp_matches_the_torch_math(tg, monkeypatch):
    """Guards _GluonResMLP's math (PERF #49; the Gluon ops' contract by torch stand-ins, res_add's rstd form in
    Triton): x2 = x + a and the MLP on rms_norm(x2) * scale, and the gradients of x, a, W_up and W_down (the loss
    through both outputs, and through the MLP's alone), against torch autograd of the plain math in fp64."""
    import torch.nn.functional as F

    tg.qk_norm_rope_op()
    calls = []
    up, dgrad = _scaled_mlp_stand_ins(tg, calls)
    monkeypatch.setitem(tg._MLP_GLUON, "up", up)
    monkeypatch.setitem(tg._MLP_GLUON, "dgrad", dgrad)
    g = torch.Generator().manual_seed(12)
    dev = _triton_device()
    x, a, gx2, gy = (torch.randn(2, 9, 32, generator=g).to(dev) for _ in range(4))
    w_up = (torch.randn(96, 32, generator=g) / 32 ** 0.5).to(dev)
    w_down = (torch.randn(32, 96, generator=g) / 96 ** 0.5).to(dev)
    for through_x2 in (True, False):
        res = []
        for dt in (torch.float32, torch.float64):
            leaves = [t.detach().to(dt).requires_grad_() for t in (x, a, w_up, w_down)]
            if dt == torch.float32:
                x2, y = tg._GluonResMLP.apply(*leaves, 0.7, 0.5)
            else:
                x2 = leaves[0] + leaves[1]
                h = F.linear(F.rms_norm(x2, (32,), eps=tg.RMS_EPS) * 0.7, leaves[2])
                y = F.linear(F.leaky_relu(h, 0.5).square(), leaves[3])
            loss = (y * gy.to(dt)).sum() + ((x2 * gx2.to(dt)).sum() if through_x2 else 0)
            res.append([x2, y] + list(torch.autograd.grad(loss, leaves)))
        for i, (p, q) in enumerate(zip(*res)):
            assert _rel_err(p, q) < 1e-5, (through_x2, i, _rel_err(p, q))
    assert calls == [("up", True), ("dgrad", True)] * 2
    # dynamo traces both Functions whole (the training graph compiles them; aot_eager here, inductor on the GPU)
    up, dgrad = _scaled_mlp_stand_ins(tg, None)
    monkeypatch.setitem(tg._MLP_GLUON, "up", up)
    monkeypatch.setitem(tg._MLP_GLUON, "dgrad", dgrad)
    leaves = [t.detach().requires_grad_() for t in (x, a, w_up, w_down)]
    both = lambda x, a, wu, wd: sum(tg._GluonResMLP.apply(x, a, wu, wd, 0.7, 0.5)) + tg._GluonMLP.apply(x, wu, wd, 0.5)
    got = torch.compile(both, backend="aot_eager", fullgraph=True)(*leaves)  # x2 and y: both gradients flow
    grads = torch.autograd.grad((got * gy).sum(), leaves)
    eager = [t.detach().requires_grad_() for t in (x, a, w_up, w_down)]
    want = both(*eager)
    for p, q in zip((got,) + grads, (want,) + torch.autograd.grad((want * gy).sum(), eager)):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "0", reason="the model runs on CPU tensors here (fp32, to "
                    "compare at fp32 tolerance), which needs Triton's interpreter; the op tests run on CUDA there")
def test_model_takes_the_res_mlp_op_only_with_the_gluon_mlp(tg, monkeypatch):
    """Guards the wiring of PERF #49: with the Gluon MLP on (its ops here torch stand-ins of their contract), every
    block's training forward runs x + a and the MLP through _GluonResMLP (the up and dgrad ops with row scales),
    with the loss and every gradient of the form before it (RES_MLP_FUSED off: res_add's normed rows into the
    unscaled ops); without the Gluon MLP, or with it where its tiles do not fit, the blocks take res_add and the
    torch MLP as before; where only the scaled kernels failed their self-test, res_add and the unscaled ops."""
    model, ids = _fused_cpu_model(tg, monkeypatch, 4, 5)
    calls = []
    up, dgrad = _scaled_mlp_stand_ins(tg, calls)
    monkeypatch.setitem(tg._MLP_GLUON, "up", up)
    monkeypatch.setitem(tg._MLP_GLUON, "dgrad", dgrad)
    monkeypatch.setattr(tg, "mlp_gemm_fits", lambda x, w: True)
    for b in model.blocks:
        b.fused_mlp = True
    results = {}
    for fused in (False, True):
        monkeypatch.setattr(tg, "RES_MLP_FUSED", fused)
        calls.clear()
        loss = model(ids, ids)
        loss.backward()
        results[fused] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, list(calls))
        model.zero_grad(set_to_none=True)
    assert results[False][2] == [("up", False)] * 4 + [("dgrad", False)] * 4
    assert results[True][2] == [("up", True)] * 4 + [("dgrad", True)] * 4
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-5, atol=1e-6)
    for n, r in results[False][1].items():
        got = results[True][1][n]
        assert (got - r).norm() <= 1e-4 * r.norm() + 1e-7, (n, (got - r).norm().item(), r.norm().item())
    monkeypatch.setattr(tg, "mlp_gemm_fits", lambda x, w: False)
    calls.clear()
    model(ids, ids).backward()
    assert calls == []
    monkeypatch.setattr(tg, "mlp_gemm_fits", lambda x, w: True)
    monkeypatch.setitem(tg._MLP_GLUON, "scaled_why", "h (scaled) off by 1.0e+00")  # only the scaled build failed
    loss = model(ids, ids)
    loss.backward()
    assert calls == [("up", False)] * 4 + [("dgrad", False)] * 4
    torch.testing.assert_close(loss.detach(), results[False][0], rtol=0, atol=0)  # the form before, exactly
    calls.clear()
    monkeypatch.setitem(tg._MLP_GLUON, "scaled_why", "")
    for b in model.blocks:
        b.fused_mlp = False
    model(ids, ids).backward()
    assert calls == []


def _fused_cpu_model(tg, monkeypatch, num_layers: int, seed: int):
    """The tiny config with num_layers, random weights, on CPU with the Triton ops on (Triton's interpreter), and a
    batch of 2 token rows."""
    monkeypatch.setattr(tg, "FUSED_QK_DEVICES", ("cuda", "cpu"))
    h = tiny_config(tg, num_layers=num_layers)
    torch.manual_seed(0)
    model = randomize_params(tg.GPT(h), std=0.2)
    ids = torch.randint(0, h.vocab_size, (2, h.train_seq_len), generator=torch.Generator().manual_seed(seed))
    assert model.set_fused_qk(True)
    return model, ids


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "0", reason="the model runs on CPU tensors here (fp32, to "
                    "compare at fp32 tolerance), which needs Triton's interpreter; the op tests run on CUDA there")
def test_model_takes_the_residual_ops_only_in_training_forwards(tg, monkeypatch):
    """Guards the wiring of the residual-stream ops (PERF #48, GPT._hidden_fused; the 3-layer tiny config's in
    test_model_with_fused_qk_matches_torch_ops_and_compiles): a training forward runs res_mix at every block's
    input, with the U-Net skips in the forms 7 layers give (blocks 0-2 push their outputs, each written by the next
    block's res_mix; block 3's skip is its own input, block 2's output; blocks 4 and 5 read blocks 1 and 0, last in
    first out; block 6 has none) and res_add in every block, with the loss and every gradient of the torch path
    (RES_FUSED off); no forward without autograd and none that records GPTQ's Hessians takes them."""
    model, ids = _fused_cpu_model(tg, monkeypatch, 7, 4)
    monkeypatch.setattr(tg, "RES_FUSED", False)
    ref = model(ids, ids)
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    monkeypatch.setattr(tg, "RES_FUSED", True)
    calls, fwd = [], []
    mix_launch, add_launch = tg._res_mix_launch, tg._res_add_launch

    def mix(*a):
        calls.append(("mix",) + a[8:10] + (len(a) > 10,))
        out = mix_launch(*a)
        if len(a) == 10:
            fwd.append((a, out))
        return out

    monkeypatch.setattr(tg, "_res_mix_launch", mix)
    monkeypatch.setattr(tg, "_res_add_launch", lambda *a: calls.append(("add", len(a) > 3)) or add_launch(*a))
    loss = model(ids, ids)
    skips = [(0, False), (0, True), (0, True), (2, False), (1, False), (1, False), (0, False)]
    assert calls == [c for s in skips for c in (("mix",) + s + (False,), ("add", False))]
    # block 4's skip is block 1's output (written by block 2's res_mix), block 5's block 0's (block 1's)
    assert torch.equal(fwd[4][0][2], fwd[2][1][2]) and torch.equal(fwd[5][0][2], fwd[1][1][2])
    assert not torch.equal(fwd[1][1][2], fwd[2][1][2])
    calls.clear()
    loss.backward()
    assert calls == [c for s in skips[::-1] for c in (("add", True), ("mix",) + s + (True,))]
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    for n, p in model.named_parameters():
        r = ref_grads[n]
        assert (p.grad - r).norm() <= 1e-4 * r.norm() + 1e-7, (n, (p.grad - r).norm().item(), r.norm().item())
    calls.clear()
    with torch.no_grad():
        torch.testing.assert_close(model(ids, ids), ref, rtol=1e-5, atol=1e-5)
    model.hessian_store = {}
    model(ids, ids)
    model.hessian_store = None
    assert calls == []


@pytest.mark.parametrize("kv_rep", [True, False])
def test_model_with_fused_qk_matches_torch_ops_and_compiles(tg, monkeypatch, kv_rep):
    """Guards the model wiring: with the ops switched on (q/k, XSA, the loss and the residual stream, PERF #48), the
    loss and every parameter gradient equal those of the torch-ops path, and the training forward + backward still
    traces as one graph (fullgraph, aot_eager).  K/V go to the attention repeated to the query heads (PERF #34) in
    the training forward of exactly the layers with XSA and no value embedding (layer 0 of the tiny config; KV_REP
    off: none), and in no forward without autograd."""
    monkeypatch.setattr(tg, "KV_REP", kv_rep)
    reps = []
    qk_launch = tg._qk_launch
    monkeypatch.setattr(tg, "_qk_launch", lambda *a: reps.append(a[6]) or qk_launch(*a))
    monkeypatch.setattr(tg, "FUSED_QK_DEVICES", ("cuda", "cpu"))
    h = tiny_config(tg)
    torch.manual_seed(0)
    model = randomize_params(tg.GPT(h), std=0.2)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, h.vocab_size, (2, h.train_seq_len), generator=g)
    tgt = torch.randint(0, h.vocab_size, (2, h.train_seq_len), generator=g)
    model.set_fused_qk(False)  # the reference: torch ops (a CUDA box would have switched the op on in __init__)
    ref_loss = model(ids, tgt)
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    assert model.set_fused_qk(True) and all(b.attn.fused_qk for b in model.blocks) and model.fused_ce
    calls = []
    launch = tg._softcap_ce_launch
    monkeypatch.setattr(tg, "_softcap_ce_launch", lambda *a: calls.append(1) or launch(*a))
    loss = model(ids, tgt)
    assert calls == [1] and reps == ([2, 1, 1] if kv_rep else [1, 1, 1])
    loss.backward()
    assert reps[3:] == reps[2::-1]  # the backward kernels, last layer first, with the same rep
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        if p.grad.dtype == torch.float32:
            torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-4, atol=1e-5, msg=n)
        else:  # bf16 grads (the embeddings) are summed in bf16: fp32 sums in another order move them by a few ulps
            scale = ref_grads[n].abs().max().item()
            torch.testing.assert_close(p.grad, ref_grads[n], rtol=2.0 ** -7, atol=scale * 2.0 ** -9, msg=n)
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=False)
    reps.clear()
    closs = compiled(ids, tgt)
    closs.backward()
    assert calls == [1, 1]  # the compiled graph calls the loss kernel too (the torch loss would give the same value)
    assert reps == ([2, 1, 1, 1, 1, 2] if kv_rep else [1] * 6)  # and the q/k op at the same rep, forward and backward
    torch.testing.assert_close(closs, ref_loss, rtol=1e-5, atol=1e-5)
    for n in ("blocks.0.attn.q_gain", "blocks.1.attn.q_gain", "kv_bank", "qo_bank"):  # layer 0: rep 2's backward
        torch.testing.assert_close(dict(model.named_parameters())[n].grad, ref_grads[n], rtol=1e-4, atol=1e-5, msg=n)
    reps.clear()
    with torch.no_grad():  # evaluation: K/V at their own heads (the copies would only cost bytes there)
        torch.testing.assert_close(model(ids, tgt), ref_loss, rtol=1e-5, atol=1e-5)
    assert reps == [1, 1, 1]
    reps.clear()
    monkeypatch.setattr(tg, "flash_attn_2_func", lambda q, k, v, causal: tg.sdpa_attention(q, k, v, False))
    model(ids, tgt)  # FlashAttention (on CUDA) reads grouped KV heads itself: no copies for it
    assert reps == [1, 1, 1]


_BUILD_CHECK = r"""
import importlib.util, sys
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile as triton_compile

spec = importlib.util.spec_from_file_location("tg_build_check", sys.argv[1])
tg = importlib.util.module_from_spec(spec)
sys.modules["tg_build_check"] = tg
spec.loader.exec_module(tg)
ns = tg._load_triton_source(tg._QK_TRITON_SRC, "qk_norm_rope_triton")
scalars, consts = {"M", "T", "NQ", "NK", "NV"}, {"D", "W", "HALF", "BM", "BG", "BH", "HAS_GAIN", "REP"}
for name in ("qk_fwd", "qk_bwd"):
    fn = ns[name]
    for half, has_gain, rep in ((8, True, 1), (0, False, 1), (8, True, 2)):
        sig = {a: "constexpr" if a in consts else "i32" if a in scalars else
               "*fp32" if a in ("GAIN", "PART") else "*bf16" for a in fn.arg_names}
        # 16-byte-aligned pointers, as Triton specialises real launches on aligned tensors.
        attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if sig[a].startswith("*")}
        meta = dict(tg._qk_meta(64, half, has_gain), REP=rep)
        k = triton_compile(ASTSource(fn, sig, meta, attrs), target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": tg.QK_WARPS})
        ptx = k.asm["ptx"]
        ok = ".target sm_90" in ptx and len(k.asm["cubin"]) > 0 and "ld.global.v4" in ptx and "st.global.v4" in ptx
        scalar = "ld.global.b16" in ptx or "st.global.b16" in ptx
        print(f"{name} half={half} gain={has_gain} rep={rep} built={ok} scalar_2byte_access={scalar}")
for name in ("xsa_fwd", "xsa_bwd"):
    fn = ns[name]
    sig = {a: "constexpr" if a in ("G", "D", "BD", "BM") else "i32" if a in ("M", "HKV") else "*bf16"
           for a in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if sig[a].startswith("*")}
    k = triton_compile(ASTSource(fn, sig, dict(G=2, D=64, BD=64, BM=tg.XSA_BLOCK_ROWS), attrs),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": tg.XSA_WARPS})
    ptx = k.asm["ptx"]
    ok = ".target sm_90" in ptx and len(k.asm["cubin"]) > 0 and "ld.global.v4" in ptx and "st.global.v4" in ptx
    scalar = "ld.global.b16" in ptx or "st.global.b16" in ptx
    print(f"{name} built={ok} scalar_2byte_access={scalar} barrier={'bar.sync' in ptx}")
fn = ns["softcap_ce"]
sig = {a: "constexpr" if a in ("BM", "BV") else "i32" if a in ("M", "V") else "fp32" if a in ("CAP", "INV_N") else
       "*i64" if a == "Y" else "*fp32" if a == "LOSS" else "*bf16" for a in fn.arg_names}
# and V: launches specialise integer arguments divisible by 16, as the record's vocabulary of 1024 is
attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if sig[a].startswith("*") or a == "V"}
k = triton_compile(ASTSource(fn, sig, dict(BM=tg.CE_BLOCK_ELEMENTS // 1024, BV=1024), attrs),
                   target=GPUTarget("cuda", 90, 32), options={"num_warps": tg.CE_WARPS})
ptx = k.asm["ptx"]
ok = ".target sm_90" in ptx and len(k.asm["cubin"]) > 0 and "ld.global.v4" in ptx and "st.global.v4" in ptx
# one 2-byte load per row is the target's logit; the rows themselves move in 16-byte vectors
print(f"softcap_ce built={ok} scalar_2byte_access={ptx.count('ld.global.b16') > 4 or 'st.global.b16' in ptx}")
res = [("res_mix_fwd", dict(HAS_B=b, SKIP=m, STORE_XO=st)) for b, m, st in ((False, 0, False), (True, 1, True),
                                                                               (True, 2, False))]
res += [("res_mix_bwd", dict(HAS_B=b, SKIP=m, HAS_GXO=g, ITERS=12)) for b, m, g in ((False, 0, False), (True, 1, True),
                                                                                     (True, 2, False))]
import os, re, subprocess, tempfile
from triton.backends.nvidia.compiler import get_ptxas
ptxas = get_ptxas(90).path  # the one Triton itself runs, as the Gluon checks use
# res_add in both forms (PERF #49: the row scales s out in fp32, the backward from the gradient times s)
res += [("res_add_fwd", dict(RSTD=False)), ("res_add_fwd", dict(RSTD=True)), ("res_add_bwd", dict(PRE=False)),
        ("res_add_bwd", dict(PRE=True))]
for name, flags in res:
    fn = ns[name]
    meta = dict(flags, D=512, BD=512, BM=tg.RES_BWD_BLOCK_ROWS if name == "res_mix_bwd" else tg.RES_BLOCK_ROWS)
    sig = {a: "constexpr" if a in meta else "i32" if a == "N" else "fp32" if a == "scale" else
           "*fp32" if a == "PART" or (a == "H2" and flags.get("RSTD")) else "*bf16" for a in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if sig[a].startswith("*")}
    k = triton_compile(ASTSource(fn, sig, meta, attrs), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": tg.RES_BWD_WARPS if name == "res_mix_bwd" else tg.RES_WARPS})
    ptx = k.asm["ptx"]
    # vector accesses: 16-byte, or 8-byte where a program's rows are 4 bf16 a thread (a launch shape of fewer)
    ok = ".target sm_90" in ptx and len(k.asm["cubin"]) > 0 and any(f"ld.global.{v}" in ptx and f"st.global.{v}" in ptx
                                                                   for v in ("v4", "v2"))
    scalar = "ld.global.b16" in ptx or "st.global.b16" in ptx
    with tempfile.TemporaryDirectory() as d:  # registers and spills, from the ptxas Triton itself runs
        open(os.path.join(d, "k.ptx"), "w").write(ptx)
        info = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", os.path.join(d, "k.ptx"), "-o",
                               os.path.join(d, "k.cubin")], capture_output=True, text=True).stderr
    regs, spill = re.search(r"Used (\d+) registers", info), re.search(r"(\d+) bytes spill stores", info)
    print(f"{name} {sorted(flags.items())} built={ok} scalar_2byte_access={scalar} "
          f"regs={regs.group(1) if regs else '?'} spills={spill.group(1) if spill else '?'}")
"""


def test_qk_kernels_compile_for_hopper_with_vector_loads(tg):
    """Guards the real (non-interpreted) build, which the CPU tests above do not exercise: the q/k kernels compile to
    sm_90 machine code with Triton's own ptxas, for the record shape (bf16 q/k and RoPE tables, D 64, 16 RoPE dims)
    and with RoPE off, and with K/V repeated twice (PERF #34), and their row loads and stores are 16-byte vector
    accesses, none 2-byte; so do the XSA kernels
    (2 query heads per KV head, D 64), with no barrier (PERF #18), the softcapped cross-entropy (vocabulary 1024,
    PERF #24) and the residual-stream kernels (512 channels, each skip form; PERF #48; res_add in both forms,
    PERF #49).  In a fresh process:
    the interpreter the other tests ran patches triton.language in this one."""
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="0")
    res = subprocess.run([sys.executable, "-c", _BUILD_CHECK, tg.__spec__.origin], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 19, res.stdout
    for line in lines:
        assert "built=True" in line and "scalar_2byte_access=False" in line, line
    assert all("barrier=False" in line for line in lines[6:8]), lines[6:8]
    for line in lines[9:]:  # the residual-stream kernels: no spills, and >= 12 warps an SM (PERF #48)
        regs = int(line.split("regs=")[1].split()[0])
        warps = tg.RES_BWD_WARPS if line.startswith("res_mix_bwd") else tg.RES_WARPS
        assert "spills=0" in line and 65536 // (regs * 32 * warps) * warps >= 12, line


def test_model_takes_the_qkv_op_only_in_training_forwards(tg, monkeypatch):
    """Guards the wiring of the Q|K|V op (PERF #47; here a stand-in on CPU: cuBLAS's projection + the q/k op, as the
    kernel computes it): with fused_qkv on, every layer's training forward (autograd recording) takes it, at the rep
    the q/k op would get (2 at the XSA layer without a value embedding, else 1), with the loss and gradients of the
    path without it; no forward without autograd (eval, SLOT) and none that records GPTQ's Hessians does."""
    monkeypatch.setattr(tg, "FUSED_QK_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(tg, "qkv_gemm_fits", lambda *a: True)
    calls = []

    def stand_in(h, w, cos, sin, gain, n_q, n_k, D, rep):
        calls.append(rep)
        raw = torch.nn.functional.linear(h, w).view(*h.shape[:2], -1, D)
        return (raw.detach(),) + tuple(tg._QK_KERNELS["op"](raw, cos, sin, gain, n_q, n_k, rep))

    h = tiny_config(tg)
    torch.manual_seed(0)
    dev = _triton_device()
    model = randomize_params(tg.GPT(h), std=0.2).to(dev)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, h.vocab_size, (2, h.train_seq_len), generator=g).to(dev)
    assert model.set_fused_qk(True)
    assert not any(b.attn.fused_qkv for b in model.blocks)  # the tiny projection (heads of 16) fits no tile
    ref = model(ids, ids)
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    monkeypatch.setitem(tg._MLP_GLUON, "qkv", stand_in)
    for b in model.blocks:
        b.attn.fused_qkv = True
    loss = model(ids, ids)
    assert calls == [2, 1, 1]  # layer 0: XSA, no value embedding (the tiny config)
    loss.backward()
    torch.testing.assert_close(loss, ref, rtol=0, atol=0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-6, atol=1e-7, msg=n)
    calls.clear()
    with torch.no_grad():
        model(ids, ids)
    model.hessian_store = {}
    model(ids, ids)
    model.hessian_store = None
    assert calls == [] and model.blocks[0].attn.fused_qkv


def test_qkv_op_is_self_tested_at_the_models_projection(tg, monkeypatch):
    """qkv_gluon_op (with stand-ins for the Gluon build and the kernel's self-test, which need a Hopper GPU): the
    self-test runs once per projection (K, n_q, n_k, D), at the model's (set_fused_qk passes them), not for one the
    tiles do not take; a failure means no op for that projection and its reason in the log header."""
    monkeypatch.setattr(tg, "_MLP_GLUON", {})
    op, tested, fail = object(), [], {(512, 8, 4, 32): "q (rep 2) off by 1.0e+00"}
    monkeypatch.setattr(tg, "_qkv_gluon_build", lambda: op)
    monkeypatch.setattr(tg, "_qkv_gluon_selftest", lambda dev, *shape: tested.append(shape) or fail.get(shape, ""))
    assert tg.qkv_gluon_op() is op and tg.qkv_gluon_op(512, 8, 4, 64) is op and tested == [(512, 8, 4, 64)]
    assert tg.qkv_gluon_op(512, 8, 4, 32) is None and tg.qkv_why(512, 8, 4, 32) == "q (rep 2) off by 1.0e+00"
    assert tg.qkv_why() == "" and tg.qkv_why(512, 8, 4, 16) == ""  # passed; not tested
    assert tg.qkv_gluon_op(512, 8, 4, 32) is None and tested == [(512, 8, 4, 64), (512, 8, 4, 32)]
    assert tg.qkv_gluon_op(520, 8, 4, 65) is None and len(tested) == 2  # K and D no tile takes: not self-tested
    monkeypatch.setattr(tg, "FUSED_QK_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(tg, "mlp_gluon_op", lambda: None)  # GPT() on a Hopper box would build the MLP's for real
    h = tiny_config(tg)  # 64 features into 4 q + 2 k + 2 v heads of 16
    model = tg.GPT(h)
    seen = []
    monkeypatch.setattr(tg, "qkv_gluon_op", lambda *shape: seen.append(shape) or op)
    assert model.set_fused_qk(True) and all(b.attn.fused_qkv for b in model.blocks)
    assert seen == [(h.model_dim, h.num_heads, h.num_kv_heads, h.head_dim)]
    monkeypatch.setattr(tg, "QKV_GLUON", False)
    model.set_fused_qk(True)
    assert not any(b.attn.fused_qkv for b in model.blocks)


def test_qkv_self_test_runs_the_models_k_v_repeats(tg, monkeypatch):
    """_qkv_gluon_selftest launches the kernel at the projection asked for, with K/V repeated n_q / n_k times (what
    the XSA layers take; REP is a compile-time constant, so each is its own kernel) and once, into NaN-filled
    outputs; here a stand-in launch (cuBLAS's projection + the q/k op in Triton's interpreter) passes, and one that
    leaves an output element unwritten does not."""
    launches = []

    def launch(x, w, cos, sin, gain, n_q, n_k, D, rep, max_ctas=0, fill=None):
        launches.append((tuple(x.shape), tuple(w.shape), n_q, n_k, D, rep, fill))
        raw = torch.nn.functional.linear(x, w).view(*x.shape[:2], -1, D)
        outs = [o.clone() for o in tg._qk_launch(raw, cos, sin, gain, n_q, n_k, rep)]
        if unwritten:
            outs[1][0, 5] = fill
        return (torch.cat((raw[:, :, :n_q + n_k], torch.full_like(raw[:, :, n_q + n_k:], fill)), 2), *outs)

    monkeypatch.setattr(tg, "_qkv_gemm_launch", launch)
    unwritten = False
    assert tg._qkv_gluon_selftest(_triton_device(), 128, 4, 1, 64) == ""
    assert [(a[0], a[1], a[5]) for a in launches] == [((2, 192, 128), (384, 128), 4), ((2, 192, 128), (384, 128), 1)]
    assert all(a[6] != a[6] for a in launches)  # NaN
    unwritten = True
    assert tg._qkv_gluon_selftest(_triton_device(), 128, 4, 1, 64) == "k (rep 4) off by nan; k (rep 1) off by nan"


def test_fused_qk_only_for_inputs_on_its_devices(tg, monkeypatch):
    """Guards device moves: a model switched to the op still runs inputs on other devices (CPU here, when only CUDA
    is listed) through torch ops, so a model built on a GPU and moved to the CPU does not hand CPU tensors to Triton;
    and the loss kernel runs only where autograd is recording (it writes the logits' gradient)."""
    h = tiny_config(tg)
    torch.manual_seed(0)
    model = randomize_params(tg.GPT(h), std=0.2)
    ids = torch.randint(0, h.vocab_size, (2, h.train_seq_len), generator=torch.Generator().manual_seed(3))
    ref = model(ids, ids)
    assert model.set_fused_qk(True)

    def boom(*args, **kwargs):
        raise AssertionError("the Triton op ran on an input outside FUSED_QK_DEVICES")

    qk_launch = tg._qk_launch
    monkeypatch.setattr(tg, "_qk_launch", boom)
    monkeypatch.setattr(tg, "_softcap_ce_launch", boom)
    assert tg.FUSED_QK_DEVICES == ("cuda",)
    torch.testing.assert_close(model(ids, ids), ref, rtol=0, atol=0)
    monkeypatch.setattr(tg, "FUSED_QK_DEVICES", ("cuda", "cpu"))
    with pytest.raises(AssertionError, match="outside FUSED_QK_DEVICES"):
        model(ids, ids)
    # the loss kernel also writes the logits' gradient: forwards without autograd (eval) keep the torch loss
    monkeypatch.setattr(tg, "_qk_launch", qk_launch)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, ids), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(AssertionError, match="outside FUSED_QK_DEVICES"):
        model(ids, ids)


def test_without_triton_the_model_keeps_torch_ops(tmp_path):
    """Guards the fallback: where Triton does not import, qk_norm_rope_op() is None, set_fused_qk reports off, and
    the model trains through torch ops (a fresh copy of the module, so no op is cached)."""
    from conftest import SOURCE, load_module

    mod = load_module(SOURCE, "train_gpt_no_triton")

    def no_triton(src, name):
        raise ImportError("No module named 'triton'")

    mod._load_triton_source = no_triton
    assert mod.qk_norm_rope_op() is None
    model = mod.GPT(tiny_config(mod))
    assert not model.set_fused_qk(True) and not any(b.attn.fused_qk for b in model.blocks)
    ids = torch.randint(0, 64, (1, 32), generator=torch.Generator().manual_seed(0))
    model(ids, ids).backward()


def test_qk_launch_rejects_tables_and_heads_that_do_not_fit(tg):
    """Guards the launcher's input checks: RoPE tables wider than half the head dim (the partner load would read the
    next head) or shorter than the sequence, and head counts or a gain that do not fit x, raise a ValueError naming
    the shapes instead of reading out of bounds."""
    tg.qk_norm_rope_op()
    x = torch.randn(1, 8, 4, 16)
    wide = tg.rope_tables(8, 18, 10000.0, torch.device("cpu"))
    short = tg.rope_tables(4, 8, 10000.0, torch.device("cpu"))
    for cos, sin in (wide, short):
        with pytest.raises(ValueError, match="RoPE tables"):
            tg._qk_launch(x, cos, sin, None, 2, 1)
    cos, sin = tg.rope_tables(8, 8, 10000.0, torch.device("cpu"))
    for gain, n_q, n_k, rep in ((None, 3, 2, 1), (None, -1, 2, 1), (torch.ones(3), 2, 1, 1), (None, 2, 1, 0)):
        with pytest.raises(ValueError, match="heads"):
            tg._qk_launch(x, cos, sin, gain, n_q, n_k, rep)
    g1, g2, g0 = (torch.ones(1, 8, n, 16) for n in (1, 2, 0))
    for rep, grads in ((1, (g2, g1, g0, g0)),  # v has 1 head, not 0
                       (1, (g2, g1, g1)),  # v_rep's gradient missing
                       (2, (g2, g1, g1, g2)),  # k at 2 heads when repeated
                       (2, (g2, g2, g1, g1))):  # v_rep at 2 heads
        with pytest.raises(ValueError, match="gradients"):
            tg._qk_launch(x, cos, sin, None, 2, 1, rep, grads)


# The Gluon MLP kernels (PERF #29): Hopper-only, so on CPU they are cross-compiled, and checked against torch on a GPU.
# the start of both build checks below (each a script run in a fresh process: argv[1] = train_gpt.py's path): the
# Gluon kernels loaded from the source, and build(fn, sig, consts, attrs, nw): the kernel compiled for sm_90 and the
# facts the tests check, as "key=value" fields (cubin, shared memory, warps, wgmma, TMA, setmaxnreg, no spills by
# ptxas, 16-byte stores only, every one-thread mbarrier arrive right after a barrier of its partition's warps, which
# Gluon inserts: without it a warp could still be using the buffer; and the shuffle count)
_GLUON_CHECK_PRELUDE = r"""
import importlib.util, subprocess, sys, tempfile
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import compile as triton_compile
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource

spec = importlib.util.spec_from_file_location("tg_gluon_check", sys.argv[1])
tg = importlib.util.module_from_spec(spec)
sys.modules["tg_gluon_check"] = tg
spec.loader.exec_module(tg)
ns = tg._load_triton_source(tg._MLP_GLUON_SRC, "mlp_gluon")
layout = lambda block: repr(gl.NVMMASharedLayout.get_default_for(block, gl.bfloat16))


def build(fn, sig, consts, attrs, nw):
    sig = dict(sig, **{name: "constexpr" for name in consts})
    k = triton_compile(GluonASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": nw})
    ptx = k.asm["ptx"]
    with tempfile.TemporaryDirectory() as d:
        with open(d + "/k.ptx", "w") as f:
            f.write(ptx)
        info = subprocess.run([get_ptxas(90).path, "-v", "-arch=sm_90a", d + "/k.ptx", "-o", d + "/k.cubin"],
                              capture_output=True, text=True).stderr
    spills = [line for line in info.splitlines() if "spill" in line]
    code = [ln.strip() for ln in ptx.splitlines() if ln.strip() and not ln.strip().startswith(("//", ".loc"))]
    arrives = [i for i, ln in enumerate(code) if "mbarrier.arrive.shared::cta" in ln]
    synced = bool(arrives) and all(any(ln.startswith(("bar.sync", "barrier.sync")) for ln in code[i - 4:i])
                                   for i in arrives)
    return (f"cubin={len(k.asm['cubin']) > 0} smem={k.metadata.shared} warps={k.metadata.num_warps} "
            f"wgmma={'wgmma.mma_async' in ptx} tma={'cp.async.bulk.tensor' in ptx} setmaxnreg={'setmaxnreg' in ptx} "
            f"no_spills={bool(spills) and all(' 0 bytes spill' in s for s in spills)} "
            f"vector_stores={ptx.count('st.global.v4') > 0 and 'st.global.b16' not in ptx} arrive_synced={synced} "
            f"shuffles={ptx.count('shfl.sync')}")
"""


def _gluon_build_check(tg, script: str, n: int) -> list:
    """Run a build-check script (Triton compiling, not interpreting) in a fresh process; its n lines, each with its
    key=value fields as a dict."""
    import subprocess
    import sys

    pytest.importorskip("triton.experimental.gluon", reason="Triton without Gluon")
    env = dict(os.environ, TRITON_INTERPRET="0")
    res = subprocess.run([sys.executable, "-c", script, tg.__spec__.origin], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    assert len(lines) == n, res.stdout
    return [(line, dict(kv.split("=") for kv in line.split())) for line in lines]


_GLUON_BUILD_CHECK = _GLUON_CHECK_PRELUDE + r"""
fn = ns["mlp_gemm"]
# the runtime specialises the output pointers and the row stride as multiples of 16 (16-byte vector accesses)
attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in ("o_ptr", "x_ptr", "s_ptr", "ldo")}
# the shipped tiles in their directions, without and with the row scales (PERF #49)
for (tile, bwd), scaled in ((tb, sc) for tb in ((tg.MLP_TILES["up"], False), (tg.MLP_TILES["dgrad"], True))
                            for sc in (False, True)):
    bm, bn, bk, stages, nw, ew, eregs, ch = tile
    b_block = [bk, bn] if bwd else [bn, bk]
    sig = {"a_desc": f"tensordesc<bf16{[bm, bk]},{layout([bm, bk])}>", "b_desc": f"tensordesc<bf16{b_block},"
           f"{layout(b_block)}>", "h_desc": f"tensordesc<bf16{[bm, bn]},{layout([bm, bn])}>", "o_ptr": "*bf16",
           "x_ptr": "*bf16", "s_ptr": "*fp32" if scaled else "*bf16", "ldo": "i32", "n_n": "i32", "n_tiles": "i32",
           "slope": "fp32"}
    consts = dict(K=512, BM=bm, BN=bn, BK=bk, STAGES=stages, BWD=bwd, NW=nw, EW=ew, EREGS=eregs, CH=ch, SCALED=scaled)
    print(f"ew={ew} bwd={bwd} scaled={scaled} " + build(fn, sig, consts, attrs, nw))
"""


def test_gluon_mlp_kernels_compile_for_hopper(tg):
    """Guards the Gluon build on a CPU box: both directions of the MLP GEMM compile to sm_90 machine code with wgmma,
    TMA loads and warp specialisation (setmaxnreg), without register spills, with 16-byte global stores, within an
    H100/H200 CTA's 232,448 bytes of shared memory, in 12 warps forward (4 consumer warps, then the 1 loader warp
    and the 4 epilogue warps, padded to warpgroups: up to 168 registers a thread, for a 128 x 128 accumulator on one
    warpgroup) and 16 backward (8 consumer warps: ptxas caps every thread at 128).  The shipped tiles in their
    directions (the backward's h TMA-loaded into shared memory beside the ring), each also with the row scales of
    PERF #49 (the consumer's products times s before rounding).  In a fresh process, as above."""
    for line, fields in _gluon_build_check(tg, _GLUON_BUILD_CHECK, 4):
        assert all(fields[k] == "True" for k in ("cubin", "wgmma", "tma", "setmaxnreg", "no_spills",
                                                 "vector_stores", "arrive_synced")), line
        assert int(fields["smem"]) <= 232_448 and fields["warps"] == ("16" if fields["bwd"] == "True" else "12"), line


_QKV_BUILD_CHECK = _GLUON_CHECK_PRELUDE + r"""
fn = ns["qkv_gemm"]
ptrs = ("raw_ptr", "q_ptr", "k_ptr", "v_ptr", "vr_ptr")
# the runtime specialises 16-byte-aligned pointers (all of these) as multiples of 16: 16-byte vector accesses
attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in ptrs + ("cos_ptr", "sin_ptr", "gain_ptr")}
bm, bn, bk, stages, nw, ew, eregs, ch = tg.QKV_TILE
for rep in (2, 1):  # the record's heads: 8 q, 4 k, 4 v of 64, RoPE on 16 columns
    sig = {"a_desc": f"tensordesc<bf16{[bm, bk]},{layout([bm, bk])}>",
           "b_desc": f"tensordesc<bf16{[bn, bk]},{layout([bn, bk])}>", **{p: "*bf16" for p in ptrs},
           "cos_ptr": "*bf16", "sin_ptr": "*bf16", "gain_ptr": "*fp32", "T": "i32", "n_n": "i32", "n_tiles": "i32"}
    consts = dict(K=512, BM=bm, BN=bn, BK=bk, STAGES=stages, NW=nw, EW=ew, EREGS=eregs, CH=ch, NQ=8, NK=4, NV=4,
                  REP=rep, D=64, HALF=8, HAS_GAIN=True)
    print(f"rep={rep} " + build(fn, sig, consts, attrs, nw))
"""


def test_gluon_qkv_kernel_compiles_for_hopper(tg):
    """Guards the Gluon build of the Q|K|V kernel (PERF #47) on a CPU box: sm_90 machine code with wgmma and TMA
    loads, no spills, 16-byte stores, within shared memory, in QKV_TILE's warps, at K/V repeated twice and once;
    RoPE's halves stay in each thread's registers (the shuffles are the norm's row sums only: a gather across lanes
    compiled to ~1,150 of them)."""
    nw, ew = tg.QKV_TILE[4:6]
    for line, fields in _gluon_build_check(tg, _QKV_BUILD_CHECK, 2):
        assert all(fields[k] == "True" for k in ("cubin", "wgmma", "tma", "no_spills", "vector_stores",
                                                 "arrive_synced")), line
        warps = nw + 4 * -(-(1 + ew) // 4)  # the consumer's, then the loader's and the epilogue's, in warpgroups
        assert int(fields["smem"]) <= 232_448 and int(fields["warps"]) == warps and int(fields["shuffles"]) < 200, line


@pytest.mark.parametrize("rep", [2, 1])
def test_qkv_self_test_comparison(tg, rep):
    """Guards what the Q|K|V kernel's self-test and bench accept (_qkv_compare, run here through the q/k op in
    Triton's interpreter): the q/k op's own outputs on a projection that differs from cuBLAS's by one bf16 ulp pass
    (another summation order); a wrong element of the projection, of an output, a NaN (an unwritten tile) or a wrong
    shape does not."""
    assert tg.qk_norm_rope_op() is not None
    B, T, D, n_q, n_k = 1, 32, 64, 8, 4
    dev = _triton_device()
    g = torch.Generator().manual_seed(rep)
    raw_ref = torch.randn(B, T, n_q + 2 * n_k, D, generator=g).bfloat16().to(dev)
    cos, sin = (t.bfloat16() for t in tg.rope_tables(T, 16, 10000.0, dev))
    gain = (torch.rand(n_q, generator=g) + 0.5).to(dev)
    raw = raw_ref.clone()
    up = torch.tensor(float("inf"), dtype=raw.dtype, device=dev)
    raw[0, 3, :n_q + n_k] = torch.nextafter(raw[0, 3, :n_q + n_k], up)
    own = torch.cat((raw[:, :, :n_q + n_k], raw_ref[:, :, n_q + n_k:]), 2)
    outs = list(tg._qk_launch(own, cos, sin, gain, n_q, n_k, rep))
    assert tg._qkv_compare(raw, outs, raw_ref, cos, sin, gain, n_q, n_k, rep) == []
    bad = raw.clone()
    bad[0, 5, 2, 7] += 1.0
    assert any(w.startswith("raw") for w in tg._qkv_compare(bad, outs, raw_ref, cos, sin, gain, n_q, n_k, rep))
    for i, name in enumerate(("q", "k", "v")):
        wrong = [o.clone() for o in outs]
        wrong[i][0, 9, 1, 3] = float("nan") if i == 2 else wrong[i][0, 9, 1, 3] * 1.5 + 1.0
        assert any(w.startswith(name) for w in tg._qkv_compare(raw, wrong, raw_ref, cos, sin, gain, n_q, n_k, rep))
    assert any("shape" in w for w in tg._qkv_compare(raw, [outs[0][:, :, :4]] + outs[1:], raw_ref, cos, sin, gain,
                                                     n_q, n_k, rep))


def test_qkv_gemm_only_where_it_fits(tg, monkeypatch):
    """qkv_gemm_fits: the record's training shapes (48 x 2048 tokens, 8 q + 4 k + 4 v heads of 64, RoPE on 16
    columns) fit; tiles straddling q/k/v, partial tiles, other RoPE widths, int32 overflow and the CPU do not."""
    class Cuda:  # shape and dtype as a CUDA tensor's, without a GPU
        def __init__(self, *shape):
            self.shape, self.dtype, self.is_cuda = torch.Size(shape), torch.bfloat16, True

        def size(self, i=None):
            return self.shape if i is None else self.shape[i]

        def dim(self):
            return len(self.shape)

        def numel(self):
            return self.shape.numel()

    cos = torch.empty(2048, 8)
    assert tg.qkv_gemm_fits(Cuda(48, 2048, 512), Cuda(1024, 512), cos, 8, 4, 64, 2)
    assert tg.qkv_gemm_fits(Cuda(48, 2048, 512), Cuda(1024, 512), cos, 8, 4, 64, 1)
    assert not tg.qkv_gemm_fits(Cuda(48, 2048, 512), Cuda(1088, 512), cos, 9, 4, 64, 1)  # q heads straddle a tile
    assert not tg.qkv_gemm_fits(Cuda(1, 100, 512), Cuda(1024, 512), cos, 8, 4, 64, 2)  # 100 rows: a partial tile
    assert not tg.qkv_gemm_fits(Cuda(48, 2048, 512), Cuda(1024, 512), torch.empty(2048, 6), 8, 4, 64, 2)  # RoPE 12
    assert not tg.qkv_gemm_fits(Cuda(48, 2048, 512), Cuda(1024, 512), torch.empty(2048, 16), 8, 4, 64, 2)  # not 16
    assert not tg.qkv_gemm_fits(Cuda(48, 2048, 512), Cuda(960, 512), cos, 8, 4, 64, 2)  # 3 v heads: a partial tile
    assert not tg.qkv_gemm_fits(Cuda(48, 2048, 512), Cuda(1024, 512), torch.empty(2048, 8, 1), 8, 4, 64, 2)  # 3-D
    assert not tg.qkv_gemm_fits(Cuda(48, 2048, 512), Cuda(1024, 512), torch.empty(1024, 8), 8, 4, 64, 2)  # T > table
    assert not tg.qkv_gemm_fits(Cuda(2048, 2048, 512), Cuda(1024, 512), cos, 8, 4, 64, 2)  # offsets past int32
    assert not tg.qkv_gemm_fits(torch.empty(48, 2048, 512, dtype=torch.bfloat16),
                                torch.empty(1024, 512, dtype=torch.bfloat16), cos, 8, 4, 64, 2)  # CPU


@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="needs a CUDA GPU with Triton compiling (TRITON_INTERPRET=0)")
def test_cuda_qkv_op_matches_cublas_and_the_q_k_op(tg):
    """On a Hopper GPU the Q|K|V op (qkv_gemm + its autograd) must pass its self-test and give, through autograd, the
    outputs and the gradients of x, W and the q gain of cuBLAS's projection + the q/k op (within bf16 rounding), at
    K/V repeated twice and once, over 4,096 tokens."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon kernels need a Hopper GPU")
    pytest.importorskip("triton.experimental.gluon", reason="Triton without Gluon")
    op = tg.qkv_gluon_op()
    assert op is not None, tg.qkv_why()
    g = torch.Generator(device="cuda").manual_seed(2)
    B, T, K, D, n_q, n_k = 2, 2048, 512, 64, 8, 4
    cos, sin = (t.bfloat16() for t in tg.rope_tables(T, 16, 10000.0, torch.device("cuda")))
    for rep in (2, 1):
        x = torch.randn(B, T, K, device="cuda", generator=g).bfloat16().requires_grad_()
        w = (torch.randn(1024, K, device="cuda", generator=g) / K ** 0.5).bfloat16().requires_grad_()
        gain = (torch.rand(n_q, device="cuda", generator=g) + 0.5).requires_grad_()
        outs = op(x, w, cos, sin, gain, n_q, n_k, D, rep)[1:]
        refs = tg._QK_KERNELS["op"](torch.nn.functional.linear(x, w).view(B, T, -1, D), cos, sin, gain, n_q, n_k, rep)
        gys = [torch.randn_like(o) for o in refs]
        got = list(outs) + list(torch.autograd.grad(outs, (x, w, gain), gys))
        want = list(refs) + list(torch.autograd.grad(refs, (x, w, gain), gys))
        for name, a, b in zip(("q", "k", "v", "v_rep", "dx", "dw", "dgain"), got, want):
            assert a.shape == b.shape, name
            if b.numel():
                err = ((a.float() - b.float()).norm() / b.float().norm()).item()
                assert err < 1e-2, (name, rep, err)


def test_gluon_mlp_only_where_it_fits(tg):
    """mlp_gemm_fits: bf16 on CUDA, whole tiles of both kernels (128 x 128), K a multiple of 64 with at least STAGES
    k-steps; anything else (the CPU here, eval shapes, other widths) keeps the torch MLP.  Without a Hopper GPU the
    ops are not built and set_fused_qk leaves every block's fused_mlp off."""
    bm, bn, bk, stages = (max(t[i] for t in tg.MLP_TILES.values()) for i in range(4))
    assert tg.mlp_tiles_fit(98_304, 512, 1536)  # the record's micro-batch
    assert not tg.mlp_tiles_fit(0, 512, 1536)  # nothing to multiply (a TMA descriptor refuses empty tensors)
    assert tg.mlp_tiles_fit(1_398_016, 512, 1536) and not tg.mlp_tiles_fit(1_398_144, 512, 1536)  # int32 offsets
    meta = lambda *shape: torch.empty(*shape, dtype=torch.bfloat16, device="meta")
    assert not tg.mlp_gemm_fits(meta(2, bm, 512), meta(6 * bn, 512))  # meta is not CUDA
    x, w = torch.empty(2, bm, 512, dtype=torch.bfloat16), torch.empty(6 * bn, 512, dtype=torch.bfloat16)
    assert not tg.mlp_gemm_fits(x, w)  # CPU
    for s in (torch.ones(2 * bm - 1), torch.ones(2 * bm, dtype=torch.bfloat16), torch.ones(2, bm)):  # PERF #49
        with pytest.raises(ValueError, match=r"mlp_gemm: row scales s .*: need \(%d,\) float32" % (2 * bm)):
            tg._mlp_gemm_launch(x.view(-1, 512), w, 0.5, s=s)  # checked before any CUDA call
    if not torch.cuda.is_available():
        assert tg.mlp_gluon_op() is None
        model = tg.GPT(tiny_config(tg))
        model.set_fused_qk(True)
        assert not any(block.fused_mlp for block in model.blocks)
        return
    cuda = lambda *shape, dtype=torch.bfloat16: torch.empty(*shape, dtype=dtype, device="cuda")
    assert tg.mlp_gemm_fits(cuda(2, bm, 512), cuda(6 * bn, 512))
    assert not tg.mlp_gemm_fits(cuda(2, bm - 1, 512), cuda(6 * bn, 512))  # rows not whole tiles
    assert not tg.mlp_gemm_fits(cuda(2, bm, 512), cuda(6 * bn - bn // 2, 512))  # columns not whole tiles
    assert not tg.mlp_gemm_fits(cuda(2, bm, bk * (stages - 1)), cuda(6 * bn, bk * (stages - 1)))  # too few k-steps
    assert not tg.mlp_gemm_fits(cuda(2, bm, 512, dtype=torch.float32), cuda(6 * bn, 512, dtype=torch.float32))


def check_gluon_mlp(tg) -> list[float]:
    """The Gluon MLP on a GPU at 16,384 tokens (1,536 tiles of 128 x 128 each way: ~12 per CTA, so the persistent
    loop, the ring's phases and the epilogues' hand-overs all run): the ops' h, u and dh against the torch math
    elementwise (within a few bf16 ulps, so one corrupted row of one tile fails), the same bits on a second launch
    (no race), and _GluonMLP's output and gradients of x, W_up and W_down against the torch MLP's.  Returns the
    relative errors of the latter; raises on the former.  Also used on the minified artifact."""
    import torch.nn.functional as F

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4, 4096, 512, device="cuda", generator=g).bfloat16().requires_grad_()
    w_up = (torch.randn(1536, 512, device="cuda", generator=g) / 512 ** 0.5).bfloat16().requires_grad_()
    w_down = (torch.randn(512, 1536, device="cuda", generator=g) / 1536 ** 0.5).bfloat16().requires_grad_()
    gy = torch.randn(4, 4096, 512, device="cuda", generator=g).bfloat16()
    if tg.mlp_gluon_op() is None or not tg.mlp_gemm_fits(x, w_up):
        raise RuntimeError(f"the Gluon MLP ops are not available on this GPU: {tg._MLP_GLUON.get('why')}")
    x2, g2, wu, wd = x.detach().reshape(-1, 512), gy.reshape(-1, 512), w_up.detach(), w_down.detach()
    up, dgrad = tg._MLP_GLUON["up"], tg._MLP_GLUON["dgrad"]
    why = tg._mlp_gluon_selftest(up, dgrad, torch.device("cuda"))  # the small case, through the ops
    why += "; " + tg._mlp_gluon_compare(up, dgrad, x2, wu, g2, wd)  # the record's width
    h, u = up(x2, wu, 0.5)
    h2, u2 = up(x2, wu, 0.5)
    if not (torch.equal(h, h2) and torch.equal(u, u2) and torch.equal(dgrad(g2, wd, h, 0.5), dgrad(g2, wd, h, 0.5))):
        why += "; a second launch gave other bits"
    if why.strip("; "):
        raise AssertionError(why.strip("; "))
    y = tg._GluonMLP.apply(x, w_up, w_down, 0.5)
    grads = torch.autograd.grad(y, (x, w_up, w_down), gy)
    y_ref = F.linear(F.leaky_relu(F.linear(x, w_up), 0.5).square(), w_down)
    refs = (y_ref,) + torch.autograd.grad(y_ref, (x, w_up, w_down), gy)
    return [((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip((y,) + grads, refs)]


@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="needs a CUDA GPU with Triton compiling (TRITON_INTERPRET=0)")
def test_cuda_gluon_mlp_matches_torch(tg):
    """On a Hopper GPU with Triton's Gluon the ops must be built (a failed self-test fails here, not silently in
    training) and compute the torch MLP's math within bf16 rounding (the GEMM outputs rounded to bf16, then the
    activation in fp32, as inductor computes it)."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon MLP kernels need a Hopper GPU")
    pytest.importorskip("triton.experimental.gluon", reason="Triton without Gluon")
    assert tg.mlp_gluon_op() is not None, tg._MLP_GLUON.get("why")
    errs = check_gluon_mlp(tg)
    assert max(errs) < 1e-2, errs


@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="needs a CUDA GPU with Triton compiling (TRITON_INTERPRET=0)")
def test_cuda_gluon_res_mlp_matches_torch(tg):
    """PERF #49 on a Hopper GPU: _GluonResMLP (res_add's row scales into the scaled Gluon kernels, the backward
    through res_add's PRE form) at 16,384 tokens of the record's width: x2, the MLP output and the gradients of x,
    a, W_up and W_down against torch autograd of x + a and the MLP on rms_norm(x + a) * scale in fp32, within bf16
    rounding; the scaled kernels give the same bits on a second launch."""
    import torch.nn.functional as F

    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon MLP kernels need a Hopper GPU")
    pytest.importorskip("triton.experimental.gluon", reason="Triton without Gluon")
    assert tg.mlp_gluon_op() is not None and tg.qk_norm_rope_op() is not None, tg._MLP_GLUON.get("why")
    assert not tg._MLP_GLUON.get("scaled_why"), tg._MLP_GLUON["scaled_why"]  # the scaled kernels' own self-test
    g = torch.Generator(device="cuda").manual_seed(2)
    x, a, gx2, gy = (torch.randn(4, 4096, 512, device="cuda", generator=g).bfloat16() for _ in range(4))
    w_up = (torch.randn(1536, 512, device="cuda", generator=g) / 512 ** 0.5).bfloat16()
    w_down = (torch.randn(512, 1536, device="cuda", generator=g) / 1536 ** 0.5).bfloat16()
    res = []
    for fused in (True, False):
        leaves = [t.detach().clone().requires_grad_() for t in (x, a, w_up, w_down)]
        if fused:
            x2, y = tg._GluonResMLP.apply(*leaves, 0.7, 0.5)
        else:
            lf = [t.float() for t in leaves]
            x2 = lf[0] + lf[1]
            h = F.linear(F.rms_norm(x2, (512,), eps=tg.RMS_EPS) * 0.7, lf[2])
            y = F.linear(F.leaky_relu(h, 0.5).square(), lf[3])
        loss = (y.float() * gy.float()).sum() + (x2.float() * gx2.float()).sum()
        res.append([x2, y] + list(torch.autograd.grad(loss, leaves)))
    errs = [_rel_err(p.float(), q.double()) for p, q in zip(*res)]
    assert max(errs) < 1e-2, errs
    x2, s = tg._QK_KERNELS["res_add_rstd"](x, a, 0.7)
    xf, sf = x2.view(-1, 512), s.view(-1)
    h1, u1 = tg._MLP_GLUON["up"](xf, w_up, 0.5, sf)
    h2, u2 = tg._MLP_GLUON["up"](xf, w_up, 0.5, sf)
    d1, d2 = (tg._MLP_GLUON["dgrad"](gy.view(-1, 512), w_down, h1, 0.5, sf) for _ in range(2))
    assert torch.equal(h1, h2) and torch.equal(u1, u2) and torch.equal(d1, d2)
    why = tg._mlp_gluon_compare(tg._MLP_GLUON["up"], tg._MLP_GLUON["dgrad"], xf, w_up, gy.view(-1, 512), w_down, sf)
    assert why == "", why


@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="needs a CUDA GPU with Triton compiling (TRITON_INTERPRET=0)")
def test_cuda_gluon_mlp_uneven_grid_matches_torch(tg):
    """The shipped tiles over few CTAs at the record's width: 1,536 tiles each way over 7 CTAs (220 or 219 each),
    so the ring's phases, the cbuf hand-over and the next-h TMA of the epilogue partition wrap around many times,
    unevenly, against the torch math."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon MLP kernels need a Hopper GPU")
    pytest.importorskip("triton.experimental.gluon", reason="Triton without Gluon")
    assert tg.mlp_gluon_op() is not None, tg._MLP_GLUON.get("why")
    g = torch.Generator(device="cuda").manual_seed(1)
    x, gy = (torch.randn(16384, 512, device="cuda", generator=g).bfloat16() for _ in range(2))
    w_up = (torch.randn(1536, 512, device="cuda", generator=g) / 512 ** 0.5).bfloat16()
    w_down = (torch.randn(512, 1536, device="cuda", generator=g) / 1536 ** 0.5).bfloat16()
    why = tg._mlp_gluon_compare(lambda a, w, s: tg._mlp_gemm_launch(a, w, s, max_ctas=7),
                                lambda a, w, h, s: tg._mlp_gemm_launch(a, w, s, h, max_ctas=7), x, w_up, gy, w_down)
    assert why == "", why


def test_gluon_mlp_selftest_accepts_the_math_and_refuses_the_rest(tg):
    """mlp_gluon_op() builds the ops only if they pass _mlp_gluon_selftest on the GPU (another Triton's Gluon may
    not compile the kernels, or compile them wrong).  Its logic on CPU, with torch stand-ins for the two kernels:
    the right math passes (""), without and with the row scales (PERF #49), and it names what is wrong otherwise: a
    wrong activation or derivative, one corrupted row of one tile (a race), row scales ignored, a wrong shape, or a
    kernel that raises."""
    import torch.nn.functional as F

    calls = []
    up, dgrad = _scaled_mlp_stand_ins(tg, calls)

    def one_bad_row(x, w, slope, s=None):
        h, u = up(x, w, slope, s)
        h[130, 128:256] = 0.0  # a row of the second tile row's second tile
        return h, u

    def raises(*args):
        raise RuntimeError("PassManager::run failed")  # what a Gluon API mismatch looks like at compile time

    cpu = torch.device("cpu")
    assert tg._mlp_gluon_selftest(up, dgrad, cpu) == "" and tg._mlp_gluon_selftest(up, dgrad, cpu, scaled=True) == ""
    assert calls == [("up", False), ("dgrad", False), ("up", True), ("dgrad", True)]
    relu = lambda x, w, slope, s=None: (lambda h: (h, F.relu(h).square()))(up(x, w, slope, s)[0])
    assert tg._mlp_gluon_selftest(relu, dgrad, cpu).startswith("u off by")
    assert tg._mlp_gluon_selftest(up, lambda g, w, h, slope, s=None: dgrad(g, w, h, 1.0, s), cpu).startswith(
        "dh off by")
    assert tg._mlp_gluon_selftest(one_bad_row, dgrad, cpu).startswith("h off by")
    unscaled_up = lambda x, w, slope, s=None: up(x, w, slope)  # row scales ignored: only the scaled test fails
    assert tg._mlp_gluon_selftest(unscaled_up, dgrad, cpu) == ""
    assert tg._mlp_gluon_selftest(unscaled_up, dgrad, cpu, scaled=True).startswith("h (scaled) off by")
    assert tg._mlp_gluon_selftest(up, lambda g, w, h, slope, s=None: dgrad(g, w, h, slope), cpu,
                                  scaled=True).startswith("dh (scaled) off by")
    assert "dh has shape" in tg._mlp_gluon_selftest(up, lambda g, w, h, slope, s=None: dgrad(g, w, h, slope, s)[:, :-1],
                                                    cpu)
    assert tg._mlp_gluon_selftest(raises, dgrad, cpu) == "RuntimeError: PassManager::run failed"
    assert tg._mlp_gluon_selftest(up, raises, cpu).startswith("RuntimeError")


def test_log_header_says_which_mlp_runs(tg, monkeypatch):
    """The mlp_act field: gluon only where the ops are built and the training shapes fit the tiles (a micro-batch of
    one rank, the MLP width), torch otherwise; and a self-test failure is logged with its reason.  mlp_norm (PERF
    #49): gemm where the Gluon MLP and the residual-stream ops run and the scaled kernels passed their self-test,
    else where the residual stream puts the RMSNorm (resid's value), with the scaled kernels' failure logged."""
    lines = []
    monkeypatch.setattr(tg, "log0", lambda msg="", console=True: lines.append(msg))
    monkeypatch.setattr(tg, "list_shards", lambda pattern, what="train": ["shard"])
    field = lambda key: next(f for line in lines if line.startswith("qk_norm_rope:") for f in line.split()
                             if f.startswith(key + ":"))
    mlp_line = lambda: field("mlp_act")
    h, d, cpu = tg.Hyperparameters(), tg.DistInfo(), torch.device("cpu")
    tg.log_header(h, d, cpu)
    assert mlp_line() == "mlp_act:torch" and field("resid") == "resid:torch" and field("mlp_norm") == "mlp_norm:torch"
    monkeypatch.setattr(tg, "FUSED_QK_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(tg, "mlp_gluon_op", lambda: object())
    monkeypatch.setattr(tg, "qkv_gluon_op", lambda *shape: None)  # the Q|K|V kernel not built (PERF #47)
    monkeypatch.setitem(tg._MLP_GLUON, ("qkv_why", 512, 8, 4, 32), "q (rep 2) off by 1.0e+00")  # another shape's
    lines.clear()
    tg.log_header(h, d, cpu)  # the record config: 98,304-token micro-batches, 512 -> 1536
    assert mlp_line() == "mlp_act:gluon" and field("resid") == "resid:triton"  # the residual-stream ops (PERF #48)
    assert field("mlp_norm") == "mlp_norm:gemm"
    monkeypatch.setitem(tg._MLP_GLUON, "scaled_why", "h (scaled) off by 1.0e+00")
    lines.clear()
    tg.log_header(h, d, cpu)
    assert mlp_line() == "mlp_act:gluon" and field("mlp_norm") == "mlp_norm:triton"
    assert "mlp_norm:triton because the Gluon MLP kernels with row scales failed their self-test: h (scaled) off by " \
           "1.0e+00" in lines
    monkeypatch.setattr(tg, "RES_MLP_FUSED", False)  # gpu_bench's normref: rows written, not for the self-test
    lines.clear()
    tg.log_header(h, d, cpu)
    assert field("mlp_norm") == "mlp_norm:triton" and not any(x.startswith("mlp_norm:triton because") for x in lines)
    monkeypatch.setitem(tg._MLP_GLUON, "scaled_why", "")
    monkeypatch.setattr(tg, "RES_MLP_FUSED", True)
    assert field("qkv_proj") == "qkv_proj:torch" and not any(x.startswith("qkv_proj:torch because") for x in lines)
    shapes = []
    monkeypatch.setattr(tg, "qkv_gluon_op", lambda *shape: shapes.append(shape) or object())
    lines.clear()
    tg.log_header(h, d, cpu)
    assert field("qkv_proj") == "qkv_proj:gluon" and shapes == [(512, 8, 4, 64)]  # self-tested at the run's shape
    lines.clear()
    tg.log_header(dataclasses.replace(h, train_batch_tokens=786_432 - 8 * 64), d, cpu)  # rows not whole tiles
    assert field("qkv_proj") == "qkv_proj:torch"
    monkeypatch.setattr(tg, "qkv_gluon_op", lambda *shape: None)
    monkeypatch.setitem(tg._MLP_GLUON, ("qkv_why", 512, 8, 4, 64), "k (rep 1) off by 2.0e-01")
    lines.clear()
    tg.log_header(h, d, cpu)
    assert field("qkv_proj") == "qkv_proj:torch"
    assert "qkv_proj:torch because the Gluon Q|K|V kernel failed its self-test: k (rep 1) off by 2.0e-01" in lines
    monkeypatch.setattr(tg, "qkv_gluon_op", lambda *shape: object())
    monkeypatch.setattr(tg, "QKV_GLUON", False)  # gpu_bench's qkvref
    monkeypatch.setattr(tg, "RES_FUSED", False)  # and resref
    lines.clear()
    tg.log_header(h, d, cpu)
    assert field("qkv_proj") == "qkv_proj:torch" and field("resid") == "resid:torch"
    assert field("mlp_norm") == "mlp_norm:torch"
    lines.clear()
    tg.log_header(dataclasses.replace(h, mlp_mult=3.1), d, cpu)  # 1587 columns: not whole 128-column tiles
    assert mlp_line() == "mlp_act:torch"
    monkeypatch.setattr(tg, "mlp_gluon_op", lambda: None)
    monkeypatch.setitem(tg._MLP_GLUON, "why", "dh off by 1.0e+00")
    lines.clear()
    tg.log_header(h, d, cpu)
    assert mlp_line() == "mlp_act:torch"
    assert "mlp_act:torch because the Gluon MLP kernels failed their self-test: dh off by 1.0e+00" in lines
