"""The peak TFLOP/s that MFU divides by, and where the number comes from.

GPUs: the datasheet's dense figure (bf16; float32 runs on TF32, half of it). CPUs: derived from the
core, not guessed: clock x FMA units x vector lanes x 2 FLOPs, times the threads the run uses. The
clock is the core's maximum (cpufreq) or, in a VM without it, the one /proc/cpuinfo reports. AVX-512
cores are taken to have two 512-bit FMA units (Xeon Skylake-SP and later, AMD Zen 5), except AMD
Zen 4 (two 256-bit units: one 512-bit FMA a cycle); AVX2 cores two 256-bit units. bfloat16 counts AMX
tiles (1,024 FLOPs a cycle) or AVX-512 BF16 dot products where the core has them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

# Dense bf16 TFLOP/s per GPU (tensor cores), by name.
GPU_PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}
GPU_PEAK_UNKNOWN = 100.0
AMX_BF16_FLOPS_PER_CYCLE = 1024  # one TMUL: a 16x32 by 32x16 bf16 tile product (512 MACs) a cycle
ZEN4_FAMILY = 25  # AMD family 19h: AVX-512 on 256-bit units


@dataclass(frozen=True)
class Peak:
    """A device's peak for one dtype, and how it was found (for the run's log)."""

    tflops: float
    source: str

    def describe(self) -> str:
        return f"MFU peak {self.tflops:.4g} TFLOP/s per rank: {self.source}"


@dataclass(frozen=True)
class CpuCore:
    """What decides a CPU core's peak: its clock, vector lanes and FMA units."""

    ghz: float
    fp32_lanes: int  # float32 lanes of one FMA unit
    fma_units: int
    isa: str
    amx_bf16: bool
    avx512_bf16: bool

    def flops_per_cycle(self, dtype: torch.dtype) -> int:
        fp32 = 2 * self.fp32_lanes * self.fma_units
        if dtype != torch.bfloat16:
            return fp32
        if self.amx_bf16:
            return AMX_BF16_FLOPS_PER_CYCLE
        return 2 * fp32 if self.avx512_bf16 else fp32


def read_cpu_core(cpuinfo: str | None = None, max_khz: str | None = None) -> CpuCore:
    """The core this process runs on, from /proc/cpuinfo (and cpufreq's maximum clock when present)."""
    if cpuinfo is None:
        cpuinfo = _read("/proc/cpuinfo")
    if max_khz is None:
        max_khz = _read("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())  # the first core's
    flags = set(fields.get("flags", "").split())
    ghz = int(max_khz) / 1e6 if max_khz.strip().isdigit() else float(fields.get("cpu MHz", "2000")) / 1e3
    amd = fields.get("vendor_id") == "AuthenticAMD"
    if "avx512f" in flags:
        zen4 = amd and int(fields.get("cpu family", "0")) == ZEN4_FAMILY
        lanes, units, isa = 16, 1 if zen4 else 2, "avx512"
    elif "avx2" in flags and "fma" in flags:
        lanes, units, isa = 8, 2, "avx2"
    elif "avx" in flags:
        lanes, units, isa = 8, 1, "avx"
    else:
        lanes, units, isa = 4, 1, "sse"
    return CpuCore(ghz, lanes, units, isa, "amx_bf16" in flags, "avx512_bf16" in flags)


def device_peak(device: torch.device, dtype: torch.dtype, threads: int, configured: float | None = None) -> Peak:
    """The MFU denominator of one rank: `training.peak_tflops` when set, else the device's own."""
    if configured:
        return Peak(configured, "training.peak_tflops")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        known = next((k for k in GPU_PEAK_BF16_TFLOPS if k in name), None)
        bf16 = GPU_PEAK_BF16_TFLOPS[known] if known else GPU_PEAK_UNKNOWN
        what = f"{name} datasheet dense bf16" if known else f"{name} unknown: a guess; set training.peak_tflops"
        return (Peak(bf16, what) if dtype == torch.bfloat16
                else Peak(bf16 / 2, f"{what} / 2 (float32 runs on TF32)"))
    core = read_cpu_core()
    per_cycle = core.flops_per_cycle(dtype)
    tflops = threads * core.ghz * per_cycle / 1e3
    kind = "bf16" if dtype == torch.bfloat16 else "fp32"
    return Peak(tflops, f"{threads} thread(s) x {core.ghz:.2f} GHz x {per_cycle} {kind} FLOP/cycle "
                        f"({core.isa}: {core.fma_units} FMA unit(s) x {core.fp32_lanes} fp32 lanes x 2"
                        f"{'; bf16 on AMX tiles' if kind == 'bf16' and core.amx_bf16 else ''})")


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""
