#!/usr/bin/env python3
"""Turn text into parameter-golf shards, laid out exactly as the official FineWeb export (SPEC §1.1-1.2).

Each document becomes [BOS=1] + SentencePiece ids (no EOS); documents are concatenated in input order; the first
--val-docs documents (or the documents of --val FILE...) form fineweb_val_*.bin, the rest fineweb_train_*.bin,
--shard-tokens tokens per shard (the last one shorter).  Inputs: JSONL or JSONL.xz files with a "text" field
(one document per line; --src keeps only lines whose "src" field matches), or plain .txt files (one document each);
a folder stands for the sorted inputs inside it.  Tokenisation runs in --workers processes; the output is
byte-identical for any worker count.  See data/README.md for the commands used by this project.

    python data/build_shards.py TRAIN_INPUT... [--val VAL_INPUT...] [--out DIR] [--tokenizer MODEL]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import lzma
import multiprocessing
import os
import sys
from collections import deque
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
BOS_ID = 1
DEFAULT_VAL_DOCS = 50_000  # the official export's val split: the first 50,000 documents
DOCS_PER_TASK = 64  # documents per worker task: big enough to amortise pickling, small enough to stream
INPUT_SUFFIXES = (".jsonl", ".jsonl.xz", ".txt")


def load_train_gpt():
    """train_gpt.py (the repo root's) by path: its write_shard/read_shard are the one definition of the format."""
    path = HERE.parent / "train_gpt.py"
    spec = importlib.util.spec_from_file_location("train_gpt_for_data_tools", str(path))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


def expand_inputs(paths) -> list[Path]:
    """Files as given, in order; a folder expands to its JSONL / JSONL.xz / .txt files, sorted by name."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.name.endswith(INPUT_SUFFIXES))
        elif p.is_file():
            if not p.name.endswith(INPUT_SUFFIXES):
                raise ValueError(f"{p}: unsupported input (want {', '.join(INPUT_SUFFIXES)})")
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    return files


def _read_batches(files: list[Path], src: str | None):
    """Yield tasks (path, first_line_no, is_json, src, raw_items) in document order; JSON is parsed in the workers.
    A file that cannot be read (truncated .xz, not UTF-8, unreadable) is a ValueError naming it."""
    for path in files:
        if path.name.endswith(".txt"):
            if src is not None:
                raise ValueError(f"{path}: --src filters JSONL documents; plain .txt files have no 'src' field")
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise ValueError(f"{path}: cannot be read as UTF-8 text ({e})") from None
            yield str(path), 1, False, None, [text]
            continue
        opener = lzma.open if path.name.endswith(".xz") else open
        i = 0
        try:
            with opener(path, "rt", encoding="utf-8") as f:
                batch, first = [], 1
                for i, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    if not batch:
                        first = i
                    batch.append(line)
                    if len(batch) == DOCS_PER_TASK:
                        yield str(path), first, True, src, batch
                        batch = []
                if batch:
                    yield str(path), first, True, src, batch
        except (OSError, EOFError, lzma.LZMAError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: cannot be read after line {i} ({type(e).__name__}: {e})") from None


_SP = None


def _init_worker(tokenizer: str) -> None:
    global _SP
    import sentencepiece as spm

    _SP = spm.SentencePieceProcessor(model_file=tokenizer)


def _encode_task(task) -> list[np.ndarray]:
    """Parse + filter + tokenise one batch; each kept document -> uint16 [BOS] + ids."""
    path, first, is_json, src, items = task
    texts = []
    for k, raw in enumerate(items):
        if not is_json:
            texts.append(raw)
            continue
        try:
            doc = json.loads(raw)
            text = doc["text"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: document near line {first + k} is not JSON with a 'text' field: {e!r}") from None
        if src is None or doc.get("src") == src:
            texts.append(text)
    return [np.array([BOS_ID] + ids, dtype=np.uint16) for ids in _SP.encode(texts)]


def tokenized_documents(files: list[Path], tokenizer: str, src: str | None, workers: int):
    """Yield each kept document's tokens in input order; at most 4 tasks per worker are in flight."""
    tasks = _read_batches(files, src)
    if workers <= 1:
        _init_worker(tokenizer)
        for task in tasks:
            yield from _encode_task(task)
        return
    with multiprocessing.Pool(workers, initializer=_init_worker, initargs=(tokenizer,)) as pool:
        pending = deque()
        for task in tasks:
            pending.append(pool.apply_async(_encode_task, (task,)))
            if len(pending) >= 4 * workers:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


class ShardWriter:
    """Accumulates one split's token stream and writes fineweb_<split>_%06d.bin shards of shard_tokens tokens."""

    def __init__(self, write_shard, out_dir: Path, split: str, shard_tokens: int, max_tokens: int = 0):
        self.write_shard, self.out_dir, self.split = write_shard, out_dir, split
        self.shard_tokens, self.max_tokens = shard_tokens, max_tokens
        self.buf: list[np.ndarray] = []
        self.buffered = self.total = 0
        self.written: list[tuple[str, int]] = []

    @property
    def full(self) -> bool:
        return 0 < self.max_tokens <= self.total

    def add(self, toks: np.ndarray) -> None:
        if self.full:
            return
        if self.max_tokens:
            toks = toks[: self.max_tokens - self.total]  # the cap cuts the last document short
        self.buf.append(toks)
        self.buffered += len(toks)
        self.total += len(toks)
        while self.buffered >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def _flush(self, n: int) -> None:
        data = np.concatenate(self.buf)
        name = f"fineweb_{self.split}_{len(self.written):06d}.bin"
        self.write_shard(self.out_dir / name, data[:n])
        self.written.append((name, n))
        self.buf = [data[n:]]
        self.buffered = len(data) - n

    def close(self) -> None:
        if self.buffered:
            self._flush(self.buffered)


def prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse to mix with shards of an earlier build (a stale fineweb_train_000099.bin would be read silently)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    old = sorted(out_dir.glob("fineweb_*_*.bin"))
    if old and not overwrite:
        raise FileExistsError(f"{out_dir} already holds {len(old)} shards ({old[0].name}, ...); pass --overwrite")
    for f in old:
        f.unlink()


def build(inputs, out_dir, tokenizer, val_inputs=(), val_docs=None, shard_tokens=10**8, max_train_tokens=0,
          max_val_tokens=0, src=None, workers=1, overwrite=False, progress=False) -> dict:
    """Build the shards; returns {"val": [(name, tokens)], "train": [...], "docs": {"val": n, "train": n}}."""
    if shard_tokens < 1:
        raise ValueError(f"--shard-tokens={shard_tokens} must be >= 1")
    if val_inputs and val_docs:
        raise ValueError("give either --val FILE... or --val-docs N, not both")
    if not os.path.isfile(tokenizer):
        raise FileNotFoundError(f"--tokenizer {tokenizer}: file not found")
    train_files, val_files = expand_inputs(inputs), expand_inputs(val_inputs)
    if not train_files and not val_files:
        raise ValueError("no input files")
    val_docs = 0 if val_files else (DEFAULT_VAL_DOCS if val_docs is None else val_docs)
    out_dir = Path(out_dir)
    prepare_out_dir(out_dir, overwrite)
    tg = load_train_gpt()
    val = ShardWriter(tg.write_shard, out_dir, "val", shard_tokens, max_val_tokens)
    train = ShardWriter(tg.write_shard, out_dir, "train", shard_tokens, max_train_tokens)
    docs = {"val": 0, "train": 0}
    bar = _progress_bar(progress)
    for split, files in (("val", val_files), ("mixed", train_files)):
        for toks in tokenized_documents(files, tokenizer, src, workers):
            is_val = split == "val" or docs["val"] < val_docs
            writer = val if is_val else train
            writer.add(toks)
            docs["val" if is_val else "train"] += 1
            bar.update(1)
            bar.set_postfix(val_tokens=val.total, train_tokens=train.total, refresh=False)
            if val.full if split == "val" else (train.full and not is_val):
                break  # this split's cap is reached (and val is complete): stop reading
    bar.close()
    val.close()
    train.close()
    return {"val": val.written, "train": train.written, "docs": docs}


def _progress_bar(enabled: bool):
    from tqdm import tqdm

    return tqdm(unit="doc", file=sys.stderr, disable=not enabled, dynamic_ncols=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="*", help="train (or mixed) inputs: .jsonl, .jsonl.xz, .txt files or folders")
    p.add_argument("--val", nargs="+", default=[], metavar="FILE", help="separate val inputs (else --val-docs)")
    p.add_argument("--val-docs", type=int, default=None, help=f"first N documents form val (default {DEFAULT_VAL_DOCS})")
    p.add_argument("--out", required=True, help="output folder (DATA_PATH for train_gpt.py); --overwrite deletes the "
                   "shards already there, so it has no default: never the downloaded FineWeb folder by accident")
    p.add_argument("--tokenizer", default=str(HERE / "tokenizers" / "fineweb_1024_bpe.model"))
    p.add_argument("--shard-tokens", type=int, default=10**8)
    p.add_argument("--max-train-tokens", type=int, default=0, help="cap on train tokens (0 = no cap)")
    p.add_argument("--max-val-tokens", type=int, default=0, help="cap on val tokens (0 = no cap)")
    p.add_argument("--src", default=None, help="keep only JSONL documents whose 'src' field equals this")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--overwrite", action="store_true", help="delete the shards already in --out first")
    a = p.parse_args(argv)
    try:
        res = build(a.inputs, a.out, a.tokenizer, a.val, a.val_docs, a.shard_tokens, a.max_train_tokens,
                    a.max_val_tokens, a.src, a.workers, a.overwrite, progress=True)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        sys.exit(f"build_shards: error: {e}")
    if a.inputs and not res["docs"]["train"]:  # train_gpt.py would stop at "no train shards"
        sys.exit(f"build_shards: error: all {res['docs']['val']} documents went to val, none to train: give more "
                 "inputs, a smaller --val-docs, or the val documents with --val")
    for split in ("val", "train"):
        total = sum(n for _, n in res[split])
        print(f"{split}: {res['docs'][split]} docs, {total} tokens in {len(res[split])} shards -> {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
