"""Build the shipped `train_gpt.py` and assemble a records/ folder from run logs.

    python build_submission.py [--out dist/train_gpt.py]          # the self-extracting artifact + .sha256
    python build_submission.py --seeds 1337,42,2025 [--record NAME]  # print the torchrun commands, exit
    python build_submission.py --record NAME --logs L1 L2 L3 [--author A --github-id G --blurb TEXT
                               --baseline DIR_OR_SCORES --track auto|non_record]

Artifact (STYLE §3.10, SPEC §8): python-minifier (pinned 3.4.0; docstrings and asserts removed, locals and literals
left alone, class-attribute annotations kept because dataclasses need them) -> raw LZMA2 at preset 9|EXTREME ->
base85 -> a two-line `exec` stub.  The build is deterministic and refuses to write an artifact that does not
compile under the running interpreter, which should be the oldest Python the evaluator uses (3.10/3.11): minifying
under 3.12+ can emit PEP 701 f-strings that older interpreters reject.

Records (the competition's layout): `records/track_10min_16mb/<date>_<NAME>/` when every log shows 8xH100, world
size 8, a MAX_WALLCLOCK_SECONDS cap within 600 s, training plus GPTQ calibration on training data within 600 s, a
legal score and, where the log holds the code that ran, the shipped file or the source it is built from; otherwise
`records/track_non_record_16mb/...`.  A compressed model plus the shipped code not under 16,000,000 bytes is
refused.  Significance follows the competition's rule: a new record must beat the previous one by >= 0.005 nats at
p < 0.01 (one-sided Welch t-test over seeds).
"""

from __future__ import annotations

import argparse
import ast
import base64
import hashlib
import json
import lzma
import math
import re
import shutil
import statistics
import sys
import tempfile
import tokenize
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent
MINIFIER_VERSION = "3.4.0"
SUPPORTED_PYTHONS = ((3, 10), (3, 11))  # the evaluator's interpreters; build under one of them
LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
STUB_HEAD = "import lzma as L,base64 as B\n"
# Raw LZMA2 needs the filter chain to decode; the default dictionary (8 MiB) covers any source shorter than that,
# so the stub need not repeat the encoder's preset.  _unpack checks the round trip through this exact expression.
STUB_EXEC = 'exec(L.decompress(B.b85decode("{}"),format=L.FORMAT_RAW,filters=[{{"id":L.FILTER_LZMA2}}]))\n'
STUB_RE = re.compile(r'^import lzma as L,base64 as B\nexec\(L\.decompress\(B\.b85decode\("([^"]*)"\),.*\)\)\n\Z')

RECORD_TRACK, NON_RECORD_TRACK = "track_10min_16mb", "track_non_record_16mb"
RECORD_WORLD_SIZE, RECORD_TRAIN_SECONDS, RECORD_GPU = 8, 600.0, "H100"
SIZE_CAP = 16_000_000  # SPEC §8: compressed model + code must be under this many bytes, in every track here
MIN_IMPROVEMENT_NATS, MAX_P_VALUE = 0.005, 0.01  # the competition's significance rule
SCORE_LABEL, ALIAS_LABEL = "final_int6_sliding_window_exact", "final_int8_zlib_roundtrip_exact"
LEGAL_SLOT_MODES = ("off", "causal")  # D5: standard SLOT fits on the targets it scores


# ==============================================================================
# Artifact
# ==============================================================================


def _minifier():
    try:
        import python_minifier
    except ImportError:
        raise RuntimeError(f"python-minifier=={MINIFIER_VERSION} is required: pip install python-minifier=={MINIFIER_VERSION}") from None
    from importlib.metadata import version

    found = version("python_minifier")
    if found != MINIFIER_VERSION:
        raise RuntimeError(f"python-minifier {found} installed; the build is pinned to {MINIFIER_VERSION} (determinism)")
    return python_minifier


def _strip_comments(code: str) -> str:
    """Python source without its comments (tokenize's COMMENT tokens: a '#' inside a string stays); lines that held
    only a comment go, other lines lose their trailing comment and spaces.  Raises if what is left does not tokenize
    to the same tokens."""
    ast.parse(code)  # Python only: another language's text (e.g. CUDA C's #include lines) can tokenize too
    toks = list(tokenize.generate_tokens(iter(code.splitlines(True)).__next__))
    cut = {t.start[0]: t.start[1] for t in toks if t.type == tokenize.COMMENT}
    lines = []
    for i, line in enumerate(code.splitlines(True), 1):
        if i in cut:
            if not line[:cut[i]].strip():
                continue
            line = line[:cut[i]].rstrip() + "\n"
        lines.append(line)
    out = "".join(lines)
    kept = lambda ts: [(t.type, t.string) for t in ts if t.type not in (tokenize.COMMENT, tokenize.NL)]
    if kept(tokenize.generate_tokens(iter(out.splitlines(True)).__next__)) != kept(toks):
        raise ValueError("stripping its comments changed the code")
    return out


def strip_kernel_comments(source: str) -> str:
    """`source` with the comments inside its module-level kernel sources (a string constant assigned to a name that
    ends in _SRC, e.g. train_gpt.py's Triton and Gluon kernels, compiled from the string at run time) removed: the
    minifier keeps a string's text, so they would count as code bytes.  A string that is not Python is kept as is;
    raises if the result is not the same module with only those strings changed."""
    spans = []
    tree = ast.parse(source)
    for node in tree.body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                and node.targets[0].id.endswith("_SRC") and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)):
            try:
                spans.append((node.value, repr(_strip_comments(node.value.value))))
            except (SyntaxError, tokenize.TokenError, IndentationError, ValueError):
                continue
    lines = re.split(r"(?<=\n)|(?<=\r)(?!\n)", source)  # as ast numbers lines (str.splitlines splits on more)
    offset = [0]
    for line in lines:
        offset.append(offset[-1] + len(line))
    out = source
    for node, text in sorted(spans, key=lambda s: (-s[0].lineno, -s[0].col_offset)):  # from the end: offsets hold
        a = offset[node.lineno - 1] + len(lines[node.lineno - 1].encode()[:node.col_offset].decode())
        b = offset[node.end_lineno - 1] + len(lines[node.end_lineno - 1].encode()[:node.end_col_offset].decode())
        out = out[:a] + text + out[b:]
    for node, text in spans:
        node.value = ast.literal_eval(text)  # node: the string constant
    if ast.dump(ast.parse(out)) != ast.dump(tree):
        raise RuntimeError("strip_kernel_comments: the rewritten source is not the same module (a bug in the build)")
    return out


def minify_source(source: str) -> str:
    """Minify with options that keep behaviour: no renaming or literal hoisting, class annotations kept; comments
    inside kernel sources removed first (strip_kernel_comments)."""
    source = strip_kernel_comments(source)
    pm = _minifier()
    keep_class_annotations = pm.RemoveAnnotationsOptions(
        remove_variable_annotations=True, remove_return_annotations=True,
        remove_argument_annotations=True, remove_class_attribute_annotations=False)
    return pm.minify(source, remove_annotations=keep_class_annotations, remove_literal_statements=True,
                     rename_locals=False, hoist_literals=False, remove_asserts=True, prefer_single_line=True)


def pack(minified: str) -> str:
    """Minified source -> the two-line self-extracting stub (raw LZMA2, base85: no quote or backslash chars)."""
    raw = lzma.compress(minified.encode("utf-8"), format=lzma.FORMAT_RAW, filters=LZMA_FILTERS)
    return STUB_HEAD + STUB_EXEC.format(base64.b85encode(raw).decode("ascii"))


def unpack(artifact: str) -> str:
    """Inverse of pack, decoding exactly as the stub does (same filter chain)."""
    m = STUB_RE.match(artifact)
    if m is None:
        raise ValueError("not a self-extracting artifact made by build_submission.py")
    raw = base64.b85decode(m.group(1))
    return lzma.decompress(raw, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2}]).decode("utf-8")


def _check_python(allow_newer: bool) -> None:
    v = sys.version_info[:2]
    if v in SUPPORTED_PYTHONS or (allow_newer and v > SUPPORTED_PYTHONS[-1]):
        return
    raise RuntimeError(f"building under Python {v[0]}.{v[1]}; build under {' or '.join('%d.%d' % p for p in SUPPORTED_PYTHONS)} "
                       "(the evaluator's); newer minifier output may not compile there (--allow-newer-python to override)")


def build_artifact(src_path, out_path, allow_newer_python: bool = False) -> dict:
    """Minify + pack `src_path` into `out_path`; refuse (RuntimeError) if anything fails to compile or round-trip.

    Returns dict(bytes=<artifact size, the counted code bytes>, sha256=..., minified_bytes=..., source_bytes=...,
    artifact=<its text>, source=<the source's text>)."""
    _check_python(allow_newer_python)
    src_path, out_path = Path(src_path), Path(out_path)
    source = src_path.read_text(encoding="utf-8")
    minified = minify_source(source)
    artifact = pack(minified)
    for text, what in ((minified, "minified source"), (artifact, "artifact")):
        try:
            compile(text, f"<{what} of {src_path.name}>", "exec")
        except SyntaxError as e:
            raise RuntimeError(f"{what} of {src_path} does not compile under Python {sys.version.split()[0]}: {e}") from None
    try:  # best effort for the oldest evaluator when building under a newer one (ast's feature_version is partial)
        ast.parse(minified, feature_version=SUPPORTED_PYTHONS[0])
    except SyntaxError as e:
        raise RuntimeError(f"minified {src_path} uses syntax newer than Python {SUPPORTED_PYTHONS[0]}: {e}") from None
    if unpack(artifact) != minified:
        raise RuntimeError("artifact does not decode back to the minified source")
    data = artifact.encode("ascii")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_bytes(data)
    return dict(bytes=len(data), sha256=hashlib.sha256(data).hexdigest(),
                minified_bytes=len(minified.encode("utf-8")), source_bytes=len(source.encode("utf-8")),
                artifact=artifact, source=source)


def write_artifact(src_path, out_path, allow_newer_python: bool = False) -> dict:
    """CLI build: the artifact, `<out>.sha256` (sha256sum format), and the code bytes printed."""
    info = build_artifact(src_path, out_path, allow_newer_python)
    out_path = Path(out_path)
    Path(str(out_path) + ".sha256").write_text(f"{info['sha256']}  {out_path.name}\n")
    print(f"artifact:{out_path} code_bytes:{info['bytes']} sha256:{info['sha256']} "
          f"minified_bytes:{info['minified_bytes']} source_bytes:{info['source_bytes']}")
    return info


# ==============================================================================
# Log parsing (SPEC §10.1, STYLE §3.9)
# ==============================================================================


class LogError(ValueError):
    pass


@dataclass
class RunLog:
    path: Path
    seed: int | None = None
    world_size: int | None = None
    max_wallclock_seconds: float | None = None
    gpus: list = field(default_factory=list)  # GPU names from the nvidia-smi table in the log header
    hparams: dict = field(default_factory=dict)  # the "Hyperparameters:" block
    train_curve: list = field(default_factory=list)  # (step, train_loss)
    val_curve: list = field(default_factory=list)  # (step, val_bpb)
    last_step: int = 0
    train_time_ms: float = 0.0
    step_avg_ms: float | None = None
    stopped_early: bool = False
    post_ema: dict = field(default_factory=dict)
    finals: dict = field(default_factory=dict)  # label -> {key: value} of final_* lines (last occurrence)
    code_bytes: int | None = None
    model_bytes: int | None = None
    total_bytes: int | None = None
    calib_seconds: float | None = None  # `gptq:calibrated N layers in Xs` (after the training clock stops)
    source_text: str | None = None  # the code that ran, as the log header holds it (None: not in this log)

    def final(self, label: str, key: str) -> float:
        return _num(self.finals[label][key])

    @property
    def slot_mode(self) -> str:
        """`slot:<mode>` on the sliding line; else the logged hyperparameters; else unknown (not provably legal)."""
        mode = self.finals.get("final_int6_sliding_window", {}).get("slot")
        if mode:
            return mode
        if "slot_enabled" in self.hparams:
            return self.hparams.get("slot_mode", "standard") if self.hparams["slot_enabled"] in ("True", "1") else "off"
        return "unknown"

    @property
    def eval_seconds(self) -> float:
        """Wall time of the final evaluations (round trip + sliding window), as logged."""
        return sum(_num(self.finals[k].get("eval_time", "0ms")) for k in ("final_int6_roundtrip", "final_int6_sliding_window")
                   if k in self.finals) / 1000.0


_NUM_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?(ms|s)?$|^[-+]?(nan|inf)$")
_GPU_RE = re.compile(r"^\|\s+\d+\s+(NVIDIA [^|]*?)\s+(On|Off)\s+\|")
_BYTES_RE = re.compile(r"^(Code size|Serialized model int\S+|Total submission size \S+): (\d+) bytes")


def _num(v: str) -> float:
    """'123ms' / '1.5' / '88.17ms' -> float (ms and s suffixes dropped; units are in the key's convention)."""
    if not _NUM_RE.match(v):
        raise ValueError(f"not a number: {v!r}")
    return float(v[:-2] if v.endswith("ms") else v[:-1] if v.endswith("s") else v)


def _kv(tokens: list) -> dict:
    return dict(t.split(":", 1) for t in tokens if ":" in t and not t.startswith(":"))


def _parse_step_line(run: RunLog, kv: dict) -> None:
    s, _, _ = kv["step"].partition("/")
    step = int(s)
    if "train_loss" in kv:
        run.train_curve.append((step, _num(kv["train_loss"])))
    elif "val_bpb" in kv:
        run.val_curve.append((step, _num(kv["val_bpb"])))
    else:
        return
    run.last_step = max(run.last_step, step)
    if "train_time" in kv:
        run.train_time_ms = _num(kv["train_time"])
    if "step_avg" in kv:
        run.step_avg_ms = _num(kv["step_avg"])


def _parse_line(run: RunLog, line: str) -> None:
    m = _BYTES_RE.match(line)
    if m:
        attr = {"C": "code_bytes", "S": "model_bytes", "T": "total_bytes"}[m.group(1)[0]]
        setattr(run, attr, int(m.group(2)))
        return
    tokens = line.split()
    kv = _kv(tokens)
    head = tokens[0]
    if head.startswith("step:") and re.match(r"^\d+/\d+$", kv["step"]):
        _parse_step_line(run, kv)
    elif head == "stopping_early:":
        run.stopped_early = True
        run.train_time_ms = _num(kv.get("train_time", "0ms"))
    elif head.startswith("final_") and "val_bpb" in kv:
        run.finals[head] = kv
    elif head == "DIAGNOSTIC" and len(tokens) > 1 and tokens[1] == "post_ema":
        run.post_ema = kv
    elif head == "gptq:calibrated" and re.match(r"^[\d.]+s$", tokens[-1]):
        run.calib_seconds = _num(tokens[-1])
    elif re.match(r"^seed:\d+$", head):
        run.seed = int(kv["seed"])
    elif re.match(r"^world_size:\d+$", head):
        run.world_size = int(kv["world_size"])
    if "max_wallclock_seconds" in kv and _NUM_RE.match(kv["max_wallclock_seconds"]):
        run.max_wallclock_seconds = _num(kv["max_wallclock_seconds"])


def parse_log(path) -> RunLog:
    """Parse one training log; LogError names the file and the missing line when the run did not finish."""
    path = Path(path)
    run = RunLog(path=path)
    in_hparams = False
    text = path.read_text(encoding="utf-8", errors="replace")
    for line in text.splitlines():
        if line == "Hyperparameters:":
            in_hparams = True
            continue
        hp = re.match(r"^\s+(\w+): (.*)$", line) if in_hparams else None
        if hp:
            run.hparams[hp.group(1)] = hp.group(2).strip()
            continue
        in_hparams = False
        gpu = _GPU_RE.match(line)
        if gpu:
            run.gpus.append(gpu.group(1))
        elif line and not line[0].isspace():
            try:
                _parse_line(run, line)
            except (ValueError, KeyError):
                continue  # source text or free-form lines that merely look like events
    if run.seed is None and re.match(r"^\d+$", run.hparams.get("seed", "")):
        run.seed = int(run.hparams["seed"])
    run.source_text = _logged_source(text)
    if run.max_wallclock_seconds is None and "max_wallclock_seconds" in run.hparams:
        run.max_wallclock_seconds = float(run.hparams["max_wallclock_seconds"])
    _require(run)
    return run


def _logged_source(text: str) -> str | None:
    """The running file's text from a log header: after the `  name: value` lines of the Hyperparameters block, up to
    the `Running Python` line (train_gpt.py's log_header); None when the log has no such header."""
    start = text.find("\nHyperparameters:\n")
    end = text.find("\nRunning Python ", start)
    if start < 0 or end < 0:
        return None
    lines = text[start + len("\nHyperparameters:\n"):end].split("\n")
    k = 0
    while k < len(lines) and re.match(r"^  \w+: ", lines[k]):
        k += 1
    return "\n".join(lines[k:])


def _require(run: RunLog) -> None:
    missing = [label for label in (SCORE_LABEL, ALIAS_LABEL) if label not in run.finals]
    if run.total_bytes is None:
        missing.append("Total submission size ...: N bytes")
    if run.model_bytes is None:
        missing.append("Serialized model int6+...: N bytes")
    if run.seed is None:
        missing.append("seed:N")
    if missing:
        raise LogError(f"{run.path}: incomplete log (did the run finish?); missing line(s): {', '.join(missing)}")


def track_reasons(run: RunLog) -> list:
    """Why this run cannot go in the 10-min record track (empty list = it can)."""
    reasons = []
    if run.world_size != RECORD_WORLD_SIZE:
        reasons.append(f"world_size {run.world_size} != {RECORD_WORLD_SIZE}")
    if len(run.gpus) != RECORD_WORLD_SIZE or not all(RECORD_GPU in g for g in run.gpus):
        reasons.append(f"device is not 8x{RECORD_GPU} (log shows {', '.join(sorted(set(run.gpus))) or 'no nvidia-smi table'}"
                       f"{' x%d' % len(run.gpus) if run.gpus else ''})")
    if run.train_time_ms > 1000 * RECORD_TRAIN_SECONDS:
        reasons.append(f"training took {run.train_time_ms / 1000:.1f}s > {RECORD_TRAIN_SECONDS:.0f}s")
    if run.max_wallclock_seconds is not None and not 0 < run.max_wallclock_seconds <= RECORD_TRAIN_SECONDS:
        reasons.append(f"max_wallclock_seconds {run.max_wallclock_seconds:g} is not a cap within {RECORD_TRAIN_SECONDS:.0f}s")
    if run.slot_mode not in LEGAL_SLOT_MODES:
        reasons.append(f"SLOT mode '{run.slot_mode}' is not a legal (causal) score")
    if run.hparams.get("use_gptq", "True") in ("True", "1") and run.hparams.get("gptq_calib", "train") == "train":
        if run.calib_seconds is None:
            reasons.append("no `gptq:calibrated ... in Xs` line: the GPTQ calibration's time on training data is unknown")
        elif run.train_time_ms + 1000 * run.calib_seconds > 1000 * RECORD_TRAIN_SECONDS:
            reasons.append(f"training + GPTQ calibration on training data took "
                           f"{run.train_time_ms / 1000 + run.calib_seconds:.1f}s > {RECORD_TRAIN_SECONDS:.0f}s "
                           "(SPEC D4: the calibration reads training data, so it must fit in the 600 s too)")
    return reasons


# ==============================================================================
# Statistics: Welch's one-sided t-test, with the Student-t CDF written out
# ==============================================================================


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz; DLMF 8.17.22)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),  # even step d_{2m}
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):  # odd step d_{2m+1}
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= c * d
        if abs(c * d - 1.0) < 1e-15:
            return h
    raise RuntimeError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) for a, b > 0, 0 <= x <= 1."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x={x} outside [0, 1]")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):  # the fraction converges fast here; use the symmetry otherwise
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def student_t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with df (real, > 0) degrees of freedom: 0.5 * I_{df/(df+t^2)}(df/2, 1/2)."""
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return tail if t >= 0 else 1.0 - tail


@dataclass(frozen=True)
class Welch:
    t: float
    df: float
    p: float  # one-sided: H1 is mean(new) < mean(base) - margin


def welch_t_test(new: list, base: list, margin: float = 0.0) -> Welch:
    """One-sided Welch t-test that `new` (losses) is lower than `base` by more than `margin`; >= 2 samples each."""
    if len(new) < 2 or len(base) < 2:
        raise ValueError(f"Welch's test needs >= 2 seeds on each side (got {len(new)} and {len(base)})")
    va, vb = statistics.variance(new) / len(new), statistics.variance(base) / len(base)
    diff = statistics.fmean(base) - statistics.fmean(new) - margin
    se2 = va + vb
    if se2 == 0.0:
        return Welch(math.copysign(math.inf, diff), math.inf, 0.0 if diff > 0 else 1.0)
    df = se2 * se2 / (va * va / (len(new) - 1) + vb * vb / (len(base) - 1))
    t = diff / math.sqrt(se2)
    return Welch(t, df, student_t_sf(t, df))


# ==============================================================================
# Records folder
# ==============================================================================


def _mean_std(xs: list) -> tuple:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else float("nan"))


def load_baseline(spec: str) -> tuple:
    """`--baseline`: a comma list of per-seed val_loss (nats), or a record folder (its logs, else submission.json).
    Returns (label, per-seed losses or [mean])."""
    p = Path(spec)
    if not p.exists():
        try:
            return f"scores {spec}", [float(x) for x in spec.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--baseline {spec!r} is neither a folder nor a comma list of val_loss values") from None
    scores = [s for log in sorted(list(p.glob("*.log")) + list(p.glob("*.txt"))) if (s := _logged_score(log)) is not None]
    if scores:
        return f"{p.name} ({len(scores)} logs)", scores
    sub = p / "submission.json"
    if not sub.exists():
        raise ValueError(f"--baseline {p}: no complete logs and no submission.json")
    meta = json.loads(sub.read_text())
    per_seed = meta.get("val_loss_per_seed") or [meta["val_loss"]]
    return f"{p.name} (submission.json)", [float(x) for x in per_seed]


def _logged_score(path: Path):
    """A previous record's per-seed val_loss: our score line, else the harness line every record since the root
    baseline prints (`final_int8_zlib_roundtrip_exact`); lenient, because older logs follow older grammars."""
    text = path.read_text(encoding="utf-8", errors="replace")
    for label in (SCORE_LABEL, ALIAS_LABEL):
        found = re.findall(rf"^{label} val_loss:([-+.\deE]+) ", text, re.M)
        if found:
            return float(found[-1])
    return None


def significance_text(new: list, base: list, label: str) -> str:
    delta = statistics.fmean(new) - statistics.fmean(base)
    lines = ["## Significance vs baseline", "",
             f"Baseline: {label}, mean val_loss {statistics.fmean(base):.8f} nats over {len(base)} seed(s).",
             f"Delta (mean_new - mean_base): **{delta:+.8f} nats** (the rule needs <= -{MIN_IMPROVEMENT_NATS}).", ""]
    try:
        w = welch_t_test(new, base)
        strict = welch_t_test(new, base, margin=MIN_IMPROVEMENT_NATS)
    except ValueError as e:
        return "\n".join(lines + [f"Welch t-test: not computable ({e}); the rule cannot be shown to be met.", ""])
    clears = -delta >= MIN_IMPROVEMENT_NATS and w.p < MAX_P_VALUE
    lines += [f"One-sided Welch t-test (H1: new < base): t = {w.t:.4f}, df = {w.df:.2f}, p = {w.p:.3g}.",
              f"Against the 0.005-nat margin itself (H1: new < base - 0.005): t = {strict.t:.4f}, p = {strict.p:.3g}.",
              f"Rule (>= {MIN_IMPROVEMENT_NATS} nats better AND p < {MAX_P_VALUE}): **{'CLEARS' if clears else 'does NOT clear'}**.", ""]
    return "\n".join(lines)


def _fmt(x, spec: str) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def results_table(runs: list, code_bytes: int) -> str:
    """Per-seed rows; bytes total = the log's compressed model + the shipped artifact's code (what is submitted)."""
    head = ("| seed | steps | ms/step | post-EMA bpb | int6 round-trip bpb | sliding bpb (score) | val_loss (nats) "
            "| bytes total | final eval (s) | SLOT |")
    rows = [head, "|" + "---|" * 10]
    for r in runs:
        rt = r.finals.get("final_int6_roundtrip_exact", r.finals.get("final_int6_roundtrip", {})).get("val_bpb")
        rows.append(f"| {r.seed} | {r.last_step} | {_fmt(r.step_avg_ms, '.2f')} | {r.post_ema.get('val_bpb', 'n/a')} "
                    f"| {rt or 'n/a'} | {r.final(SCORE_LABEL, 'val_bpb'):.8f} | {r.final(SCORE_LABEL, 'val_loss'):.8f} "
                    f"| {r.model_bytes + code_bytes:,} | {r.eval_seconds:.1f} | {r.slot_mode} |")
    bpb_m, bpb_s = _mean_std([r.final(SCORE_LABEL, "val_bpb") for r in runs])
    loss_m, loss_s = _mean_std([r.final(SCORE_LABEL, "val_loss") for r in runs])
    rows.append(f"| **mean** | {statistics.fmean(r.last_step for r in runs):.0f} | | | | **{bpb_m:.8f}** | **{loss_m:.8f}** "
                f"| {statistics.fmean(r.model_bytes + code_bytes for r in runs):,.0f} | | |")
    rows.append(f"| std | | | | | {_fmt(bpb_s, '.8f')} | {_fmt(loss_s, '.8f')} | | | |")
    return "\n".join(rows)


def plot_curves(runs: list, out_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for r in runs:
        if r.train_curve:
            ax1.plot(*zip(*r.train_curve), label=f"seed {r.seed}", lw=1)
        if r.val_curve:
            ax2.plot(*zip(*r.val_curve), marker="o", label=f"seed {r.seed}", lw=1)
    for ax, name in ((ax1, "train_loss (nats)"), (ax2, "val_bpb")):
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    ax1.set_yscale("log")
    ax2.set_yscale("log")  # step-0 val (~4 bpb) would flatten the rest of the curve
    fig.tight_layout()
    fig.savefig(out_path, dpi=100, metadata={"Software": None})
    plt.close(fig)


def torchrun_commands(seeds: list, name: str = "run", nproc: int = RECORD_WORLD_SIZE,
                      script: str = "train_gpt.py") -> list:
    return [f"SEED={s} RUN_ID={name}_seed{s} torchrun --standalone --nproc_per_node={nproc} {script}" for s in seeds]


def _readme(name, args, runs, track, reasons, info, baseline, warnings) -> str:
    losses = [r.final(SCORE_LABEL, "val_loss") for r in runs]
    bpb_m, bpb_s = _mean_std([r.final(SCORE_LABEL, "val_bpb") for r in runs])
    loss_m, loss_s = _mean_std(losses)
    modes = sorted({r.slot_mode for r in runs})
    legal = all(m in LEGAL_SLOT_MODES for m in modes)
    out = [f"# {name}", "", args.blurb or "", "",
           f"**val_bpb {bpb_m:.8f}** (std {_fmt(bpb_s, '.8f')}), val_loss {loss_m:.8f} nats (std {_fmt(loss_s, '.8f')}), "
           f"mean over {len(runs)} seed(s).  Author: {args.author or 'n/a'} (@{args.github_id or 'n/a'}).", "",
           f"The score is the `{SCORE_LABEL}` line of each log (sliding window, every target scored once; repeated as "
           f"`{ALIAS_LABEL}` for the harness).  SLOT mode: {', '.join(modes)}.  Legal record score: "
           f"**{'yes' if legal else 'NO'}** ({'no SLOT or causal SLOT: each token is scored before it is fitted on' if legal else 'standard SLOT fits delta on the targets it then scores (SPEC D5)'}).", "",
           f"Track: `{track}`" + (f" ({'; '.join(reasons)})." if reasons else " (8xH100, world size 8, training and GPTQ calibration within 600 s, causal or no SLOT)."), "",
           "## Results", "", results_table(runs, info["bytes"]), ""]
    if baseline is not None:
        out.append(significance_text(losses, baseline[1], baseline[0]))
    out += ["## Files", "",
            f"- `train_gpt.py`: the submitted, counted code: {info['bytes']:,} bytes, sha256 `{info['sha256']}` (minified "
            f"from {info['source_bytes']:,} bytes with python-minifier {MINIFIER_VERSION}, raw LZMA2 preset 9e, base85).",
            "- `train_gpt_human.py`: the readable source it was built from (from the repo root, `python "
            "build_submission.py --source <this folder>/train_gpt_human.py --out <this folder>/train_gpt.py` rebuilds "
            "it byte for byte).",
            *[f"- `{_log_name(r)}`: training log, seed {r.seed}." for r in runs],
            "- `loss_curve.png`: train_loss and val_bpb vs step.", "- `requirements.txt`.", "",
            "## Reproduce", "", "```", *torchrun_commands([r.seed for r in runs], name), "```", ""]
    if warnings:
        out += ["## Warnings", "", *[f"- {w}" for w in warnings], ""]
    return "\n".join(out)


def _log_name(run: RunLog) -> str:
    return f"train_seed{run.seed}.log"


def make_record(args) -> Path:
    """Assemble the records folder; returns its path.  Refuses incomplete logs and duplicate seeds."""
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$", args.record):
        raise ValueError(f"--record {args.record!r}: use letters, digits and _.+- only")
    runs = [parse_log(p) for p in args.logs]
    seeds = [r.seed for r in runs]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"duplicate seeds among --logs: {seeds}")
    with tempfile.TemporaryDirectory() as tmp:  # build first: a refused artifact leaves no half-made folder
        info = build_artifact(args.source, Path(tmp) / "train_gpt.py", args.allow_newer_python)
        over = [f"seed {r.seed}: {r.model_bytes:,} + {info['bytes']:,} = {r.model_bytes + info['bytes']:,}"
                for r in runs if r.model_bytes + info["bytes"] >= SIZE_CAP]
        if over:
            raise ValueError(f"compressed model + the shipped code is not under {SIZE_CAP:,} bytes (SPEC §8), so no "
                             f"track takes it: {'; '.join(over)}")
        by_reason: dict = {}
        for r in runs:
            for why in track_reasons(r) + _code_reasons(r, info["artifact"], info["source"]):
                by_reason.setdefault(why, []).append(str(r.seed))
        reasons = [f"{why} (seed {', '.join(s)})" for why, s in by_reason.items()]
        track = NON_RECORD_TRACK if (reasons or args.track == "non_record") else RECORD_TRACK
        if args.track == "non_record" and not reasons:
            reasons = ["forced by --track non_record"]
        date = args.date or datetime.now(timezone.utc).strftime("%Y-%m-%d")
        folder = Path(args.records_dir) / track / f"{date}_{args.record}"
        if folder.exists() and not args.force:
            raise ValueError(f"{folder} exists; pass --force to overwrite")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(tmp) / "train_gpt.py", folder / "train_gpt.py")
    shutil.copyfile(args.source, folder / "train_gpt_human.py")
    shutil.copyfile(args.requirements, folder / "requirements.txt")
    for r in runs:
        shutil.copyfile(r.path, folder / _log_name(r))
    warnings = _consistency_warnings(runs, info["bytes"])
    baseline = load_baseline(args.baseline) if args.baseline else None
    (folder / "README.md").write_text(_readme(args.record, args, runs, track, reasons, info, baseline, warnings))
    plot_curves(runs, folder / "loss_curve.png")
    sub = dict(name=args.record, author=args.author or "", github_id=args.github_id or "",
               val_bpb=statistics.fmean(r.final(SCORE_LABEL, "val_bpb") for r in runs),
               val_loss=statistics.fmean(r.final(SCORE_LABEL, "val_loss") for r in runs),
               bytes_total=max(r.model_bytes for r in runs) + info["bytes"], bytes_code=info["bytes"], date=date,
               blurb=args.blurb or "", seeds=seeds, val_bpb_per_seed=[r.final(SCORE_LABEL, "val_bpb") for r in runs],
               val_loss_per_seed=[r.final(SCORE_LABEL, "val_loss") for r in runs], track=track)
    (folder / "submission.json").write_text(json.dumps(sub, indent=2) + "\n")
    for w in warnings:
        print(f"WARNING: {w}")
    print(f"record:{folder} track:{track} val_bpb:{sub['val_bpb']:.8f} val_loss:{sub['val_loss']:.8f} "
          f"bytes_total:{sub['bytes_total']} bytes_code:{sub['bytes_code']}")
    return folder


def _code_reasons(run: RunLog, shipped: str, source: str) -> list:
    """The code a log says ran (its header holds the file's text) must be the shipped artifact or the source it is
    built from (the same code, minified or not); anything else, e.g. a dist/ build older than the source, means the
    record would not reproduce from its own train_gpt.py.  Logs without the text (older grammar) are not judged."""
    if run.source_text is None or run.source_text.rstrip("\n") in (shipped.rstrip("\n"), source.rstrip("\n")):
        return []
    return ["the code in the log header is neither the shipped train_gpt.py nor its source (a stale dist/ build, "
            "or edits after the run)"]


def _consistency_warnings(runs: list, code_bytes: int) -> list:
    out = []
    for r in runs:
        if r.code_bytes != code_bytes:
            out.append(f"seed {r.seed}: the log's Code size ({r.code_bytes}) differs from the shipped artifact ({code_bytes}): "
                       "the run did not use this exact file; bytes_total uses the shipped artifact")
        if r.finals[SCORE_LABEL].get("val_loss") != r.finals[ALIAS_LABEL].get("val_loss"):
            out.append(f"seed {r.seed}: {ALIAS_LABEL} differs from {SCORE_LABEL}")
    return out


# ==============================================================================
# CLI
# ==============================================================================


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default=str(ROOT / "train_gpt.py"), help="readable source to build")
    p.add_argument("--out", default=str(ROOT / "dist" / "train_gpt.py"), help="artifact path (build mode)")
    p.add_argument("--allow-newer-python", action="store_true", help="build under Python > 3.11 anyway")
    p.add_argument("--seeds", help="comma list: print the torchrun commands and exit")
    p.add_argument("--record", help="record NAME: assemble records/<track>/<date>_NAME/ from --logs")
    p.add_argument("--logs", nargs="+", default=[])
    p.add_argument("--author", default="")
    p.add_argument("--github-id", default="")
    p.add_argument("--blurb", default="")
    p.add_argument("--baseline", help="previous record folder, or comma list of its per-seed val_loss (nats)")
    p.add_argument("--track", choices=("auto", "non_record"), default="auto")
    p.add_argument("--date", help="YYYY-MM-DD for the folder name (default: today, UTC)")
    p.add_argument("--records-dir", default=str(ROOT / "records"))
    p.add_argument("--requirements", default=str(ROOT / "requirements.txt"))
    p.add_argument("--force", action="store_true", help="overwrite an existing record folder")
    args = p.parse_args(argv)
    if args.record and not args.logs and not args.seeds:
        p.error("--record needs --logs")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.seeds:
            seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
            # the minified build is what runs, so the logs' code size is the submitted file's (STYLE: the shipped file
            # is what actually runs); build it first with `python3 build_submission.py`
            print("\n".join(torchrun_commands(seeds, args.record or "run", script="dist/train_gpt.py")))
        elif args.record:
            make_record(args)
        else:
            write_artifact(args.source, args.out, args.allow_newer_python)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
