"""Soft-round QAT (SPEC §6, D2): the fake quantiser's formula and gradients, exact identity when off, every int6
matrix fake-quantised when on, and a switch that a compiled graph really sees (the seed's QAT never ran because
torch.compile baked in a class attribute)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_config, randomize_params




def _batch(h, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, h.vocab_size, (2, h.train_seq_len + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def _hand_fake_quant(w, alpha, clip):
    """Element-by-element transcription of SPEC §6 in Python floats."""
    out = []
    for row in w.tolist():
        s = max(max(abs(x) for x in row) / clip, 1.0 / clip)
        q = []
        for x in row:
            z = x / s
            fl = math.floor(z)
            soft = fl + 1.0 / (1.0 + math.exp(-alpha * (z - fl - 0.5)))
            q.append(min(max(soft, -clip), clip) * s)
        out.append(q)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("alpha", [1.0, 4.0, 16.0])
def test_fake_quant_soft_equals_formula(tg, alpha):
    """Guards the soft-round formula: per-row scale max(rowmax/clip, 1/clip) (the floor matters for small rows),
    floor + sigmoid(alpha*(frac-0.5)), clamp to [-clip, clip], times the scale."""
    g = torch.Generator().manual_seed(0)
    w = torch.cat((torch.randn(3, 7, generator=g, dtype=torch.float64) * 2, torch.full((1, 7), 0.01, dtype=torch.float64)))
    torch.testing.assert_close(tg.fake_quant_soft(w, alpha, 5), _hand_fake_quant(w, alpha, 5))


def test_fake_quant_soft_sharp_limit_is_rounding(tg):
    """Guards the intent: at large alpha the soft quantiser is round-to-nearest on the int6 grid."""
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s = (w.abs().amax(-1, keepdim=True) / 31).clamp_min(1 / 31)
    z = w / s
    away = ((z - z.floor() - 0.5).abs() > 0.05)
    hard = torch.round(z).clamp(-31, 31) * s
    got = tg.fake_quant_soft(w, 1e4, 31)
    torch.testing.assert_close(got[away], hard[away])


def test_fake_quant_soft_gradients_flow(tg):
    """Guards 'no STE': gradients flow through the sigmoid and the row scale, and equal the analytic derivative
    (gradcheck); also for a 3-D bank with a tensor alpha."""
    # Fixed draw: the row-max element sits at z = +-clip, where fp rounding of w/s can flip floor(z); a seeded
    # draw keeps finite differences away from that edge.
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(3, 6, generator=g, dtype=torch.float64) * 2).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: tg.fake_quant_soft(x, 3.0, 7), (w,))
    bank = torch.randn(2, 4, 5, requires_grad=True)
    tg.fake_quant_soft(bank, torch.tensor(2.0), 31).pow(2).sum().backward()
    assert torch.isfinite(bank.grad).all() and bank.grad.abs().sum() > 0


def test_qat_off_is_bitwise_identity(tg):
    """Guards D2 'off is exactly the identity': a training forward/backward with set_qat(0) gives bitwise the loss
    and gradients of a forward that never touches the QAT path (eval mode skips it)."""
    h = tiny_config(tg)
    torch.manual_seed(0)
    m = randomize_params(tg.GPT(h))
    x, y = _batch(h)
    m.set_qat(0.0)
    m.train()
    loss_a = m(x, y)
    loss_a.backward()
    grads_a = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad(set_to_none=True)
    m.eval()
    loss_b = m(x, y)
    loss_b.backward()
    assert torch.equal(loss_a, loss_b)
    for n, p in m.named_parameters():
        assert torch.equal(grads_a[n], p.grad), n


def test_qat_on_fake_quantises_every_int6_matrix(tg, monkeypatch):
    """Guards D2's scope: with QAT on, a training forward equals a QAT-off forward whose four banks and bigram.proj
    (stored as int6 once it exceeds the passthrough size) were replaced by fake_quant_soft of themselves (per row of
    every bank matrix); ve_shared.proj (fp16 passthrough) and the embeddings are left alone."""
    monkeypatch.setattr(tg, "SMALL_TENSOR_NUMEL", 0)  # make the tiny bigram.proj an int6 matrix
    h = tiny_config(tg)
    torch.manual_seed(0)
    m = randomize_params(tg.GPT(h)).train()
    assert m.qat_bigram
    x, y = _batch(h)
    alpha = 3.0
    m.set_qat(alpha)
    got = m(x, y)
    ref = randomize_params(tg.GPT(h)).train()
    ref.load_state_dict(m.state_dict())
    with torch.no_grad():
        for p in (ref.qo_bank, ref.kv_bank, ref.mlp_up_bank, ref.mlp_down_bank, ref.bigram.proj.weight):
            p.copy_(tg.fake_quant_soft(p, alpha, h.quant_clip_range))
    ref.set_qat(0.0)
    torch.testing.assert_close(got, ref(x, y), rtol=1e-6, atol=1e-6)
    m.set_qat(0.0)
    assert (m(x, y) - got).abs() > 1e-6


def test_qat_does_not_touch_eval_forwards(tg):
    """Guards evaluation: QAT is a training-forward transform (SPEC §6), so eval-mode logits ignore qat_alpha."""
    h = tiny_config(tg)
    torch.manual_seed(0)
    m = randomize_params(tg.GPT(h)).eval()
    x, _ = _batch(h)
    off = m.forward_logits(x)
    m.set_qat(8.0)
    assert torch.equal(m.forward_logits(x), off)


def test_qat_alpha_is_a_buffer_outside_the_state_dict(tg):
    """Guards the switch's plumbing: set_qat fills a float32 buffer in place (what a compiled graph reads), that
    moves with the model, and stays out of the state dict the quantiser and EMA iterate over."""
    h = tiny_config(tg)
    m = tg.GPT(h)
    buf = m.qat_alpha
    m.set_qat(5.5)
    assert m.qat_alpha is buf and buf.dtype == torch.float32 and buf.item() == 5.5
    assert "qat_alpha" in dict(m.named_buffers()) and "qat_alpha" not in m.state_dict()


def test_compiled_model_sees_qat_switch_with_two_graphs(tg):
    """Guards the seed's dead-QAT bug (SPEC §6, D2): a model compiled with fullgraph=True must change its output
    when set_qat turns QAT on, and follow alpha while on (the buffer), and return to the QAT-off output when it
    turns off.  QAT off and on are two graphs (PERF #25: off, the fake-quantiser is not in the graph at all), so
    the switch compiles exactly once more, and switching back and forth never compiles a third."""
    from torch._dynamo.testing import CompileCounter

    h = tiny_config(tg)
    torch.manual_seed(0)
    m = randomize_params(tg.GPT(h)).train()
    x, y = _batch(h)
    torch._dynamo.reset()
    cnt = CompileCounter()
    cm = torch.compile(m, backend=cnt, fullgraph=True, dynamic=False)
    m.set_qat(0.0)
    off = cm(x, y).detach()
    assert cnt.frame_count == 1
    m.set_qat(1.0)
    on1 = cm(x, y).detach()
    assert cnt.frame_count == 2
    m.set_qat(16.0)
    on16 = cm(x, y).detach()
    m.set_qat(0.0)
    off_again = cm(x, y).detach()
    m.set_qat(4.0)
    cm(x, y)
    assert cnt.frame_count == 2
    assert (on1 - off).abs() > 1e-5 and (on16 - on1).abs() > 1e-6
    assert torch.equal(off, off_again)
    m.set_qat(0.0)
    torch.testing.assert_close(off, m(x, y).detach(), rtol=1e-6, atol=1e-6)
    m.set_qat(16.0)
    torch.testing.assert_close(on16, m(x, y).detach(), rtol=1e-6, atol=1e-6)


def test_warmup_compiles_the_qat_graph_and_leaves_qat_off(tg, monkeypatch):
    """Guards PERF #25's other half: the warm-up runs two extra steps with QAT on (so the QAT graph neither compiles
    nor, with CUDA graphs at one micro-batch a step, records inside the timed loop when late QAT starts), after the
    WARMUP_STEPS logged ones, and leaves QAT off and the initial weights restored; with QAT_ENABLED=0 there are no
    such steps."""
    for enabled in (True, False):
        h = tiny_config(tg, qat_enabled=enabled, warmup_steps=2)
        torch.manual_seed(0)
        m = tg.GPT(h).train()
        before = {k: v.clone() for k, v in m.state_dict().items()}
        seen = []

        def step(model, opt, loader, h_, d, device, i, scale):
            seen.append((i, bool(model.qat_on), model.qat_alpha.item()))
            for p in model.parameters():
                p.data.add_(1.0)

        monkeypatch.setattr(tg, "run_train_step", step)
        monkeypatch.setattr(tg, "build_optimizers", lambda *a: None)
        monkeypatch.setattr(tg, "TrainLoader", lambda *a: None)
        monkeypatch.setattr(tg, "list_shards", lambda *a: [])
        tg.warmup_compile(h, tg.DistInfo(), torch.device("cpu"), m, m)
        assert seen == [(0, False, 0.0), (1, False, 0.0)] + ([(2, True, 1.0), (3, True, 1.0)] if enabled else [])
        assert not m.qat_on and m.qat_alpha.item() == 0.0
        assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


def test_qat_disabled_keeps_ops_out_and_refuses_alpha(tg):
    """Guards QAT_ENABLED=0 (D2's switch back to the seed's math): training forwards equal the QAT-capable model's
    off forward, and turning QAT on is refused loudly instead of silently doing nothing."""
    h = tiny_config(tg)
    torch.manual_seed(0)
    on = randomize_params(tg.GPT(h)).train()
    off = tg.GPT(tiny_config(tg, qat_enabled=False)).train()
    off.load_state_dict(on.state_dict())
    x, y = _batch(h)
    assert torch.equal(on(x, y), off(x, y))
    off.set_qat(0.0)
    with pytest.raises(RuntimeError, match="QAT_ENABLED=0"):
        off.set_qat(2.0)
