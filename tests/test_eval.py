"""Evaluation (section 8): byte accounting, BPB, non-overlapping and sliding-window eval, rank partitions, log lines.

Most tests use ToyLM, a tiny causal stand-in with the GPT's eval interface (forward / forward_hidden /
compute_logits / forward_logits); the last ones run the real tiny GPT once section 4 is merged."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import leave_finished_worker, tiny_config

CPU = torch.device("cpu")
TOKENIZER = Path("/work/shared/data/tokenizers/fineweb_1024_bpe.model")
if not TOKENIZER.exists():
    TOKENIZER = Path(__file__).resolve().parents[1] / "data" / "tokenizers" / "fineweb_1024_bpe.model"


class ToyLM(nn.Module):
    """Causal stand-in: hidden = rmsnorm(emb + tanh(cumulative mean of emb @ mix)); tied softcapped head."""

    def __init__(self, vocab: int = 64, dim: int = 16, seed: int = 0, scale: float = 0.5):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.tok_emb = nn.Parameter(torch.randn(vocab, dim, generator=g) * scale)
        self.mix = nn.Parameter(torch.randn(dim, dim, generator=g) / dim**0.5)

    def forward_hidden(self, x):
        e = F.embedding(x, self.tok_emb)
        steps = torch.arange(1, x.size(1) + 1, device=x.device, dtype=e.dtype).view(1, -1, 1)
        return F.rms_norm(e + torch.tanh((e.cumsum(1) / steps) @ self.mix), (e.size(-1),))

    def compute_logits(self, hidden):
        w = self.tok_emb
        return (30.0 * torch.tanh(F.linear(hidden.to(w.dtype), w) / 30.0)).float()

    def forward_logits(self, x):
        return self.compute_logits(self.forward_hidden(x))

    def forward(self, x, y):
        return F.cross_entropy(self.forward_logits(x).flatten(0, 1), y.flatten())


def make_val_data(tg, tokens, base_bytes, has_leading_space, is_boundary, device=CPU):
    """A ValidationData (section 3's class when merged, else a duck-typed stand-in with the same fields)."""
    fields = dict(tokens=torch.as_tensor(tokens, dtype=torch.int64),
                  base_bytes=torch.as_tensor(base_bytes, dtype=torch.int16).to(device),
                  has_leading_space=torch.as_tensor(has_leading_space, dtype=torch.bool).to(device),
                  is_boundary=torch.as_tensor(is_boundary, dtype=torch.bool).to(device))
    cls = getattr(tg, "ValidationData", None)
    return cls(**fields) if cls is not None else types.SimpleNamespace(**fields)


def random_val_data(tg, n_tokens: int, vocab: int = 64, seed: int = 0):
    """n_tokens + 1 random tokens; random byte LUT with tokens 0, 1 as zero-byte boundaries (pad/BOS)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(1, 4, (vocab,), generator=g)
    base[:2] = 0
    space = torch.rand(vocab, generator=g) < 0.4
    space[:2] = False
    boundary = torch.zeros(vocab, dtype=torch.bool)
    boundary[:2] = True
    return make_val_data(tg, torch.randint(0, vocab, (n_tokens + 1,), generator=g), base, space, boundary)


def eval_config(tg, **overrides):
    base = dict(eval_seq_len=16, train_seq_len=16, eval_stride=4, val_batch_size=8 * 16 * 4, slot_enabled=False)
    base.update(overrides)
    return tiny_config(tg, **base)


def sliding_nll(tg, h, model, val_data, world=1, **kw):
    """Per-target NLL (NaN where unscored) and the summed [nll, tokens, bytes] over `world` simulated ranks."""
    n = val_data.tokens.numel() - 1
    out = torch.full((n,), float("nan"), dtype=torch.float64)
    total = torch.zeros(3, dtype=torch.float64)
    with torch.no_grad():
        for r in range(world):
            total += tg.sliding_window_sums(h, model, tg.DistInfo(r, world, r), CPU, val_data, nll_out=out, **kw)
    return out, total


# ---------------------------------------------------------------------------------------------- bytes and BPB


def sp_luts(sp, vocab: int):
    """SPEC §1.4 LUTs, written here independently of section 3 (control/unknown/unused -> 0 bytes, boundary)."""
    base, space, boundary = [0] * vocab, [False] * vocab, [True] * vocab
    for i in range(sp.vocab_size()):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        boundary[i] = False
        if sp.is_byte(i):
            base[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith("\u2581"):
            space[i], piece = True, piece[1:]
        base[i] = len(piece.encode("utf-8"))
    return base, space, boundary


@pytest.mark.skipif(not TOKENIZER.exists(), reason="real tokenizer not available")
def test_count_target_bytes_equals_utf8_length_with_real_tokenizer(tg):
    """Guards the BPB denominator: the bytes counted for [BOS] doc [BOS] doc must be the UTF-8 length of the docs
    (leading-space +1 only after a non-boundary token, byte-fallback = 1 byte, BOS = 0)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER))
    docs = ["Hello world, this is a test of the byte counter.", "Caf\u00e9 na\u00efve \u65e5\u672c\u8a9e \U0001F642 x y 123 (\u00e9t\u00e9)"]
    stream = []
    for doc in docs:
        ids = sp.encode(doc)
        assert sp.decode(ids) == doc  # the tokenizer round-trips these texts (no NFKC change)
        stream += [sp.bos_id()] + ids
    luts = sp_luts(sp, 1024)
    if hasattr(tg, "build_sentencepiece_luts"):  # section 3's LUTs agree with this independent reading of §1.4
        for mine, theirs in zip(luts, tg.build_sentencepiece_luts(sp, 1024, CPU)):
            assert torch.equal(torch.as_tensor(mine).to(theirs.dtype), theirs)
    vd = make_val_data(tg, stream, *luts)
    tokens = vd.tokens
    counted = tg.count_target_bytes(vd, tokens[:-1], tokens[1:]).sum().item()
    assert counted == sum(len(doc.encode("utf-8")) for doc in docs)


def test_loss_to_bpb_formula_and_empty_error(tg):
    """Guards BPB = nll / (ln2 * bytes) and loss = nll / tokens; an empty eval must raise, not divide by zero."""
    loss, bpb = tg.loss_to_bpb(torch.tensor(12.0, dtype=torch.float64), 6, 14)
    assert loss == pytest.approx(2.0)
    assert bpb == pytest.approx(12.0 / (math.log(2) * 14))
    with pytest.raises(RuntimeError):
        tg.loss_to_bpb(0.0, 0, 0)


class UniformLM(ToyLM):
    """Logits identically 0: every target costs exactly ln(V) nats."""

    def compute_logits(self, hidden):
        return torch.zeros(*hidden.shape[:-1], self.tok_emb.size(0))


def test_bpb_of_hand_computed_case(tg):
    """Guards the whole accounting on a case done by hand: V=4, base bytes [0,1,2,3], token 2 has a leading space,
    token 0 is a boundary.  Stream 1 2 3 2 0 2 3: target bytes 3,3,3,0,2,3 = 14 (the space of the 2 after 0 is not
    counted); loss ln4 per token, so bpb = 6 ln4 / (ln2 * 14) = 12/14, for both evaluators."""
    vd = make_val_data(tg, [1, 2, 3, 2, 0, 2, 3], [0, 1, 2, 3], [False, False, True, False], [True, False, False, False])
    model = UniformLM(vocab=4, dim=8)
    h = eval_config(tg, vocab_size=4, train_seq_len=3, eval_seq_len=4, eval_stride=2, val_batch_size=8 * 3)
    d = tg.DistInfo()
    for loss, bpb in (tg.eval_val(h, model, d, CPU, vd), tg.eval_val_sliding(h, model, d, CPU, vd)):
        assert loss == pytest.approx(math.log(4), rel=1e-6)  # CE is fp32
        assert bpb == pytest.approx(12 / 14, rel=1e-6)


# ---------------------------------------------------------------------------------------------- window planning


def _check_plan(tg, n, T, stride, world):
    counts = torch.zeros(n, dtype=torch.int64)
    prev_end, reached_end = None, False
    for r in range(world):
        starts, sf = tg.plan_windows(n, T, stride, r, world)
        assert starts.dtype == torch.int64 and sf.shape == starts.shape
        for ws, s in zip(starts.tolist(), sf.tolist()):
            assert not reached_end, "a window was created after one already reached the end"
            assert prev_end is None or ws == prev_end + stride, "windows must be consecutive and contiguous by rank"
            wlen = min(T, n - ws)
            assert 0 <= s < wlen, "every window scores at least one token"
            counts[ws + s : ws + wlen] += 1
            prev_end, reached_end = ws, ws + wlen >= n
    assert reached_end
    assert torch.equal(counts, torch.ones(n, dtype=torch.int64)), f"n={n} T={T} stride={stride} world={world}"


@pytest.mark.parametrize("n", [1, 5, 15, 16, 17, 31, 100, 257])
@pytest.mark.parametrize("T,stride", [(16, 1), (16, 3), (16, 4), (16, 16), (8, 5)])
def test_plan_windows_scores_every_target_once_for_any_rank_count(tg, n, T, stride):
    """Guards D10 (the seed's tail windows re-scored the last 64 tokens) and the rank split: over all ranks the
    windows are consecutive, disjoint, complete, and every target index is scored exactly once."""
    for world in (1, 2, 3, 8, 13):
        _check_plan(tg, n, T, stride, world)


def test_plan_windows_record_window_count(tg):
    """Guards the record geometry: 62,021,632 targets, T=2048, stride 64 give 969,057 windows (the seed's 969,088
    minus its 31 duplicate tail windows), split contiguously over 8 ranks."""
    n, T, stride = 62_021_632, 2048, 64
    parts = [tg.plan_windows(n, T, stride, r, 8) for r in range(8)]
    assert sum(p[0].numel() for p in parts) == 969_057
    assert all(parts[r][0][-1] + stride == parts[r + 1][0][0] for r in range(7))
    last = parts[-1][0][-1].item()
    assert last + T >= n and last - stride + T < n
    assert (parts[0][1][1:] == T - stride).all() and parts[0][1][0] == 0


def test_plan_windows_rejects_bad_arguments(tg):
    """Guards silent garbage on a bad EVAL_STRIDE or an empty val stream."""
    with pytest.raises(ValueError, match="EVAL_STRIDE"):
        tg.plan_windows(100, 16, 17, 0, 1)
    with pytest.raises(ValueError, match="EVAL_STRIDE"):
        tg.plan_windows(100, 16, 0, 0, 1)
    with pytest.raises(ValueError):
        tg.plan_windows(0, 16, 4, 0, 1)


# ---------------------------------------------------------------------------------------------- evaluators


@pytest.mark.parametrize("n", [3, 15, 16, 61])
@pytest.mark.parametrize("batch", [1, 3, 32])
def test_sliding_eval_scores_each_target_exactly_once(tg, monkeypatch, n, batch):
    """Guards the batched gather/padding/masking end to end: every target gets exactly one finite NLL, and the
    token and byte counts equal N and the bytes of the whole stream, for short streams (N < T), awkward N, batch
    sizes that leave a padded last batch, and several simulated ranks."""
    monkeypatch.setattr(tg, "SLIDING_BATCH_WINDOWS", batch)
    vd = random_val_data(tg, n)
    h, model = eval_config(tg), ToyLM()
    all_bytes = tg.count_target_bytes(vd, vd.tokens[:-1], vd.tokens[1:]).sum().item()
    for world in (1, 2, 5):
        nll, total = sliding_nll(tg, h, model, vd, world)
        assert torch.isfinite(nll).all()
        assert total[1].item() == n and total[2].item() == all_bytes
        torch.testing.assert_close(total[0], nll.sum())


def test_sliding_nll_equals_full_context_model_within_window(tg):
    """Guards the window geometry: a target scored by the window starting at ws must get exactly the NLL the model
    gives it with the context tokens[ws : target], checked against a direct per-window forward."""
    n, T, stride = 45, 16, 4
    vd = random_val_data(tg, n, seed=3)
    h, model = eval_config(tg), ToyLM(seed=1)
    nll, _ = sliding_nll(tg, h, model, vd)
    starts, sf = tg.plan_windows(n, T, stride, 0, 1)
    for ws, s in zip(starts.tolist(), sf.tolist()):
        x = vd.tokens[ws : min(ws + T, n)][None]
        y = vd.tokens[ws + 1 : min(ws + T, n) + 1]
        with torch.no_grad():
            ref = F.cross_entropy(model.forward_logits(x)[0], y, reduction="none").double()
        torch.testing.assert_close(nll[ws + s : ws + x.size(1)], ref[s:], rtol=1e-5, atol=1e-6)


def test_stride_equal_to_seq_len_matches_non_overlapping_eval(tg):
    """Guards consistency of the two evaluators: with EVAL_STRIDE == EVAL_SEQ_LEN (and SLOT off) the sliding eval
    is the non-overlapping eval."""
    vd = random_val_data(tg, 16 * 7, seed=2)
    h, model = eval_config(tg, eval_stride=16), ToyLM(seed=2)
    d = tg.DistInfo()
    a, b = tg.eval_val(h, model, d, CPU, vd), tg.eval_val_sliding(h, model, d, CPU, vd)
    assert a[0] == pytest.approx(b[0], rel=1e-6) and a[1] == pytest.approx(b[1], rel=1e-6)
    h2 = eval_config(tg, eval_stride=4)
    c = tg.eval_val_sliding(h2, model, d, CPU, vd)
    assert c[0] != pytest.approx(a[0], rel=1e-6)  # overlapping windows really change the context


def test_eval_val_rank_sums_add_up(tg):
    """Guards eval_val's contiguous rank split: the per-rank sums of 2 and 4 simulated ranks (different batch
    sizes through grad_accum) add up to the 1-rank sums; no sequence is lost or counted twice."""
    vd = random_val_data(tg, 16 * 13 + 5, seed=4)
    h, model = eval_config(tg), ToyLM(seed=4)
    with torch.inference_mode():
        one = tg.val_sums(h, model, tg.DistInfo(), CPU, vd)
        assert one[1].item() == 16 * 13
        for world in (2, 4):
            total = sum(tg.val_sums(h, model, tg.DistInfo(r, world, r), CPU, vd) for r in range(world))
            assert torch.equal(total[1:], one[1:])
            torch.testing.assert_close(total[0], one[0], rtol=1e-6, atol=0)  # fp32 batch means


def test_sliding_rank_sums_add_up(tg):
    """Guards the sliding eval's rank split: 2 and 3 simulated ranks' sums add up to the 1-rank sums."""
    vd = random_val_data(tg, 101, seed=5)
    h, model = eval_config(tg), ToyLM(seed=5)
    _, one = sliding_nll(tg, h, model, vd, 1)
    for world in (2, 3):
        _, total = sliding_nll(tg, h, model, vd, world)
        assert torch.equal(total[1:], one[1:])
        torch.testing.assert_close(total[0], one[0], rtol=1e-6, atol=0)  # fp32 batch means


def test_evaluators_restore_training_mode_and_leave_no_grads(tg):
    """Guards side effects on the model: eval switches to eval mode and back, and leaves parameters untouched."""
    vd = random_val_data(tg, 40)
    h, model = eval_config(tg, slot_enabled=True, slot_steps=2), ToyLM()
    before = [p.detach().clone() for p in model.parameters()]
    model.train()
    tg.eval_val(h, model, tg.DistInfo(), CPU, vd)
    tg.eval_val_sliding(h, model, tg.DistInfo(), CPU, vd)
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


# ---------------------------------------------------------------------------------------------- distributed (gloo)


def _gloo_worker(rank, world, port, source, result_path):
    import importlib.util
    import sys

    import torch.distributed as dist

    spec = importlib.util.spec_from_file_location("train_gpt_worker", source)
    tg = importlib.util.module_from_spec(spec)
    sys.modules["train_gpt_worker"] = tg
    spec.loader.exec_module(tg)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        vd = random_val_data(tg, 101, seed=6)
        h, model = eval_config(tg, slot_enabled=True, slot_steps=3), ToyLM(seed=6)
        d = tg.DistInfo(rank, world, rank)
        out = [tg.eval_val(h, model, d, CPU, vd), tg.eval_val_sliding(h, model, d, CPU, vd),
               tg.eval_val_sliding(h, model, d, CPU, vd, slot_enabled=False)]
        if rank == 0:
            torch.save(out, result_path)
        dist.barrier()  # both ranks done before gloo tears down (a teardown race once aborted a rank)
    finally:
        dist.destroy_process_group()
    leave_finished_worker()


@pytest.mark.slow  # ~25 s on 2 cores: 3 interpreters import torch (+ dynamo via AdamW)
def test_distributed_all_reduce_matches_single_process(tg_source, tmp_path):
    """Guards the collective wiring (fp64 sums all-reduced once): 2 gloo ranks report the 1-process results, for
    eval_val, sliding without SLOT, and causal SLOT (whose per-window delta makes it world-size independent)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = tmp_path / "out.pt"
    mp.spawn(_gloo_worker, args=(2, port, str(tg_source.__file__), str(result)), nprocs=2, join=True)
    got = torch.load(result)
    tg = tg_source
    vd = random_val_data(tg, 101, seed=6)
    h, model = eval_config(tg, slot_enabled=True, slot_steps=3), ToyLM(seed=6)
    d = tg.DistInfo()
    want = [tg.eval_val(h, model, d, CPU, vd), tg.eval_val_sliding(h, model, d, CPU, vd),
            tg.eval_val_sliding(h, model, d, CPU, vd, slot_enabled=False)]
    for g, w in zip(got, want):
        assert g[0] == pytest.approx(w[0], rel=1e-6) and g[1] == pytest.approx(w[1], rel=1e-6)


# ---------------------------------------------------------------------------------------------- logging


def test_timed_eval_log_lines(tg, tmp_path):
    """Guards the parse targets of SPEC §10.1 / STYLE §3.9: `label val_loss val_bpb [stride:64] eval_time:Nms`
    with this project's slot token after the canonical ones, then the `_exact` twin with 8 decimals."""
    log = tmp_path / "log.txt"
    tg.init_logging(str(log), True)
    try:
        h = eval_config(tg, slot_enabled=True, slot_mode="causal")
        out = tg.timed_eval("final_int6_sliding_window", lambda a, dev: (1.23456789012, 0.98765432109), 1, CPU,
                            extra=f"stride:{h.eval_stride}", suffix=tg.slot_tag(h))
        tg.timed_eval("final_int6_roundtrip", lambda: (2.0, 1.5))
    finally:
        tg.init_logging(None, False)
    assert out == (1.23456789012, 0.98765432109)
    lines = log.read_text().splitlines()
    assert re.fullmatch(r"final_int6_sliding_window val_loss:1\.2346 val_bpb:0\.9877 stride:4 eval_time:\d+ms "
                        r"slot:causal", lines[0]), lines[0]
    assert lines[1] == "final_int6_sliding_window_exact val_loss:1.23456789 val_bpb:0.98765432"
    assert re.fullmatch(r"final_int6_roundtrip val_loss:2\.0000 val_bpb:1\.5000 eval_time:\d+ms", lines[2]), lines[2]
    assert lines[3] == "final_int6_roundtrip_exact val_loss:2.00000000 val_bpb:1.50000000"
    assert tg.slot_tag(h, slot_enabled=False) == "slot:off" and tg.slot_tag(h, slot_mode="standard") == "slot:standard"


# ---------------------------------------------------------------------------------------------- the real tiny GPT


def _tiny_gpt(tg, **overrides):
    if not hasattr(tg, "GPT"):
        pytest.skip("section 4 (GPT) not merged yet")
    h = tiny_config(tg, slot_enabled=False, **overrides)
    torch.manual_seed(0)
    model = tg.GPT(h).eval()
    return h, model


def test_real_gpt_stride_equal_seq_len_matches_eval_val(tg):
    """Guards the contract with section 4: forward == CE(compute_logits(forward_hidden)), so with stride == T the
    sliding eval of the real GPT equals eval_val; also runs with a torch.compile'd (eager backend) hidden_fn."""
    h, model = _tiny_gpt(tg, eval_stride=32)
    vd = random_val_data(tg, 32 * 5, vocab=h.vocab_size, seed=7)
    d = tg.DistInfo()
    a = tg.eval_val(h, model, d, CPU, vd)
    b = tg.eval_val_sliding(h, model, d, CPU, vd)
    c = tg.eval_val_sliding(h, model, d, CPU, vd, hidden_fn=torch.compile(model.forward_hidden, backend="eager"))
    assert a[1] == pytest.approx(b[1], rel=1e-5) and b == c
