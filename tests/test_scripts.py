"""Developer scripts whose arithmetic feeds docs/PERF.md and runs without a GPU."""

from __future__ import annotations

import pytest

from conftest import ROOT, load_module

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
