#!/usr/bin/env python3
"""Download the challenge's tokenized FineWeb (the official parameter-golf export) from the Hugging Face Hub.

    python data/cached_challenge_fineweb.py --variant sp1024 --train-shards 80

writes ./data/datasets/fineweb10B_sp1024/fineweb_{val,train}_*.bin and ./data/tokenizers/fineweb_1024_bpe.{model,vocab}
(next to this script).  The default, the full val split plus 80 train shards (8B tokens, ~16 GB), is what the
record runs read; --train-shards 1 is enough to try the pipeline.  Files already present and valid are skipped;
invalid ones (bad header, wrong size, unreadable tokenizer) are downloaded again.  Every downloaded shard is checked
with train_gpt.py's own read_shard.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ID = "willdepueoai/parameter-golf"
REPO_TYPE = "dataset"
REMOTE_ROOT = "datasets"
DEFAULT_TRAIN_SHARDS = 80
# What each variant holds in the hub repo.  The val split is the first 50,000 documents (~62M tokens): one shard.
VARIANTS = {
    "sp1024": {
        "dataset": "fineweb10B_sp1024",
        "val_files": ("fineweb_val_000000.bin",),
        "tokenizer_files": ("fineweb_1024_bpe.model", "fineweb_1024_bpe.vocab"),
        "vocab_size": 1024,
    },
}


def hub_download(remote_path: str, dest: Path) -> None:
    """The one network call: fetch REPO_ID/remote_path into dest (via a staging folder beside it, then a rename)."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise RuntimeError("huggingface_hub is not installed: pip install huggingface_hub (or -r requirements.txt)") \
            from None

    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".download-") as staging:
        got = hf_hub_download(repo_id=REPO_ID, filename=remote_path, repo_type=REPO_TYPE, local_dir=staging)
        os.replace(got, dest)


def load_train_gpt():
    """train_gpt.py (the repo root's) by path: its read_shard is the one definition of a valid shard."""
    spec = importlib.util.spec_from_file_location("train_gpt_for_data_tools", str(HERE.parent / "train_gpt.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def check_file(path: Path, kind: str, tg, vocab_size: int) -> str | None:
    """None if path is a valid file of this kind ("shard", "model", "vocab"), else what is wrong with it."""
    if not path.is_file():
        return "missing"
    try:
        if kind == "shard":
            tg.read_shard(path)
        elif kind == "model":
            import sentencepiece as spm

            sp = spm.SentencePieceProcessor(model_file=str(path))
            if sp.vocab_size() != vocab_size:
                return f"tokenizer vocab size {sp.vocab_size()}, expected {vocab_size}"
        elif sum(1 for _ in path.open(encoding="utf-8")) != vocab_size:
            return f"vocab file does not have {vocab_size} lines"
    except (ValueError, RuntimeError, OSError, UnicodeDecodeError) as e:
        return str(e)
    return None


def plan(variant: str, train_shards: int, root: Path) -> list[tuple[str, Path, str]]:
    """(remote path, local path, kind) for every file of the request, val and tokenizer first."""
    v = VARIANTS[variant]
    data_dir = root / "datasets" / v["dataset"]
    shards = list(v["val_files"]) + [f"fineweb_train_{i:06d}.bin" for i in range(train_shards)]
    items = [(f"{REMOTE_ROOT}/tokenizers/{n}", root / "tokenizers" / n, n.rsplit(".", 1)[1]) for n in v["tokenizer_files"]]
    items += [(f"{REMOTE_ROOT}/{v['dataset']}/{n}", data_dir / n, "shard") for n in shards]
    return items


def fetch(variant: str = "sp1024", train_shards: int = DEFAULT_TRAIN_SHARDS, root: Path = HERE, log=print) -> dict:
    """Make root/ hold a valid copy of every requested file; returns counts {"skipped", "downloaded"}."""
    if variant not in VARIANTS:
        raise ValueError(f"--variant {variant!r}: known variants are {sorted(VARIANTS)}")
    if train_shards < 0:
        raise ValueError(f"--train-shards {train_shards} must be >= 0")
    try:
        tg = load_train_gpt()
    except ImportError as e:  # its shard reader checks every file: torch, numpy, sentencepiece
        raise RuntimeError(f"train_gpt.py needs {e.name or e} to check the files: pip install -r requirements.txt") \
            from None
    vocab_size = VARIANTS[variant]["vocab_size"]
    counts = {"skipped": 0, "downloaded": 0}
    for remote, dest, kind in plan(variant, train_shards, Path(root)):
        problem = check_file(dest, kind, tg, vocab_size)
        if problem is None:
            counts["skipped"] += 1
            continue
        if problem != "missing":
            log(f"re-downloading {dest}: {problem}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            hub_download(remote, dest)
        except Exception as e:  # the hub client raises many types (HTTP, not found, offline); report them all alike
            raise RuntimeError(f"could not download {remote} from the {REPO_TYPE} repo {REPO_ID}: {e}") from e
        problem = check_file(dest, kind, tg, vocab_size)
        if problem is not None:
            dest.unlink(missing_ok=True)
            raise RuntimeError(f"downloaded {remote} but {dest} is invalid ({problem}); removed it, please retry")
        counts["downloaded"] += 1
        log(f"downloaded {dest}")
    return counts


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="sp1024", choices=sorted(VARIANTS))
    p.add_argument("--train-shards", type=int, default=DEFAULT_TRAIN_SHARDS, help="train shards to fetch (0..N-1)")
    a = p.parse_args(argv)
    try:
        c = fetch(a.variant, a.train_shards)
    except (ValueError, RuntimeError) as e:
        sys.exit(f"cached_challenge_fineweb: error: {e}")
    print(f"done: {c['downloaded']} downloaded, {c['skipped']} already present and valid", file=sys.stderr)


if __name__ == "__main__":
    main()
