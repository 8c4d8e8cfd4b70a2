"""Optimizer section (SPEC §3, D1): Newton-Schulz, Parallel Muon vs a hand-written reference, split LR, routing,
local-grad clipping, state-dict restore, and the 2-rank gloo == 1-rank equivalence of the sharded path."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from conftest import SOURCE, leave_finished_worker, load_module, tiny_config

L, D, DKV, DMLP, V = 3, 16, 8, 32, 32  # toy sizes: qo 6 slots, mlp 3 slots (padded to 4 on 2 ranks)


class ToyBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn_scale = nn.Parameter(torch.ones(D))


class ToySmear(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(D))


class ToyBanked(nn.Module):
    """Tiny stand-in for GPT with the real parameter names: four banks, tied tok_emb, a few scalars."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        bank = lambda *s: nn.Parameter(torch.randn(*s, generator=g) * 0.3 / math.sqrt(s[-1]))
        self.qo_bank, self.kv_bank = bank(2 * L, D, D), bank(2 * L, DKV, D)
        self.mlp_up_bank, self.mlp_down_bank = bank(L, DMLP, D), bank(L, D, DMLP)
        self.tok_emb = nn.Embedding(V, D)
        with torch.no_grad():
            self.tok_emb.weight.copy_(torch.randn(V, D, generator=g) * 0.5)
        self.blocks = nn.ModuleList(ToyBlock() for _ in range(L))
        self.skip_weights = nn.Parameter(torch.ones(D))
        self.smear = ToySmear()

    def forward(self, ids, targets):
        x = self.tok_emb(ids) * (1 + self.smear.gate)
        for i in range(L):
            q = F.linear(x, self.qo_bank[i])
            k, v = F.linear(x, self.kv_bank[i]), F.linear(x, self.kv_bank[L + i])
            x = x + self.blocks[i].attn_scale * F.linear(torch.tanh(q + torch.cat([k * v, v], -1)), self.qo_bank[L + i])
            x = x + F.linear(F.leaky_relu(F.linear(x, self.mlp_up_bank[i]), 0.5).square(), self.mlp_down_bank[i])
        logits = F.linear(x * self.skip_weights, self.tok_emb.weight)
        return F.cross_entropy(logits.reshape(-1, V).float(), targets.reshape(-1))


def standin_classify(name: str) -> str:
    return "matrix" if name.endswith("_bank") else "embed" if name.startswith("tok_emb") else "scalar"


def ensure_classify(mod) -> None:
    """Until the model section lands, give the module a stand-in classify_param (the real one wins when present)."""
    if not hasattr(mod, "classify_param"):
        mod.classify_param = standin_classify


@pytest.fixture
def tgc(tg):
    had = hasattr(tg, "classify_param")
    ensure_classify(tg)
    yield tg
    if not had:
        del tg.classify_param


def toy_batch(seed: int, batch: int = 8, seq: int = 6):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (batch, seq), generator=g), torch.randint(0, V, (batch, seq), generator=g)


def ref_ns(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Reference Newton-Schulz on one 2-D matrix, written independently of the module (bf16, Muon coefficients)."""
    X = G.bfloat16()
    tall = X.shape[0] > X.shape[1]
    X = X.T if tall else X
    X = X / (torch.linalg.matrix_norm(X.float()).bfloat16() + 1e-7)
    for _ in range(steps):
        A = X @ X.T
        X = 3.4445 * X + (-4.7750 * A + 2.0315 * (A @ A)) @ X
    return X.T if tall else X


def conditioned(rows: int, cols: int, seed: int, batch: tuple = ()) -> torch.Tensor:
    """Random matrices with singular values in [0.1, 1] (NS5 cannot lift singular values ~1e-4 of the norm)."""
    g = torch.Generator().manual_seed(seed)
    k = min(rows, cols)
    U = torch.linalg.qr(torch.randn(*batch, rows, k, generator=g)).Q
    Vt = torch.linalg.qr(torch.randn(*batch, cols, k, generator=g)).Q.mT
    s = 0.1 + 0.9 * torch.rand(*batch, k, generator=g)
    return U @ torch.diag_embed(s) @ Vt


# ---------------------------------------------------------------- Newton-Schulz

@pytest.mark.parametrize("shape", [(32, 32), (48, 16), (16, 48), (3, 24, 40), (2, 2, 40, 24)])
def test_newton_schulz_near_orthogonal(tg, shape):
    """Guards wrong coefficients, a missing normalisation or transpose: singular values must land in ~[0.5, 1.5]."""
    G = conditioned(shape[-2], shape[-1], seed=len(shape) * 7 + shape[-1], batch=shape[:-2])
    O = tg.newton_schulz5(G * 37.0, steps=5)  # the input scale must not matter
    assert O.shape == G.shape and O.dtype == torch.bfloat16
    s = torch.linalg.svdvals(O.float())
    assert s.min() > 0.5 and s.max() < 1.5, (s.min(), s.max())


def test_newton_schulz_batched_matches_per_matrix_and_zero_maps_to_zero(tg):
    """Guards batching mixing matrices (e.g. one Frobenius norm for the whole bank) and NaNs on zero padding."""
    G = torch.randn(4, 24, 40)
    G[2] = 0
    O = tg.newton_schulz5(G)
    assert torch.isfinite(O).all() and (O[2] == 0).all()
    for i in (0, 1, 3):
        torch.testing.assert_close(O[i].float(), tg.newton_schulz5(G[i]).float(), atol=2e-2, rtol=0)
        torch.testing.assert_close(O[i].float(), ref_ns(G[i]).float(), atol=2e-2, rtol=0)


# ---------------------------------------------------------------- Muon vs reference

def test_muon_step_equals_reference_update(tg):
    """Guards the update rule: bf16 momentum, Nesterov, NS, shape factor sqrt(max(1,r/c)), decoupled wd with the group
    lr, and per-slot lr multipliers applied after NS (D1), over two steps so the momentum buffer matters."""
    torch.manual_seed(0)
    banks = [nn.Parameter(torch.randn(3, 24, 8)), nn.Parameter(torch.randn(2, 8, 24))]
    mults = [[0.5, 1.0, 2.0], [1.0, 0.25]]
    lr, mu, wd = 0.05, 0.9, 0.1
    opt = tg.Muon(banks, lr=lr, momentum=mu, backend_steps=5, nesterov=True, weight_decay=wd, lr_mults=mults)
    W = [b.detach().clone() for b in banks]
    bufs = [torch.zeros(b.shape, dtype=torch.bfloat16) for b in banks]
    for step in range(2):
        grads = [torch.randn_like(b) for b in banks]
        for b, g in zip(banks, grads):
            b.grad = g.clone()
        opt.step()
        for j, (w, g) in enumerate(zip(W, grads)):
            rows, cols = w.shape[1:]
            for i in range(w.shape[0]):
                gb = g[i].bfloat16()
                bufs[j][i] = bufs[j][i] * mu + gb
                O = ref_ns(torch.add(gb, bufs[j][i], alpha=mu))  # Nesterov in bf16 (NS amplifies any rounding change)
                w[i] = w[i] * (1 - lr * wd) - lr * mults[j][i] * math.sqrt(max(1.0, rows / cols)) * O.float()
        for b, w in zip(banks, W):
            torch.testing.assert_close(b.detach(), w, atol=2e-4, rtol=0)


def test_muon_rejects_non_bank_params(tg):
    """Guards silently running Muon on a 2-D weight whose slot -> layer mapping is undefined."""
    with pytest.raises(ValueError):
        tg.Muon([nn.Parameter(torch.randn(4, 4))], lr=0.1, momentum=0.9)


# ---------------------------------------------------------------- build_optimizers: routing, split LR, clipping

def test_every_param_in_exactly_one_group_routed_by_classify_param(tgc):
    """Guards a parameter left untrained or stepped twice, and routing that bypasses classify_param."""
    model = ToyBanked()
    opts = tgc.build_optimizers(tiny_config(tgc), model, tgc.DistInfo())
    ids = [id(p) for p in opts.params]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    muon_ids = {id(p) for g in opts.muon.param_groups for p in g["params"]}
    assert muon_ids == {id(p) for n, p in model.named_parameters() if tgc.classify_param(n) == "matrix"}
    assert {id(p) for g in opts.adams[0].param_groups for p in g["params"]} == {id(model.tok_emb.weight)}
    assert opts.adams[0].param_groups[0]["lr"] == tiny_config(tgc).tied_embed_lr
    assert opts.adams[1].param_groups[0]["lr"] == tiny_config(tgc).scalar_lr


def test_unknown_role_raises(tgc, monkeypatch):
    """Guards a new parameter role (e.g. an untied "head") being dropped from every optimizer without an error."""
    monkeypatch.setattr(tgc, "classify_param", lambda n: "head" if n == "skip_weights" else standin_classify(n))
    with pytest.raises(ValueError, match="skip_weights"):
        tgc.build_optimizers(tiny_config(tgc), ToyBanked(), tgc.DistInfo())


def _effective_bank_lrs(tg, h, scale=0.5):
    """Per-slot effective lr of one Optimizers.step at step 0: dW_i / (shape factor * NS(Nesterov(g_i)))."""
    model = ToyBanked()
    ids, tgt = toy_batch(1)
    model(ids, tgt).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if n.endswith("_bank")}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opts = tg.build_optimizers(h, model, tg.DistInfo())
    opts.step(0, scale)
    mu = tg.muon_momentum(0, h)
    out = {}
    for n, g in grads.items():
        p = dict(model.named_parameters())[n]
        gb = g.bfloat16()
        O = tg.newton_schulz5(torch.add(gb, gb, alpha=mu)).float()  # step 0: buf = g, u = g + mu*g
        factor = math.sqrt(max(1.0, p.shape[1] / p.shape[2]))
        delta = (before[n] - p.detach())
        out[n] = (delta * O).sum((1, 2)) / (factor * (O * O).sum((1, 2)))  # least-squares lr per slot
    return out


def test_split_lr_scales_the_orthogonalised_update(tgc):
    """Guards D1: early layers (< BANK_SPLIT) must step at MATRIX_LR_EARLY*scale and late at MATRIX_LR_LATE*scale
    (the seed scaled gradients before NS, a no-op); Q/O and K/V slots L+i belong to layer i."""
    h = tiny_config(tgc, matrix_lr=0.03, matrix_lr_early=0.01, matrix_lr_late=0.04, bank_split=1, muon_wd=0.0,
                    grad_clip_norm=0.0, split_lr_enabled=True)
    lrs = _effective_bank_lrs(tgc, h, scale=0.5)
    for name, per_slot in lrs.items():
        layer = torch.arange(per_slot.numel()) % L
        expect = torch.where(layer < 1, 0.01 * 0.5, 0.04 * 0.5)
        torch.testing.assert_close(per_slot, expect.to(per_slot.dtype), rtol=1e-3, atol=1e-7)
    # the update norms of early vs late layers differ by ~ MATRIX_LR_EARLY / MATRIX_LR_LATE
    model_norm = {n: v for n, v in lrs.items()}
    assert model_norm["qo_bank"][0] / model_norm["qo_bank"][1] == pytest.approx(0.25, rel=1e-3)


def test_split_lr_disabled_moves_every_layer_at_matrix_lr(tgc):
    """Guards SPLIT_LR_ENABLED=0 not reproducing the seed's effective behaviour (every bank at MATRIX_LR)."""
    h = tiny_config(tgc, matrix_lr=0.03, matrix_lr_early=0.01, matrix_lr_late=0.04, bank_split=1, muon_wd=0.0,
                    grad_clip_norm=0.0, split_lr_enabled=False)
    for per_slot in _effective_bank_lrs(tgc, h, scale=1.0).values():
        torch.testing.assert_close(per_slot, torch.full_like(per_slot, 0.03), rtol=1e-3, atol=1e-7)


def test_split_lr_update_norm_ratio(tgc):
    """Guards D1 end to end: with wd=0, early- and late-layer update norms relate as MATRIX_LR_EARLY/MATRIX_LR_LATE
    relative to the same step with split LR off (which moves both groups equally)."""
    def deltas(split):
        h = tiny_config(tgc, matrix_lr=0.03, matrix_lr_early=0.015, matrix_lr_late=0.03, bank_split=1,
                        muon_wd=0.0, grad_clip_norm=0.0, split_lr_enabled=split)
        model = ToyBanked()
        before = model.mlp_up_bank.detach().clone()
        model(*toy_batch(2)).backward()
        tgc.build_optimizers(h, model, tgc.DistInfo()).step(0, 1.0)
        return (model.mlp_up_bank.detach() - before).flatten(1).norm(dim=1)
    on, off = deltas(True), deltas(False)
    assert (on[0] / off[0]).item() == pytest.approx(0.5, rel=1e-3)  # layer 0 early: 0.015 vs 0.03
    assert (on[1:] / off[1:]).tolist() == pytest.approx([1.0, 1.0], rel=1e-3)


def test_clipping_bounds_local_grads_and_sets_lr_and_momentum(tgc):
    """Guards clipping being skipped, and the schedule not reaching the groups: lr = base * scale, Muon momentum =
    muon_momentum(step)."""
    h = tiny_config(tgc, grad_clip_norm=0.3, muon_momentum_warmup_steps=10)
    model = ToyBanked()
    (model(*toy_batch(3)) * 100).backward()
    opts = tgc.build_optimizers(h, model, tgc.DistInfo())
    assert torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]) > 1.0
    opts.step(5, 0.25)
    assert torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]) == pytest.approx(0.3, rel=1e-3)
    assert opts.muon.param_groups[0]["lr"] == pytest.approx(h.matrix_lr * 0.25)
    assert opts.muon.param_groups[0]["momentum"] == pytest.approx(tgc.muon_momentum(5, h))
    assert opts.adams[1].param_groups[0]["lr"] == pytest.approx(h.scalar_lr * 0.25)


def test_clip_grads_matches_torch_bit_for_bit(tgc):
    """Guards PERF #37's clip: Optimizers.clip_grads must give torch.nn.utils.clip_grad_norm_'s total norm and clipped
    grads exactly, with grads of two dtypes (fp32 and a bf16 bank between them, as the real model's bf16 embeddings
    sit among fp32 parameters), clipping or not, over many random gradients: the order of the per-tensor norms in the
    stack changes the total's last bits (torch groups by dtype in a hash map's order, not first-seen), and some of
    these draws tell the orders apart.  zero_grad must zero every grad in place, of either dtype."""
    h = tiny_config(tgc, grad_clip_norm=0.3)
    model = ToyBanked()
    (model(*toy_batch(3)) * 100).backward()
    model.kv_bank.data = model.kv_bank.data.bfloat16()  # a bf16 parameter, as the real model's are
    model.kv_bank.grad = model.kv_bank.grad.bfloat16()
    opts = tgc.build_optimizers(h, model, tgc.DistInfo())
    assert [p.grad.dtype for p in opts.params].count(torch.bfloat16) == 1
    gen = torch.Generator().manual_seed(0)
    clipped = 0
    for trial in range(60):
        overall = 10.0 ** float(torch.empty(()).uniform_(-4, 0, generator=gen))  # total norms either side of 0.3
        for p in opts.params:
            scale = overall * float(torch.empty(()).uniform_(-3, 1, generator=gen).exp())
            p.grad.copy_(torch.randn(p.shape, generator=gen) * scale)
        grads = [p.grad.clone() for p in opts.params]
        ref = [nn.Parameter(torch.zeros_like(g)) for g in grads]
        for r, g in zip(ref, grads):
            r.grad = g.clone()
        want = torch.nn.utils.clip_grad_norm_(ref, 0.3)
        got = opts.clip_grads(0.3)
        assert torch.equal(got, want), trial
        for p, r, g in zip(opts.params, ref, grads):
            assert torch.equal(p.grad, r.grad) and p.grad.dtype == g.dtype, trial
        clipped += bool(want > 0.3)
    assert 0 < clipped < 60  # both regimes drawn
    bufs = [p.grad for p in opts.params]
    opts.zero_grad()
    assert all(p.grad is b and not b.any() for p, b in zip(opts.params, bufs))


def test_state_dict_round_trip_restores_exact_state(tgc):
    """Guards the compile warm-up restore (SPEC §3.4): a snapshot must not alias live state, and reloading it must
    make the following steps bitwise identical to the first time they ran."""
    h = tiny_config(tgc)
    model = ToyBanked()
    opts = tgc.build_optimizers(h, model, tgc.DistInfo())

    def run(steps):
        for s in steps:
            model(*toy_batch(10 + s)).backward()
            opts.step(s, 1.0)
            opts.zero_grad()

    run(range(2))
    w_snap = {k: v.clone() for k, v in model.state_dict().items()}
    o_snap = opts.state_dict()
    run(range(2, 5))
    w_first = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(w_snap)
    opts.load_state_dict(o_snap)
    buf = opts.muon.state[model.qo_bank]["momentum_buffer"]
    snap_buf = o_snap[0]["state"][0]["momentum_buffer"]
    assert buf.dtype == snap_buf.dtype == torch.bfloat16 and torch.equal(buf, snap_buf)
    run(range(2, 5))
    for k, v in model.state_dict().items():
        assert torch.equal(v, w_first[k]), k
    assert all(not p.grad.any() for p in model.parameters())  # zero_grad zeroes in place (PERF #27)


def test_gradients_accumulate_into_buffers_allocated_up_front(tgc):
    """Guards PERF #27: with CUDA graphs a backward's outputs live in memory that the next replay overwrites, so no
    .grad may ever be such an output.  The optimizers allocate every .grad when built; backward then adds into those
    same tensors (never swaps in its own) over micro-batches and steps, and zero_grad zeroes them in place.  The
    accumulated gradient equals the sum of the micro-batches' gradients computed apart, and a newly built optimizer
    keeps a gradient computed before it (the warm-up's last zero_grad clears the buffers before the timed run)."""
    h = tiny_config(tgc)
    model = ToyBanked()
    opts = tgc.build_optimizers(h, model, tgc.DistInfo())
    bufs = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and not g.any() for g in bufs.values())
    ptrs = {n: g.data_ptr() for n, g in bufs.items()}
    for step in range(2):
        apart = []
        for mb in range(3):
            loss = model(*toy_batch(20 + 3 * step + mb))
            apart.append(torch.autograd.grad(loss, list(model.parameters()), retain_graph=True))
            loss.backward()
        for (n, p), *gs in zip(model.named_parameters(), *apart):
            assert p.grad is bufs[n] and p.grad.data_ptr() == ptrs[n], n
            torch.testing.assert_close(p.grad, sum(gs), rtol=1e-6, atol=1e-7)
        opts.step(step, 1.0)
        opts.zero_grad()
        assert all(p.grad is bufs[n] and not p.grad.any() for n, p in model.named_parameters())
    loss = model(*toy_batch(40))
    kept = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
    loss.backward()  # a gradient computed before the optimizers are built is kept (and its buffer too)
    tgc.build_optimizers(h, model, tgc.DistInfo())
    assert all(p.grad is bufs[n] and torch.equal(p.grad, g) for (n, p), g in zip(model.named_parameters(), kept))


# ---------------------------------------------------------------- 2 ranks (gloo) == 1 rank

STEPS, BATCH = 4, 8


def _train(mod, model, h, rank, world, steps=STEPS, use_rs=True):
    opts = mod.build_optimizers(h, model, mod.DistInfo(rank, world, rank))
    opts.muon.use_reduce_scatter = use_rs
    per = BATCH // world
    for s in range(steps):
        ids, tgt = toy_batch(100 + s, batch=BATCH)
        model(ids[rank * per:(rank + 1) * per], tgt[rank * per:(rank + 1) * per]).backward()
        opts.step(s, 1.0 - 0.2 * s)
        opts.zero_grad()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _exact_grads(step, rank):
    """Per-rank bank grads on a coarse grid (k/32, |k| <= 64): bf16-exact, and so are their sum and mean."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    return [torch.randint(-64, 65, p.shape, generator=g).float() / 32 for p in _toy_banks()]


def _toy_banks():
    m = ToyBanked()
    return [m.qo_bank, m.kv_bank, m.mlp_up_bank, m.mlp_down_bank]


def _muon_exact(mod, rank, world, use_rs=True):
    banks = _toy_banks()
    mults = [[0.5 + 0.25 * i for i in range(p.shape[0])] for p in banks]
    opt = mod.Muon(banks, lr=0.02, momentum=0.95, backend_steps=5, weight_decay=0.04, lr_mults=mults)
    opt.use_reduce_scatter = use_rs
    for s in range(3):
        grads = _exact_grads(s, rank) if world > 1 else [(a + b) / 2 for a, b in zip(_exact_grads(s, 0), _exact_grads(s, 1))]
        for p, g in zip(banks, grads):
            p.grad = g
        opt.step()
    return [p.detach().clone() for p in banks]


def _local_grads(model, rank):
    g = torch.Generator().manual_seed(rank)
    scale = 10.0 if rank == 0 else 0.1  # very different local norms: local clipping != clipping the mean
    return {n: torch.randn(p.shape, generator=g) * scale for n, p in model.named_parameters()}


def _worker(rank, world, store, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    mod = load_module(SOURCE, "train_gpt_source")
    ensure_classify(mod)
    h = tiny_config(mod, grad_clip_norm=0.0)
    result = {"rs": _train(mod, ToyBanked(), h, rank, world), "ar": _train(mod, ToyBanked(), h, rank, world, use_rs=False),
              "muon_rs": _muon_exact(mod, rank, world), "muon_ar": _muon_exact(mod, rank, world, use_rs=False)}
    # local clipping: grads set by hand, clip 0.3, lr 0 so only the reduced grads are observed
    model = ToyBanked()
    for n, p in model.named_parameters():
        p.grad = _local_grads(model, rank)[n].clone()
    opts = mod.build_optimizers(tiny_config(mod, grad_clip_norm=0.3), model, mod.DistInfo(rank, world, rank))
    opts.step(0, 0.0)
    result["clipped"] = {n: p.grad.clone() for n, p in model.named_parameters() if not n.endswith("_bank")}
    torch.save(result, f"{out_dir}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
    leave_finished_worker()


def test_two_rank_gloo_matches_one_rank(tg_source, tmp_path):
    """Guards Parallel Muon's sharding (padding 3 -> 4 slots, reduce-scatter / all-gather, shard <-> slot mapping,
    per-shard momentum) and the coalesced replicated all-reduce: 2 ranks on half batches each must give the weights
    of 1 rank on the whole batch, with reduce-scatter and with the all-reduce fallback (exactly, for bf16-exact
    grads).  Also guards clipping after the reduction instead of on each rank's local grads (SPEC §12.7), and a sum
    instead of a mean of the replicated grads."""
    ensure_classify(tg_source)
    ref_muon = _muon_exact(tg_source, 0, 1)
    ref = _train(tg_source, ToyBanked(), tiny_config(tg_source, grad_clip_norm=0.0), 0, 1)
    init = ToyBanked().state_dict()
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    outs = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    # bf16-exact grads: the sharded path must reproduce the one-process weights exactly
    for mode in ("muon_rs", "muon_ar"):
        for r in range(2):
            for got, want in zip(outs[r][mode], ref_muon):
                torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    # end to end on real grads (bf16 grad rounding differs between 1 and 2 ranks; NS amplifies it to a few %)
    for mode in ("rs", "ar"):
        for k, w in ref.items():
            moved = (w - init[k]).norm().item()
            assert moved > 1e-3, k
            for r in range(2):
                err = (outs[r][mode][k] - w).norm().item()
                assert err <= 0.1 * moved, (mode, r, k, err, moved)
    # expected replicated grads: the mean of each rank's *locally* clipped grads
    model = ToyBanked()
    coefs, local = [], []
    for r in range(2):
        g = _local_grads(model, r)
        local.append(g)
        coefs.append(min(1.0, 0.3 / (torch.linalg.vector_norm(torch.stack([x.norm() for x in g.values()])) + 1e-6)))
    for n, got in outs[0]["clipped"].items():
        torch.testing.assert_close(got, (coefs[0] * local[0][n] + coefs[1] * local[1][n]) / 2, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- the real model (once section 4 is merged)

def test_real_gpt_routing_and_training_steps(tg):
    """Guards the optimizer/model contract (SPEC §3.1): the four banks go to Muon, the three embedding tables to
    AdamW tok, everything else (bigram.proj and ve_shared.proj included) to AdamW scalar; and a few full steps on
    the tiny record config (split LR, clipping, momentum warm-up on) reduce the loss on a fixed batch."""
    if not hasattr(tg, "GPT"):
        pytest.skip("model section not merged yet")
    torch.manual_seed(0)
    h = tiny_config(tg)
    model = tg.GPT(h)
    opts = tg.build_optimizers(h, model, tg.DistInfo())
    names = {id(p): n for n, p in model.named_parameters()}
    muon = sorted(names[id(p)] for g in opts.muon.param_groups for p in g["params"])
    assert muon == sorted(["qo_bank", "kv_bank", "mlp_up_bank", "mlp_down_bank"])
    tok = {names[id(p)] for g in opts.adams[0].param_groups for p in g["params"]}
    assert tok == {n for n in names.values() if n.endswith("embed.weight") or n == "tok_emb.weight"}
    scalar = {names[id(p)] for g in opts.adams[1].param_groups for p in g["params"]}
    assert {"bigram.proj.weight", "ve_shared.proj.weight"} <= scalar
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, h.vocab_size, (2, h.train_seq_len + 1), generator=g)
    losses = []
    for s in range(4):
        loss = model(ids[:, :-1], ids[:, 1:])
        losses.append(loss.item())
        loss.backward()
        opts.step(s, 1.0)
        opts.zero_grad()
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 0.1, losses
