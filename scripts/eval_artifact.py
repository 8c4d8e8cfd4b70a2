"""Re-evaluate a saved artifact (final_model.int6.ptz) without retraining: round-trip and sliding-window scores.

Same env vars as train_gpt.py (DATA_PATH, TOKENIZER_PATH, model shape, EVAL_*, SLOT_*); the model shape must match the
run that wrote the artifact.  Examples:
    SLOT_MODE=standard python scripts/eval_artifact.py final_model.int6.ptz
    SLOT_ENABLED=0 torchrun --standalone --nproc_per_node=8 scripts/eval_artifact.py final_model.int6.ptz
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
        raise SystemExit("usage: eval_artifact.py ARTIFACT   (e.g. final_model.int6.ptz)")
    artifact = sys.argv[1]
    if not os.path.isfile(artifact):
        raise SystemExit(f"artifact {artifact!r} not found")
    tg = load_train_gpt(os.environ.get("TRAIN_GPT", str(Path(__file__).resolve().parents[1] / "train_gpt.py")))
    h = tg.Hyperparameters.from_env()
    h.validate()
    d = tg.dist_info()
    device = tg.setup_runtime(h, d)
    tg.init_logging(h.logfile, d.is_main)
    try:
        val_data = tg.load_validation_data(h, device, h.train_seq_len)
        tg.log0(f"eval_artifact:{artifact} val_tokens:{val_data.tokens.numel() - 1} world_size:{d.world_size} "
                f"attention_backend:{tg.attention_backend_name(device)}")
        model = tg.load_artifact(h, artifact, device)
        tg.evaluate_artifact_model(h, d, device, model, val_data)
    finally:
        if tg.is_distributed():
            tg.dist.destroy_process_group()


if __name__ == "__main__":
    main()
