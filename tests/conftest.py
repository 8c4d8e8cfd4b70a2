"""Shared fixtures: load train_gpt.py by path (never `import train_gpt`), parametrised over the readable source and
the built self-extracting artifact, so the shipped file is the tested file (STYLE §3.5, §3.11)."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "train_gpt.py"
SHARED = ROOT.parent / "shared"
TOKENIZER = ROOT / "data" / "tokenizers" / "fineweb_1024_bpe.model"
SAMPLE_DIR = ROOT / "data" / "sample"

# a tiny record-architecture run as env vars, for the tests that launch train_gpt.py or a script in a subprocess
TINY_ENV = dict(
    DATA_PATH=str(SAMPLE_DIR), TOKENIZER_PATH=str(TOKENIZER), NUM_LAYERS="2", MODEL_DIM="64", NUM_HEADS="4",
    NUM_KV_HEADS="2", BIGRAM_VOCAB_SIZE="64", BIGRAM_DIM="16", VE_DIM="16", VE_LAYERS="1", XSA_LAST_N="2",
    TRAIN_SEQ_LEN="64", EVAL_SEQ_LEN="64", EVAL_STRIDE="32", TRAIN_BATCH_TOKENS="4096", ITERATIONS="6",
    WARMUP_STEPS="2", MAX_WALLCLOCK_SECONDS="0", VAL_LOSS_EVERY="3", TRAIN_LOG_EVERY="1", GPTQ_CALIB_SAMPLES="2",
    SLOT_STEPS="2", VAL_BATCH_SIZE="4096", WARMDOWN_ITERS="2", OMP_NUM_THREADS="1",
)

os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on CPU tensors (tests/test_kernels.py)
os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the subprocess and gloo tests
torch.set_num_threads(1)  # 2 OpenMP threads on 2 busy cores can make small matmuls 500x slower


def load_module(path: Path, name: str):
    """Load a script by path as a fresh module (nothing runs: main() is behind __name__ == '__main__')."""
    spec = importlib.util.spec_from_file_location(name, str(path))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


_ARTIFACT_CACHE: dict = {}


def leave_finished_worker() -> None:
    """The last call of an mp.spawn'd gloo worker that finished and tore its group down: os._exit(0) skips the
    interpreter's teardown, where a gloo rank now and then aborts after its work is done (train_gpt.py's
    leave_without_teardown).  A worker that raised never gets here and reports through mp.spawn as before."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def built_artifact(tmp_root: Path) -> Path:
    """Build dist/train_gpt.py once per session with build_submission.py (skips if the builder is unavailable), or
    take the build TRAIN_GPT_ARTIFACT names (a GPU box whose Python the builder refuses: build it under 3.10/3.11
    with `build_submission.py --out`, from the same train_gpt.py, and carry it)."""
    if "path" not in _ARTIFACT_CACHE and os.environ.get("TRAIN_GPT_ARTIFACT"):
        path = Path(os.environ["TRAIN_GPT_ARTIFACT"])
        if not path.is_file():
            raise ValueError(f"TRAIN_GPT_ARTIFACT={path}: no such file")  # an error, not a skip: it was asked for
        _ARTIFACT_CACHE["path"] = path
    if "path" not in _ARTIFACT_CACHE:
        builder = load_module(ROOT / "build_submission.py", "build_submission_for_tests")
        out = tmp_root / "artifact_train_gpt.py"
        builder.build_artifact(SOURCE, out)
        _ARTIFACT_CACHE["path"] = out
    return _ARTIFACT_CACHE["path"]


@pytest.fixture(scope="session")
def tg_source():
    return load_module(SOURCE, "train_gpt_source")


@pytest.fixture(scope="session", params=["source", "artifact"])
def tg(request, tmp_path_factory):
    """The train_gpt module, once as the readable source and once as the minified artifact."""
    if request.param == "source":
        return load_module(SOURCE, "train_gpt_source")
    try:
        path = built_artifact(tmp_path_factory.mktemp("artifact"))
    except (ImportError, AttributeError, FileNotFoundError) as e:  # builder missing in a partial checkout
        pytest.skip(f"artifact build unavailable: {e}")
    except RuntimeError as e:
        if "building under Python" not in str(e):  # a real build failure fails the artifact's tests
            raise
        # the builder refuses this Python (newer than the evaluator's)
        pytest.skip(f"artifact build refused: {e}; TRAIN_GPT_ARTIFACT can name a build made elsewhere")
    return load_module(path, "train_gpt_artifact")


def randomize_params(model, std=0.3, seed=0):
    """Give every parameter random values so that every branch (bigram, VE, skips, zero-init W_O/W_down) is live."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_((torch.randn(p.shape, generator=g) * std).to(p.dtype))
    return model


def tiny_config(mod, **overrides):
    """A tiny but complete config of the record architecture (all features on), fast on 2 CPU cores."""
    base = dict(
        vocab_size=64, num_layers=3, model_dim=64, num_heads=4, num_kv_heads=2, mlp_mult=2.0,
        bigram_vocab_size=48, bigram_dim=16, ve_dim=16, ve_layers="1,2", xsa_last_n=3, rope_dims=8,
        train_seq_len=32, eval_seq_len=32, eval_stride=8, train_batch_tokens=8 * 4 * 32, val_batch_size=8 * 32,
        bank_split=1, warmup_steps=0, iterations=4, max_wallclock_seconds=0.0, warmdown_iters=2,
        muon_momentum_warmup_steps=4, gptq_calib_samples=2, run_id="test",
    )
    base.update(overrides)
    return dataclasses.replace(mod.Hyperparameters(), **base)


@pytest.fixture
def tiny_h(tg):
    return tiny_config(tg)
