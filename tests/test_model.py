"""Model section (SPEC §2, D6, D7): parameter inventory, dtypes, roles, causality, head/loss plumbing, the pieces
of the forward (bigram hash, RoPE, XSA, attention backends), compile-friendliness and Hessian recording."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config, randomize_params

DEFAULT_PARAMS = 27_201_116  # SPEC §2 / the seed's log line model_params:27201116




def _ids(h, batch=2, seq=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, h.vocab_size, (batch, seq or h.train_seq_len), generator=g)


@pytest.fixture
def tiny_model(tg):
    torch.manual_seed(0)
    return tg.GPT(tiny_config(tg))


def test_default_param_count_on_meta(tg):
    """Guards the architecture against drift: the default config must be the seed's 27,201,116-parameter model
    (one wrong bank shape, skip count or VE width changes the count)."""
    with torch.device("meta"):
        model = tg.GPT(tg.Hyperparameters())
    assert sum(p.numel() for p in model.parameters()) == DEFAULT_PARAMS


def test_default_param_names_and_shapes(tg):
    """Guards the state-dict interface (optimizer grouping, quantiser, checkpoints) against renamed or reshaped
    parameters (SPEC §2.1)."""
    with torch.device("meta"):
        model = tg.GPT(tg.Hyperparameters())
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    expected = {
        "tok_emb.weight": (1024, 512), "bigram.embed.weight": (2816, 160), "bigram.proj.weight": (512, 160),
        "bigram.scale": (), "smear.gate": (512,), "qo_bank": (22, 512, 512), "kv_bank": (22, 256, 512),
        "mlp_up_bank": (11, 1536, 512), "mlp_down_bank": (11, 512, 1536), "skip_weights": (5, 512),
        "skip_gates": (5, 512), "ve_shared.embed.weight": (1024, 128), "ve_shared.proj.weight": (256, 128),
        "ve_shared.scale": (), "ve_layer_scales.0": (1,), "ve_layer_scales.1": (1,),
    }
    for i in range(11):
        expected.update({f"blocks.{i}.attn.q_gain": (8,), f"blocks.{i}.attn_scale": (512,),
                         f"blocks.{i}.mlp_scale": (512,), f"blocks.{i}.resid_mix": (2, 512)})
    assert shapes == expected


def test_param_dtypes(tg):
    """Guards the dtype rule of SPEC §2.1: embeddings and skip_gates bf16 (optimised in bf16), everything else
    (banks, CastedLinear weights, control scalars) fp32."""
    with torch.device("meta"):
        model = tg.GPT(tg.Hyperparameters())
    bf16 = {"tok_emb.weight", "bigram.embed.weight", "ve_shared.embed.weight", "skip_gates"}
    for name, p in model.named_parameters():
        assert p.dtype == (torch.bfloat16 if name in bf16 else torch.float32), name


def test_control_tensor_name_patterns_set_the_dtype_rule(tg):
    """Guards CONTROL_TENSOR_NAME_PATTERNS (SPEC §2.1, §10.2): params of ndim >= 2 outside the banks and CastedLinear
    weights are fp32 exactly when their name holds a pattern.  The seed's list makes resid_mix and skip_weights fp32
    and leaves skip_gates bf16 (test_param_dtypes); a list naming skip_gates and not skip_weight flips those two; the
    banks, CastedLinear weights and 1-D params stay fp32 whatever the list."""
    h = tg.Hyperparameters.from_env({"CONTROL_TENSOR_NAME_PATTERNS": "skip_gates,resid_mix"})
    assert h.control_patterns == ("skip_gates", "resid_mix")
    assert h.keep_fp32_patterns == h.control_patterns  # the seed's default for the quantiser's list: the control list
    both = tg.Hyperparameters.from_env({"CONTROL_TENSOR_NAME_PATTERNS": "q_gain", "INT8_KEEP_FLOAT_FP32_NAME_PATTERNS": ""})
    assert both.control_patterns == ("q_gain",) and both.keep_fp32_patterns == ()
    assert tg.Hyperparameters().control_patterns[:2] == ("attn_scale", "attn_scales")
    with torch.device("meta"):
        model = tg.GPT(h)
    bf16 = {"tok_emb.weight", "bigram.embed.weight", "ve_shared.embed.weight", "skip_weights"}
    for name, p in model.named_parameters():
        assert p.dtype == (torch.bfloat16 if name in bf16 else torch.float32), name
    with torch.device("meta"):
        bare = tg.GPT(tg.Hyperparameters.from_env({"CONTROL_TENSOR_NAME_PATTERNS": ""}))
    two_d = {n for n, p in bare.named_parameters() if p.dtype == torch.bfloat16}
    assert two_d == {"tok_emb.weight", "bigram.embed.weight", "ve_shared.embed.weight", "skip_weights",
                     "skip_gates"} | {f"blocks.{i}.resid_mix" for i in range(11)}


def test_classify_param_covers_every_param_and_unbanked_names(tg):
    """Guards the one source of parameter roles: a new parameter silently landing in the wrong optimizer group or
    quantiser route (bigram.proj / ve_shared.proj are matrices but 'scalar'), and the unbanked GPTQ names."""
    with torch.device("meta"):
        model = tg.GPT(tg.Hyperparameters())
    roles = {n: tg.classify_param(n) for n, _ in model.named_parameters()}
    assert {n for n, r in roles.items() if r == "embed"} == {"tok_emb.weight", "bigram.embed.weight",
                                                              "ve_shared.embed.weight"}
    assert {n for n, r in roles.items() if r == "matrix"} == {"qo_bank", "kv_bank", "mlp_up_bank", "mlp_down_bank"}
    assert roles["bigram.proj.weight"] == roles["ve_shared.proj.weight"] == roles["skip_gates"] == "scalar"
    for i in (0, 10):
        for s in ("attn.c_q", "attn.c_k", "attn.c_v", "attn.proj", "mlp.fc", "mlp.proj"):
            assert tg.classify_param(f"blocks.{i}.{s}.weight") == "matrix"
        assert tg.classify_param(f"blocks.{i}.attn.q_gain") == "scalar"
    assert tg.classify_param("_orig_mod.qo_bank") == "matrix"
    assert tg.classify_param("module.tok_emb.weight") == "embed"


def test_init_values(tg):
    """Guards SPEC §2.1 / §12.5 init: zero W_O and W_down, orthogonal W_Q/K/V/up, orthogonal (not zero) bigram.proj
    and ve_shared.proj once both dims are >= 64, zero bigram table, control-parameter constants; fp32 params
    carry bf16-rounded values as in the seed."""
    h = tiny_config(tg, model_dim=64, num_heads=2, num_kv_heads=2, bigram_dim=64, ve_dim=64)
    torch.manual_seed(0)
    m = tg.GPT(h)
    L = h.num_layers
    assert m.qo_bank[L:].abs().sum() == 0 and m.mlp_down_bank.abs().sum() == 0
    for w in (m.qo_bank[0], m.kv_bank[0], m.kv_bank[L], m.mlp_up_bank[0], m.bigram.proj.weight, m.ve_shared.proj.weight):
        small = w if w.shape[0] <= w.shape[1] else w.T
        torch.testing.assert_close(small @ small.T, torch.eye(small.shape[0]), atol=2e-2, rtol=0)
    assert torch.equal(m.qo_bank, m.qo_bank.bfloat16().float())
    assert m.bigram.embed.weight.abs().sum() == 0
    assert abs(m.tok_emb.weight.float().std().item() - h.tied_embed_init_std) < 1e-3
    assert m.bigram.scale.item() == pytest.approx(0.05, abs=1e-3) and m.ve_shared.scale.item() == pytest.approx(0.1, abs=1e-3)
    assert torch.all(m.blocks[0].attn.q_gain == 1.5) and torch.all(m.skip_weights == 1) and torch.all(m.skip_gates == 0)
    assert torch.all(m.blocks[1].resid_mix[0] == 1) and torch.all(m.blocks[1].resid_mix[1] == 0)
    assert all(torch.all(p == 1) for p in m.ve_layer_scales) and torch.all(m.smear.gate == 0)


def test_tiny_proj_stays_zero_below_64(tg, tiny_model):
    """Guards the seed's generic-init size rule: projections with a dim < 64 keep their constructor zero init."""
    assert tiny_model.bigram.proj.weight.abs().sum() == 0 and tiny_model.ve_shared.proj.weight.abs().sum() == 0


def test_loss_at_init_is_ln_vocab(tg, tiny_model):
    """Guards a mis-scaled head or init: the untrained model must predict ~uniformly (loss ~ ln V)."""
    h = tiny_config(tg)
    ids = _ids(h, batch=4)
    loss = tiny_model(ids, _ids(h, batch=4, seed=2))
    assert loss.dtype == torch.float32 and loss.ndim == 0
    assert abs(loss.item() - math.log(h.vocab_size)) < 0.1


def test_forward_equals_ce_of_logits_and_logits_split(tg, tiny_model):
    """Guards the evaluator/SLOT interface: forward == mean CE(forward_logits) and
    forward_logits == compute_logits(forward_hidden), with fp32 softcapped logits."""
    h = tiny_config(tg)
    m = randomize_params(tiny_model)
    ids, tgt = _ids(h), _ids(h, seed=3)
    logits = m.forward_logits(ids)
    assert logits.dtype == torch.float32 and logits.shape == (2, h.train_seq_len, h.vocab_size)
    assert logits.abs().max() <= h.logit_softcap
    torch.testing.assert_close(m(ids, tgt), F.cross_entropy(logits.reshape(-1, h.vocab_size), tgt.reshape(-1)))
    hid = m.forward_hidden(ids)
    assert hid.shape == (2, h.train_seq_len, h.model_dim)
    torch.testing.assert_close(m.compute_logits(hid), logits, rtol=0, atol=0)


def test_compute_logits_rounds_hidden_to_embedding_dtype(tg, tiny_model):
    """Guards SLOT's expectation (SPEC §9.3): fp32 hidden + delta is rounded to bf16 before the tied head, so
    a perturbation below bf16 resolution does not change the logits."""
    h = tiny_config(tg)
    hid = torch.ones(1, 2, h.model_dim)
    base = tiny_model.compute_logits(hid)
    torch.testing.assert_close(tiny_model.compute_logits(hid + 1e-4), base, rtol=0, atol=0)
    assert not torch.equal(tiny_model.compute_logits(hid + 0.05), base)


@pytest.mark.parametrize("t", [0, 1, 17, 31])
def test_causality(tg, tiny_model, t):
    """Guards against information leaking from the future (attention mask, SmearGate direction, bigram hash
    reading the next token): changing token t must not change any logit before t, and must change logit t."""
    h = tiny_config(tg)
    m = randomize_params(tiny_model)
    ids = _ids(h)
    ids2 = ids.clone()
    ids2[:, t] = (ids2[:, t] + 1) % h.vocab_size
    a, b = m.forward_logits(ids), m.forward_logits(ids2)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=0)
    assert (a[:, t] - b[:, t]).abs().max() > 1e-4


def test_bigram_hash_matches_hand_computation(tg):
    """Guards the BigramHash formula (SPEC §2.2, §12.11): multipliers, XOR, modulus buckets-1, reserved bucket
    at position 0."""
    buckets = 2816
    ids = torch.tensor([[5, 1023, 0, 77, 77, 512], [1, 2, 3, 4, 5, 6]])
    got = tg.bigram_hash(ids, buckets)
    for row in range(2):
        toks = ids[row].tolist()
        want = [buckets - 1] + [((36313 * toks[i]) ^ (27191 * toks[i - 1])) % (buckets - 1) for i in range(1, 6)]
        assert got[row].tolist() == want
    assert got.dtype == torch.int64


def test_bigram_branch_uses_hash_bucket(tg):
    """Guards the bigram embedding wiring: output = scale * proj(embed[hash])."""
    bh = tg.BigramHash(48, 8, 16)
    randomize_params(bh)
    ids = torch.tensor([[3, 9, 4]])
    idx = tg.bigram_hash(ids, 48)
    want = bh.scale * (bh.embed.weight[idx].float() @ bh.proj.weight.T)
    torch.testing.assert_close(bh(ids, torch.float32, None, 31), want)


def test_rope_base_from_train_seq_len_constant(tg):
    """Guards D7: the NTK base is derived from ROPE_TRAIN_SEQ_LEN=1024 (effective ~22,081.79 at T=2048 with 16
    rope dims), unscaled at T <= 1024."""
    assert tg.ROPE_TRAIN_SEQ_LEN == 1024
    assert tg.rope_base(10000.0, 16, 2048) == pytest.approx(22081.79, abs=0.01)
    assert tg.rope_base(10000.0, 16, 1024) == 10000.0 and tg.rope_base(10000.0, 16, 64) == 10000.0
    cos, sin = tg.rope_tables(2048, 16, 10000.0, torch.device("cpu"))
    t, j = 1500, 3
    ang = t * 22081.79 ** (-2 * j / 16)
    assert cos[t, j].item() == pytest.approx(math.cos(ang), abs=1e-3)
    assert sin[t, j].item() == pytest.approx(math.sin(ang), abs=1e-3)


def test_rope_rotates_pairs_d_and_d_plus_half(tg):
    """Guards the partial rotate-half pairing (SPEC §2.4.3): dim d pairs with d+rope_dims/2, dims past rope_dims
    are untouched, and position 0 is the identity."""
    rd, D = 8, 16
    cos, sin = tg.rope_tables(5, rd, 10000.0, torch.device("cpu"))
    x = torch.randn(1, 5, 2, D)
    y = tg.apply_rope(x, cos, sin)
    torch.testing.assert_close(y[..., rd:], x[..., rd:], rtol=0, atol=0)
    torch.testing.assert_close(y[:, 0], x[:, 0])
    for t in range(5):
        for d in range(rd // 2):
            a, b = x[0, t, :, d], x[0, t, :, d + rd // 2]
            c, s = cos[t, d], sin[t, d]
            torch.testing.assert_close(y[0, t, :, d], a * c + b * s)
            torch.testing.assert_close(y[0, t, :, d + rd // 2], -a * s + b * c)


def test_rotary_cache_is_reused_and_keyed(tg):
    """Guards the cos/sin cache: reused for the same (T, device, dtype), distinct for another T, and built as
    normal tensors even under inference_mode (a later training forward must be able to save them)."""
    rot = tg.Rotary(8, 10000.0)
    with torch.inference_mode():
        a = rot(16, torch.device("cpu"), torch.float32)
    assert rot(16, torch.device("cpu"), torch.float32) is a
    assert not a[0].is_inference()
    assert rot(32, torch.device("cpu"), torch.float32)[0].shape == (32, 4)


def test_xsa_output_orthogonal_to_own_value(tg):
    """Guards XSA (SPEC §2.4.6): each head's output has no component along its own token's KV-group value, and
    the head -> group map is h // (H/Hkv)."""
    y, v = torch.randn(2, 5, 4, 8), torch.randn(2, 5, 2, 8)
    out = tg.exclusive_self_attention(y, v)
    for head in range(4):
        dots = (out[:, :, head] * v[:, :, head // 2]).sum(-1)
        assert dots.abs().max() < 1e-4
    # The component orthogonal to v is kept.
    vn = F.normalize(v[:, :, 0], dim=-1)
    keep = y[:, :, 1] - (y[:, :, 1] * vn).sum(-1, keepdim=True) * vn
    torch.testing.assert_close(out[:, :, 1], keep)


def _reference_attention(q, k, v):
    """Plain causal GQA attention: explicit softmax with a causal mask, KV heads via repeat_interleave."""
    B, T, H, D = q.shape
    rep = H // k.size(2)
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(rep, 1), v.transpose(1, 2).repeat_interleave(rep, 1)
    scores = qh @ kh.transpose(-1, -2) / math.sqrt(D)
    mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ vh).transpose(1, 2)


@pytest.mark.parametrize("prefer_cudnn", [False, True])
def test_sdpa_matches_reference_attention(tg, prefer_cudnn):
    """Guards D6: the SDPA path (native GQA, and the CUDA path's explicit KV expansion under sdpa_kernel) computes
    the same causal GQA attention as a plain reference, in the (B, T, H, D) layout of the FA kernels."""
    q, k, v = torch.randn(2, 7, 4, 8), torch.randn(2, 7, 2, 8), torch.randn(2, 7, 2, 8)
    torch.testing.assert_close(tg.sdpa_attention(q, k, v, prefer_cudnn), _reference_attention(q, k, v),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tg.causal_attention(q, k, v), _reference_attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_cuda_sdpa_path_traces_under_fullgraph_compile(tg):
    """Guards D6 under torch.compile: the cuDNN-preferring SDPA path (sdpa_kernel context with priorities) must
    trace with fullgraph=True, or the CUDA training graph would fail to compile."""
    q, k, v = torch.randn(1, 5, 4, 8), torch.randn(1, 5, 2, 8), torch.randn(1, 5, 2, 8)
    torch._dynamo.reset()
    fn = torch.compile(lambda a, b, c: tg.sdpa_attention(a, b, c, True), backend="eager", fullgraph=True)
    torch.testing.assert_close(fn(q, k, v), _reference_attention(q, k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU check for the lead: every CUDA attention kernel")
def test_cuda_attention_backends_agree_in_bf16(tg):
    """Guards D6 on a GPU: FA3 / FA2 / SDPA-cuDNN / default SDPA give the reference attention within bf16
    tolerance, forward and backward."""
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(2, 256, h, 64, device=dev, generator=g) for h in (8, 4, 4))
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ref = _reference_attention(qr, kr, vr)
    ref.square().sum().backward()
    ref = ref.detach()
    kernels = {"sdpa": lambda a, b, c: tg.sdpa_attention(a, b, c, False),
               "sdpa_cudnn": lambda a, b, c: tg.sdpa_attention(a, b, c, True)}
    if tg.flash_attn_3_func is not None:
        kernels["fa3"] = lambda a, b, c: tg.causal_attention(a, b, c)
    elif tg.flash_attn_2_func is not None:
        kernels["fa2"] = lambda a, b, c: tg.causal_attention(a, b, c)
    for name, fn in kernels.items():
        qb, kb, vb = (t.bfloat16().requires_grad_() for t in (q, k, v))
        out = fn(qb, kb, vb)
        torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2, msg=name)
        out.float().square().sum().backward()
        for got, want in zip((qb, kb, vb), (qr, kr, vr)):
            torch.testing.assert_close(got.grad.float(), want.grad, atol=5e-2, rtol=5e-2, msg=name)


def test_attention_backend_name_on_cpu(tg):
    """Guards the logged backend name: CPU runs use SDPA (D6)."""
    assert tg.attention_backend_name(torch.device("cpu")) == "sdpa"


def _reference_forward(m, h, ids):
    """An independent, literal transcription of SPEC §2.2-§2.8 in fp32, reading the model's parameters."""
    L, d, H, Hkv = h.num_layers, h.model_dim, h.num_heads, h.num_kv_heads
    D, rd = d // H, h.rope_dims
    B, T = ids.shape
    P = {n: p.float() for n, p in m.named_parameters()}
    rms = lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + torch.finfo(torch.float32).eps)
    prev = torch.cat((torch.full_like(ids[:, :1], -1), ids[:, :-1]), 1)
    bidx = torch.where(prev < 0, torch.full_like(ids, h.bigram_vocab_size - 1),
                       ((36313 * ids) ^ (27191 * prev.clamp_min(0))) % (h.bigram_vocab_size - 1))
    e = P["tok_emb.weight"][ids] + P["bigram.scale"] * (P["bigram.embed.weight"][bidx] @ P["bigram.proj.weight"].T)
    x = rms(e)
    g = torch.sigmoid(P["smear.gate"])
    x = (1 - g) * x + g * torch.cat((torch.zeros_like(x[:, :1]), x[:, :-1]), 1)
    x0 = x
    ve_layers = h.ve_layer_ids
    if ve_layers:
        ve = P["ve_shared.scale"] * (P["ve_shared.embed.weight"][ids] @ P["ve_shared.proj.weight"].T)
    base = h.rope_base * (T / 1024) ** (rd / (rd - 2)) if T > 1024 else h.rope_base
    pos = torch.arange(T, dtype=torch.float32)[:, None] * base ** (-torch.arange(0, rd, 2).float() / rd)
    cos, sin = pos.cos()[None, :, None], pos.sin()[None, :, None]

    def rope(t):
        a, b = t[..., : rd // 2], t[..., rd // 2: rd]
        return torch.cat((a * cos + b * sin, -a * sin + b * cos, t[..., rd:]), -1)

    stack = []
    for i in range(L):
        j = i - L // 2
        if j >= 0 and stack:
            s = P["skip_weights"][j] * stack.pop()
            gate = torch.sigmoid(P["skip_gates"][j])
            x = gate * x + (1 - gate) * s
        mix = P[f"blocks.{i}.resid_mix"]
        x = mix[0] * x + mix[1] * x0
        ln = 1 / math.sqrt(i + 1) if h.ln_scale else 1.0
        hh = rms(x) * ln
        q = rms((hh @ P["qo_bank"][i].T).view(B, T, H, D))
        k = rms((hh @ P["kv_bank"][i].T).view(B, T, Hkv, D))
        v = hh @ P["kv_bank"][L + i].T
        if i in ve_layers:
            v = v + P[f"ve_layer_scales.{ve_layers.index(i)}"] * ve
        v = v.view(B, T, Hkv, D)
        q = rope(q) * P[f"blocks.{i}.attn.q_gain"][:, None]
        y = _reference_attention(q, rope(k), v)
        if i >= L - h.xsa_last_n:
            vh = F.normalize(v, dim=-1).repeat_interleave(H // Hkv, 2)
            y = y - (y * vh).sum(-1, keepdim=True) * vh
        x = x + P[f"blocks.{i}.attn_scale"] * (y.reshape(B, T, d) @ P["qo_bank"][L + i].T)
        u = F.leaky_relu((rms(x) * ln) @ P["mlp_up_bank"][i].T, h.negative_slope) ** 2
        x = x + P[f"blocks.{i}.mlp_scale"] * (u @ P["mlp_down_bank"][i].T)
        if i < L // 2:
            stack.append(x)
    hid = rms(x)
    z = hid.bfloat16().float() @ P["tok_emb.weight"].T
    return hid, h.logit_softcap * torch.tanh(z / h.logit_softcap)


@pytest.mark.parametrize("overrides", [
    {}, {"num_layers": 5, "xsa_last_n": 2, "ve_layers": "0,3"},
    {"num_layers": 4, "xsa_last_n": 0, "ve_enabled": False, "rope_dims": 0, "ln_scale": False},
    {"num_layers": 1, "xsa_last_n": 1, "ve_layers": "0", "num_kv_heads": 4, "train_seq_len": 1100}])
def test_forward_matches_literal_spec_reference(tg, overrides):
    """Guards the whole forward against wiring slips the other tests cannot see: U-Net skip order (LIFO) and
    gate direction, resid_mix, ln_scale, q/k norm, q_gain after RoPE, VE layers, XSA layers, LeakyReLU^2,
    final norm and softcap; checked against a literal SPEC transcription with random weights."""
    h = tiny_config(tg, **overrides)
    torch.manual_seed(0)
    m = randomize_params(tg.GPT(h), std=0.2)
    ids = _ids(h)
    ref_hidden, ref_logits = _reference_forward(m, h, ids)
    torch.testing.assert_close(m.forward_hidden(ids), ref_hidden, atol=1e-4, rtol=1e-4)
    # Logits only loosely: the bf16 rounding of the hidden state can flip on fp32-level differences.
    torch.testing.assert_close(m.forward_logits(ids), ref_logits, atol=2e-2, rtol=0)


@pytest.mark.parametrize("overrides", [{}, {"num_layers": 5, "xsa_last_n": 2, "ve_layers": "0,3"}])
def test_backward_matches_literal_spec_reference(tg, overrides):
    """Every parameter's gradient against autograd through the literal SPEC transcription (fp32, CPU): guards the
    places where the model computes the same function in another form (attn_scale / mlp_scale folded into W_O /
    W_down, PERF #21; XSA's hand-written torch backward; the fused Q|K|V projection).  The Triton ops' gradients are
    checked against fp64 in test_kernels.py."""
    h = tiny_config(tg, **overrides)
    torch.manual_seed(0)
    m = randomize_params(tg.GPT(h), std=0.2)
    ids = _ids(h)
    w = torch.randn(*ids.shape, h.model_dim, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad((m.forward_hidden(ids) * w).sum(), list(m.parameters()), allow_unused=True)
    ref_hidden, _ = _reference_forward(m, h, ids)
    want = torch.autograd.grad((ref_hidden * w).sum(), list(m.parameters()), allow_unused=True)
    for (name, p), g, r in zip(m.named_parameters(), got, want):
        if r is None:
            assert g is None or g.abs().max() == 0, name
            continue
        assert g is not None, f"{name}: no gradient, the reference has one"
        # fp32 params agree to within 8e-6 of their largest gradient; bf16 ones (embeddings) to bf16 rounding (<= 0.7%)
        scale = (1e-2 if p.dtype == torch.bfloat16 else 2e-5) * r.abs().max().item()
        torch.testing.assert_close(g.float(), r.float(), atol=scale, rtol=0, msg=lambda s, n=name: f"{n}: {s}")


def test_compiled_fullgraph_matches_eager(tg, tiny_model):
    """Guards compile-friendliness: torch.compile(fullgraph=True, dynamic=False) must trace the whole training
    forward and backward without graph breaks, and give the eager loss."""
    from torch._dynamo.testing import CompileCounter

    h = tiny_config(tg)
    m = randomize_params(tiny_model)
    ids, tgt = _ids(h), _ids(h, seed=4)
    torch._dynamo.reset()
    cnt = CompileCounter()
    cm = torch.compile(m, backend=cnt, fullgraph=True, dynamic=False)
    loss = cm(ids, tgt)
    loss.backward()
    torch.testing.assert_close(loss, m(ids, tgt), atol=1e-5, rtol=1e-5)
    assert cnt.frame_count == 1
    assert all(p.grad is not None for p in m.parameters())


def test_hessian_store_keys_shapes_psd_and_accumulation(tg, tiny_model):
    """Guards GPTQ's recorded inputs (SPEC §7.1): one fp32 X^T X per block input (qkv, attn.proj, mlp.fc,
    mlp.proj) with the right widths, symmetric PSD, summed over tokens (two sequences in one batch == the sum of
    each alone), and recording off again once the store is None."""
    h = tiny_config(tg)
    m = randomize_params(tiny_model).eval()
    ids = _ids(h)
    m.hessian_store = {}
    with torch.inference_mode():
        m.forward_logits(ids)
    both = m.hessian_store
    singles = []
    for row in range(2):
        m.hessian_store = {}
        with torch.inference_mode():
            m.forward_logits(ids[row:row + 1])
        singles.append(m.hessian_store)
    m.hessian_store = None
    widths = {"attn.qkv": h.model_dim, "attn.proj": h.model_dim, "mlp.fc": h.model_dim,
              "mlp.proj": int(h.mlp_mult * h.model_dim)}
    assert set(both) == {f"blocks.{i}.{k}" for i in range(h.num_layers) for k in widths}
    for key, H in both.items():
        w = widths[key.split(".", 2)[2]]
        assert H.shape == (w, w) and H.dtype == torch.float32
        torch.testing.assert_close(H, H.T)
        assert torch.linalg.eigvalsh(H.double()).min() > -1e-6 * H.diag().max()
        torch.testing.assert_close(H, singles[0][key] + singles[1][key], rtol=1e-4, atol=1e-4)
    m.forward_logits(ids)
    assert m.hessian_store is None


def test_hessian_qkv_is_normed_block_input(tg, tiny_model):
    """Guards which tensor is recorded for attn.qkv: RMSNorm(x_in) * ln_scale, i.e. rows of RMS 1/sqrt(i+1), so
    trace(H) = tokens * d / (i + 1)."""
    h = tiny_config(tg)
    m = randomize_params(tiny_model).eval()
    m.hessian_store = {}
    with torch.inference_mode():
        m.forward_logits(_ids(h))
    for i in range(h.num_layers):
        tr = m.hessian_store[f"blocks.{i}.attn.qkv"].trace().item()
        assert tr == pytest.approx(2 * h.train_seq_len * h.model_dim / (i + 1), rel=1e-3)


def test_every_parameter_gets_a_gradient(tg, tiny_model):
    """Guards detached or dead branches (a .detach(), an unused scale, a skip gate never read): with random
    weights every parameter must receive a non-zero gradient from the training loss."""
    h = tiny_config(tg)
    m = randomize_params(tiny_model).train()
    m(_ids(h), _ids(h, seed=5)).backward()
    dead = [n for n, p in m.named_parameters() if p.grad is None or p.grad.float().abs().sum() == 0]
    assert dead == []


def _xsa_reference(y, v):
    B, T, H, D = y.shape
    yg = y.reshape(B, T, v.size(2), H // v.size(2), D)
    vn = torch.nn.functional.normalize(v, dim=-1).unsqueeze(3)
    return (yg - (yg * vn).sum(-1, keepdim=True) * vn).reshape(B, T, H, D)


def test_xsa_hand_written_backward_matches_autograd(tg):
    """Guards XSA's custom backward: output and gradients equal autograd through F.normalize (fp64 gradcheck too),
    including a zero value vector (below normalize's floor)."""
    g = torch.Generator().manual_seed(0)
    y = torch.randn(2, 5, 4, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 5, 2, 8, generator=g, dtype=torch.float64)
    v[0, 1, 1] = 0.0
    v.requires_grad_(True)
    out = tg.exclusive_self_attention(y, v)
    ref = _xsa_reference(y, v)
    torch.testing.assert_close(out, ref)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad((out * w).sum(), (y, v))
    want = torch.autograd.grad((ref * w).sum(), (y, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    v2 = torch.randn(1, 3, 2, 4, generator=g, dtype=torch.float64, requires_grad=True)
    y2 = torch.randn(1, 3, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(tg.exclusive_self_attention, (y2, v2))


def test_xsa_bf16_inputs_keep_dtype_and_match_fp32(tg):
    """Guards the fp32 internals: bf16 in, bf16 out and bf16 grads, equal to the fp32 computation rounded once."""
    g = torch.Generator().manual_seed(1)
    y = torch.randn(2, 6, 4, 16, generator=g).bfloat16().requires_grad_(True)
    v = torch.randn(2, 6, 2, 16, generator=g).bfloat16().requires_grad_(True)
    out = tg.exclusive_self_attention(y, v)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, _xsa_reference(y.float(), v.float()).bfloat16(), atol=0, rtol=0)
    out.float().square().sum().backward()
    assert y.grad.dtype == torch.bfloat16 and v.grad.dtype == torch.bfloat16


def test_rope_buffers_match_tables_and_stay_out_of_state_dict(tg):
    """Guards the RoPE buffers: the model reads cos/sin of its train/eval lengths from non-persistent buffers equal
    to rope_tables (so checkpoints and artifacts do not change), and falls back to the computed tables for other
    lengths and when rope_ntk_len asks for a longer length's base."""
    h = tiny_config(tg, train_seq_len=32, eval_seq_len=48)
    model = tg.GPT(h)
    assert not any(k.startswith("rope_") for k in model.state_dict())
    for T in (32, 48):
        cos, sin = model.rope(T, torch.float32)
        ref = tg.rope_tables(T, h.rope_dims, h.rope_base, torch.device("cpu"))
        assert cos is not ref[0]
        torch.testing.assert_close(cos, ref[0], rtol=0, atol=0)
        torch.testing.assert_close(sin, ref[1], rtol=0, atol=0)
    assert model.rope(16, torch.float32)[0].shape == (16, h.rope_dims // 2)
    model.rope_ntk_len = 2048
    cos = model.rope(32, torch.float32)[0]
    torch.testing.assert_close(cos, tg.rope_tables(32, h.rope_dims, h.rope_base, torch.device("cpu"), 2048)[0])
