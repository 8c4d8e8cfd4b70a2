"""Pure pieces of the training section: the QAT ramp, the EMA decay warm-up and the EMA update itself."""

from __future__ import annotations

import math
import os

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


def test_ema_follows_parameters_updated_in_place_or_replaced(tg):
    """EMA.update takes the fp32 parameters' lerp sources once (aliases, updated in place by the optimizers) and
    takes them again where a parameter's data was replaced: the average follows the weights either way, bit for bit
    the lerp towards p.float()."""
    m = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    m[1].weight.data = m[1].weight.data.to(torch.bfloat16)
    ema = tg.EMA(m)
    for step, change in ((3, "in place"), (4, "replaced"), (5, "in place")):
        before = [t.clone() for t in ema.shadow]
        with torch.no_grad():
            for p in m.parameters():
                if change == "in place":
                    p.mul_(1.5).add_(0.25)
                else:
                    p.data = p.data * 2.0 + 1.0
        ema.update(step)
        w = 1.0 - tg.ema_decay(step)
        for s0, s1, p in zip(before, ema.shadow, m.parameters()):
            assert torch.equal(s1, s0.lerp(p.detach().float(), w)), change


def _agree_worker(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist
    from conftest import SOURCE, leave_finished_worker, load_module

    tg = load_module(SOURCE, "train_gpt_agree")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        loss = torch.tensor(float("nan") if rank == 1 else 2.5)
        ms, bad = tg._agree_step(100.0 + 7.0 * rank, loss, torch.device("cpu"))
        synced = tg._synced_clock(tg.time.perf_counter() - 10.0 - 5.0 * rank, torch.device("cpu"))  # rank 1: ~15 s
        torch.save((ms, bad, synced), f"{out}/rank{rank}.pt")
        dist.barrier()  # both ranks done before gloo tears down
    finally:
        dist.destroy_process_group()
    leave_finished_worker()


def test_ranks_agree_on_clock_and_nonfinite_loss(tmp_path):
    """Guards rank divergence: each rank's own clock would give each a different LR scale and QAT start step, and a
    NaN on one rank must stop every rank.  Both must be the all-reduced MAX, and so must the clock read at a stop or
    a validation (_synced_clock)."""
    import torch.multiprocessing as mp

    mp.spawn(_agree_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [g[:2] for g in got] == [(107.0, True)] * 2
    assert got[0][2] == got[1][2] and 15000.0 <= got[0][2] < 15000.0 + 60000.0  # the synced clock: MAX too


def test_one_process_agrees_with_itself(tg):
    """One process: the clock is its own (no collective, no float32 round trip) and the flag is the loss's."""
    assert tg._agree_step(123.456789, torch.tensor(2.5), torch.device("cpu")) == (123.456789, False)
    for bad in (float("nan"), float("inf"), -float("inf")):
        assert tg._agree_step(1.0, torch.tensor(bad), torch.device("cpu")) == (1.0, True)


def test_stop_and_validation_report_the_clock_once_the_gpu_is_done(tg, monkeypatch):
    """PERF #38 reads each step's clock at its last forward, before the GPU has run that step's backward and optimizer;
    the time reported at the wallclock stop, at a validation and at the end, and the time a validation leaves off the
    clock, must be read once every queued step is done (_synced_clock), not that early reading.  A fake clock that
    advances 100 ms per reading tells the readings apart."""
    import types

    from conftest import tiny_config

    now = [0.0]

    def perf_counter():
        now[0] += 0.1
        return now[0]

    monkeypatch.setattr(tg, "time", types.SimpleNamespace(perf_counter=perf_counter))
    monkeypatch.setattr(tg, "build_optimizers", lambda *a: None)
    monkeypatch.setattr(tg, "TrainLoader", lambda *a: None)
    monkeypatch.setattr(tg, "list_shards", lambda *a: [])

    def eval_val(*a):  # a validation takes 10 s of the fake clock, which the training clock must leave off
        now[0] += 10.0
        return 1.0, 1.0

    monkeypatch.setattr(tg, "eval_val", eval_val)
    lines = []
    monkeypatch.setattr(tg, "log0", lambda msg, console=True: lines.append(msg))

    def step(model, opt, loader, h_, d, device, i, scale, prefetch=False, agree=None):
        agree.start(torch.tensor(1.0))
        return torch.tensor(1.0)

    monkeypatch.setattr(tg, "run_train_step", step)
    m = tg.GPT(tiny_config(tg)).train()
    cpu = torch.device("cpu")
    # capped: budget 250 ms with no GPTQ reserve; t0 at 0.2 s, step clocks at 100, 200, 300 ms, then the stop's 400
    h = tiny_config(tg, iterations=10, max_wallclock_seconds=0.25, use_gptq=False, val_loss_every=0)
    now[0] = 0.1
    steps, ms = tg.train_model(h, tg.DistInfo(), cpu, m, m, None)
    assert (steps, round(ms)) == (3, 400)
    assert "stopping_early: wallclock_cap train_time:400ms step:3/10" in lines
    assert any(l.startswith("step:3/10 val_loss:") and "train_time:400ms" in l for l in lines)
    # a validation after step 2: its time (the 2 readings around it) is left off; the end reads the clock again
    lines.clear()
    h = tiny_config(tg, iterations=3, max_wallclock_seconds=0.0, val_loss_every=2)
    now[0] = 0.0
    steps, ms = tg.train_model(h, tg.DistInfo(), cpu, m, m, None)
    # val 0 (10 s), t0 = 10.1, steps at 100, 200, synced 300 -> val (10 s) -> t0 moved so the clock resumes at 300,
    # step 3 at 400, the end's synced reading 500 (10,500 if the validations counted)
    assert [l.split(" val_loss")[0] for l in lines if "val_loss" in l] == ["step:0/3", "step:2/3", "step:3/3"]
    assert "train_time:300ms" in next(l for l in lines if l.startswith("step:2/3 val_loss"))
    assert (steps, round(ms)) == (3, 500)


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


class _SameBatches:
    """Stand-in loader (the loader is not under test): hands out the same micro-batches, in order, to every model."""

    def __init__(self, batches):
        self.batches, self.calls = batches, 0

    def next_batch(self, global_tokens, seq_len, grad_accum):
        self.calls += 1
        return self.batches[self.calls - 1]


class _GradTap:
    """The Optimizers as run_train_step uses them (opt None: no optimizer step), keeping each step's weights and
    accumulated gradients as they are when the optimizer step begins."""

    def __init__(self, opt, model):
        self.opt, self.model, self.weights, self.grads = opt, model, [], []

    def step(self, step, scale):
        self.weights.append({n: p.detach().clone() for n, p in self.model.named_parameters()})
        self.grads.append({n: p.grad.float().clone() for n, p in self.model.named_parameters()})
        if self.opt is not None:
            self.opt.step(step, scale)

    def backward(self, loss):  # the shipped foreach accumulation (PERF #40); autograd's own for the reference
        self.opt.backward(loss) if self.opt is not None else loss.backward()

    def zero_grad(self):
        (self.opt or self.model).zero_grad()


@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="GPU check of PERF #27 (CUDA graphs): needs a GPU and real Triton, TRITON_INTERPRET=0")
def test_cuda_graphs_accumulate_micro_batch_gradients_in_place(tg):
    """Guards PERF #27 on a GPU: the training model compiled with train_compile_options() (inductor CUDA graphs),
    driven by the real run_train_step (and Optimizers.backward's foreach accumulation, PERF #40) over 8 micro-batches
    a step (one GPU) for 4 steps with QAT off and 2 with QAT on (the second graph records at its second call), keeps
    every .grad the buffer its optimizers allocated, and each step's loss and accumulated gradient equal those of the
    same inductor kernels without CUDA graphs (accumulated by autograd) on that step's weights and micro-batches (the
    sum over micro-batches).  A graph's outputs live in memory that its next replay
    overwrites: with zero_grad(set_to_none=True) and no .grad allocated up front (before the fix), a step's first
    backward hands its gradients to .grad as graph outputs, the next micro-batch's replay overwrites them, and
    accumulating into them raises "accessing tensor output of CUDAGraphs that has been overwritten by a subsequent
    run" (checked on an H200, torch 2.11); were the overwrite silent, the gradient comparison would fail.  Compared
    step by step, not as two whole runs: atomics make two correct runs differ slightly, and Adam's first steps (about
    lr * sign(g)) blow that up (ve_layer_scales 20% apart after 6 steps)."""
    from torch._dynamo.utils import counters

    from conftest import randomize_params, tiny_config

    torch._dynamo.reset()
    counters.clear()
    dev, steps, d = torch.device("cuda"), 6, tg.DistInfo()
    h = tiny_config(tg, vocab_size=1024, model_dim=128, num_heads=2, num_kv_heads=1, rope_dims=16,
                    train_seq_len=64, eval_seq_len=64, train_batch_tokens=8 * 2 * 64)
    ga = d.grad_accum_steps
    assert ga >= 2
    g = torch.Generator(device=dev).manual_seed(0)
    shape = (h.train_batch_tokens // (ga * h.train_seq_len), h.train_seq_len)
    batches = [tuple(torch.randint(0, h.vocab_size, shape, device=dev, generator=g) for _ in "xy")
               for _ in range(steps * ga)]

    def train_step(model, base, tap, loader, step):
        base.set_qat(1.0 if step >= 4 else 0.0)  # QAT on for the last 2 steps: its own graph
        return tg.run_train_step(model, tap, loader, h, d, dev, step, 1.0)

    torch.manual_seed(0)
    graphed = randomize_params(tg.build_model(h, dev), std=0.1)  # W_O / W_down start at zero: make every grad live
    tap, loader = _GradTap(tg.build_optimizers(h, graphed, d), graphed), _SameBatches(batches)
    bufs = [p.grad for p in graphed.parameters()]
    model = tg.maybe_compile(graphed, dev, tg.train_compile_options())
    losses = [train_step(model, graphed, tap, loader, step) for step in range(steps)]
    assert counters["inductor"]["cudagraph_skips"] == 0  # both graphs (QAT off, on) really ran as CUDA graphs
    assert all(p.grad is b for p, b in zip(graphed.parameters(), bufs))  # no .grad ever became a graph output
    torch._dynamo.reset()  # the reference compiles afresh: the same kernels, no CUDA graphs, never an optimizer step
    plain = tg.build_model(h, dev)
    ref, loader = _GradTap(None, plain), _SameBatches(batches)
    plain_model = tg.maybe_compile(plain, dev, dict(tg.train_compile_options(), **{"triton.cudagraphs": False}))
    for step, weights in enumerate(tap.weights):
        plain.load_state_dict(weights, strict=False)
        torch.testing.assert_close(losses[step], train_step(plain_model, plain, ref, loader, step), rtol=1e-3, atol=0)
        for name, want in ref.grads[step].items():
            err = (tap.grads[step][name] - want).norm() / want.norm()  # at most 0.6% on an H200
            assert err < 0.05, f"step {step} {name}: relative gradient error {err:.3g}"


def _fresh_training(tg, files):
    """(h, d, cpu, model, optimizers, loader) of a tiny config at eight micro-batches a step on one rank, seeded the
    same on every call, so two runs of it differ only in what the caller changes."""
    from conftest import tiny_config

    h = tiny_config(tg, train_batch_tokens=8 * 2 * 32)
    d, cpu = tg.DistInfo(), torch.device("cpu")
    torch.manual_seed(0)
    model = tg.build_model(h, cpu)
    return h, d, cpu, model, tg.build_optimizers(h, model, d), tg.TrainLoader(files, h.seed, 0, 1, cpu)


def _shards(tg, tmp_path, seed, n=3, size=4000):
    """n training shards of `size` random tokens below 64, drawn from one seeded generator."""
    import numpy as np

    rng = np.random.default_rng(seed)
    files = []
    for i in range(n):
        files.append(str(tmp_path / f"fineweb_train_{i:06d}.bin"))
        tg.write_shard(files[-1], rng.integers(0, 64, size=size))
    return files


def test_foreach_backward_adds_the_same_gradients_with_one_add_per_dtype(tg, tmp_path):
    """PERF #40: Optimizers.backward (autograd.grad, then one foreach add per dtype into the .grad buffers) gives
    the .grad of every parameter, fp32 and bf16, bit for bit as loss.backward() does, micro-batch after micro-batch
    and over whole steps; it runs one foreach add per dtype where autograd runs an add per parameter."""
    files = _shards(tg, tmp_path, 2)
    runs = []
    for form in ("autograd", "foreach"):
        h, d, cpu, model, opt, loader = _fresh_training(tg, files)
        if form == "autograd":
            opt.backward = lambda loss: loss.backward()
        assert {id(p) for p in opt.params} == {id(p) for p in model.parameters() if p.requires_grad}
        assert {p.grad.dtype for p in opt.params} == {torch.float32, torch.bfloat16}
        grads = []
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(3):  # three micro-batches summed into the same buffers
                x, y = loader.next_batch(h.train_batch_tokens, h.train_seq_len, d.grad_accum_steps)
                opt.backward(model(x, y) / 3)
                grads.append([p.grad.clone() for p in opt.params])
        counts = {k: sum(e.count for e in prof.key_averages() if e.key == k)
                  for k in ("torch::autograd::AccumulateGrad", "aten::_foreach_add_")}
        if form == "foreach":  # fp32 and bf16, per micro-batch
            assert counts == {"torch::autograd::AccumulateGrad": 0, "aten::_foreach_add_": 3 * 2}, counts
        else:
            assert counts == {"torch::autograd::AccumulateGrad": 3 * len(opt.params), "aten::_foreach_add_": 0}, counts
        opt.zero_grad()
        losses = [tg.run_train_step(model, opt, loader, h, d, cpu, s, 1.0) for s in range(2)]
        runs.append((grads, torch.stack(losses), {k: v.clone() for k, v in model.state_dict().items()}))
    for ga, gb in zip(runs[0][0], runs[1][0]):
        assert all(torch.equal(a, b) for a, b in zip(ga, gb))
    assert torch.equal(runs[0][1], runs[1][1])
    assert all(torch.equal(v, runs[1][2][k]) for k, v in runs[0][2].items())


def test_foreach_backward_makes_a_dropped_grad_again_and_leaves_unused_ones(tg, tmp_path):
    """A .grad set to None since the buffers were made is made again (holding this micro-batch's gradient); a
    parameter the loss does not use keeps its .grad as it was; a frozen one (requires_grad False) is left out."""
    h, d, cpu, model, opt, loader = _fresh_training(tg, _shards(tg, tmp_path, 3))
    x, y = loader.next_batch(h.train_batch_tokens, h.train_seq_len, d.grad_accum_steps)
    ref = [g.clone() for g in torch.autograd.grad(model(x, y), opt.params, allow_unused=True)]
    first, unused = opt.params[0], nn.Parameter(torch.ones(3))
    frozen = nn.Parameter(torch.ones(2), requires_grad=False)
    first.grad = None
    unused.grad = torch.full((3,), 2.0)
    opt.params += [unused, frozen]
    opt.backward(model(x, y))
    assert torch.equal(first.grad, ref[0]) and torch.equal(unused.grad, torch.full((3,), 2.0))
    assert frozen.grad is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="PERF #40 on a GPU: the fused multi-tensor add")
def test_foreach_backward_adds_bit_for_bit_on_cuda(tg):
    """On a GPU _foreach_add_ runs torch's multi-tensor kernel (on CPU, one add per tensor): over three micro-batches
    whose gradients are known exactly (loss = sum of p * G, so dL/dp = G), the record model's .grad buffers, fp32 and
    bf16, equal those loss.backward() accumulates, bit for bit."""
    dev, d = torch.device("cuda"), tg.DistInfo()
    h = tg.Hyperparameters()
    torch.manual_seed(0)
    model = tg.build_model(h, dev)
    bufs = []
    for form in ("autograd", "foreach"):
        opt = tg.build_optimizers(h, model, d)
        opt.zero_grad()
        gen = torch.Generator(device=dev).manual_seed(1)
        for _ in range(3):
            loss = sum((p * torch.randn(p.shape, device=dev, generator=gen).to(p.dtype)).sum() for p in opt.params)
            loss.backward() if form == "autograd" else opt.backward(loss)
        bufs.append([p.grad.clone() for p in opt.params])
    assert {b.dtype for b in bufs[0]} == {torch.float32, torch.bfloat16}
    assert all(torch.equal(a, b) for a, b in zip(*bufs))


def test_prefetched_batches_train_the_same_steps(tg, tmp_path):
    """PERF #36: run_train_step(prefetch=True) builds the next step's first batch before the optimizer step; over
    three steps (eight micro-batches each, one rank) the losses and the final weights equal those of the same run without it, and the
    last step's prefetched batch waits in the loader, unconsumed."""
    files = _shards(tg, tmp_path, 0)
    runs = []
    for prefetch in (False, True):
        h, d, cpu, model, opt, loader = _fresh_training(tg, files)
        losses = [tg.run_train_step(model, opt, loader, h, d, cpu, s, 1.0, prefetch=prefetch) for s in range(3)]
        assert (loader.ready is not None) == prefetch and loader.batches_built == 8 * 3 + prefetch
        runs.append((torch.stack(losses), {k: v.clone() for k, v in model.state_dict().items()}))
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(v, runs[1][1][k]) for k, v in runs[0][1].items())


def test_step_agreement_starts_at_the_last_forward_and_changes_no_step(tg, tmp_path):
    """PERF #38: run_train_step starts the step's StepAgreement once the last micro-batch's forward is done and before
    its backward (its clock is read with 8 batches built and 7 backwards run), once per step; the steps' losses and
    weights are those of a run without it, result() gives the clock and the flag, and a NaN loss sets the flag."""
    files = _shards(tg, tmp_path, 1, n=1, size=6000)
    runs = []
    for with_agree in (False, True):
        h, d, cpu, model, opt, loader = _fresh_training(tg, files)
        backwards, seen, losses = [0], [], []
        next(model.parameters()).register_hook(lambda g: backwards.__setitem__(0, backwards[0] + 1))
        for s in range(2):
            agree = tg.StepAgreement(lambda: seen.append((loader.batches_built, backwards[0])) or 10.0 * len(seen),
                                     cpu) if with_agree else None
            losses.append(tg.run_train_step(model, opt, loader, h, d, cpu, s, 1.0, agree=agree))
            if with_agree:
                assert agree.result() == (10.0 * (s + 1), False)
        runs.append((torch.stack(losses), {k: v.clone() for k, v in model.state_dict().items()}))
    assert seen == [(8, 7), (16, 15)]
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(v, runs[1][1][k]) for k, v in runs[0][1].items())
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    agree = tg.StepAgreement(lambda: 5.0, cpu)
    tg.run_train_step(model, opt, loader, h, d, cpu, 2, 1.0, agree=agree)
    assert agree.result() == (5.0, True)
    with pytest.raises(RuntimeError, match="before start"):
        tg.StepAgreement(lambda: 0.0, cpu).result()
