"""build_submission.py --record / --seeds / --baseline: log parsing, the records folder, and the significance test.

The logs in tests/fixtures/ are SYNTHETIC: they follow the log grammar (SPEC §10.1) with PR #1172's per-seed results
(SPEC §11.1); they are not real training logs."""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

import pytest

from conftest import ROOT, SOURCE, load_module

FIXTURES = ROOT / "tests" / "fixtures"
SEEDS = (1337, 42, 2025)
LOGS = [FIXTURES / f"pr1172_seed{s}.log" for s in SEEDS]
PR1179_LOSSES = [1.87584199, 1.87386531, 1.87554548]  # SPEC §11.2, the same code with SLOT off


@pytest.fixture(scope="module")
def bs():
    return load_module(ROOT / "build_submission.py", "build_submission_records_test")


def _exact(path: Path, label: str) -> tuple:
    """(val_loss, val_bpb) of a final *_exact line, read with a plain regex independent of the parser."""
    m = re.findall(rf"^{label} val_loss:(\S+) val_bpb:(\S+)$", path.read_text(), re.M)
    return float(m[-1][0]), float(m[-1][1])


def _edited_logs(tmp_path: Path, *edits) -> list:
    """Copies of the fixture logs with (regex, replacement) edits applied."""
    out = []
    for p in LOGS:
        text = p.read_text()
        for pat, rep in edits:
            text = re.sub(pat, rep, text, flags=re.M)
        q = tmp_path / "logs_in" / p.name
        q.parent.mkdir(parents=True, exist_ok=True)
        q.write_text(text)
        out.append(q)
    return out


def _record(bs, tmp_path, logs, *extra) -> Path:
    args = ["--record", "Test_Record", "--logs", *map(str, logs), "--records-dir", str(tmp_path / "records"),
            "--date", "2026-04-01", "--author", "A. Author", "--github-id", "aauthor", "--blurb", "synthetic", *extra]
    assert bs.main(args) == 0
    (folder,) = (tmp_path / "records").glob("*/2026-04-01_Test_Record")
    return folder


CAUSAL = (r"slot:standard$", "slot:causal")


def test_parse_log_reads_every_field(bs):
    """Guards the log grammar parser: each canonical line lands in the right field, the source-code line in the log
    header is not mistaken for a step line, and the nvidia-smi table yields the GPU list."""
    run = bs.parse_log(LOGS[0])
    assert (run.seed, run.world_size, run.max_wallclock_seconds) == (1337, 8, 600.0)
    assert run.gpus == ["NVIDIA H100 80GB HBM3"] * 8
    assert (run.last_step, run.step_avg_ms, run.train_time_ms, run.stopped_early) == (6704, 88.17, 591092.0, True)
    assert run.train_curve[0] == (1, 6.9271) and run.train_curve[-1] == (6500, 1.9063) and len(run.train_curve) == 23
    assert run.val_curve == [(0, 4.1047), (4000, 1.1975), (6704, 1.1319)]
    assert run.post_ema["val_bpb"] == "1.1309"
    assert (run.code_bytes, run.model_bytes, run.total_bytes) == (23349, 15623775, 15647124)
    assert (run.final(bs.SCORE_LABEL, "val_loss"), run.final(bs.SCORE_LABEL, "val_bpb")) == _exact(LOGS[0], bs.SCORE_LABEL)
    assert run.slot_mode == "standard" and run.eval_seconds == pytest.approx(168.5 + 6.612)


def test_record_folder_has_every_file_and_the_logged_numbers(bs, tmp_path):
    """Guards the records layout and its numbers: every file present, per-seed scores, means and sample stds taken
    from the logs, submission.json consistent with the shipped artifact."""
    folder = _record(bs, tmp_path, _edited_logs(tmp_path, CAUSAL))
    names = {p.name for p in folder.iterdir()}
    assert names == {"train_gpt.py", "train_gpt_human.py", "README.md", "submission.json", "requirements.txt",
                     "loss_curve.png", *(f"train_seed{s}.log" for s in SEEDS)}
    assert (folder / "train_gpt_human.py").read_bytes() == SOURCE.read_bytes()
    assert (folder / "requirements.txt").read_bytes() == (ROOT / "requirements.txt").read_bytes()
    assert (folder / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    art = (folder / "train_gpt.py").read_bytes()
    assert bs.unpack(art.decode()) == bs.minify_source(SOURCE.read_text())

    scores = [_exact(p, bs.SCORE_LABEL) for p in LOGS]
    sub = json.loads((folder / "submission.json").read_text())
    assert sub["val_loss"] == pytest.approx(statistics.fmean(s[0] for s in scores), abs=1e-12)
    assert sub["val_bpb"] == pytest.approx(statistics.fmean(s[1] for s in scores), abs=1e-12)
    assert sub["bytes_code"] == len(art)
    model_bytes = [int(re.search(r"^Serialized model int6\+brotli: (\d+) bytes", p.read_text(), re.M).group(1)) for p in LOGS]
    assert sub["bytes_total"] == max(model_bytes) + len(art)
    assert (sub["name"], sub["author"], sub["github_id"], sub["date"], sub["blurb"]) == (
        "Test_Record", "A. Author", "aauthor", "2026-04-01", "synthetic")

    readme = (folder / "README.md").read_text()
    for loss, bpb in scores:
        assert f"{bpb:.8f}" in readme and f"{loss:.8f}" in readme
    for mb in model_bytes:  # the table's totals are what is submitted: each log's model + the shipped code
        assert f"| {mb + len(art):,} |" in readme
    assert "| 15,647,124 |" not in readme  # the fixture log's own total (its code size is another file's)
    assert f"{statistics.stdev(s[1] for s in scores):.8f}" in readme
    assert f"{statistics.stdev(s[0] for s in scores):.8f}" in readme
    assert "Legal record score: **yes**" in readme and bs.SCORE_LABEL in readme
    assert "Code size (23349) differs" in readme  # the fixtures' code size is not this artifact's


def test_track_selection(bs, tmp_path):
    """Guards the record/non-record split: causal SLOT on 8xH100 within 600 s is a record; standard SLOT, another
    world size, another GPU, an over-long run, or --track non_record is not."""
    assert "track_10min_16mb" == _record(bs, tmp_path / "ok", _edited_logs(tmp_path / "ok", CAUSAL)).parent.name
    assert not bs.track_reasons(bs.parse_log(_edited_logs(tmp_path / "ok", CAUSAL)[0]))
    cases = {
        "SLOT mode 'standard'": [],
        "world_size 1": [CAUSAL, (r"^world_size:8 grad_accum_steps:1$", "world_size:1 grad_accum_steps:8")],
        "device is not 8xH100": [CAUSAL, (r"NVIDIA H100 80GB HBM3 ", "NVIDIA H200          ")],
        "training took 600.0s": [CAUSAL, (r"^stopping_early: wallclock_cap train_time:\d+ms", "stopping_early: wallclock_cap train_time:600001ms")],
        "max_wallclock_seconds 0": [CAUSAL, (r"^  max_wallclock_seconds: 600.0$", "  max_wallclock_seconds: 0.0")],
        # 591.1 s of training + 9.5 s of calibration on training data: over 600 s (GPTQ_RESERVE_MS too small)
        "training + GPTQ calibration on training data took 600.6s": [
            CAUSAL, (r"^gptq:calibrated 66 layers in 6.8s$", "gptq:calibrated 66 layers in 9.5s")],
    }
    for i, (why, edits) in enumerate(cases.items()):
        reasons = bs.track_reasons(bs.parse_log(_edited_logs(tmp_path / str(i), *edits)[1]))
        # an over-long run is also over 600 s with its calibration: that case has both reasons
        assert len(reasons) == (2 if why.startswith("training took") else 1) and reasons[0].startswith(why), (why, reasons)
    forced = _record(bs, tmp_path / "forced", _edited_logs(tmp_path / "forced", CAUSAL), "--track", "non_record")
    assert forced.parent.name == "track_non_record_16mb"
    assert "forced by --track non_record" in (forced / "README.md").read_text()


def test_record_over_the_size_cap_is_refused(bs, tmp_path, capsys):
    """Guards SPEC §8's cap in the records step: a compressed model that with the shipped code reaches 16,000,000
    bytes (here one seed's log at 15,980,000 of model) is refused for every track, naming the seed and the sum, and
    no folder is made."""
    logs = _edited_logs(tmp_path, CAUSAL)
    text = logs[1].read_text()
    logs[1].write_text(re.sub(r"^Serialized model int6\+brotli: \d+ bytes$", "Serialized model int6+brotli: 15980000 bytes",
                              text, flags=re.M))
    args = ["--record", "Big", "--logs", *map(str, logs), "--records-dir", str(tmp_path / "records")]
    assert bs.main(args) == 1
    err = capsys.readouterr().err
    assert "not under 16,000,000 bytes" in err and "seed 42: 15,980,000 + " in err, err
    assert not (tmp_path / "records").exists()


@pytest.mark.parametrize("dropped", [r"^final_int6_sliding_window_exact .*\n", r"^final_int8_zlib_roundtrip_exact .*\n",
                                     r"^Total submission size .*\n"])
def test_incomplete_log_is_refused(bs, tmp_path, capsys, dropped):
    """Guards publishing a record from a run that did not finish: the build refuses, names the log and the missing
    line, and creates no folder."""
    logs = _edited_logs(tmp_path, (dropped, ""))
    args = ["--record", "X", "--logs", *map(str, logs), "--records-dir", str(tmp_path / "records")]
    assert bs.main(args) == 1
    err = capsys.readouterr().err
    assert str(logs[0]) in err and "missing line" in err
    assert not (tmp_path / "records").exists()
    with pytest.raises(bs.LogError):
        bs.parse_log(logs[1])


def _t_density(x: float, df: float) -> float:
    return math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi) * (1 + x * x / df) ** (-(df + 1) / 2)


def _sf_by_simpson(t: float, df: float, n: int = 20000) -> float:
    """P(T > t) = 1/2 - integral_0^t density (t >= 0), composite Simpson: an independent check of the beta route."""
    h = t / n
    s = _t_density(0, df) + _t_density(t, df) + sum((4 if i % 2 else 2) * _t_density(i * h, df) for i in range(1, n))
    return 0.5 - s * h / 3


def test_student_t_tail_matches_tables_and_integration(bs):
    """Guards the hand-written Student-t CDF (scipy is not available in CI): one-sided table values
    t_0.01(4)=3.747, t_0.05(5)=2.015, t_0.05(1)=6.314, the Cauchy closed form for df=1, and numeric integration
    for a non-integer df."""
    assert bs.student_t_sf(3.747, 4) == pytest.approx(0.01, abs=2e-5)
    assert bs.student_t_sf(2.015, 5) == pytest.approx(0.05, abs=2e-5)
    assert bs.student_t_sf(6.314, 1) == pytest.approx(0.05, abs=2e-5)
    for t in (0.3, 1.0, 7.5):
        assert bs.student_t_sf(t, 1) == pytest.approx(0.5 - math.atan(t) / math.pi, rel=1e-10)
        assert bs.student_t_sf(-t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, rel=1e-10)
    for t, df in ((2.3, 3.14), (0.7, 9.6), (12.1, 3.14)):
        assert bs.student_t_sf(t, df) == pytest.approx(_sf_by_simpson(t, df), rel=1e-7, abs=1e-12)


def test_welch_hand_computed_example(bs):
    """Guards Welch's t, its degrees of freedom and the one-sided p, and the rule's p < 0.01 condition.

    By hand: new = [2.0, 2.2, 2.4] (mean 2.2, s^2 = 0.04), base = [2.6, 2.8, 3.0] (mean 2.8, s^2 = 0.04).
    se^2 = 0.04/3 + 0.04/3 = 0.026667, se = 0.163299;  t = (2.8 - 2.2)/0.163299 = 3.6742.
    df = (0.08/3)^2 / ((0.04/3)^2/2 + (0.04/3)^2/2) = (0.0064/9) / (0.0016/9) = 4.
    t-table, df=4, one-sided: t_0.025 = 2.776, t_0.01 = 3.747, so 0.01 < p < 0.025; the df=4 closed form
    F(t) = 1/2 + (3/8) u (1 - u^2/12), u = t/sqrt(1 + t^2/4), gives p = 1 - F = 0.010656.
    The improvement (0.6 nats) is far above 0.005 but p >= 0.01: the run does NOT clear the rule."""
    w = bs.welch_t_test([2.0, 2.2, 2.4], [2.6, 2.8, 3.0])
    assert w.t == pytest.approx(3.6742346, rel=1e-6) and w.df == pytest.approx(4.0, rel=1e-12)
    u = w.t / math.sqrt(1 + w.t**2 / 4)
    closed_form = 0.5 - (3 / 8) * u * (1 - u**2 / 12)
    assert w.p == pytest.approx(closed_form, rel=1e-10)
    assert w.p == pytest.approx(_sf_by_simpson(w.t, 4.0), rel=1e-8) and 0.01 < w.p < 0.025
    text = bs.significance_text([2.0, 2.2, 2.4], [2.6, 2.8, 3.0], "hand example")
    assert "does NOT clear" in text and "-0.60000000 nats" in text


def test_welch_unequal_variances_uses_welch_satterthwaite_df(bs):
    """Guards a pooled (Student) df sneaking in, which the equal-variance example above cannot tell apart.

    By hand: new = [1, 3] (mean 2, s^2 = 2, s^2/n = 1), base = [4, 6, 8, 10, 12] (mean 8, s^2 = 10, s^2/n = 2).
    se^2 = 3, t = 6/sqrt(3) = 3.4641;  df = 3^2 / (1^2/1 + 2^2/4) = 9/2 = 4.5 (pooled would be 5).
    t-table one-sided: df=4 t_0.01 = 3.747, t_0.025 = 2.776 -> p between 0.01 and 0.025."""
    w = bs.welch_t_test([1.0, 3.0], [4.0, 6.0, 8.0, 10.0, 12.0])
    assert w.t == pytest.approx(6 / math.sqrt(3), rel=1e-12) and w.df == pytest.approx(4.5, rel=1e-12)
    assert w.p == pytest.approx(_sf_by_simpson(w.t, 4.5), rel=1e-8) and 0.01 < w.p < 0.025
    shifted = bs.welch_t_test([1.0, 3.0], [4.0, 6.0, 8.0, 10.0, 12.0], margin=0.5)  # H1: new < base - 0.5
    assert shifted.t == pytest.approx(5.5 / math.sqrt(3), rel=1e-12)


def test_baseline_from_scores_folder_and_submission_json(bs, tmp_path):
    """Guards --baseline: PR #1172 vs PR #1179 per-seed losses clear the rule (p from integration, not a stored
    number); a record folder's logs or its submission.json give the same baseline; a single score cannot be tested."""
    new = [_exact(p, bs.SCORE_LABEL)[0] for p in LOGS]
    w = bs.welch_t_test(new, PR1179_LOSSES)
    assert w.p == pytest.approx(_sf_by_simpson(w.t, w.df), rel=1e-6) and w.p < 0.01
    folder = _record(bs, tmp_path, LOGS, "--baseline", ",".join(map(str, PR1179_LOSSES)))
    readme = (folder / "README.md").read_text()
    assert folder.parent.name == "track_non_record_16mb" and "Legal record score: **NO**" in readme  # standard SLOT
    assert "**CLEARS**" in readme and f"{statistics.fmean(new) - statistics.fmean(PR1179_LOSSES):+.8f} nats" in readme

    label, scores = bs.load_baseline(str(folder))  # a record folder: read its logs
    assert sorted(scores) == sorted(new) and "3 logs" in label
    only_json = tmp_path / "old_record"
    only_json.mkdir()
    (only_json / "submission.json").write_text(json.dumps({"val_loss": 1.9, "val_bpb": 1.12}))
    assert bs.load_baseline(str(only_json))[1] == [1.9]
    old_grammar = tmp_path / "root_baseline"  # older records: only the harness line, no int6 lines
    old_grammar.mkdir()
    for i, loss in enumerate(PR1179_LOSSES):
        (old_grammar / f"train_{i}.log").write_text(f"step:1/2 train_loss:6.9\nfinal_int8_zlib_roundtrip_exact val_loss:{loss:.8f} val_bpb:1.2\n")
    assert bs.load_baseline(str(old_grammar))[1] == PR1179_LOSSES
    assert "not computable" in bs.significance_text(new, [1.9], "one number")


def test_seeds_helper_prints_torchrun_commands(bs, capsys):
    """Guards the 3-seed launch helper: one torchrun line per seed, SEED and RUN_ID set, 8 processes."""
    assert bs.main(["--seeds", "1337,42,2025", "--record", "MyRun"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [f"SEED={s} RUN_ID=MyRun_seed{s} torchrun --standalone --nproc_per_node=8 dist/train_gpt.py"
                     for s in SEEDS]


def test_record_judges_the_code_the_log_says_ran(bs, tmp_path):
    """Guards reproducibility of a record: a log whose header holds the running file's text (train_gpt.py's
    log_header: the source between the Hyperparameters block and `Running Python`) goes in the record track when
    that text is the shipped artifact or the source it is built from, and not when it is anything else (a stale
    dist/ build, edits after the run).  The proxy record's own log holds exactly its train_gpt.py."""
    art = tmp_path / "built.py"
    bs.build_artifact(SOURCE, art)

    def with_code(sub, code):
        logs = _edited_logs(tmp_path / sub, CAUSAL, (r"^\(source text of the running train_gpt.py omitted in this fixture\)$",
                                                    lambda m: code + "\nRunning Python 3.11.7"))
        return logs

    for sub, code in (("art", art.read_text()), ("src", SOURCE.read_text())):
        logs = with_code(sub, code.rstrip("\n"))
        assert bs.parse_log(logs[0]).source_text.rstrip("\n") == code.rstrip("\n")
        assert _record(bs, tmp_path / sub, logs).parent.name == "track_10min_16mb", sub
    stale = with_code("stale", art.read_text().rstrip("\n") + "\n# edited")
    folder = _record(bs, tmp_path / "stale", stale)
    assert folder.parent.name == "track_non_record_16mb"
    assert "neither the shipped train_gpt.py nor its source" in (folder / "README.md").read_text()
    proxy = next((ROOT / "records" / "track_non_record_16mb").glob("*_proxy_1xH200"))
    logged = bs.parse_log(proxy / "train_seed1337.log").source_text
    assert logged.rstrip("\n") == (proxy / "train_gpt.py").read_text().rstrip("\n")


def test_record_needs_the_calibration_time_when_gptq_reads_training_data(bs, tmp_path):
    """Guards the calibration rule's blind spot: with USE_GPTQ on and GPTQ_CALIB=train a log without the
    `gptq:calibrated ... in Xs` line cannot show the calibration fits in 600 s, so it is not a record."""
    logs = _edited_logs(tmp_path, CAUSAL, (r"^gptq:calibrated .*\n", ""))
    reasons = bs.track_reasons(bs.parse_log(logs[0]))
    assert len(reasons) == 1 and reasons[0].startswith("no `gptq:calibrated"), reasons


def test_size_cap_boundary(bs, tmp_path, capsys):
    """Guards SPEC §8's strict cap at its edge: model + shipped code = 15,999,999 bytes is accepted, 16,000,000 is
    refused."""
    art = tmp_path / "built.py"
    code = bs.build_artifact(SOURCE, art)["bytes"]
    for total, ok in ((15_999_999, True), (16_000_000, False)):
        logs = _edited_logs(tmp_path / str(total), CAUSAL, (r"^Serialized model int6\+brotli: \d+ bytes$",
                                                            f"Serialized model int6+brotli: {total - code} bytes"))
        args = ["--record", "Edge", "--logs", *map(str, logs), "--records-dir", str(tmp_path / str(total) / "records")]
        assert (bs.main(args) == 0) == ok, (total, capsys.readouterr().err)
