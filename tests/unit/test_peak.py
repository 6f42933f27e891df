"""The MFU denominator: derived from the CPU core (clock, FMA units, lanes), stated with its source."""

from __future__ import annotations

import pytest
import torch

from titan.peak import device_peak, read_cpu_core

SAPPHIRE_RAPIDS = ("vendor_id\t: GenuineIntel\ncpu family\t: 6\ncpu MHz\t\t: 2600.000\n"
                   "flags\t\t: fpu sse2 avx fma avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n")
ZEN4 = "vendor_id\t: AuthenticAMD\ncpu family\t: 25\ncpu MHz\t\t: 3000.000\nflags\t\t: avx fma avx2 avx512f avx512_bf16\n"
HASWELL = "vendor_id\t: GenuineIntel\ncpu family\t: 6\ncpu MHz\t\t: 1200.000\nflags\t\t: avx fma avx2\n"


@pytest.mark.parametrize("cpuinfo,max_khz,ghz,fp32,bf16", [
    (SAPPHIRE_RAPIDS, "", 2.6, 64, 1024),  # 2 x 512-bit FMA; bf16 on AMX tiles
    (ZEN4, "", 3.0, 32, 64),  # AVX-512 on 256-bit units; AVX-512 BF16 dot products
    (HASWELL, "3500000", 3.5, 32, 32),  # cpufreq's maximum clock, not the current one
])
def test_cpu_core_flops_per_cycle(cpuinfo, max_khz, ghz, fp32, bf16):
    core = read_cpu_core(cpuinfo, max_khz)
    assert core.ghz == pytest.approx(ghz)
    assert core.flops_per_cycle(torch.float32) == fp32 and core.flops_per_cycle(torch.bfloat16) == bf16


def test_cpu_peak_counts_the_threads_and_says_how():
    core = read_cpu_core()
    peak = device_peak(torch.device("cpu"), torch.float32, 3)
    assert peak.tflops == pytest.approx(3 * core.ghz * core.flops_per_cycle(torch.float32) / 1e3)
    assert "3 thread(s)" in peak.describe() and "FLOP/cycle" in peak.describe()


def test_a_configured_peak_wins():
    peak = device_peak(torch.device("cpu"), torch.float32, 2, configured=1.5)
    assert peak.tflops == 1.5 and "training.peak_tflops" in peak.describe()
