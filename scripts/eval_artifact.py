"""Re-evaluate a saved artifact (final_model.int6.ptz) without retraining: round-trip and sliding-window scores.
Given the trained weights instead (final_model.pt, which train_gpt.py writes before anything after training can
fail), it first exports them as the run would have (GPTQ calibration on the training data, int6, brotli, fitted to
TARGET_MB: final_model.int6.ptz), then scores that: the way back from an export that failed (brotli missing, disk
full, TARGET_MB too small) without training again.  Run it from the run's folder (it writes final_model.pt and
final_model.int6.ptz there, as the run does), with TRAIN_GPT = the train_gpt.py that ran (the code size counted
against TARGET_MB is that file's: the minified submission's, not the repo's source) and under torchrun at the run's
GPU count (the calibration batches depend on the ranks).

Same env vars as train_gpt.py (DATA_PATH, TOKENIZER_PATH, model shape, EVAL_*, SLOT_*, GPTQ_*, TARGET_MB); the model
shape must match the run that wrote the file.  Examples:
    SLOT_MODE=standard python scripts/eval_artifact.py final_model.int6.ptz
    SLOT_ENABLED=0 torchrun --standalone --nproc_per_node=8 scripts/eval_artifact.py final_model.int6.ptz
    torchrun --standalone --nproc_per_node=8 scripts/eval_artifact.py final_model.pt
Not counted code: it loads train_gpt.py (or the file named by TRAIN_GPT) by path and reuses its functions.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path


def load_train_gpt(path: str):
    spec = importlib.util.spec_from_file_location("train_gpt", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["train_gpt"] = mod
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit("usage: eval_artifact.py ARTIFACT   (final_model.int6.ptz; or final_model.pt, exported first)")
    artifact = sys.argv[1]
    if not os.path.isfile(artifact):
        raise SystemExit(f"artifact {artifact!r} not found")
    tg = load_train_gpt(os.environ.get("TRAIN_GPT", str(Path(__file__).resolve().parents[1] / "train_gpt.py")))
    h = tg.Hyperparameters.from_env()
    h.validate()
    checkpoint = artifact.endswith(".pt")
    if checkpoint:
        tg.check_export_ready(h)
        if os.path.abspath(artifact) != os.path.abspath("final_model.pt") and any(
                os.path.exists(f) for f in ("final_model.pt", "final_model.int6.ptz")):
            raise SystemExit(f"exporting {artifact} writes final_model.pt and final_model.int6.ptz here, which hold "
                             "another run's files: run it from the checkpoint's folder")
    d = tg.dist_info()
    device = tg.setup_runtime(h, d)
    tg.init_logging(h.logfile, d.is_main)
    try:
        val_data = tg.load_validation_data(h, device, h.train_seq_len)
        tg.log0(f"eval_artifact:{artifact} val_tokens:{val_data.tokens.numel() - 1} world_size:{d.world_size} "
                f"attention_backend:{tg.attention_backend_name(device)}")
        if checkpoint:
            artifact = export_checkpoint(tg, h, d, device, artifact)
        model = tg.load_artifact(h, artifact, device)
        tg.evaluate_artifact_model(h, d, device, model, val_data)
    finally:
        if tg.is_distributed():
            tg.dist.destroy_process_group()


def export_checkpoint(tg, h, d, device, path: str) -> str:
    """The trained weights of `path` into a model of the env's shape, then train_gpt's own export; returns the
    artifact's path.  The checkpoint is loaded strictly: a model shape other than the run's fails here, naming the
    tensors that differ."""
    import torch
    state = torch.load(path, map_location="cpu", weights_only=True)
    base = tg.build_model(h, device)
    try:
        base.load_state_dict(state)
    except RuntimeError as e:
        raise SystemExit(f"{path} does not fit the model the env vars describe (set the run's NUM_LAYERS, MODEL_DIM, "
                         f"MLP_MULT, BIGRAM_*, VE_* ...): {e}") from None
    tg.log0(f"eval_artifact:exporting {path} ({sum(t.numel() for t in state.values())} values) code:{tg.__file__}")
    return tg.export_artifact(h, d, device, base)


if __name__ == "__main__":
    main()
