"""Section 1 CONFIG: Hyperparameters.from_env parsing, the record-run defaults (SPEC §10.2 + section D), validate()."""

from __future__ import annotations

import dataclasses

import pytest

from conftest import tiny_config

# SPEC §10.2 with the record run's overrides (PR #1172's launch command) as the defaults, plus the switches of
# section D.  Written from the SPEC, not from the code: a changed default must be a deliberate edit here too.
RECORD_DEFAULTS = {
    "DATA_PATH": "./data/datasets/fineweb10B_sp1024", "TOKENIZER_PATH": "./data/tokenizers/fineweb_1024_bpe.model",
    "SEED": 1337, "VAL_BATCH_SIZE": 524288, "VAL_LOSS_EVERY": 4000, "TRAIN_LOG_EVERY": 500, "ITERATIONS": 20000,
    "WARMDOWN_ITERS": 4000, "WARMUP_STEPS": 20, "TRAIN_BATCH_TOKENS": 786432, "TRAIN_SEQ_LEN": 2048,
    "EVAL_SEQ_LEN": 2048, "MAX_WALLCLOCK_SECONDS": 600.0, "QK_GAIN_INIT": 1.5, "VOCAB_SIZE": 1024, "NUM_LAYERS": 11,
    "NUM_KV_HEADS": 4, "MODEL_DIM": 512, "NUM_HEADS": 8, "MLP_MULT": 3.0, "TIE_EMBEDDINGS": True,
    "ROPE_BASE": 10000.0, "LOGIT_SOFTCAP": 30.0, "EMBED_LR": 0.6, "HEAD_LR": 0.008, "TIED_EMBED_LR": 0.035,
    "TIED_EMBED_INIT_STD": 0.005, "MATRIX_LR": 0.03, "MATRIX_LR_EARLY": 0.025, "MATRIX_LR_LATE": 0.03,
    "BANK_SPLIT": 5, "SCALAR_LR": 0.025, "MUON_MOMENTUM": 0.99, "MUON_BACKEND_STEPS": 5,
    "MUON_MOMENTUM_WARMUP_START": 0.92, "MUON_MOMENTUM_WARMUP_STEPS": 1500, "BETA1": 0.9, "BETA2": 0.95,
    "ADAM_EPS": 1e-8, "GRAD_CLIP_NORM": 0.3, "EVAL_STRIDE": 64, "MUON_BETA2": 0.95, "SWA_ENABLED": True,
    "SWA_EVERY": 50, "MUON_WD": 0.04, "ADAM_WD": 0.04, "BIGRAM_VOCAB_SIZE": 2816, "BIGRAM_DIM": 160,
    "XSA_LAST_N": 11, "ROPE_DIMS": 16, "LN_SCALE": True, "VE_ENABLED": True, "VE_DIM": 128, "VE_LAYERS": "9,10",
    "TTT_ENABLED": False, "TTT_LR": 0.002, "TTT_EPOCHS": 3, "TTT_CHUNK_TOKENS": 32768, "TTT_FREEZE_BLOCKS": 2,
    "TTT_MOMENTUM": 0.9, "TTT_BATCH_SEQS": 32, "TTT_GRAD_CLIP": 1.0, "NEGATIVE_SLOPE": 0.5, "USE_GPTQ": True,
    "GPTQ_CALIB_SAMPLES": 64, "GPTQ_RESERVE_MS": 9000, "LATE_QAT_THRESHOLD": 0.15, "QUANT_CLIP_RANGE": 31,
    "SLOT_ENABLED": True, "SLOT_LR": 0.005, "SLOT_STEPS": 8,
    # section D switches
    "SPLIT_LR_ENABLED": True, "QAT_ENABLED": True, "GPTQ_CALIB": "train", "SLOT_MODE": "causal", "TARGET_MB": 16.0,
}


def _field_types(tg):
    return {f.name.upper(): type(f.default) for f in dataclasses.fields(tg.Hyperparameters)}


def test_defaults_are_the_record_run(tg):
    """Guards drift from the record: every SPEC §10.2 env var exists with the record run's value and type
    (WARMDOWN_ITERS=4000, BIGRAM_DIM=160, SLOT_ENABLED=1, SLOT_LR=0.005, SLOT_STEPS=8, MATRIX_LR=0.03, ...)."""
    h = tg.Hyperparameters()
    for key, want in RECORD_DEFAULTS.items():
        got = getattr(h, key.lower())
        assert got == want and type(got) is type(want), (key, got, want)
    h.validate()


def test_from_env_parses_by_type(tg):
    """Guards type confusion (an int field silently a float, '0' read as truthy): each field is parsed by the type
    of its default, whitespace-stripped, and unknown keys are ignored."""
    env, want = {"UNRELATED_VAR": "x", "NUM_LAYER": "3"}, {}
    for i, (key, typ) in enumerate(_field_types(tg).items()):
        raw, val = {bool: ("0", False), int: (f" {i + 7} ", i + 7), float: ("2.5e-1", 0.25), str: ("abc", "abc")}[typ]
        env[key], want[key] = raw, val
    h = tg.Hyperparameters.from_env(env)
    for key, val in want.items():
        got = getattr(h, key.lower())
        assert got == val and type(got) is type(val), key
    assert tg.Hyperparameters.from_env({"MLP_MULT": "4"}).mlp_mult == 4.0
    assert type(tg.Hyperparameters.from_env({"MLP_MULT": "4"}).mlp_mult) is float
    assert tg.Hyperparameters.from_env({"SLOT_ENABLED": "0", "USE_GPTQ": "1"}).slot_enabled is False


@pytest.mark.parametrize("key,raw", [
    ("SLOT_ENABLED", "true"), ("SLOT_ENABLED", "2"), ("QAT_ENABLED", ""), ("TIE_EMBEDDINGS", "yes"),
    ("ITERATIONS", "1.5"), ("ITERATIONS", "ten"), ("SEED", ""), ("MATRIX_LR", "fast"), ("MAX_WALLCLOCK_SECONDS", "10m"),
])
def test_from_env_bad_values_name_the_var(tg, key, raw):
    """Guards cryptic int()/float() tracebacks: a bad value raises ValueError naming the env var and the value;
    booleans accept only 0 and 1."""
    with pytest.raises(ValueError) as e:
        tg.Hyperparameters.from_env({key: raw})
    assert key in str(e.value) and repr(raw) in str(e.value)


def test_run_id_and_frozen(tg):
    """Guards log-file collisions and accidental mutation: RUN_ID defaults to a fresh uuid4, a given RUN_ID is kept,
    and the config is frozen."""
    a, b = tg.Hyperparameters.from_env({}), tg.Hyperparameters.from_env({})
    assert a.run_id and a.run_id != b.run_id and len(a.run_id) == 36
    assert dataclasses.replace(a, run_id="") == dataclasses.replace(tg.Hyperparameters(), run_id="")
    assert tg.Hyperparameters.from_env({"RUN_ID": "exp1"}).run_id == "exp1"
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.seed = 1


def test_derived_properties(tg):
    """Guards the paths and budgets other sections derive from the config."""
    h = tg.Hyperparameters.from_env({"DATA_PATH": "/d/x", "RUN_ID": "r"})
    assert h.train_files == "/d/x/fineweb_train_*.bin" and h.val_files == "/d/x/fineweb_val_*.bin"
    assert h.logfile.replace("\\", "/") == "logs/r.txt"
    assert h.ve_layer_ids == (9, 10) and dataclasses.replace(h, ve_enabled=False).ve_layer_ids == ()
    assert h.head_dim == 64 and h.target_bytes == 16_000_000
    assert h.train_budget_ms == 591_000.0  # 600 s minus the 9 s GPTQ reserve
    assert dataclasses.replace(h, use_gptq=False).train_budget_ms == 600_000.0
    assert dataclasses.replace(h, max_wallclock_seconds=0.0).train_budget_ms == 0.0


@pytest.mark.parametrize("overrides,var", [
    (dict(num_heads=7), "NUM_HEADS"),
    (dict(num_kv_heads=3), "NUM_KV_HEADS"),
    (dict(rope_dims=10, model_dim=128, num_heads=16), "ROPE_DIMS"),
    (dict(rope_dims=7), "ROPE_DIMS"),
    (dict(num_layers=0), "NUM_LAYERS"),
    (dict(xsa_last_n=12), "XSA_LAST_N"),
    (dict(vocab_size=70000), "VOCAB_SIZE"),
    (dict(tie_embeddings=False), "TIE_EMBEDDINGS"),
    (dict(ve_layers="9,x"), "VE_LAYERS"),
    (dict(ve_layers="11"), "VE_LAYERS"),
    (dict(ve_layers="9,9"), "VE_LAYERS"),
    (dict(train_seq_len=1), "TRAIN_SEQ_LEN"),
    (dict(eval_stride=4096), "EVAL_STRIDE"),
    (dict(train_batch_tokens=1024), "TRAIN_BATCH_TOKENS"),
    (dict(train_batch_tokens=0), "TRAIN_BATCH_TOKENS"),
    (dict(mlp_mult=0.001), "MLP_MULT"),
    (dict(ve_dim=0), "VE_DIM"),
    (dict(muon_wd=-1.0), "MUON_WD"),
    (dict(adam_wd=-0.5), "ADAM_WD"),
    (dict(gptq_reserve_ms=600_000), "GPTQ_RESERVE_MS"),
    (dict(max_wallclock_seconds=-1.0), "MAX_WALLCLOCK_SECONDS"),
    (dict(matrix_lr_early=-0.1), "MATRIX_LR_EARLY"),
    (dict(muon_momentum=1.0), "MUON_MOMENTUM"),
    (dict(beta2=1.5), "BETA2"),
    (dict(adam_eps=0.0), "ADAM_EPS"),
    (dict(late_qat_threshold=2.0), "LATE_QAT_THRESHOLD"),
    (dict(gptq_calib="random"), "GPTQ_CALIB"),
    (dict(quant_clip_range=0), "QUANT_CLIP_RANGE"),
    (dict(target_mb=0.0), "TARGET_MB"),
    (dict(slot_mode="legal"), "SLOT_MODE"),
    (dict(slot_steps=-1), "SLOT_STEPS"),
    (dict(ttt_enabled=True), "TTT_ENABLED"),
])
def test_validate_names_the_var(tg, overrides, var):
    """Guards a crash deep inside training on a bad setting: validate() raises ValueError naming the env var."""
    h = dataclasses.replace(tg.Hyperparameters(), **overrides)
    with pytest.raises(ValueError, match=var):
        h.validate()


def test_ve_dim_is_free_when_the_value_embedding_is_off(tg):
    """Guards VE_DIM's check against over-reach: with VE_ENABLED=0 the width is unused, so any value passes."""
    dataclasses.replace(tg.Hyperparameters(), ve_enabled=False, ve_dim=0).validate()


def test_export_needs_are_checked_before_training(tg, monkeypatch):
    """Guards the start-up check of what the export after training needs (check_export_ready, called by main before
    any training): a TARGET_MB at or below this file's own bytes and a missing brotli fail at once, naming the
    cause, instead of after the run's training budget is spent."""
    h = tg.Hyperparameters()
    tg.check_export_ready(h)  # the record's 16 MB and brotli installed: fine
    code = tg.code_size_bytes()
    with pytest.raises(ValueError, match=rf"TARGET_MB=0.01 \(10000 bytes\).*{code} bytes"):
        tg.check_export_ready(dataclasses.replace(h, target_mb=0.01))
    with pytest.raises(ValueError, match="under the cap"):  # code + 1: no byte left for the model (total < cap)
        tg.check_export_ready(dataclasses.replace(h, target_mb=(code + 1) / 1e6))
    tg.check_export_ready(dataclasses.replace(h, target_mb=(code + 2) / 1e6))
    assert tg.model_budget(code + 2, code) == 1
    monkeypatch.setattr(tg, "brotli", None)
    with pytest.raises(RuntimeError, match="pip install brotli"):
        tg.check_export_ready(h)


def test_near_misses_flag_typos_of_settings_only(tg):
    """Guards the header's typo warning (Hyperparameters.near_misses): an env var one letter off a setting is named
    with the setting it nearly spells; settings themselves and the usual launcher / library variables are not."""
    env = {"SLOT_ENABLE": "0", "GPTQ_CALIB_SAMPLE": "3", "WARMDOWN_ITER": "5", "SLOT_ENABLED": "1", "SEED": "1",
           "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "x", "MASTER_PORT": "1", "MAX_JOBS": "4",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONHASHSEED": "0", "TRAIN_GPT": "a.py",
           "CUDA_VISIBLE_DEVICES": "0", "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
    assert tg.Hyperparameters.near_misses(env) == [("GPTQ_CALIB_SAMPLE", "GPTQ_CALIB_SAMPLES"),
                                                   ("SLOT_ENABLE", "SLOT_ENABLED"), ("WARMDOWN_ITER", "WARMDOWN_ITERS")]


def test_tiny_config_is_valid(tg):
    """Guards the tests' own fixture: the tiny config used across the suite passes validate()."""
    tiny_config(tg).validate()
    tg.Hyperparameters.from_env({"NUM_LAYERS": "2", "MODEL_DIM": "64", "NUM_HEADS": "4", "NUM_KV_HEADS": "2",
                                 "VE_LAYERS": "0,1", "XSA_LAST_N": "2"}).validate()
