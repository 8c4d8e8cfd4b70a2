"""End-to-end smoke runs of train_and_eval on the embedded sample (CPU): training, EMA, GPTQ, packing, reload,
round-trip and sliding+SLOT eval, and the log grammar users' parsers depend on."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from conftest import TOKENIZER, SAMPLE_DIR, tiny_config

FINAL_LINE = re.compile(r"^(final_\w+?)(_exact)? val_loss:(\S+) val_bpb:(\S+)")


def smoke_config(tg, **overrides):
    base = dict(
        data_path=str(SAMPLE_DIR), tokenizer_path=str(TOKENIZER), vocab_size=1024, train_seq_len=64,
        eval_seq_len=64, eval_stride=32, train_batch_tokens=8 * 2 * 64, val_batch_size=8 * 64 * 4, iterations=8,
        warmdown_iters=4, val_loss_every=4, train_log_every=1, gptq_calib_samples=2, bigram_vocab_size=64,
        slot_steps=2,
    )
    base.update(overrides)
    return tiny_config(tg, **base)


def run_pipeline(tg, h, tmp_path, monkeypatch, max_val_tokens=4096):
    """Run train_and_eval in tmp_path with a shortened val split; return the log lines."""
    monkeypatch.chdir(tmp_path)
    real_load = tg.load_validation_data

    def short_val(h_, device, seq_len):
        v = real_load(h_, device, seq_len)
        n = (min(max_val_tokens, v.tokens.numel() - 1) // seq_len) * seq_len
        return dataclasses.replace(v, tokens=v.tokens[: n + 1])

    monkeypatch.setattr(tg, "load_validation_data", short_val)
    logfile = tmp_path / "log.txt"
    tg.init_logging(str(logfile), True)
    try:
        tg.train_and_eval(h, tg.DistInfo(), torch.device("cpu"))
    finally:
        tg.init_logging(None, False)
    return logfile.read_text().splitlines()


def test_pipeline_end_to_end(tg, tmp_path, monkeypatch):
    """Guards the whole chain and the log grammar: training lowers the loss, the artifact is written and reloaded,
    every final_* line has its _exact twin, and the harness alias is the last line and equals the sliding score;
    the GPTQ calibration's time goes to gptq_reserve_warning, whose line (when it has one) is logged."""
    h = smoke_config(tg)
    calib = []
    monkeypatch.setattr(tg, "gptq_reserve_warning", lambda h_, ms: calib.append(ms) or f"reserve_warning_stand_in: {ms}ms")
    compiled, real_compile = [], tg.maybe_compile
    monkeypatch.setattr(tg, "maybe_compile", lambda fn, device, options=None: compiled.append(options) or
                        real_compile(fn, device, options))
    lines = run_pipeline(tg, h, tmp_path, monkeypatch)
    # the training model with the training options (PERF #23); the reloaded artifact's eval graphs without them
    assert compiled == [tg.train_compile_options(), None, None]
    train = [float(m.group(1)) for m in map(re.compile(r"^step:\d+/\d+ train_loss:(\S+) train_time:\d+ms step_avg:[\d.]+ms").match, lines) if m]
    assert len(train) == h.iterations
    assert train[-1] < train[0] - 0.3, train
    assert any(re.match(r"^step:\d+/8 val_loss:[\d.]+ val_bpb:[\d.]+ train_time:\d+ms step_avg:[\d.]+ms$", l) for l in lines)
    assert any(l.startswith("DIAGNOSTIC post_ema val_loss:") for l in lines)
    assert len(calib) == 1 and f"reserve_warning_stand_in: {calib[0]}ms" in lines
    logged_s = float(next(re.match(r"^gptq:calibrated \d+ layers in ([\d.]+)s$", l) for l in lines
                          if l.startswith("gptq:calibrated")).group(1))
    assert abs(calib[0] / 1000 - logged_s) < 0.15, (calib, logged_s)  # in ms, from the same start
    sizes = {k: int(v) for k, v in (re.match(r"^(Code size|Serialized model int6\+brotli|Total submission size int6\+brotli): (\d+) bytes$", l).groups() for l in lines if re.match(r"^(Code size|Serialized model int6\+brotli|Total submission size int6\+brotli): \d+ bytes$", l))}
    assert sizes["Total submission size int6+brotli"] == sizes["Serialized model int6+brotli"] + sizes["Code size"]
    assert sizes["Code size"] == len(open(tg.__file__, "rb").read())  # D9: the real bytes of the file that runs
    assert (tmp_path / "final_model.pt").is_file() and (tmp_path / "final_model.int6.ptz").is_file()
    finals = [FINAL_LINE.match(l) for l in lines if FINAL_LINE.match(l)]
    labels = [m.group(1) + (m.group(2) or "") for m in finals]
    assert labels == ["final_int6_roundtrip", "final_int6_roundtrip_exact", "final_int6_sliding_window",
                      "final_int6_sliding_window_exact", "final_int8_zlib_roundtrip_exact"]
    assert lines[-1].startswith("final_int8_zlib_roundtrip_exact")
    assert finals[-1].group(3, 4) == finals[-2].group(3, 4)
    sliding = [l for l in lines if l.startswith("final_int6_sliding_window val_loss")][0]
    assert re.search(r" stride:32 eval_time:\d+ms slot:causal$", sliding)
    post_ema = float(re.search(r"DIAGNOSTIC post_ema val_loss:(\S+)", "\n".join(lines)).group(1))
    roundtrip = float(finals[0].group(3))
    assert abs(roundtrip - post_ema) < 0.25, (roundtrip, post_ema)


def test_gptq_reserve_warning(tg):
    """A calibration on training data longer than GPTQ_RESERVE_MS under a wallclock cap is flagged, naming both; not
    one within the reserve, a self-generated one (no training data) or one without a cap (no reserve)."""
    h = tg.Hyperparameters()  # the record's: 600 s cap, 9,000 ms reserve, calibration on training data
    msg = tg.gptq_reserve_warning(h, 9500.4)
    assert msg.startswith("gptq_warning: calibration on training data took 9500.4ms > GPTQ_RESERVE_MS=9000, ")
    assert tg.gptq_reserve_warning(h, 9000.0) == ""
    assert tg.gptq_reserve_warning(dataclasses.replace(h, gptq_calib="selfgen"), 20_000.0) == ""
    assert tg.gptq_reserve_warning(dataclasses.replace(h, max_wallclock_seconds=0.0), 20_000.0) == ""


def test_nonfinite_loss_stops_and_saves_ema(tg_source, tmp_path, monkeypatch):
    """Guards reliability: a non-finite loss must stop training with a message naming the step, and the last finite
    EMA weights must be on disk."""
    tg = tg_source
    h = smoke_config(tg, scalar_lr=1e30, tied_embed_lr=1e30, matrix_lr_early=1e30, matrix_lr_late=1e30,
                     grad_clip_norm=0.0, val_loss_every=0)
    with pytest.raises(RuntimeError, match=r"non-finite train_loss at step:\d+"):
        run_pipeline(tg, h, tmp_path, monkeypatch)
    state = torch.load(tmp_path / "final_model.pt")
    assert state and all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


def _failed_main_log(tg, tmp_path, monkeypatch, run_id: str, exc: type, match: str) -> list[str]:
    """Run main() in tmp_path under RUN_ID=run_id, expect it to raise exc (matching match), return its log's lines."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RUN_ID", run_id)
    try:
        with pytest.raises(exc, match=match):
            tg.main()
    finally:
        tg.init_logging(None, False)
    return (tmp_path / "logs" / f"{run_id}.txt").read_text().splitlines()


def test_main_writes_the_error_into_the_log(tg, tmp_path, monkeypatch):
    """Guards the archived log of a failed run: main() appends `run_error: type:<type> msg:<message>` to
    logs/<RUN_ID>.txt before re-raising, so the log says why the run stopped, not only the console (here: a
    DATA_PATH without shards); and the header's warning about an env var that nearly spells a setting."""
    monkeypatch.setenv("DATA_PATH", str(tmp_path / "missing"))
    monkeypatch.setenv("SLOT_ENABLE", "0")  # a typo of SLOT_ENABLED: the header warns about it
    lines = _failed_main_log(tg, tmp_path, monkeypatch, "failed", FileNotFoundError, "DATA_PATH")
    assert "env_warning: unknown:SLOT_ENABLE did_you_mean:SLOT_ENABLED (not a setting: it changes nothing)" in lines
    assert lines[-1].startswith("run_error: type:FileNotFoundError msg:no train shards match ") and "set DATA_PATH" in lines[-1]


def test_run_error_keeps_a_multi_line_message_on_its_line(tg, tmp_path, monkeypatch):
    """Guards the log grammar (one event per line) against errors whose text spans lines (load_state_dict's, dynamo's):
    the run_error line joins them with ' | ' and nothing else follows it."""
    def fail(*a):
        raise RuntimeError("Error(s) in loading state_dict:\n\tMissing key(s): blocks.0.attn.q_gain")
    monkeypatch.setattr(tg, "log_header", fail)  # the first thing main() does once the log is open
    lines = _failed_main_log(tg, tmp_path, monkeypatch, "multiline", RuntimeError, "Missing key")
    assert lines[-1] == ("run_error: type:RuntimeError msg:Error(s) in loading state_dict: | \tMissing key(s): "
                         "blocks.0.attn.q_gain")


def test_main_checks_the_export_needs_before_anything_else(tg, tmp_path, monkeypatch):
    """Guards where check_export_ready runs: main() refuses a box without brotli at once, before the log, the process
    group, the data or any training (no logs/ folder is made), so a 600 s run is not spent on weights it cannot pack."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RUN_ID", "nobrotli")
    monkeypatch.setattr(tg, "brotli", None)
    monkeypatch.setattr(tg, "setup_runtime", lambda *a: pytest.fail("main() went on past the start-up check"))
    with pytest.raises(RuntimeError, match="pip install brotli"):
        tg.main()
    assert not (tmp_path / "logs").exists()


def test_a_finished_multi_rank_run_leaves_without_the_interpreter_teardown(tg, tmp_path, monkeypatch):
    """Guards the exit of a finished distributed run: main() tears the process group down, then runs the atexit
    handlers and leaves through os._exit(0), skipping the interpreter's teardown where a gloo rank now and then aborted
    after all its output was written.  A one-process run returns normally; a failed multi-rank run raises as before."""
    import atexit
    import os

    calls = []

    class Left(BaseException):
        pass

    def fake_exit(code):
        calls.append(("os._exit", code))
        raise Left

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(atexit, "_run_exitfuncs", lambda: calls.append("atexit"))
    monkeypatch.setattr(os, "_exit", fake_exit)
    monkeypatch.setattr(tg, "check_export_ready", lambda h: None)
    monkeypatch.setattr(tg, "setup_runtime", lambda h, d: torch.device("cpu"))
    monkeypatch.setattr(tg, "log_header", lambda *a: None)
    monkeypatch.setattr(tg, "train_and_eval", lambda *a: calls.append("trained"))
    try:
        monkeypatch.delenv("RANK", raising=False)
        monkeypatch.delenv("WORLD_SIZE", raising=False)
        tg.main()
        assert calls == ["trained"]
        calls.clear()
        monkeypatch.setenv("RANK", "1")
        monkeypatch.setenv("WORLD_SIZE", "2")
        with pytest.raises(Left):
            tg.main()
        assert calls == ["trained", "atexit", ("os._exit", 0)]
        calls.clear()

        def fail(*a):
            raise RuntimeError("mid-run failure")
        monkeypatch.setattr(tg, "train_and_eval", fail)
        with pytest.raises(RuntimeError, match="mid-run failure"):
            tg.main()
        assert calls == []
    finally:
        tg.init_logging(None, False)
