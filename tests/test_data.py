"""Section 3 DATA of train_gpt.py and the data/ tools: shard format, coprime-stride loader, validation tokens,
byte LUTs, the shard builder and the download script (on a fake local hub)."""

from __future__ import annotations

import dataclasses
import json
import lzma
import shutil
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

from conftest import ROOT, SAMPLE_DIR, TOKENIZER, load_module

CPU = torch.device("cpu")


def _shards(tg, folder: Path, sizes, seed=0, vocab=1024) -> list[str]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, n in enumerate(sizes):
        p = folder / f"fineweb_train_{i:06d}.bin"
        tg.write_shard(p, rng.integers(0, vocab, size=n))
        paths.append(str(p))
    return paths


def _batches(loader, n, global_tokens=8 * 32, seq_len=32, grad_accum=1):
    return [loader.next_batch(global_tokens, seq_len, grad_accum) for _ in range(n)]


@pytest.fixture(scope="module")
def sp():
    return spm.SentencePieceProcessor(model_file=str(TOKENIZER))


@pytest.fixture(scope="module")
def builder():
    return load_module(ROOT / "data" / "build_shards.py", "build_shards_for_tests")


@pytest.fixture(scope="module")
def downloader():
    return load_module(ROOT / "data" / "cached_challenge_fineweb.py", "cached_challenge_fineweb_for_tests")


# ---------------------------------------------------------------------------------------------------- shard format


def test_shard_roundtrip_and_header(tg, tmp_path):
    """Guards the on-disk format (SPEC §1.2): 256 int32 header (magic, version, n) then n little-endian uint16."""
    toks = np.array([0, 1, 2, 65535, 1023, 7], dtype=np.int64)
    p = tmp_path / "fineweb_train_000000.bin"
    tg.write_shard(p, toks)
    raw = p.read_bytes()
    assert len(raw) == 1024 + 2 * len(toks)
    header = np.frombuffer(raw[:1024], dtype="<i4")
    assert header[:3].tolist() == [20240520, 1, len(toks)] and not header[3:].any()
    np.testing.assert_array_equal(np.frombuffer(raw[1024:], dtype="<u2"), toks)
    np.testing.assert_array_equal(tg.read_shard(p), toks)
    assert [f.name for f in tmp_path.iterdir()] == [p.name]  # no temp file left behind
    with pytest.raises(ValueError, match="uint16"):
        tg.write_shard(tmp_path / "bad.bin", [70000])


def _corrupt(tmp_path, tg, how):
    p = tmp_path / f"fineweb_val_{how}.bin"
    tg.write_shard(p, np.arange(100))
    raw = bytearray(p.read_bytes())
    if how == "magic":
        raw[0:4] = np.array([12345], "<i4").tobytes()
    elif how == "version":
        raw[4:8] = np.array([2], "<i4").tobytes()
    elif how == "truncated":
        raw = raw[:-3]
    elif how == "short_header":
        raw = raw[:500]
    elif how == "empty":
        raw = b""
    elif how == "extra":
        raw += b"\0\0"
    p.write_bytes(bytes(raw))
    return p


@pytest.mark.parametrize("how,what", [("magic", "bad magic"), ("version", "version"), ("truncated", "truncated"),
                                      ("short_header", "shorter than"), ("empty", "empty"), ("extra", "file has")])
def test_corrupt_shards_name_the_file(tg, tmp_path, how, what):
    """Guards silent training on garbage: each corruption raises ValueError naming the file and the problem."""
    p = _corrupt(tmp_path, tg, how)
    with pytest.raises(ValueError) as e:
        tg.read_shard(p)
    assert str(p) in str(e.value) and what in str(e.value)


def test_missing_shard_and_empty_glob(tg, tmp_path):
    """Guards a cryptic error on a wrong DATA_PATH: missing file / empty glob name the file, pattern and env var."""
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        tg.read_shard(tmp_path / "nope.bin")
    pattern = str(tmp_path / "fineweb_train_*.bin")
    with pytest.raises(FileNotFoundError) as e:
        tg.list_shards(pattern, "train")
    assert pattern in str(e.value) and "DATA_PATH" in str(e.value)
    paths = _shards(tg, tmp_path, [10, 10, 10])
    assert tg.list_shards(pattern) == sorted(paths)


# ---------------------------------------------------------------------------------------------------- loader


def test_xy_shift_dtype_shape(tg, tmp_path):
    """Guards an off-by-one between inputs and targets: y is x shifted by one, int64, (local windows, seq_len)."""
    files = _shards(tg, tmp_path, [5000, 3000, 4000])
    x, y = tg.TrainLoader(files, 1, 0, 1, CPU).next_batch(4 * 2 * 32, 32, 2)
    assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    shards = [tg.read_shard(f) for f in files]
    for xr, yr in zip(x, y):  # every row is a real contiguous window of some shard
        window = torch.cat([xr, yr[-1:]]).numpy()
        assert any(
            any(np.array_equal(s[o:o + 33], window) for o in range(0, len(s) - 32)) for s in shards)


def test_loader_deterministic_and_seeded(tg, tmp_path):
    """Guards D8: the same SEED gives the same batches; a different SEED gives a different order."""
    files = _shards(tg, tmp_path, [3000] * 6)
    a = _batches(tg.TrainLoader(files, 1337, 0, 1, CPU), 5)
    b = _batches(tg.TrainLoader(files, 1337, 0, 1, CPU), 5)
    c = _batches(tg.TrainLoader(files, 42, 0, 1, CPU), 5)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, b))
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(a, c))


def test_loader_names_a_shard_of_another_tokenizer(tg, tmp_path):
    """Guards train shards built with a bigger vocabulary: the loader names the shard and the id (the val loader
    already does) instead of an index error deep in the embedding; in-range shards give the same batches as an
    unchecked loader."""
    files = _shards(tg, tmp_path / "ok", [3000] * 4)
    a = _batches(tg.TrainLoader(files, 1337, 0, 1, CPU, 1024), 3)
    b = _batches(tg.TrainLoader(files, 1337, 0, 1, CPU), 3)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
    bad = _shards(tg, tmp_path / "bad", [3000] * 4, vocab=4096)
    with pytest.raises(ValueError, match=r"shard .*fineweb_train_00000\d\.bin: token id \d+ >= VOCAB_SIZE=1024"):
        _batches(tg.TrainLoader(bad, 1337, 0, 1, CPU, 1024), 3)


def test_loader_prefetch_keeps_the_batches_and_their_order(tg, tmp_path):
    """The training loop builds each next step's first batch ahead (TrainLoader.prefetch, PERF #36): the batches and
    their order are those of plain next_batch calls, a second prefetch before the batch is taken builds nothing, and a batch
    asked for with other arguments than it was built with is refused (the RNG has moved on)."""
    files = _shards(tg, tmp_path, [3000] * 6)
    plain = _batches(tg.TrainLoader(files, 5, 0, 1, CPU), 6, 8 * 32, 32, 2)
    ld = tg.TrainLoader(files, 5, 0, 1, CPU)
    got = []
    for i in range(6):
        if i % 2:
            ld.prefetch(8 * 32, 32, 2)
            ld.prefetch(8 * 32, 32, 2)
        got.append(ld.next_batch(8 * 32, 32, 2))
    assert ld.batches_built == 6
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(plain, got))
    ld.prefetch(8 * 32, 32, 2)
    with pytest.raises(ValueError, match=r"TrainLoader: batch prefetched for .*\(256, 32, 2\).*\(256, 32, 1\)"):
        ld.next_batch(8 * 32, 32, 1)


def test_loader_depends_on_file_names_not_paths(tg, tmp_path):
    """Guards the seed's bug (SPEC §12.17): data order must not change when the shards are moved or DATA_PATH is
    written differently; it follows the file names."""
    files = _shards(tg, tmp_path / "a", [3000] * 4)
    moved = tmp_path / "elsewhere" / "deeper"
    moved.mkdir(parents=True)
    copies = [shutil.copy(f, moved) for f in files]
    a = _batches(tg.TrainLoader(files, 7, 0, 1, CPU), 4)
    b = _batches(tg.TrainLoader(copies[::-1], 7, 0, 1, CPU), 4)  # given in another order, too
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, b))
    assert tg.shard_names_hash(files) == tg.shard_names_hash(copies)
    renamed = [str(Path(f).with_name(Path(f).name.replace("fineweb", "finewab"))) for f in copies]
    for src, dst in zip(copies, renamed):
        shutil.move(src, dst)
    assert tg.shard_names_hash(renamed) != tg.shard_names_hash(files)


@pytest.mark.parametrize("world", [2, 4])
def test_rank_slices_disjoint_and_cover_global_batch(tg, tmp_path, world):
    """Guards duplicated or dropped data across GPUs: rank r gets windows r, r+W, ... of the one global batch, so
    the ranks' slices are disjoint and together are the whole batch."""
    files = _shards(tg, tmp_path, [4000] * 5)
    T, ga, global_tokens = 16, 2, 16 * 2 * 8
    ranks = [tg.TrainLoader(files, 3, r, world, CPU) for r in range(world)]
    ref = tg.TrainLoader(files, 3, 0, world, CPU)
    shards = [tg.read_shard(f) for f in sorted(files)]
    for _ in range(3):
        plan = ref._plan_windows(global_tokens // (ga * T), T)
        ref.batches_built += 1
        assert len(set(plan)) == len(plan) == 8  # no window twice in a batch
        outs = [ld.next_batch(global_tokens, T, ga) for ld in ranks]
        for r, (x, y) in enumerate(outs):
            assert x.shape == (8 // world, T)
            want = np.stack([shards[s][o:o + T + 1] for s, o in plan[r::world]]).astype(np.int64)
            assert torch.equal(x, torch.from_numpy(want[:, :-1])) and torch.equal(y, torch.from_numpy(want[:, 1:]))
        rows = {tuple(row.tolist()) for x, _ in outs for row in x}
        assert len(rows) == 8  # disjoint: the union has every window once


def test_batch_size_errors_name_env_var(tg, tmp_path):
    """Guards a silently smaller batch: TRAIN_BATCH_TOKENS must split evenly over ranks, accumulation and seq_len."""
    files = _shards(tg, tmp_path, [3000])
    with pytest.raises(ValueError, match="TRAIN_BATCH_TOKENS"):
        tg.TrainLoader(files, 0, 0, 2, CPU).next_batch(3 * 32, 32, 1)
    with pytest.raises(ValueError, match="TRAIN_SEQ_LEN"):
        tg.TrainLoader(_shards(tg, tmp_path / "s", [20]), 0, 0, 1, CPU).next_batch(64, 32, 1)


def test_cursor_visits_every_block_once_per_pass(tg):
    """Guards the coprime-stride cursor (SPEC §1.5): within a pass every block of the shard comes exactly once, the
    stride is coprime with the block count, and a used-up pass is re-drawn."""
    rng = np.random.default_rng(0)
    for n, T in [(1000, 32), (33, 32), (100, 7), (5000, 64), (97, 8)]:
        for _ in range(3):
            c = tg._ShardCursor(n, T, rng)
            phase, bc = c.phase, c.bc
            assert 0 <= phase <= min(T - 1, max(0, n - T - 1)) and bc == (n - 1 - phase) // T >= 1
            assert np.gcd(c.stride, bc) == 1
            offsets = [c.take() for _ in range(bc)]
            assert sorted(offsets) == [phase + i * T for i in range(bc)]
            assert all(o + T + 1 <= n for o in offsets)
            assert c.k == 0 and c.remaining == c.bc  # a fresh pass


def test_mix_schedule_grows_from_8_to_32_shards(tg, tmp_path):
    """Guards the mixing schedule: max(8, W) shards per batch at the start, max(32, 8W) after 1800 batches."""
    files = _shards(tg, tmp_path, [2000] * 40)
    ld = tg.TrainLoader(files, 0, 0, 1, CPU)
    assert len({s for s, _ in ld._plan_windows(64, 16)}) == 8
    ld.batches_built = 900
    assert len({s for s, _ in ld._plan_windows(64, 16)}) == 20
    ld.batches_built = 5000
    assert len({s for s, _ in ld._plan_windows(64, 16)}) == 32
    ld2 = tg.TrainLoader(files[:5], 0, 0, 1, CPU)  # fewer shards than 8: all of them
    assert len({s for s, _ in ld2._plan_windows(64, 16)}) == 5


def test_loader_on_embedded_sample(tg):
    """Guards the committed sample: its shards are valid and feed the loader (the quickstart depends on them)."""
    files = tg.list_shards(str(SAMPLE_DIR / "fineweb_train_*.bin"))
    assert len(files) == 2 and all(len(tg.read_shard(f)) == 1_000_000 for f in files)
    x, y = tg.TrainLoader(files, 1337, 0, 1, CPU).next_batch(8 * 64, 64, 1)
    assert x.shape == (8, 64) and int(x.max()) < 1024 and torch.equal(x[:, 1:], y[:, :-1])
    first = tg.read_shard(files[0])
    assert first[0] == 1 and (first == 1).sum() > 50  # whole documents, each opened by BOS
    val = tg.read_shard(SAMPLE_DIR / "fineweb_val_000000.bin")
    assert 200_000 <= len(val) <= 300_000 and val[0] == 1


# ---------------------------------------------------------------------------------------------------- LUTs / val


def _lut_bytes(luts, toks):
    base, lead, boundary = (t.numpy() for t in luts)
    prev, tgt = toks[:-1], toks[1:]
    return int((base[tgt].astype(np.int64) + (lead[tgt] & ~boundary[prev])).sum())


TEXTS = [
    "Hello world, this is a test.",
    " Leading space and  double  spaces, tabs\tand\nnewlines.",
    "Digits 1234567890 and 3.14159, year 2024.",
    "Non-ASCII: café, naïve, Ærøskøbing, 日本語のテキスト, emoji 🙂🚀, Ελληνικά, русский.",
    "▁ a literal U+2581 and ﬁ ligature (NFKC) and ① circled.",
    "",
]


def test_lut_bytes_equal_utf8_of_decoded_text(tg, sp):
    """Guards the BPB denominator (SPEC §1.4, §12.12): for BOS-separated documents, the LUT byte count of the tokens
    equals the UTF-8 length of the tokenizer's decoded text, byte-fallback pieces and leading spaces included."""
    luts = tg.build_sentencepiece_luts(sp, 1024, CPU)
    stream, total = [], 0
    for text in TEXTS:
        ids = sp.encode(text)
        doc = np.array([1] + ids, dtype=np.int64)
        assert _lut_bytes(luts, doc) == len(sp.decode(ids).encode("utf-8")), text
        stream += doc.tolist()
        total += len(sp.decode(ids).encode("utf-8"))
    assert any(sp.is_byte(i) for i in stream)  # the fallback path really ran
    assert _lut_bytes(luts, np.array(stream + [1])) == total  # across document boundaries, BOS = 0 bytes


def test_lut_shapes_and_padding(tg, sp):
    """Guards index errors on padded vocabularies: LUTs span max(tokenizer, VOCAB_SIZE); extra ids are 0-byte
    boundaries; control tokens are boundaries; '▁' alone is one space byte."""
    base, lead, boundary = tg.build_sentencepiece_luts(sp, 1100, CPU)
    assert base.shape == lead.shape == boundary.shape == (1100,)
    assert base.dtype == torch.int16 and lead.dtype == torch.bool and boundary.dtype == torch.bool
    assert boundary[1024:].all() and not base[1024:].any() and not lead[1024:].any()
    assert boundary[[0, 1, 2, 3]].all() and not base[[0, 1, 2, 3]].any()
    sp_id = sp.piece_to_id("\u2581")
    assert lead[sp_id] and base[sp_id] == 0 and not boundary[sp_id]
    assert tg.build_sentencepiece_luts(sp, 64, CPU)[0].shape == (1024,)


def _val_config(tg, data_dir, **kw):
    return dataclasses.replace(tg.Hyperparameters(), data_path=str(data_dir), tokenizer_path=str(TOKENIZER), **kw)


def test_load_validation_data(tg, tmp_path):
    """Guards the val split (SPEC §1.3): sorted shards concatenated, cut to whole seq_len windows + 1, int64."""
    a, b = np.arange(0, 50) % 1024, np.arange(100, 171) % 1024
    tg.write_shard(tmp_path / "fineweb_val_000001.bin", b)
    tg.write_shard(tmp_path / "fineweb_val_000000.bin", a)
    vd = tg.load_validation_data(_val_config(tg, tmp_path), CPU, 16)
    usable = ((121 - 1) // 16) * 16
    assert vd.tokens.dtype == torch.int64 and vd.tokens.shape == (usable + 1,)
    assert torch.equal(vd.tokens, torch.from_numpy(np.concatenate([a, b])[: usable + 1].astype(np.int64)))
    assert vd.base_bytes.shape == (1024,) and vd.is_boundary[1]


def test_validation_errors_name_the_env_var(tg, tmp_path):
    """Guards confusing failures at start-up: missing tokenizer, too-small VOCAB_SIZE, no val shards, a val split
    shorter than one window, out-of-vocab tokens: each error names the env var or files at fault."""
    tg.write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(20))
    h = _val_config(tg, tmp_path)
    with pytest.raises(FileNotFoundError, match="TOKENIZER_PATH"):
        tg.load_validation_data(dataclasses.replace(h, tokenizer_path=str(tmp_path / "x.model")), CPU, 16)
    with pytest.raises(ValueError, match="VOCAB_SIZE=512"):
        tg.load_validation_data(dataclasses.replace(h, vocab_size=512), CPU, 16)
    with pytest.raises(FileNotFoundError, match="DATA_PATH"):
        tg.load_validation_data(dataclasses.replace(h, data_path=str(tmp_path / "none")), CPU, 16)
    with pytest.raises(ValueError, match="fineweb_val_000000.bin"):
        tg.load_validation_data(h, CPU, 32)
    tg.write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(2000))
    with pytest.raises(ValueError, match="VOCAB_SIZE=1024"):
        tg.load_validation_data(h, CPU, 16)


# ---------------------------------------------------------------------------------------------------- builder

DOCS = [
    {"text": "The first document. It has two sentences.", "src": "wikipedia"},
    {"text": "Second one, from a blog: 42 apples & café ☕.", "src": "blogs"},
    {"text": "Third: Wikipedia again, with digits 2015 and ümlauts.", "src": "wikipedia"},
    {"text": "", "src": "wikipedia"},
    {"text": "Fifth. " * 40, "src": "imdb"},
    {"text": "Sixth and last, wikipedia: the end.", "src": "wikipedia"},
]


def _write_jsonl(path: Path, docs, xz=False):
    data = "".join(json.dumps(d) + "\n" for d in docs)
    if xz:
        with lzma.open(path, "wt", encoding="utf-8") as f:
            f.write(data)
    else:
        path.write_text(data, encoding="utf-8")
    return path


def _read_split(tg, folder: Path, split: str):
    files = sorted(folder.glob(f"fineweb_{split}_*.bin"))
    return files, (np.concatenate([tg.read_shard(f) for f in files]).astype(np.int64) if files else np.zeros(0, int))


def _docs_of(stream):
    """Split a token stream at BOS: every document must start with BOS=1 (and contain no EOS=2)."""
    assert len(stream) == 0 or stream[0] == 1
    cuts = np.flatnonzero(stream == 1).tolist() + [len(stream)]
    return [stream[a + 1:b].tolist() for a, b in zip(cuts[:-1], cuts[1:])]


def test_builder_layout_split_and_roundtrip(tg, builder, sp, tmp_path):
    """Guards the export layout (SPEC §1.1): each document is [BOS] + ids with no EOS; the first --val-docs
    documents are val; shards hold --shard-tokens tokens (last shorter); decoding gives back the text."""
    inp = _write_jsonl(tmp_path / "docs.jsonl.xz", DOCS, xz=True)
    out = tmp_path / "out"
    res = builder.build([inp], out, str(TOKENIZER), val_docs=2, shard_tokens=20, workers=1)
    enc = [[1] + sp.encode(d["text"]) for d in DOCS]
    val_files, val = _read_split(tg, out, "val")
    train_files, train = _read_split(tg, out, "train")
    assert val.tolist() == sum(enc[:2], []) and train.tolist() == sum(enc[2:], [])
    assert [f.name for f in train_files][:2] == ["fineweb_train_000000.bin", "fineweb_train_000001.bin"]
    sizes = [len(tg.read_shard(f)) for f in train_files]
    assert all(s == 20 for s in sizes[:-1]) and 0 < sizes[-1] <= 20 and sum(sizes) == len(train)
    assert res["docs"] == {"val": 2, "train": 4} and 2 not in train.tolist()
    decoded = [sp.decode(ids) for ids in _docs_of(np.concatenate([val, train]))]
    assert decoded == [sp.decode(sp.encode(d["text"])) for d in DOCS]
    assert decoded[0] == DOCS[0]["text"]


def test_builder_deterministic_across_workers(tg, builder, tmp_path):
    """Guards nondeterministic document order under multiprocessing: 1 and 2 workers give identical bytes."""
    many = [{"text": f"doc {i}: " + "lorem ipsum " * (i % 7), "src": "wikipedia"} for i in range(300)]
    inp = _write_jsonl(tmp_path / "many.jsonl", many)
    outs = []
    for w in (1, 2):
        out = tmp_path / f"out{w}"
        builder.build([inp], out, str(TOKENIZER), val_docs=10, shard_tokens=500, workers=w)
        outs.append({f.name: f.read_bytes() for f in out.iterdir()})
    assert outs[0] == outs[1] and len(outs[0]) > 3


def test_builder_src_filter_caps_val_files_and_txt(tg, builder, sp, tmp_path):
    """Guards the sample's provenance and size: --src keeps only matching documents, --val FILE gives the val split,
    the token caps cut exactly, .txt files are one document each, and stale shards are not mixed in."""
    train_in = _write_jsonl(tmp_path / "train.jsonl", DOCS)
    val_in = _write_jsonl(tmp_path / "val.jsonl", DOCS[::-1])
    out = tmp_path / "out"
    builder.build([train_in], out, str(TOKENIZER), val_inputs=[val_in], src="wikipedia", max_val_tokens=12,
                  workers=1)
    wiki = [d["text"] for d in DOCS if d["src"] == "wikipedia"]
    _, val = _read_split(tg, out, "val")
    _, train = _read_split(tg, out, "train")
    assert val.tolist() == sum(([1] + sp.encode(t) for t in wiki[::-1]), [])[:12]
    assert train.tolist() == sum(([1] + sp.encode(t) for t in wiki), [])
    with pytest.raises(FileExistsError, match="--overwrite"):
        builder.build([train_in], out, str(TOKENIZER), val_docs=1, workers=1)
    builder.build([train_in], out, str(TOKENIZER), val_docs=1, max_train_tokens=15, workers=1, overwrite=True)
    _, train = _read_split(tg, out, "train")
    assert len(train) == 15
    (tmp_path / "txt").mkdir()
    for i, t in enumerate(["alpha beta", "gamma\ndelta"]):
        (tmp_path / "txt" / f"{i}.txt").write_text(t, encoding="utf-8")
    builder.build([tmp_path / "txt"], tmp_path / "out_txt", str(TOKENIZER), val_docs=0, workers=1)
    _, train = _read_split(tg, tmp_path / "out_txt", "train")
    assert _docs_of(train) == [sp.encode("alpha beta"), sp.encode("gamma\ndelta")]
    with pytest.raises(ValueError, match="'text'"):
        builder.build([_write_jsonl(tmp_path / "bad.jsonl", [{"body": "x"}])], tmp_path / "o2", str(TOKENIZER),
                      val_docs=0, workers=1)


# ---------------------------------------------------------------------------------------------------- download


@pytest.fixture
def fake_hub(tg, tmp_path):
    """A local folder laid out like the hub repo: datasets/fineweb10B_sp1024/*.bin, datasets/tokenizers/*."""
    hub = tmp_path / "hub"
    (hub / "datasets" / "fineweb10B_sp1024").mkdir(parents=True)
    (hub / "datasets" / "tokenizers").mkdir(parents=True)
    for name in ("fineweb_1024_bpe.model", "fineweb_1024_bpe.vocab"):
        shutil.copy(TOKENIZER.parent / name, hub / "datasets" / "tokenizers" / name)
    rng = np.random.default_rng(0)
    for name in ["fineweb_val_000000.bin"] + [f"fineweb_train_{i:06d}.bin" for i in range(3)]:
        tg.write_shard(hub / "datasets" / "fineweb10B_sp1024" / name, rng.integers(0, 1024, 300))
    return hub


@pytest.fixture
def offline(downloader, fake_hub, monkeypatch):
    """Replace the one network call by a copy from the fake hub; record the calls."""
    calls = []

    def copy(remote_path, dest):
        src = fake_hub / remote_path
        if not src.is_file():
            raise FileNotFoundError(f"404: {remote_path}")
        calls.append(remote_path)
        shutil.copy(src, dest)

    monkeypatch.setattr(downloader, "hub_download", copy)
    return calls


def test_download_fetches_verifies_and_skips(downloader, fake_hub, offline, tmp_path):
    """Guards the user's download: files land in datasets/fineweb10B_sp1024 and tokenizers/, byte-identical to the
    hub; a second run downloads nothing."""
    root = tmp_path / "data"
    c = downloader.fetch("sp1024", 2, root, log=lambda m: None)
    assert c == {"skipped": 0, "downloaded": 5}
    ds = root / "datasets" / "fineweb10B_sp1024"
    assert sorted(f.name for f in ds.iterdir()) == ["fineweb_train_000000.bin", "fineweb_train_000001.bin",
                                                    "fineweb_val_000000.bin"]
    assert (root / "tokenizers" / "fineweb_1024_bpe.model").read_bytes() == TOKENIZER.read_bytes()
    assert (ds / "fineweb_val_000000.bin").read_bytes() == \
        (fake_hub / "datasets" / "fineweb10B_sp1024" / "fineweb_val_000000.bin").read_bytes()
    offline.clear()
    assert downloader.fetch("sp1024", 2, root, log=lambda m: None) == {"skipped": 5, "downloaded": 0}
    assert offline == []


def test_download_replaces_corrupt_files(downloader, fake_hub, offline, tmp_path):
    """Guards a stale or half-written local file being trusted: an invalid shard or tokenizer is fetched again."""
    root = tmp_path / "data"
    downloader.fetch("sp1024", 1, root, log=lambda m: None)
    shard = root / "datasets" / "fineweb10B_sp1024" / "fineweb_train_000000.bin"
    shard.write_bytes(shard.read_bytes()[:-10])
    (root / "tokenizers" / "fineweb_1024_bpe.model").write_bytes(b"not a model")
    offline.clear()
    msgs = []
    assert downloader.fetch("sp1024", 1, root, log=msgs.append) == {"skipped": 2, "downloaded": 2}
    assert sorted(offline) == ["datasets/fineweb10B_sp1024/fineweb_train_000000.bin",
                               "datasets/tokenizers/fineweb_1024_bpe.model"]
    assert any("truncated" in m for m in msgs)
    assert downloader.check_file(shard, "shard", downloader.load_train_gpt(), 1024) is None


def test_download_errors(downloader, fake_hub, offline, tmp_path):
    """Guards unclear failures: a file missing on the hub, or served corrupt, raises an error naming it."""
    (fake_hub / "datasets" / "fineweb10B_sp1024" / "fineweb_val_000000.bin").unlink()
    with pytest.raises(RuntimeError, match="fineweb_val_000000.bin"):
        downloader.fetch("sp1024", 1, tmp_path / "d1", log=lambda m: None)
    bad = fake_hub / "datasets" / "fineweb10B_sp1024" / "fineweb_val_000000.bin"
    bad.write_bytes(b"\0" * 2000)
    with pytest.raises(RuntimeError, match="invalid.*bad magic"):
        downloader.fetch("sp1024", 1, tmp_path / "d2", log=lambda m: None)
    assert not (tmp_path / "d2" / "datasets" / "fineweb10B_sp1024" / "fineweb_val_000000.bin").exists()
    bad.unlink()  # the hub has train shards 0..2 only
    tg_src = downloader.load_train_gpt()
    tg_src.write_shard(bad, np.arange(300))
    with pytest.raises(RuntimeError, match="fineweb_train_000003.bin"):
        downloader.fetch("sp1024", 4, tmp_path / "d3", log=lambda m: None)
    with pytest.raises(ValueError, match="variant"):
        downloader.fetch("sp4096", 1, tmp_path / "d4")


def test_builder_cli(tg, builder, sp, tmp_path, capsys):
    """Guards the documented command line (data/README.md): inputs before --val, the caps, --src and --out wire
    through argparse to the same shards as build()."""
    train_in = _write_jsonl(tmp_path / "t.jsonl.xz", DOCS, xz=True)
    val_in = _write_jsonl(tmp_path / "v.jsonl", DOCS[:3])
    out = tmp_path / "cli"
    builder.main([str(train_in), "--val", str(val_in), "--src", "wikipedia", "--max-train-tokens", "25",
                  "--shard-tokens", "10", "--out", str(out), "--tokenizer", str(TOKENIZER), "--workers", "1"])
    assert sorted(f.name for f in out.glob("fineweb_train_*")) == [f"fineweb_train_{i:06d}.bin" for i in range(3)]
    _, val = _read_split(tg, out, "val")
    assert _docs_of(val) == [sp.encode(DOCS[0]["text"]), sp.encode(DOCS[2]["text"])]
    assert "train: " in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--overwrite"):
        builder.main([str(train_in), "--out", str(out), "--tokenizer", str(TOKENIZER), "--workers", "1"])


def test_builder_errors_name_the_input_and_guard_the_real_data(builder, tmp_path):
    """Guards the builder's failure paths a user hits: a truncated .xz or a non-UTF-8 .txt is an error naming that
    file (not a bare traceback); --out has no default, so an --overwrite cannot land on the downloaded FineWeb
    folder by accident; inputs whose documents all go to val are an error (train_gpt.py would find no train shards)."""
    good = _write_jsonl(tmp_path / "t.jsonl.xz", DOCS * 20, xz=True)
    cut = tmp_path / "cut.jsonl.xz"
    cut.write_bytes(good.read_bytes()[:-40])
    bad_txt = tmp_path / "latin1.txt"
    bad_txt.write_bytes("caf\xe9 au lait".encode("latin-1"))
    for path in (cut, bad_txt):
        with pytest.raises(SystemExit, match=rf"build_shards: error: {path}: cannot be read"):
            builder.main([str(path), "--out", str(tmp_path / f"o_{path.stem}"), "--tokenizer", str(TOKENIZER),
                          "--workers", "1", "--val-docs", "1"])
    with pytest.raises(SystemExit) as e:  # argparse: "the following arguments are required: --out"
        builder.main([str(good), "--tokenizer", str(TOKENIZER), "--workers", "1"])
    assert e.value.code == 2
    with pytest.raises(SystemExit, match="went to val, none to train"):
        builder.main([str(good), "--out", str(tmp_path / "allval"), "--tokenizer", str(TOKENIZER), "--workers", "1"])


def test_download_says_what_to_install(downloader, tmp_path, monkeypatch):
    """Guards the downloader's missing-package failures: without huggingface_hub, or without train_gpt.py's own
    dependencies (its shard reader checks every file), the error says what to pip install, not a bare traceback."""
    real_import = __import__

    def no_hub(name, *a, **k):
        if name == "huggingface_hub":
            raise ImportError("No module named 'huggingface_hub'", name=name)
        return real_import(name, *a, **k)

    monkeypatch.setattr("builtins.__import__", no_hub)
    with pytest.raises(RuntimeError, match=r"fineweb_1024_bpe.model.*pip install huggingface_hub"):
        downloader.fetch("sp1024", 0, tmp_path / "d", log=lambda m: None)
    monkeypatch.setattr("builtins.__import__", real_import)

    def no_torch():
        raise ImportError("No module named 'torch'", name="torch")

    monkeypatch.setattr(downloader, "load_train_gpt", no_torch)
    with pytest.raises(RuntimeError, match=r"needs torch .*pip install -r requirements.txt"):
        downloader.fetch("sp1024", 0, tmp_path / "d", log=lambda m: None)
