"""Pure pieces of the training section: the QAT ramp, the EMA decay warm-up and the EMA update itself."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn


def test_qat_alpha_ramps_from_1_to_16_over_500_steps(tg):
    """Guards the soft-round ramp of SPEC §6 (alpha 1 -> 16 over QAT_RAMP_STEPS, then flat)."""
    assert tg.qat_alpha(100, 100) == 1.0
    assert tg.qat_alpha(350, 100) == pytest.approx(8.5)
    assert tg.qat_alpha(600, 100) == 16.0
    assert tg.qat_alpha(5000, 100) == 16.0


def test_ema_decay_warms_up_then_is_the_seed_constant(tg):
    """Guards the EMA warm-up: early steps must not keep the random init (flat 0.997 keeps 0.997^150 = 64% of it
    after 150 steps), and late steps must use exactly the seed's 0.997."""
    assert tg.ema_decay(1) == pytest.approx(2 / 11)
    assert tg.ema_decay(100) == pytest.approx(101 / 110)
    assert tg.ema_decay(3000) == tg.EMA_DECAY == 0.997
    init_weight = math.prod(tg.ema_decay(s) for s in range(1, 151))
    assert init_weight < 1e-3


def test_ema_update_is_a_lerp_and_keeps_the_previous_average(tg):
    """Guards EMA.update (lerp towards the weights with the step's decay, bf16 params averaged in fp32) and the
    non-finite fallback: a NaN step must not reach the saved average."""
    m = nn.Linear(3, 2)
    m.weight.data = m.weight.data.to(torch.bfloat16)
    ema = tg.EMA(m)
    start = [t.clone() for t in ema.shadow]
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
    ema.update(5)
    d = tg.ema_decay(5)
    for s0, s1, p in zip(start, ema.shadow, m.parameters()):
        assert s1.dtype == torch.float32
        torch.testing.assert_close(s1, d * s0 + (1 - d) * p.float())
    with torch.no_grad():
        m.bias.fill_(float("nan"))
    ema.update(6)
    saved = ema.last_finite_state()
    assert all(torch.isfinite(t).all() for t in saved.values())
    torch.testing.assert_close(saved["bias"], ema.previous[1])
    ema.copy_to(m)
    assert m.weight.dtype == torch.bfloat16


def _agree_worker(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist
    from conftest import SOURCE, load_module

    tg = load_module(SOURCE, "train_gpt_agree")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        loss = torch.tensor(float("nan") if rank == 1 else 2.5)
        ms, bad = tg._agree_step(100.0 + 7.0 * rank, loss, torch.device("cpu"))
        torch.save((ms, bad), f"{out}/rank{rank}.pt")
        dist.barrier()  # both ranks done before gloo tears down
    finally:
        dist.destroy_process_group()


def test_ranks_agree_on_clock_and_nonfinite_loss(tmp_path):
    """Guards rank divergence: each rank's own clock would give each a different LR scale and QAT start step, and a
    NaN on one rank must stop every rank.  Both must be the all-reduced MAX."""
    import torch.multiprocessing as mp

    mp.spawn(_agree_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    for r in range(2):
        assert torch.load(tmp_path / f"rank{r}.pt") == (107.0, True)


def test_short_window_uses_the_training_length_rope_base(tg):
    """Guards GPTQ_CALIB=selfgen: its 256-token sampling windows must see the RoPE base of the 2048-token training
    length (~22,082), not 10,000, or the sampled text is off-distribution.  With rope_ntk_len set, a causal model's
    output on a prefix equals the prefix of its full-length output."""
    from conftest import randomize_params, tiny_config

    h = tiny_config(tg, vocab_size=64, train_seq_len=1100)
    torch.manual_seed(0)
    model = randomize_params(tg.GPT(h).eval())  # W_O / W_down start at zero: attention (and RoPE) would be inert
    x = torch.randint(0, 64, (1, 1100))
    with torch.no_grad():
        full = model.forward_hidden(x)
        short = model.forward_hidden(x[:, :300])
        model.rope_ntk_len = 1100
        short_ntk = model.forward_hidden(x[:, :300])
    model.rope_ntk_len = 0
    torch.testing.assert_close(short_ntk, full[:, :300], rtol=1e-4, atol=1e-4)
    assert (short - full[:, :300]).abs().max() > 1e-2


def test_training_compiles_without_mix_order_reductions_and_with_cuda_graphs(tg):
    """PERF #23 and #27: the training model's inductor options turn mix-order reductions off and CUDA graphs on.
    torch.compile checks option names and types when it is called (no compile happens here), so a knob renamed or
    retyped by torch fails."""
    opts = tg.train_compile_options()
    assert opts == {"triton.mix_order_reduction": False, "triton.cudagraphs": True}
    torch.compile(lambda x: x, dynamic=False, fullgraph=True, options=opts)
    with torch._inductor.config.patch(opts):
        assert torch._inductor.config.triton.mix_order_reduction is False
        assert torch._inductor.config.triton.cudagraphs is True
    with pytest.raises(RuntimeError, match="triton.mix_order_reductions"):
        torch.compile(lambda x: x, options={"triton.mix_order_reductions": False})
    fn = lambda x: x  # noqa: E731
    assert tg.maybe_compile(fn, torch.device("cpu"), opts) is fn  # eager on CPU, with or without options


def test_maybe_compile_hands_its_options_to_torch_compile(tg, monkeypatch):
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(kw) or fn)
    fn = lambda x: x  # noqa: E731
    tg.maybe_compile(fn, torch.device("cuda"), tg.train_compile_options())
    tg.maybe_compile(fn, torch.device("cuda"))
    assert seen == [dict(dynamic=False, fullgraph=True, options={"triton.mix_order_reduction": False,
                                                                 "triton.cudagraphs": True}),
                    dict(dynamic=False, fullgraph=True, options=None)]
