"""Section 7 (COMPRESSION & SERIALIZATION): byte shuffle, Brotli, torch.save payload, code size (D9), and the
selective ±1 pruning that fits the artifact under TARGET_MB (SPEC §8, PR #1019)."""

from __future__ import annotations

import os

import pytest
import torch


def test_byte_shuffle_layout_and_round_trip(tg):
    """SPEC §8 layout: BSHF + stride (2 bytes LE) + even offsets then odd offsets; exact inverse for odd lengths,
    empty input and other strides (an off-by-one in the odd tail corrupts the last tensor of the file)."""
    assert tg.byte_shuffle(b"abcde") == b"BSHF\x02\x00" + b"ace" + b"bd"
    assert tg.byte_shuffle(b"") == b"BSHF\x02\x00"
    payload = os.urandom(1001)
    for data in (b"", b"x", b"xy", payload, payload[:1000]):
        for stride in (1, 2, 3, 7):
            shuffled = tg.byte_shuffle(data, stride)
            assert shuffled[4:6] == stride.to_bytes(2, "little") and len(shuffled) == len(data) + 6
            assert tg.byte_unshuffle(shuffled) == data


def test_byte_unshuffle_rejects_foreign_input(tg):
    """A wrong or truncated file must fail loudly, not decode into garbage weights."""
    for bad in (b"", b"BSH", b"PK\x03\x04" + b"\x00" * 10, b"BSHF\x00\x00abc"):
        with pytest.raises(ValueError):
            tg.byte_unshuffle(bad)


def test_compress_round_trip(tg):
    """compress = shuffle + brotli-11 and decompress its exact inverse, on compressible and random data."""
    for data in (b"", b"\x00\x01" * 5000 + b"\x07", os.urandom(3333)):
        blob = tg.compress(data)
        assert tg.decompress(blob) == data
    assert len(tg.compress(b"\x00\x01" * 5000)) < 200


def test_missing_brotli_is_a_clear_error(tg, monkeypatch):
    """STYLE §3.12.7: no silent codec fallback; the message says how to fix it."""
    monkeypatch.setattr(tg, "brotli", None)
    with pytest.raises(RuntimeError, match="pip install brotli"):
        tg.compress(b"abc")


def sample_qsd():
    g = torch.Generator().manual_seed(0)
    return {
        "w": {
            "a.q": torch.randint(-31, 32, (7, 9), generator=g, dtype=torch.int8),
            "a.scale": torch.rand(7, generator=g).half(),
            "b": torch.randn(5, generator=g).half(),
            "n": torch.tensor([3, 4], dtype=torch.int64),
        },
        "m": {"a": {"type": "int6"}, "b": "passthrough", "n": "passthrough"},
    }


def test_serialize_deserialize_identical(tg):
    """The file re-loads into an identical dict (dtypes, shapes, values, routes) under weights_only loading."""
    qsd = sample_qsd()
    back = tg.deserialize(tg.decompress(tg.compress(tg.serialize(qsd))))
    assert back["m"] == qsd["m"] and set(back["w"]) == set(qsd["w"])
    for k, t in qsd["w"].items():
        assert back["w"][k].dtype == t.dtype and torch.equal(back["w"][k], t)


def test_serialize_is_deterministic(tg):
    """The reported size must be re-derivable: the same dict serialises to the same bytes."""
    assert tg.serialize(sample_qsd()) == tg.serialize(sample_qsd())


def test_code_size_is_the_real_file_size(tg, tmp_path):
    """D9: count the bytes of the file that runs (the seed counted a constant 4 bytes short)."""
    assert tg.code_size_bytes() == len(open(tg.__file__, "rb").read())
    f = tmp_path / "x.py"
    f.write_bytes(b"print(1)\n" * 3)
    assert tg.code_size_bytes(str(f)) == 27


def int6_qsd(n_tensors=3, rows=96, cols=256, seed=0):
    """Laplace-like int6 values with many ±1 (like a real GPTQ output) and varied row scales."""
    g = torch.Generator().manual_seed(seed)
    w, m = {}, {}
    for k in range(n_tensors):
        spread = 0.5 + 3 * torch.rand(rows, 1, generator=g)
        v = torch.round(torch.randn(rows, cols, generator=g) * spread).clamp(-31, 31)
        w[f"t{k}.q"] = v.to(torch.int8)
        w[f"t{k}.scale"] = (0.03 + 0.05 * torch.rand(rows, generator=g)).half()
        m[f"t{k}"] = {"type": "int6"}
    w["emb.q"] = torch.randint(-127, 128, (32, 64), generator=g, dtype=torch.int8)
    w["emb.scale"] = torch.rand(32, generator=g).half()
    m["emb"] = {"type": "int8"}
    return {"w": w, "m": m}


def test_fit_to_budget_noop_when_under(tg):
    """Already under budget: nothing is pruned and the blob is exactly compress(serialize(qsd)).  Under means
    strictly (SPEC §8: total < 16,000,000): a total equal to the target is over and gets pruned."""
    qsd = int6_qsd(n_tensors=1)
    blob0 = tg.compress(tg.serialize(qsd))
    out, blob, info = tg.fit_to_budget(qsd, None, 1000, len(blob0) + 1001)
    assert out is qsd and blob == blob0 and info["pruned"] == 0 and info["bytes"] == len(blob0)
    out, blob, info = tg.fit_to_budget(qsd, None, 1000, len(blob0) + 1000)
    assert info["pruned"] > 0 and len(blob) + 1000 < len(blob0) + 1000


def test_fit_to_budget_prunes_cheapest_ones_until_it_fits(tg):
    """Over budget: the returned blob fits with the code bytes, decodes to the returned dict, differs from the
    input only by ±1 -> 0, and pruned values are never costlier (scale^2 * diag H / mean diag H) than surviving ±1
    values."""
    qsd = int6_qsd()
    hess = {"t1": torch.diag(torch.linspace(0.1, 3.0, 256))}  # column weights for one tensor
    hess_w = {"t1": hess["t1"]}
    size0 = len(tg.compress(tg.serialize(qsd)))
    code = 5000
    target = code + int(size0 * 0.97)
    out, blob, info = tg.fit_to_budget(qsd, hess_w, code, target)
    assert len(blob) + code < target and info["bytes"] == len(blob) and info["pruned"] > 0
    assert info["compresses"] <= 8
    back = tg.deserialize(tg.decompress(blob))
    changed = 0
    worst_pruned, best_kept = 0.0, float("inf")
    for k in range(3):
        a, b = qsd["w"][f"t{k}.q"], back["w"][f"t{k}.q"]
        assert torch.equal(b, out["w"][f"t{k}.q"])
        diff = a != b
        assert bool((a[diff].abs() == 1).all()) and bool((b[diff] == 0).all())
        changed += int(diff.sum())
        cost = qsd["w"][f"t{k}.scale"].float()[:, None].square().expand(a.shape)
        if f"t{k}" in hess_w:
            d = hess["t1"].diagonal()
            cost = cost * (d / d.mean())[None, :]
        if diff.any():
            worst_pruned = max(worst_pruned, float(cost[diff].max()))
        kept = (b.abs() == 1)
        best_kept = min(best_kept, float(cost[kept].min()))
    assert changed == info["pruned"] and worst_pruned <= best_kept
    assert torch.equal(back["w"]["emb.q"], qsd["w"]["emb.q"])  # int8 tensors are never pruned
    # and not grossly over-pruned: within 2% of the model budget
    assert len(blob) >= (target - code) * 0.98


def test_prune_order_does_not_depend_on_the_hessians_scale(tg):
    """Guards the pruning's units: a Hessian is a sum over a batch's tokens (~1e4-1e5 on its diagonal in a real run),
    so its raw diagonal ranked every ±1 of a tensor without one (bigram.proj) before any of a block matrix's.  The
    order must be the same for H and 1e4 * H, and tensors with and without a Hessian must interleave."""
    qsd = int6_qsd()
    h = {"t1": torch.diag(torch.linspace(0.1, 3.0, 256))}
    a = tg._prune_candidates(qsd, h)
    b = tg._prune_candidates(qsd, {"t1": 1e4 * h["t1"]})
    assert a[0] == b[0] and all(torch.equal(x, y) for x, y in zip(a[1:], b[1:]))
    first = b[1][:len(b[1]) // 3]  # the cheapest third holds ±1s of the tensor with a Hessian and of those without
    assert (first == b[0].index("t1")).any() and (first != b[0].index("t1")).any()


def test_fit_to_budget_raises_when_impossible(tg):
    """If even zeroing every ±1 cannot fit, fail before evaluation with the sizes in the message."""
    qsd = int6_qsd(n_tensors=1)
    size0 = len(tg.compress(tg.serialize(qsd)))
    with pytest.raises(RuntimeError, match="TARGET_MB"):
        tg.fit_to_budget(qsd, None, 0, size0 // 3)


def test_dequantize_names_a_tensor_of_another_shape(tg):
    """Guards re-scoring an artifact with the wrong model env vars: a tensor whose shape differs from the model's
    (even with as many elements, which a reshape would load scrambled) is an error naming it and the env vars."""
    q = {"w": {"a.q": torch.ones(4, 8, dtype=torch.int8), "a.scale": torch.ones(4, dtype=torch.float16),
               "b": torch.ones(3)}, "m": {"a": {"type": "int6"}, "b": "passthrough"}}
    ok = tg.dequantize_state_dict(q, {"a": torch.zeros(4, 8), "b": torch.zeros(3)})
    assert ok["a"].shape == (4, 8) and torch.equal(ok["b"], torch.ones(3))
    with pytest.raises(ValueError, match=r"artifact tensor a has shape \(4, 8\), the model here \(8, 4\).*MODEL_DIM"):
        tg.dequantize_state_dict(q, {"a": torch.zeros(8, 4), "b": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"artifact tensor b has shape \(3,\), the model here \(4,\)"):
        tg.dequantize_state_dict(q, {"a": torch.zeros(4, 8), "b": torch.zeros(4)})
