"""Bytes and achieved bandwidth of inductor's generated Triton kernels, from their sources and a profile of the same
compile (docs/PERF.md, "The wide RMSNorm-backward kernels").  On the GPU box:

    TORCHINDUCTOR_CACHE_DIR=/tmp/ic TORCHINDUCTOR_FX_GRAPH_CACHE=0 OUT=prof BENCH_STEPS=1 \\
        python3 scripts/gpu_bench.py train
    python3 scripts/kernel_bytes.py /tmp/ic prof/profile_base.txt rms_norm [--rows 98304 --width 512] [--dump F]

Counts, per kernel whose name matches the pattern, the distinct pointers it loads or stores at full-row offsets
(`r0_1 + WIDTH*x0`, inductor's form for a [rows, WIDTH] tensor walked row by row) at their dtype's size, times rows x
WIDTH; the per-channel partial sums of mix-order reductions (`accumN`) are listed too.  Loads in any other form
(looped reductions, broadcasts) are not counted, so a 0 means "not this form", not "no traffic".  Not counted code.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys

ELEMENT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8, "i64": 8, "i32": 4, "i8": 1, "u8": 1, "i1": 1}


def kernel_sources(root: pathlib.Path, pattern: re.Pattern) -> dict[str, str]:
    """name -> source (decorator through body) of every generated Triton kernel under root whose name matches."""
    found: dict[str, str] = {}
    for f in sorted(root.rglob("*.py")):
        try:
            src = f.read_text()
        except (OSError, UnicodeDecodeError):
            continue
        for m in re.finditer(r"def (triton_\w+)\(", src):
            name = m.group(1)
            if name in found or not pattern.search(name):
                continue
            start = src.rfind("@triton_heuristics", 0, m.start())
            end = src.find("\n\n\n", m.end())
            found[name] = src[start if start >= 0 else m.start(): end if end > 0 else len(src)]
    return found


def profile_times(path: pathlib.Path) -> dict[str, float]:
    """Kernel name -> average self device time (µs) from a `gpu_bench.py train` profile table."""
    times = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) < 10 or not parts[0].startswith("triton_"):
            continue
        avg = parts[-2]  # "CUDA time avg" column, e.g. 92.4us / 1.016ms
        scale = 1000.0 if avg.endswith("ms") else 1.0 if avg.endswith("us") else None
        if scale is not None:
            times[parts[0]] = float(avg[:-2]) * scale
    return times


def row_traffic(src: str, width: int) -> tuple[int, int, int, int]:
    """(row loads, row stores, bytes per row, partial-sum accumulators) of one kernel's source."""
    sig = re.search(r"'signature': \{(.*?)\}", src)
    dtypes = dict(re.findall(r"'(\w+)': '\*(\w+)'", sig.group(1))) if sig else {}
    row = rf"\((\w+) \+ \(r0_1 \+ {width}\*x0\)"
    loads = set(re.findall(r"tl\.load" + row, src))
    stores = set(re.findall(r"tl\.store" + row, src))
    # a pointer both loaded and stored (in_out_ptr) is read once and written once
    per_row = sum(ELEMENT_BYTES.get(dtypes.get(p, ""), 0) for p in [*loads, *stores]) * width
    return len(loads), len(stores), per_row, len(re.findall(r"accum\d+ = tl\.full", src))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("cache_dir", type=pathlib.Path)
    p.add_argument("profile", type=pathlib.Path)
    p.add_argument("pattern")
    p.add_argument("--rows", type=int, default=98304, help="rows of the tensors (tokens per micro-batch)")
    p.add_argument("--width", type=int, default=512, help="row width the kernels index (model_dim)")
    p.add_argument("--dump", type=pathlib.Path, help="also write the matching kernels' sources here")
    a = p.parse_args(sys.argv[1:])
    sources = kernel_sources(a.cache_dir, re.compile(a.pattern))
    if not sources:
        raise SystemExit(f"kernel_bytes: no generated kernel matching {a.pattern!r} under {a.cache_dir}")
    times = profile_times(a.profile)
    rows = []
    for name, src in sources.items():
        if name in times:
            n_load, n_store, per_row, n_acc = row_traffic(src, a.width)
            gb = per_row * a.rows / 1e9
            rows.append((times[name], n_load, n_store, n_acc, gb, gb / times[name] * 1e3, name))  # GB/us -> TB/s
    for us, n_load, n_store, n_acc, gb, tbs, name in sorted(rows, reverse=True):
        print(f"{us:9.1f} us  loads {n_load:2d} stores {n_store} sums {n_acc}  {gb:5.2f} GB  {tbs:4.2f} TB/s  {name}")
    print(f"kernel_bytes: {len(rows)} kernels in the profile, {len(sources)} generated matching {a.pattern!r}")
    if a.dump:
        a.dump.write_text("".join(f"#### {n}\n{s}\n\n" for n, s in sorted(sources.items())))


if __name__ == "__main__":
    main()
