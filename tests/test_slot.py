"""SLOT (SPEC §9.3, D5): the causal mode never lets a scored target shape the delta that scores it (the flip test),
the standard mode reproduces the seed's leak, and SLOT stays cheap (one transformer forward per batch)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from test_eval import CPU, ToyLM, eval_config, random_val_data, sliding_nll

SLOT = dict(slot_enabled=True, slot_lr=0.05, slot_steps=4)


def _flip(tg, vd, index):
    """A copy of vd whose token at `index` is changed (the LUTs are shared)."""
    tokens = vd.tokens.clone()
    tokens[index] = (tokens[index] + 7) % 64
    fields = {k: getattr(vd, k) for k in ("base_bytes", "has_leading_space", "is_boundary")}
    return type(vd)(tokens=tokens, **fields)


@pytest.mark.parametrize("stride", [4, 5])
def test_flip_one_target_causal_is_legal_standard_leaks(tg, stride):
    """THE flip test (D5; PR #1240's check of the seed).  Change the val token tokens[p+1], i.e. the target scored
    at position p.  A score at q < p depends only on tokens[0..q+1], so it may not change.  Causal SLOT: every score
    at q < p is bit-identical and the score at p changes.  Standard SLOT: scores at q < p in the same batch change,
    because the shared delta was fitted on a loss containing target p (the leak this mode exists to document)."""
    n = 90
    vd = random_val_data(tg, n, seed=11)
    model = ToyLM(seed=11)
    h = eval_config(tg, eval_stride=stride, **SLOT)
    starts, sf = tg.plan_windows(n, h.eval_seq_len, stride, 0, 1)
    p = int(starts[-2] + sf[-2])  # first target scored by the second-to-last window: all windows share batch 0
    flipped = _flip(tg, vd, p + 1)
    for mode in ("causal", "standard"):
        base, _ = sliding_nll(tg, h, model, vd, slot_mode=mode)
        alt, _ = sliding_nll(tg, h, model, flipped, slot_mode=mode)
        assert alt[p] != base[p]
        earlier = (alt[:p] - base[:p]).abs()
        if mode == "causal":
            assert torch.equal(alt[:p], base[:p]), f"causal SLOT leaked: max change {earlier.max():.3g} before {p}"
        else:
            assert earlier.max() > 1e-4 and (earlier > 0).sum() > p // 2, "standard SLOT should show the leak"


def test_slot_with_zero_steps_equals_no_slot(tg):
    """Guards the SLOT plumbing (fp32 cast, delta broadcast, masking): 0 steps leaves delta at 0, so both modes give
    exactly the no-SLOT scores."""
    vd = random_val_data(tg, 77, seed=12)
    model = ToyLM(seed=12)
    off, off_sums = sliding_nll(tg, eval_config(tg), model, vd)
    for mode in ("causal", "standard"):
        on, on_sums = sliding_nll(tg, eval_config(tg, slot_enabled=True, slot_steps=0, slot_mode=mode), model, vd)
        assert torch.equal(on, off) and torch.equal(on_sums, off_sums)


def test_causal_slot_fits_and_leaves_first_window_alone(tg):
    """Guards that causal SLOT really adapts (scores after the first window change and, on a stream dominated by one
    token, the loss falls), while the first window, which has no already-scored context, keeps delta = 0.
    (Windows of 64: with very short windows the context positions are too few and too unlike the scored ones.)"""
    n, T = 400, 64
    g = torch.Generator().manual_seed(13)
    vd = random_val_data(tg, n, seed=13)
    tokens = torch.where(torch.rand(n + 1, generator=g) < 0.6, 5, vd.tokens)  # a skewed stream SLOT can exploit
    vd = type(vd)(tokens=tokens, base_bytes=vd.base_bytes, has_leading_space=vd.has_leading_space,
                  is_boundary=vd.is_boundary)
    model = ToyLM(seed=13)
    geometry = dict(eval_seq_len=T, eval_stride=16)
    off, off_sums = sliding_nll(tg, eval_config(tg, **geometry), model, vd)
    on, on_sums = sliding_nll(tg, eval_config(tg, **geometry, **SLOT, slot_mode="causal"), model, vd)
    assert torch.equal(on[:T], off[:T])
    assert not torch.allclose(on[T:], off[T:])
    assert on_sums[0] < 0.995 * off_sums[0]
    assert torch.equal(on_sums[1:], off_sums[1:])


def test_causal_slot_independent_of_batch_grouping_and_ranks(tg, monkeypatch):
    """Guards the per-window delta: each window's fit is exactly its own, so the causal scores do not depend on how
    windows are grouped into batches or split over ranks; the standard mode's do (the seed's known dependence)."""
    vd = random_val_data(tg, 100, seed=14)
    model = ToyLM(seed=14)
    runs = {}
    for mode in ("causal", "standard"):
        h = eval_config(tg, **SLOT, slot_mode=mode)
        monkeypatch.setattr(tg, "SLIDING_BATCH_WINDOWS", 32)
        ref, _ = sliding_nll(tg, h, model, vd)
        monkeypatch.setattr(tg, "SLIDING_BATCH_WINDOWS", 3)
        regrouped, _ = sliding_nll(tg, h, model, vd, world=2)
        runs[mode] = (ref, regrouped)
    torch.testing.assert_close(runs["causal"][1], runs["causal"][0], rtol=1e-5, atol=1e-6)
    assert (runs["standard"][1] - runs["standard"][0]).abs().max() > 1e-4


def _reference_standard_slot(model, hidden, y, lr, steps):
    """The seed's SLOT written out plainly (SPEC §9.3): shared [1,1,d] delta, AdamW(betas default, eps 1e-5,
    wd 1e-8), mean CE over positions 0..T-2 of every window."""
    delta = torch.zeros(1, 1, hidden.size(-1), requires_grad=True)
    opt = torch.optim.AdamW([delta], lr=lr, eps=1e-5, weight_decay=1e-8)
    for _ in range(steps):
        opt.zero_grad()
        logits = model.compute_logits(hidden + delta)
        F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), y[:, :-1].reshape(-1)).backward()
        opt.step()
    return delta.detach()


def _reference_causal_slot(model, hidden, y, s, lr, steps):
    """One window fitted alone on its context positions [0, s)."""
    delta = torch.zeros(1, 1, hidden.size(-1), requires_grad=True)
    opt = torch.optim.AdamW([delta], lr=lr, eps=1e-5, weight_decay=1e-8)
    for _ in range(steps):
        opt.zero_grad()
        logits = model.compute_logits(hidden[:, :s] + delta)
        F.cross_entropy(logits.reshape(-1, logits.size(-1)), y[:, :s].reshape(-1)).backward()
        opt.step()
    return delta.detach()


def test_fit_slot_delta_matches_reference_adamw(tg):
    """Guards the SLOT optimiser against a plain reference: the standard delta equals the seed's recipe, and each
    causal per-window delta equals that window fitted alone (zero for a window without context)."""
    g = torch.Generator().manual_seed(15)
    model = ToyLM(seed=15)
    hidden = torch.randn(3, 12, 16, generator=g)
    y = torch.randint(0, 64, (3, 12), generator=g)
    s = torch.tensor([0, 5, 12])
    with torch.no_grad():
        standard = tg._fit_slot_delta(model, hidden, y, None, 3, 0.05, 5)
        got = tg._fit_slot_delta(model, hidden, y, torch.arange(12) < s[:, None], 3, 0.05, 5)
    assert all(p.grad is None for p in model.parameters()), "SLOT must not write gradients into the model"
    torch.testing.assert_close(standard, _reference_standard_slot(model, hidden, y, 0.05, 5), rtol=1e-5, atol=1e-7)
    assert torch.equal(got[0], torch.zeros(1, 16))
    for k in (1, 2):
        ref = _reference_causal_slot(model, hidden[k : k + 1], y[k : k + 1], int(s[k]), 0.05, 5)
        torch.testing.assert_close(got[k : k + 1], ref, rtol=1e-5, atol=1e-7)


def test_slot_runs_the_transformer_once_per_batch(tg, monkeypatch):
    """Guards SLOT's cost (SPEC §9.3): hidden states are computed once per batch and reused across the steps; only
    compute_logits reruns.  Counts hidden_fn calls against the number of batches."""
    monkeypatch.setattr(tg, "SLIDING_BATCH_WINDOWS", 4)
    vd = random_val_data(tg, 70, seed=16)
    model = ToyLM(seed=16)
    calls = []

    def hidden_fn(x):
        calls.append(tuple(x.shape))
        return model.forward_hidden(x)

    h = eval_config(tg, **SLOT)
    n_windows = tg.plan_windows(70, h.eval_seq_len, h.eval_stride, 0, 1)[0].numel()
    for mode in ("causal", "standard"):
        calls.clear()
        tg.eval_val_sliding(h, model, tg.DistInfo(), CPU, vd, hidden_fn=hidden_fn, slot_mode=mode)
        assert len(calls) == -(-n_windows // 4)
        assert set(calls) == {(4, h.eval_seq_len)}, "the last batch is padded to a fixed shape (no recompile)"


def test_bad_slot_mode_is_rejected(tg):
    """Guards a typo in SLOT_MODE silently running some other mode."""
    vd = random_val_data(tg, 40)
    with pytest.raises(ValueError, match="SLOT_MODE"):
        tg.eval_val_sliding(eval_config(tg, **SLOT), ToyLM(), tg.DistInfo(), CPU, vd, slot_mode="causel")


def test_real_gpt_flip_test(tg):
    """The flip test on the real tiny GPT (section 4) with a compiled (eager backend) hidden_fn: causal SLOT keeps
    every earlier score bit-identical, standard SLOT changes them."""
    if not hasattr(tg, "GPT"):
        pytest.skip("section 4 (GPT) not merged yet")
    from conftest import tiny_config

    h = tiny_config(tg, **SLOT, eval_stride=8)
    torch.manual_seed(0)
    model = tg.GPT(h).eval()
    vd = random_val_data(tg, 100, vocab=h.vocab_size, seed=17)
    starts, sf = tg.plan_windows(100, h.eval_seq_len, h.eval_stride, 0, 1)
    p = int(starts[-1] + sf[-1])
    fn = torch.compile(model.forward_hidden, backend="eager")
    for mode in ("causal", "standard"):
        base, _ = sliding_nll(tg, h, model, vd, hidden_fn=fn, slot_mode=mode)
        alt, _ = sliding_nll(tg, h, model, _flip(tg, vd, p + 1), hidden_fn=fn, slot_mode=mode)
        assert torch.isfinite(base).all() and alt[p] != base[p]
        assert torch.equal(alt[:p], base[:p]) == (mode == "causal"), mode


def test_compiled_token_nll_rebinding_gives_same_scores(tg, monkeypatch):
    """Guards the compile hook: main() may rebind the module global token_nll to a torch.compile'd version (fused
    softcap + CE on the SLOT hot path); SLOT's fit and the scoring must pick it up and give the same results, with
    gradients flowing through the compiled graph into delta."""
    vd = random_val_data(tg, 60, seed=18)
    model = ToyLM(seed=18)
    h = eval_config(tg, **SLOT)
    calls = []
    compiled = torch.compile(tg.token_nll, backend="eager", dynamic=False)

    def counted(*args):
        calls.append(1)
        return compiled(*args)

    for mode in ("causal", "standard"):
        ref, ref_sums = sliding_nll(tg, h, model, vd, slot_mode=mode)
        with monkeypatch.context() as m:
            m.setattr(tg, "token_nll", counted)
            got, got_sums = sliding_nll(tg, h, model, vd, slot_mode=mode)
        torch.testing.assert_close(got, ref, equal_nan=True)
        torch.testing.assert_close(got_sums, ref_sums)
    assert len(calls) == 2 * (h.slot_steps + 1)  # one batch: steps fits + one scoring pass, per mode
