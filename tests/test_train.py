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
