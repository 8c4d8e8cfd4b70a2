"""Developer scripts whose arithmetic feeds docs/PERF.md and runs without a GPU."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, load_module, tiny_config

# Two kernels in the form inductor's cache holds them (trimmed): a [rows, 512] persistent reduction with a bf16 and
# an fp32 row input, an in/out row buffer and a per-channel partial sum; and a pointwise kernel it cannot count.
KERNELS = '''
@triton_heuristics.persistent_reduction(
    triton_meta={'signature': {'in_out_ptr0': '*bf16', 'in_ptr0': '*bf16', 'in_ptr1': '*fp32', 'in_ptr2': '*fp32', 'ws_ptr': '*fp32', 'xnumel': 'i32'}},
)
@triton.jit
def triton_per_fused_rms_norm_backward_sum_3(in_out_ptr0, in_ptr0, in_ptr1, in_ptr2, ws_ptr, xnumel):
    accum0 = tl.full([R0_BLOCK], 0, tl.float32)[None, :]
    for _ in tl.range(0, split_size, XBLOCK, num_stages=NUM_STAGES):
        tmp0 = tl.load(in_ptr0 + (r0_1 + 512*x0), None).to(tl.float32)
        tmp1 = tl.load(in_ptr1 + (r0_1 + 512*x0), None)
        tmp2 = tl.load(in_ptr2 + (512 + r0_1), None, eviction_policy='evict_last')
        tmp4 = tl.load(in_out_ptr0 + (r0_1 + 512*x0), None).to(tl.float32)
        tmp5 = tl.load(in_ptr0 + (r0_1 + 512*x0), None).to(tl.float32)
        tl.store(in_out_ptr0 + (r0_1 + 512*x0), tmp4, None)


@triton_heuristics.pointwise(
    triton_meta={'signature': {'in_ptr0': '*bf16', 'out_ptr0': '*bf16', 'xnumel': 'i32'}},
)
@triton.jit
def triton_poi_fused_leaky_relu_7(in_ptr0, out_ptr0, xnumel):
    tmp0 = tl.load(in_ptr0 + (x0), None)
    tl.store(out_ptr0 + (x0), tmp0, None)


'''

PROFILE = """-------  header lines as torch.profiler prints them
Name    Self CPU %      Self CPU   CPU total %     CPU total  CPU time avg     Self CUDA   Self CUDA %    CUDA total  CUDA time avg    # of Calls
-------
triton_per_fused_rms_norm_backward_sum_3  0.00%  0.000us  0.00%  0.000us  0.000us  16.00ms  1.00%  16.00ms  1.000ms  16
triton_poi_fused_leaky_relu_7  0.00%  0.000us  0.00%  0.000us  0.000us  3.20ms  0.30%  3.20ms  200.000us  16
"""


@pytest.fixture(scope="module")
def kb():
    return load_module(ROOT / "scripts" / "kernel_bytes.py", "kernel_bytes_test")


def test_kernel_bytes_counts_row_traffic_by_dtype(kb, tmp_path, capsys, monkeypatch):
    """Guards the bytes and TB/s quoted in PERF.md: each distinct row pointer once per direction at its dtype's size
    (in_out counted as a read and a write), broadcast loads not counted, times from the profile's average column."""
    cache = tmp_path / "cache" / "ab"
    cache.mkdir(parents=True)
    (cache / "kernels.py").write_text(KERNELS)
    (tmp_path / "profile.txt").write_text(PROFILE)
    src = kb.kernel_sources(tmp_path / "cache", kb.re.compile("rms_norm"))
    assert list(src) == ["triton_per_fused_rms_norm_backward_sum_3"]
    assert kb.row_traffic(src["triton_per_fused_rms_norm_backward_sum_3"], 512) == (3, 1, (2 + 4 + 2 + 2) * 512, 1)
    assert kb.profile_times(tmp_path / "profile.txt") == {"triton_per_fused_rms_norm_backward_sum_3": 1000.0,
                                                          "triton_poi_fused_leaky_relu_7": 200.0}
    monkeypatch.setattr(kb.sys, "argv", ["kernel_bytes.py", str(tmp_path / "cache"), str(tmp_path / "profile.txt"),
                                          "triton_"])
    kb.main()
    out = capsys.readouterr().out.splitlines()
    # 10 bytes x 512 x 98,304 rows = 0.50 GB in 1,000 us = 0.50 TB/s; the pointwise kernel counts nothing
    assert "loads  3 stores 1 sums 1   0.50 GB  0.50 TB/s  triton_per_fused_rms_norm_backward_sum_3" in out[0]
    assert "loads  0 stores 0 sums 0" in out[1]
    assert out[-1] == "kernel_bytes: 2 kernels in the profile, 2 generated matching 'triton_'"


def test_kernel_bytes_names_the_missing_kernels(kb, tmp_path, monkeypatch):
    (tmp_path / "profile.txt").write_text(PROFILE)
    monkeypatch.setattr(kb.sys, "argv", ["kernel_bytes.py", str(tmp_path), str(tmp_path / "profile.txt"), "rms_norm"])
    with pytest.raises(SystemExit, match="no generated kernel matching 'rms_norm'"):
        kb.main()


@pytest.fixture
def gpu_bench(monkeypatch):
    """scripts/gpu_bench.py loaded fresh. Its variants set inductor's global config (restored afterwards), and it
    registers the train_gpt.py it loads as sys.modules["train_gpt"] (put back as it was)."""
    import torch._inductor.config as inductor_config

    monkeypatch.delitem(sys.modules, "train_gpt", raising=False)
    monkeypatch.delenv("TRAIN_GPT", raising=False)
    saved = inductor_config.get_config_copy()
    yield load_module(ROOT / "scripts" / "gpu_bench.py", "gpu_bench_for_tests")
    inductor_config.load_config(saved)


def test_gpu_bench_variants_switch_the_training_options(gpu_bench, monkeypatch):
    import torch

    tg = gpu_bench.load_train_gpt()
    cfg = torch._inductor.config.triton
    before = (cfg.mix_order_reduction, cfg.mix_order_reduction_split_size)
    shipped = {"triton.mix_order_reduction": False, "triton.cudagraphs": True}
    gpu_bench.apply_variant(tg, "base")
    assert tg.train_compile_options() == shipped
    gpu_bench.apply_variant(tg, "mix+split32")
    assert tg.train_compile_options() == {**shipped, "triton.mix_order_reduction": True}
    assert cfg.mix_order_reduction_split_size == 32
    gpu_bench.apply_variant(tg, "nomix")
    assert tg.train_compile_options() == shipped and cfg.mix_order_reduction is False
    assert cfg.mix_order_reduction_split_size == before[1]  # every knob back to torch's value before a variant's own
    gpu_bench.apply_variant(tg, "base")
    assert (cfg.mix_order_reduction, cfg.mix_order_reduction_split_size) == before
    tiling = (cfg.tile_reductions, cfg.prefer_nd_tiling)
    gpu_bench.apply_variant(tg, "tilered+ndtile")  # inductor's 2-D reduction tiling and N-D tiling preference
    assert cfg.tile_reductions is True and cfg.prefer_nd_tiling is True
    gpu_bench.apply_variant(tg, "base")
    assert (cfg.tile_reductions, cfg.prefer_nd_tiling) == tiling
    ce = tg._QK_KERNELS["ce"]
    assert ce is not None
    gpu_bench.apply_variant(tg, "ceref")  # the training loss through torch ops (GPT.forward reads _QK_KERNELS)
    assert tg._QK_KERNELS["ce"] is None and tg._QK_KERNELS["xsa"] is not None
    gpu_bench.apply_variant(tg, "base")
    assert tg._QK_KERNELS["ce"] is ce
    gpu_bench.apply_variant(tg, "qatgraph")  # QAT's ops stay in the graph while QAT is off (before PERF #25)
    m = tg.GPT(tiny_config(tg))
    m.set_qat(0.0)
    assert m.qat_on and m.qat_alpha.item() == 0.0
    gpu_bench.apply_variant(tg, "base")
    m.set_qat(0.0)
    assert not m.qat_on
    assert tg.maybe_compile is gpu_bench.ORIGINALS["compile"]
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(kw["options"]) or fn)
    gpu_bench.apply_variant(tg, "nocg+pwtune")  # no CUDA graphs (before PERF #27); pointwise autotuning added
    gpu_bench.train_compile(tg, m, torch.device("cpu"))
    assert seen == [{"triton.mix_order_reduction": False, "max_autotune_pointwise": True}]
    assert tg.Optimizers.zero_grad is gpu_bench.zero_grad_to_none
    gpu_bench.apply_variant(tg, "autotune")  # the training model's own options win over the mode's
    gpu_bench.train_compile(tg, m, torch.device("cpu"))
    assert seen[-1]["triton.cudagraphs"] is True and seen[-1]["max_autotune"] is True
    gpu_bench.apply_variant(tg, "base")
    assert tg.maybe_compile is gpu_bench.ORIGINALS["compile"]
    assert tg.Optimizers.zero_grad is gpu_bench.ORIGINALS["zero_grad"]
    assert tg.mlp_gluon_op is gpu_bench.ORIGINALS["mlp"]
    gpu_bench.apply_variant(tg, "mlpref")  # the MLP through torch ops (GPT.set_fused_qk asks mlp_gluon_op)
    assert tg.mlp_gluon_op is not gpu_bench.ORIGINALS["mlp"] and tg.mlp_gluon_op() is None
    gpu_bench.apply_variant(tg, "base")
    assert tg.mlp_gluon_op is gpu_bench.ORIGINALS["mlp"]
    assert tg.KV_REP is True
    gpu_bench.apply_variant(tg, "kvgqa")  # K/V to the attention at their own heads (before PERF #34)
    assert tg.KV_REP is False
    gpu_bench.apply_variant(tg, "base")
    gpu_bench.apply_variant(tg, "expand")  # expanded by torch ops before the attention: from 4 heads, not the op's 8
    assert tg.KV_REP is False
    gpu_bench.apply_variant(tg, "base")
    assert tg.KV_REP is True and tg.QKV_GLUON is True and tg.RES_FUSED is True
    gpu_bench.apply_variant(tg, "resref+qkvref")  # the residual stream and the Q|K|V projection as before #48 and #47
    assert tg.RES_FUSED is False and tg.QKV_GLUON is False
    gpu_bench.apply_variant(tg, "base")
    assert tg.RES_FUSED is True and tg.QKV_GLUON is True and tg.RES_MLP_FUSED is True
    gpu_bench.apply_variant(tg, "normref")  # the MLP's RMSNorm written out, as before #49
    assert tg.RES_MLP_FUSED is False and tg.RES_FUSED is True
    gpu_bench.apply_variant(tg, "base")
    assert tg.RES_MLP_FUSED is True
    shipped_tiles = tg.MLP_TILES
    monkeypatch.setenv("BENCH_DGRAD_TILE", "(128, 128, 64, 5, 8, 2, 152, 2048)")  # another backward tile alone
    gpu_bench.apply_variant(tg, "dgtile")
    assert tg.MLP_TILES == {"up": shipped_tiles["up"], "dgrad": (128, 128, 64, 5, 8, 2, 152, 2048)}
    assert shipped_tiles["dgrad"] != (128, 128, 64, 5, 8, 2, 152, 2048) and tg.mlp_tiles_fit(98_304, 512, 1536)
    assert tg.mlp_gluon_op is gpu_bench.ORIGINALS["mlp"]
    gpu_bench.apply_variant(tg, "base")
    assert tg.MLP_TILES is shipped_tiles
    for raw in ("(128, 256)", "[128, 128, 64, 5, 8, 2, 152, 2048]", "(128, 128, 64, 5, 8, 2, 152, 20.48)", "tile",
                "{[1]}", "(0, 128, 64, 5, 8, 2, 152, 2048)", "(128, 128, 64, 5, 8, -1, 152, 2048)",
                "(128, 128, 128, 5, 8, 2, 152, 2048)"):  # the last: 4 k-steps of K = 512 for a 5-slot ring
        monkeypatch.setenv("BENCH_DGRAD_TILE", raw)
        with pytest.raises(ValueError, match="BENCH_DGRAD_TILE"):
            gpu_bench.apply_variant(tg, "dgtile")
    assert tg.MLP_TILES is shipped_tiles  # a refused tile leaves the shipped ones in place
    monkeypatch.delenv("BENCH_DGRAD_TILE")
    with pytest.raises(ValueError, match="BENCH_DGRAD_TILE is not set; variant dgtile"):
        gpu_bench.apply_variant(tg, "dgtile")
    gpu_bench.apply_variant(tg, "base")
    # the forward's tile likewise (uptile, BENCH_UP_TILE), and both at once
    monkeypatch.setenv("BENCH_UP_TILE", "(128, 256, 32, 6, 8, 2, 152, 2048)")
    monkeypatch.setenv("BENCH_DGRAD_TILE", "(128, 128, 64, 5, 8, 2, 152, 2048)")
    gpu_bench.apply_variant(tg, "uptile")
    assert tg.MLP_TILES == {"up": (128, 256, 32, 6, 8, 2, 152, 2048), "dgrad": shipped_tiles["dgrad"]}
    gpu_bench.apply_variant(tg, "uptile+dgtile")
    assert tg.MLP_TILES == {"up": (128, 256, 32, 6, 8, 2, 152, 2048), "dgrad": (128, 128, 64, 5, 8, 2, 152, 2048)}
    gpu_bench.apply_variant(tg, "base")
    assert tg.MLP_TILES is shipped_tiles
    monkeypatch.setenv("BENCH_UP_TILE", "(128, 128, 128, 6, 8, 2, 152, 2048)")  # 4 k-steps for a 6-slot ring
    with pytest.raises(ValueError, match=r"BENCH_UP_TILE=\(128, 128, 128, 6.*does not tile the record"):
        gpu_bench.apply_variant(tg, "uptile+dgtile")
    assert tg.MLP_TILES is shipped_tiles
    monkeypatch.delenv("BENCH_UP_TILE")
    with pytest.raises(ValueError, match="BENCH_UP_TILE is not set; variant uptile"):
        gpu_bench.apply_variant(tg, "uptile")
    gpu_bench.apply_variant(tg, "base")
    for bad, why in (("mix+nomix", "contradict"), ("mix+split128+split32", "same knob"), ("base+fast", "unknown"),
                     ("split32", "split32 tune mix-order reductions, which this train_gpt.py compiles the training "
                                 "model without")):
        with pytest.raises(ValueError, match=why):
            gpu_bench.apply_variant(tg, bad)


def test_gpu_bench_summarises_clocks_and_power(gpu_bench):
    """nvidia-smi's csv samples (SM clock MHz, power W, throttle-reason mask) as one line: means, the clock's range
    and the share of samples held by a power limit (SW power cap 0x4, HW power brake 0x80; not idle 0x1 or thermal
    0x20); unreadable samples ("[N/A]", a truncated last line, an error message) are skipped."""
    text = ("1755, 652.0, 0x0000000000000004\n1980, 300.0, 0x0000000000000000\n1665, 700.0, 0x0000000000000080\n"
            "1800, 500.0, 0x0000000000000020\n[N/A], [N/A], [N/A]\n345, 78.5, 0x0000000000000001\n1900, 6")
    assert gpu_bench.smi_summary(text) == ("sm_clock_mhz:1509 (345-1980) power_w:446 power_capped:40% of 5 samples")
    assert gpu_bench.smi_summary("No devices were found\n") == "no readable nvidia-smi samples"
    assert gpu_bench.smi_summary("") == "no readable nvidia-smi samples"


def test_gpu_bench_samples_nvidia_smi_while_a_block_runs(gpu_bench, tmp_path, monkeypatch):
    """GpuClocks starts nvidia-smi (here a stand-in on PATH that prints a sample every 0.1 s until killed, as
    `-lms` does) for the block, stops it after, and summarises what it printed; with no nvidia-smi, or one that
    prints nothing readable, the summary says so and the block still runs."""
    import time

    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho \"$@\" > \"$(dirname \"$0\")/args\"\n"
                    "while true; do echo '1700, 690.0, 0x0000000000000004'; sleep 0.1; done\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    with gpu_bench.GpuClocks("GPU-1234") as clocks:
        time.sleep(0.5)
    summary = clocks.summary()
    assert summary.startswith("sm_clock_mhz:1700 (1700-1700) power_w:690 power_capped:100% of "), summary
    assert int(summary.split(" of ")[1].split()[0]) >= 2
    args = (tmp_path / "args").read_text()
    assert "-i GPU-1234" in args and "clocks.sm,power.draw,clocks_throttle_reasons.active" in args
    fake.write_text("#!/bin/sh\necho 'No devices were found'\n")  # nvidia-smi's errors go to stdout
    with gpu_bench.GpuClocks("GPU-1234") as clocks:
        time.sleep(0.2)
    assert clocks.summary() == "no readable nvidia-smi samples (nvidia-smi: No devices were found)"
    fake.write_text("#!/bin/sh\necho 'driver gone' >&2\nexit 9\n")
    with gpu_bench.GpuClocks("GPU-1234") as clocks:
        time.sleep(0.2)
    assert clocks.summary() == "no readable nvidia-smi samples (nvidia-smi: driver gone)"
    # one that ignores SIGTERM is killed after STOP_SECONDS, and its samples still count
    fake.write_text("#!/bin/sh\ntrap '' TERM\nwhile true; do echo '1500, 700.0, 0x0000000000000004'; sleep 0.1; done\n")
    monkeypatch.setattr(gpu_bench.GpuClocks, "STOP_SECONDS", 0.5)
    t0 = time.perf_counter()
    with gpu_bench.GpuClocks("GPU-1234") as clocks:
        time.sleep(0.3)
    assert clocks.proc.poll() is not None and time.perf_counter() - t0 < 5
    assert clocks.summary().startswith("sm_clock_mhz:1500 (1500-1500) power_w:700 power_capped:100% of ")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with gpu_bench.GpuClocks("0") as clocks:
        ran = True
    assert ran and clocks.summary().startswith("nvidia-smi did not start")


def test_gpu_bench_ballast_runs_before_every_forward(gpu_bench, monkeypatch):
    """with_ballast: the model itself without a ballast flag; with one, a callable that runs the ballast (n calls of
    its op) and then the model on the same inputs, returning the model's output; two ballasts at once are refused.
    The ballast's GEMM is counted, not computed (at the record shape it is ~0.15 TFLOP a call)."""
    import torch

    model = lambda x, y: x * 2 + y
    assert gpu_bench.with_ballast(model, {"base"}, torch.device("cpu")) is model
    with pytest.raises(ValueError, match="two ballasts"):
        gpu_bench.with_ballast(model, {"ballastcopy", "ballastgemm"}, torch.device("cpu"))
    calls = []
    run = gpu_bench.with_ballast(lambda x, y: calls.append("model") or model(x, y), {"ballastgemm", "base"},
                                 torch.device("cpu"))
    monkeypatch.setattr(torch.Tensor, "__matmul__", lambda a, b: calls.append(("gemm", tuple(a.shape),
                                                                                   tuple(b.shape))))
    out = run(torch.ones(3), torch.ones(3))
    assert torch.equal(out, torch.full((3,), 3.0))
    assert calls == [("gemm", (98_304, 512), (512, 1536))] * gpu_bench.BALLAST["ballastgemm"][1] + ["model"]


def test_gpu_bench_checks_every_variant_before_touching_the_gpu(gpu_bench, monkeypatch):
    """A bad last variant fails on a CPU machine with the variant's error, not with CUDA's (setup_runtime and the
    device name come after the check), so no GPU time is spent on the variants before it."""
    monkeypatch.setattr(sys, "argv", ["gpu_bench.py", "train"])
    monkeypatch.setenv("BENCH_VARIANTS", "base,mix,stages")
    with pytest.raises(ValueError, match="stages tune mix-order reductions"):
        gpu_bench.main()
    monkeypatch.setenv("BENCH_VARIANTS", ",")
    with pytest.raises(ValueError, match="BENCH_VARIANTS names no variant"):
        gpu_bench.main()
    monkeypatch.setenv("BENCH_VARIANTS", "base")
    monkeypatch.setattr(sys, "argv", ["gpu_bench.py", "power", "trian"])  # a typo'd mode is refused, not skipped
    with pytest.raises(ValueError, match=r"unknown modes \['trian'\]"):
        gpu_bench.main()


def test_gpu_bench_mix_needs_the_training_options(gpu_bench, tmp_path, monkeypatch):
    """A train_gpt.py from before PERF #23 (no train_compile_options) compiles with mix-order reductions anyway."""
    source = (ROOT / "train_gpt.py").read_text()
    start = source.index("def train_compile_options")
    end = source.index("def maybe_compile")
    old = tmp_path / "train_gpt_old.py"
    old.write_text(source[:start] + source[end:].replace(", train_compile_options())", ")"))
    monkeypatch.setenv("TRAIN_GPT", str(old))
    tg = gpu_bench.load_train_gpt()
    assert not hasattr(tg, "train_compile_options")
    gpu_bench.apply_variant(tg, "split32")  # the knobs act on the training compile there, without mix
    assert not hasattr(tg, "train_compile_options")
    with pytest.raises(ValueError, match="mix needs a train_gpt.py with train_compile_options"):
        gpu_bench.apply_variant(tg, "mix")


@pytest.mark.slow
def test_dist_bench_times_the_optimizer_step_its_collectives_and_training_steps(tmp_path):
    """scripts/dist_bench.py on CPU (gloo): two ranks report the whole optimizer step plus each bank's reduce-scatter
    and all-gather and the replicated all-reduce, with their sizes; one process reports the step alone.  Both report
    whole training steps (train_model's loop body) with the grad_accum of their world size: two ranks as shipped,
    with the gradients accumulated by autograd (before PERF #40), with the per-step sync waited for after the whole
    step (before PERF #38), and that with the host-side ops from before PERF #37 too; one process only the forms
    BENCH_FORMS names, in its order."""
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not on PATH")
    env = {**os.environ, "NUM_LAYERS": "2", "MODEL_DIM": "64", "NUM_HEADS": "4", "NUM_KV_HEADS": "2",
           "BIGRAM_VOCAB_SIZE": "64", "BIGRAM_DIM": "16", "VE_DIM": "16", "VE_LAYERS": "1", "XSA_LAST_N": "2",
           "TRAIN_SEQ_LEN": "64", "TRAIN_BATCH_TOKENS": "4096", "BENCH_REPS": "2", "BENCH_STEPS": "2",
           "OMP_NUM_THREADS": "1", "DATA_PATH": str(ROOT / "data" / "sample"),
           "CUDA_VISIBLE_DEVICES": ""}  # gloo on CPU even on a GPU machine
    for var in ("RANK", "WORLD_SIZE"):
        env.pop(var, None)
    script = str(ROOT / "scripts" / "dist_bench.py")
    runs = {}
    t = r"(\d+\.\d)/(\d+\.\d)"
    for world, cmd, forms, line_forms in (
            (2, [torchrun, "--standalone", "--nproc_per_node=2", script], "",
             f"shipped:{t} autogradacc:{t} latesync:{t} hostbefore:{t}"),
            (1, [sys.executable, script], "autogradacc,shipped", f"autogradacc:{t} shipped:{t}")):
        proc = subprocess.run(cmd, cwd=tmp_path, env={**env, "BENCH_FORMS": forms}, capture_output=True, text=True,
                              timeout=240)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        lines = [l for l in proc.stdout.splitlines() if l.startswith("dist_bench")]
        assert len(lines) == 2, proc.stdout  # rank 0 alone prints, one line per mode
        runs[world] = lines[0]
        m = re.fullmatch(rf"dist_bench_train world:{world} grad_accum:{8 // world} ms/step:(\d+\.\d) tok/s:(\d+) "
                         + line_forms, lines[1])
        assert m and int(m.group(2)) > 0 and all(float(x) > 0 for x in m.groups()), lines[1]
        assert float(m.group(1)) == pytest.approx((float(m.group(3)) + float(m.group(4))) / 2, abs=0.06)
    for forms, says in (("shiped", "BENCH_FORMS=shiped: this train_gpt.py has the forms shipped, autogradacc"),
                        ("shipped,shipped", "BENCH_FORMS=shipped,shipped names a form twice")):
        proc = subprocess.run([sys.executable, script, "train"], cwd=tmp_path, env={**env, "BENCH_FORMS": forms},
                              capture_output=True, text=True, timeout=240)
        assert proc.returncode != 0 and says in proc.stderr, proc.stderr[-1000:]
    m = re.fullmatch(r"dist_bench world:1 optimizer_step:(\d+\.\d+)ms", runs[1])
    assert m and float(m.group(1)) > 0, runs[1]
    banks = re.findall(r"(\w+_bank):(\d+\.\d+)MB rs:(\d+\.\d+)ms\(\d+GB/s\) ag:(\d+\.\d+)ms\(\d+GB/s\)", runs[2])
    assert sorted(b[0] for b in banks) == ["kv_bank", "mlp_down_bank", "mlp_up_bank", "qo_bank"], runs[2]
    # [2L, d, d] bf16 padded to a multiple of 2 slots: 4 x 64 x 64 x 2 bytes
    assert dict((b[0], float(b[1])) for b in banks)["qo_bank"] == pytest.approx(4 * 64 * 64 * 2 / 1e6, abs=0.005)
    assert runs[2].startswith("dist_bench world:2 optimizer_step:") and re.search(
        r" replicated:\d+\.\d+MB all_reduce:\d+\.\d+ms\(\d+GB/s\)$", runs[2]), runs[2]


def test_dist_bench_refuses_an_unknown_mode(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "dist_bench.py"), "trian"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode != 0 and "unknown modes ['trian']" in proc.stderr, proc.stderr[-1000:]


def _dist_bench(monkeypatch):
    """scripts/dist_bench.py loaded by path (it imports gpu_bench by name)."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    return load_module(ROOT / "scripts" / "dist_bench.py", "dist_bench_for_tests")


def _ev(cat, name, ts, dur, tid=1, corr=None):
    """One complete ('X') event of a torch-profiler chrome trace; corr: its correlation id."""
    e = {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 1, "tid": tid}
    if corr is not None:
        e["args"] = {"correlation": corr}
    return e


def test_dist_bench_gpu_gaps_reads_the_idle_time_off_a_trace(monkeypatch):
    """dist_bench's gap finder on a hand-made chrome trace: overlapping ops merge into one busy interval, CPU-side
    events are not GPU work, idle counts between the first and the last op only, and each gap of at least 20 us is
    named by the op that ended last before it and the op after it."""
    db = _dist_bench(monkeypatch)
    trace = {"traceEvents": [
        _ev("kernel", "gemm", 100.0, 50.0),  # busy 100-150
        _ev("kernel", "norm", 120.0, 10.0),  # inside gemm: no gap, gemm stays the op before the next gap
        _ev("cpu_op", "aten::mm", 150.0, 500.0),  # host time: not GPU work
        _ev("gpu_memcpy", "Memcpy HtoD", 160.0, 5.0),  # 10 us gap: counted, not listed
        _ev("kernel", "attn", 215.0, 100.0),  # 50 us gap after the copy
        _ev("gpu_memset", "Memset", 415.0, 1.0),  # 100 us gap
        {"ph": "i", "cat": "kernel", "name": "marker", "ts": 10.0},  # not a complete event
    ]}
    idle, gaps = db.gpu_gaps(trace)
    assert idle == pytest.approx(10.0 + 50.0 + 100.0)
    assert gaps == [(100.0, "attn", "Memset"), (50.0, "Memcpy HtoD", "attn")]
    assert db.gpu_gaps({"traceEvents": []}) == (0.0, [])


def test_dist_bench_gap_launchers_names_the_host_code_behind_each_gap(monkeypatch):
    """The op after each GPU gap is traced back, by its correlation id, to its launch call and the host events around
    that call on the same thread (outermost first); lag = op start - launch call start."""
    db = _dist_bench(monkeypatch)

    trace = {"traceEvents": [
        _ev("kernel", "gemm", 100.0, 50.0, tid=7, corr=1),
        _ev("kernel", "lerp", 300.0, 10.0, tid=7, corr=2),  # 150 us gap, launched at 290: host-bound
        _ev("gpu_memcpy", "Memcpy DtoH", 400.0, 5.0, tid=7, corr=3),  # 90 us gap, queued at 120: waited elsewhere
        _ev("kernel", "fill", 430.0, 1.0, tid=7, corr=4),  # 25 us gap, its launch not traced
        _ev("user_annotation", "bench:ema_update", 250.0, 100.0),
        _ev("cpu_op", "aten::_foreach_lerp_", 280.0, 20.0),
        _ev("cuda_runtime", "cudaLaunchKernel", 290.0, 5.0, corr=2),
        _ev("cpu_op", "aten::copy_", 110.0, 20.0),
        _ev("cuda_runtime", "cudaMemcpyAsync", 120.0, 3.0, corr=3),
        _ev("cpu_op", "aten::other_thread", 100.0, 500.0, tid=2),  # another thread: not the launcher
    ]}
    assert db.gap_launchers(trace) == [
        (150.0, 10.0, "lerp", ["bench:ema_update", "aten::_foreach_lerp_"]),
        (90.0, 280.0, "Memcpy DtoH", ["aten::copy_"]),
        (25.0, pytest.approx(float("nan"), nan_ok=True), "fill", ["(launch not traced)"]),
    ]


def test_dist_bench_host_during_gaps_says_what_the_launching_thread_did(monkeypatch):
    """Per GPU gap: the self time of the launching thread's host events (Python functions too) inside the window from
    the gap's start to the launch of the op after it (clipped to it, less the events nested in them), summed by name,
    largest first; other threads left out; the time no event covers as `(none traced)`."""
    db = _dist_bench(monkeypatch)

    trace = {"traceEvents": [
        _ev("kernel", "fill", 100.0, 10.0, tid=7, corr=1),
        _ev("kernel", "copy", 1110.0, 5.0, tid=7, corr=2),  # 1000 us gap (110 -> 1110); launched at 1100
        _ev("kernel", "gemm", 1200.0, 5.0, tid=7, corr=3),  # 85 us gap, its launch not traced: not reported
        _ev("user_annotation", "bench:run_train_step", 50.0, 2000.0),  # holds the whole window
        _ev("python_function", "train_gpt.py(10): next_batch", 60.0, 400.0),  # 350 us of it in the window
        _ev("python_function", "cudagraph_trees.py(5): run", 700.0, 300.0),
        _ev("cpu_op", "aten::copy_", 750.0, 100.0),  # inside run: both listed
        _ev("python_function", "train_gpt.py(10): next_batch", 1050.0, 100.0),  # 50 us in the window
        _ev("python_function", "other_thread", 0.0, 5000.0, tid=2),
        _ev("cuda_runtime", "cudaLaunchKernel", 1100.0, 5.0, corr=2),
    ]}
    # the window is 110 -> 1100 (990 us); bench:run_train_step holds it all, less its three children (700 us)
    assert db.host_during_gaps(trace) == [
        (1000.0, "copy", [("train_gpt.py(10): next_batch", 400.0), ("bench:run_train_step", 290.0),
                          ("cudagraph_trees.py(5): run", 200.0), ("aten::copy_", 100.0), ("(none traced)", 0.0)]),
    ]
    trace["traceEvents"].pop(3)  # without the annotation, its 290 us are nobody's
    assert db.host_during_gaps(trace, top=1)[0][2] == [("train_gpt.py(10): next_batch", 400.0), ("(none traced)", 290.0)]
    # nesting by the traced extents, not by the order of the list nor by the clipped spans (both frames hold the
    # window); an event that starts inside another and outlasts it takes its own time out of the first's
    gpu = [_ev("kernel", "fill", 100.0, 10.0, tid=7, corr=1), _ev("kernel", "copy", 1110.0, 5.0, tid=7, corr=2),
           _ev("cuda_runtime", "cudaLaunchKernel", 1100.0, 5.0, corr=2)]
    outer, inner = _ev("python_function", "outer", 0.0, 3000.0), _ev("python_function", "inner", 50.0, 2000.0)
    for host in ([outer, inner], [inner, outer]):
        assert db.host_during_gaps({"traceEvents": gpu + host})[0][2] == [
            ("inner", 990.0), ("outer", 0.0), ("(none traced)", 0.0)]
    a, b = _ev("python_function", "a", 0.0, 600.0), _ev("python_function", "b", 500.0, 1000.0)
    assert db.host_during_gaps({"traceEvents": gpu + [b, a]})[0][2] == [("b", 600.0), ("a", 390.0),
                                                                        ("(none traced)", 0.0)]
    # an op launched before its gap began waited on something else: no host window to read
    early = [_ev("kernel", "fill", 100.0, 10.0, tid=7, corr=1), _ev("kernel", "wait", 1110.0, 5.0, tid=7, corr=2),
             _ev("cuda_runtime", "cudaLaunchKernel", 50.0, 5.0, corr=2), outer]
    assert db.host_during_gaps({"traceEvents": early}) == [(1000.0, "wait", [("(launched before the gap)", 60.0)])]


def test_dist_bench_undo_puts_back_every_patched_method(monkeypatch):
    """The train forms patch methods on the instances (clip_grads, zero_grad, the EMA's update, backward); _undo
    takes each off again, so the next form runs the class's own."""
    db = _dist_bench(monkeypatch)

    class Obj:
        def backward(self):
            return "class"

    o = Obj()
    for name in ("clip_grads", "zero_grad", "update", "backward"):
        setattr(o, name, lambda: "patched")
    db._undo(o)
    assert o.backward() == "class" and not {"clip_grads", "zero_grad", "update", "backward"} & set(vars(o))


def test_eval_artifact_exports_a_checkpoint_then_rescores_the_artifact(tmp_path):
    """Guards the way back from a failed export: scripts/eval_artifact.py given the trained weights (final_model.pt,
    written before the export) runs train_gpt's own export (GPTQ, int6, brotli) and scores the artifact it wrote;
    given that artifact it scores it again to the same numbers; a checkpoint of another shape fails, naming the env
    vars to set.  Tiny model on the committed sample, on CPU, in subprocesses as users run it."""
    import torch
    from conftest import TINY_ENV
    env = {**os.environ, **TINY_ENV, "EVAL_STRIDE": "64", "SLOT_ENABLED": "0", "RUN_ID": "exp"}
    for k in ("RANK", "WORLD_SIZE"):
        env.pop(k, None)
    tg = load_module(ROOT / "train_gpt.py", "tg_eval_artifact_test")
    h = tg.Hyperparameters.from_env(env)
    torch.manual_seed(0)
    model = tg.build_model(h, torch.device("cpu"))
    torch.save(model.state_dict(), tmp_path / "final_model.pt")
    script = str(ROOT / "scripts" / "eval_artifact.py")

    def run(arg, run_id, **extra):
        proc = subprocess.run([sys.executable, script, arg], cwd=tmp_path, env={**env, "RUN_ID": run_id, **extra},
                              capture_output=True, text=True, timeout=300)
        return proc, (tmp_path / "logs" / f"{run_id}.txt")

    proc, log = run("final_model.pt", "export")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = log.read_text().splitlines()
    assert any(l.startswith("eval_artifact:exporting final_model.pt") for l in lines)
    assert any(re.match(r"^Total submission size int6\+brotli: \d+ bytes$", l) for l in lines)
    # the code counted is the TRAIN_GPT file's (here the default: the repo's source)
    assert f"Code size: {len((ROOT / 'train_gpt.py').read_bytes())} bytes" in lines
    assert (tmp_path / "final_model.int6.ptz").is_file()
    first = [l for l in lines if l.startswith("final_int6_roundtrip_exact")]
    proc, log = run("final_model.int6.ptz", "rescore")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    again = [l for l in log.read_text().splitlines() if l.startswith("final_int6_roundtrip_exact")]
    assert first and again == first, (first, again)
    proc, _ = run("final_model.pt", "wrongshape", MODEL_DIM="128")
    assert proc.returncode != 0 and "does not fit the model the env vars describe" in proc.stderr, proc.stderr[-2000:]
    (tmp_path / "other").mkdir()
    (tmp_path / "final_model.pt").rename(tmp_path / "other" / "final_model.pt")  # ./final_model.int6.ptz stays
    proc, _ = run("other/final_model.pt", "elsewhere")
    assert proc.returncode != 0 and "run it from the checkpoint's folder" in proc.stderr, proc.stderr[-2000:]
