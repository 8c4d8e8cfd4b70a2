"""LR schedule (SPEC §4: wallclock warmdown; root-baseline step warmdown without a cap) and Muon momentum warm-up."""

from __future__ import annotations

import pytest

from conftest import tiny_config

BUDGET = 591_000.0  # 600 s cap minus the 9 s GPTQ reserve


@pytest.mark.parametrize("step, elapsed_ms, expect", [
    (0, 0.0, 1.0),               # first step: no step time measured yet, full LR (no warmup)
    (1000, 100_000.0, 1.0),      # 100 ms/step -> warmdown 400 s; 491 s remain > 400 s
    (1910, 191_000.0, 1.0),      # exactly at the warmdown start: remaining == warmdown_ms
    (3910, 391_000.0, 0.5),      # 200 s of 400 s remain
    (5000, 500_000.0, 91 / 400), # 91 s remain
    (5910, 591_000.0, 0.0),      # budget spent
    (6000, 600_000.0, 0.0),      # past the budget: never negative
])
def test_lr_scale_wallclock(tg, step, elapsed_ms, expect):
    """Guards the wallclock warmdown: decay over the last WARMDOWN_ITERS *estimated* steps, linear in time, to 0 at
    the budget (a step-count schedule would never reach 0 before the cap)."""
    assert tg.lr_scale(step, elapsed_ms, BUDGET, 4000, 20000) == pytest.approx(expect, abs=1e-12)


def test_lr_scale_wallclock_tracks_step_time(tg):
    """Guards using a fixed step time: slower steps start the warmdown earlier (warmdown_ms = iters * mean step)."""
    assert tg.lr_scale(2000, 200_000.0, BUDGET, 4000, 20000) == pytest.approx(391 / 400)  # 100 ms/step
    assert tg.lr_scale(2000, 100_000.0, BUDGET, 4000, 20000) == 1.0  # 50 ms/step: warmdown only 200 s


@pytest.mark.parametrize("step, expect", [(0, 1.0), (79, 1.0), (80, 1.0), (90, 0.5), (99, 0.05), (100, 0.0), (120, 0.0)])
def test_lr_scale_without_cap_is_step_based(tg, step, expect):
    """Guards MAX_WALLCLOCK_SECONDS=0: the root baseline's schedule, linear from ITERATIONS-WARMDOWN_ITERS to 0."""
    assert tg.lr_scale(step, 123_456.0, 0.0, 20, 100) == pytest.approx(expect)


def test_lr_scale_zero_warmdown(tg):
    """Guards a division by zero with WARMDOWN_ITERS=0: full LR until the end of the budget / iterations."""
    assert tg.lr_scale(100, 10_000.0, BUDGET, 0, 20000) == 1.0
    assert tg.lr_scale(99, 0.0, 0.0, 0, 100) == 1.0


def test_muon_momentum_warmup(tg):
    """Guards the momentum warm-up endpoints and linearity: 0.92 at step 0, 0.99 from MUON_MOMENTUM_WARMUP_STEPS on."""
    h = tiny_config(tg, muon_momentum_warmup_start=0.92, muon_momentum=0.99, muon_momentum_warmup_steps=1500)
    assert tg.muon_momentum(0, h) == pytest.approx(0.92)
    assert tg.muon_momentum(750, h) == pytest.approx(0.955)
    assert tg.muon_momentum(1500, h) == pytest.approx(0.99)
    assert tg.muon_momentum(10_000, h) == pytest.approx(0.99)
    assert tg.muon_momentum(3, tiny_config(tg, muon_momentum_warmup_steps=0)) == pytest.approx(h.muon_momentum)
