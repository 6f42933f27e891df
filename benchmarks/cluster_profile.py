"""Measure the cluster profile of this machine (``configs/cluster/cpu.yaml``) for the layout planner.

    python -m benchmarks.cluster_profile            # about 1.5 minutes; prints YAML lines to paste

Every number is measured in this run (the machine is shared: timings are medians of repeats after
a warm-up; threads are set explicitly for each part). GB = 1e9 bytes, TFLOP = 1e12 FLOPs.

- ``matmul_tflops_fp32`` / ``_bf16``: ``F.linear`` forward + backward (``torch.autograd.grad`` of the
  input and the weight: 3 matmuls, ``6 T d_in d_out`` FLOPs) on ``T`` in {256, 1024, 2048} tokens
  and (d -> d, d -> 4d, 4d -> d) for d in {256, 512, 1024}: 27 shapes, one thread; per shape the
  median of the repeats (each repeat is one pass over all shapes, so a noisy spell hits every shape
  once); the value is the median over shapes, min / max in the comment. fp32 again with 2 threads
  in one process (comment line), to show the intra-op scaling.
- ``attention_efficiency``: causal ``F.scaled_dot_product_attention`` forward + backward in fp32, one
  thread, on 4 (heads, head_dim, seq) shapes, in the nominal FLOPs the planner and MFU count (the full
  square, ``12 b h hd s^2``); the median rate over ``matmul_tflops_fp32``.
- ``memory_gbps``: one thread, 64 MB fp32 ``a + b`` with a fresh output each call (as eager ops
  write theirs, page faults included), 12 B per element. Comment lines: in-place ops on 64 and 512 MB
  (``torch.add(a, b, out=c)`` 12 B per element, ``a.mul_(s)`` and ``c.copy_(a)`` 8 B; write-allocate
  traffic not counted) and ``torch.optim.AdamW.step`` on 4 parameters of 64 MB (4 reads + 3 writes
  of 4 B per element) with each implementation.
- ``kernel_overhead_us``: ``x.add_(1)`` on 16 floats, one thread, per call, under the communication
  counter (``parallel.comm_stats.CommCounter``) every training step runs under; bare in the comment.
  ``dtensor_op_overhead_us``: the same op on a DTensor (16 floats per rank, ``Shard(0)``) on a 2-rank
  gloo mesh, in the 2-process collective run, less the plain op there.
- ``comm_overlap``: 0 on CPU: gloo moves and reduces the bytes with the cores that compute (an
  FSDP2 loop of this model measured 0.575 s per step against 0.41 s with a barrier only, about
  compute plus its collectives' time).
- collectives: ``torch.distributed.run`` with 2 and 4 processes (gloo over loopback, one thread
  each; `benchmarks/cluster_profile_worker.py`): all-gather (``all_gather_single``, the new name of
  ``all_gather_into_tensor``), reduce-scatter (``reduce_scatter_single``), ``all_reduce``,
  ``all_to_all_single`` on fp32 messages of 1 KB to 64 MB (the full tensor: the all-gather's
  output, the reduce-scatter's input). A timed repeat is a barrier then up to 50 back-to-back
  calls; the slowest rank's time per call, median of 5 repeats. Wire bytes per rank as ring
  algorithms count them (all-gather ``(n-1)/n S``, reduce-scatter ``(n-1)/n S``, all-reduce
  ``2 (n-1)/n S``, all-to-all ``(n-1)/n S``); ``time = latency + wire / bandwidth`` is fitted per
  collective and n by least squares on the relative error (each size weighs the same).
  ``intra_node_gbps`` / ``_latency_us`` are FSDP's mix at n = 2 (per unit two all-gathers and one
  reduce-scatter of the same bytes: the harmonic mean of the bandwidths, 2:1; the mean latency).
- ``runtime_memory_gb``: the larger peak RSS (``ru_maxrss``) of 2 ranks that imported torch, hydra
  and ``recipes.pretrain`` and joined a gloo group with ``parallel.mesh.init_process_group``.
- ``device_memory_gb``: ``MemTotal`` of /proc/meminfo / 2 (one rank of a 2-rank run).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from parallel.comm_stats import CommCounter

REPO = Path(__file__).resolve().parents[1]
GB = 1e9
TOKENS = (256, 1024, 2048)
DIMS = (256, 512, 1024)
SIZES = tuple(1024 * 4 ** k for k in range(9))  # 1 KB .. 64 MB
WIRE_FACTOR = {"all_gather": lambda n: (n - 1) / n, "reduce_scatter": lambda n: (n - 1) / n,
               "all_reduce": lambda n: 2 * (n - 1) / n, "all_to_all": lambda n: (n - 1) / n}


def linear_shapes() -> list[tuple[int, int, int]]:
    """(tokens, d_in, d_out) of a transformer block's projections: d -> d, d -> 4d, 4d -> d."""
    return [(t, i, o) for t in TOKENS for d in DIMS for i, o in ((d, d), (d, 4 * d), (4 * d, d))]


def linear_step(tokens: int, d_in: int, d_out: int, dtype: torch.dtype) -> Callable[[], None]:
    """One forward + backward of F.linear (gradients of input and weight)."""
    x = torch.randn(tokens, d_in, dtype=dtype, requires_grad=True)
    w = torch.randn(d_out, d_in, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(tokens, d_out, dtype=dtype)

    def step() -> None:
        torch.autograd.grad(F.linear(x, w), (x, w), grad_out)
    return step


def seconds(fn: Callable[[], None], iters: int = 1) -> float:
    """Wall seconds per call of `fn` over `iters` calls."""
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


def matmul_tflops(dtype: torch.dtype, threads: int, repeats: int) -> list[float]:
    """TFLOP/s per shape of `linear_shapes()`: median over `repeats` passes after a warm-up pass."""
    torch.set_num_threads(threads)
    steps = [linear_step(*shape, dtype) for shape in linear_shapes()]
    for step in steps:
        step()
    times = [[seconds(step) for step in steps] for _ in range(repeats)]
    return [6 * t * i * o / statistics.median(col) / 1e12 for (t, i, o), col in zip(linear_shapes(), zip(*times))]


def attention_tflops(repeats: int = 5) -> list[float]:
    """Nominal TFLOP/s (12 b h hd s^2: the full square, forward + backward, as MFU counts attention)
    of causal SDPA forward + backward in fp32, one thread, per shape of (heads, head_dim, seq)."""
    torch.set_num_threads(1)
    rates = []
    for heads, head_dim, seq in ((8, 32, 256), (8, 64, 512), (16, 64, 1024), (8, 128, 1024)):
        q, k, v = (torch.randn(2, heads, seq, head_dim, requires_grad=True) for _ in range(3))
        grad_out = torch.randn(2, heads, seq, head_dim)
        step = lambda: torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v), grad_out)  # noqa: E731
        step()
        rates.append(12 * 2 * heads * head_dim * seq ** 2 / statistics.median(seconds(step) for _ in range(repeats)) / 1e12)
    return rates


def stream_gbps(fn: Callable[[], None], nbytes: float, repeats: int = 7) -> float:
    """GB/s of `fn` moving `nbytes`, median of repeats after a warm-up call."""
    fn()
    return nbytes / statistics.median(seconds(fn) for _ in range(repeats)) / GB


def elementwise_gbps(megabytes: int) -> dict[str, float]:
    """Bytes read + written per second of add (out=), mul_ and copy_ on fp32 tensors of `megabytes`."""
    n = megabytes * 2 ** 20 // 4
    a, b, c = torch.randn(n), torch.randn(n), torch.empty(n)
    return {"add": stream_gbps(lambda: torch.add(a, b, out=c), 12 * n),
            "mul_": stream_gbps(lambda: a.mul_(1.0), 8 * n),
            "copy_": stream_gbps(lambda: c.copy_(a), 8 * n)}


def out_of_place_add_gbps(megabytes: int) -> float:
    """GB/s (12 B per element) of `a + b` with a fresh output tensor each call."""
    n = megabytes * 2 ** 20 // 4
    a, b = torch.randn(n), torch.randn(n)
    return stream_gbps(lambda: a + b, 12 * n)


def adamw_gbps(implementation: dict[str, bool], params: int = 4, megabytes: int = 64) -> float:
    """GB/s of AdamW.step on `params` fp32 parameters, counted as 4 reads + 3 writes of 4 B per element."""
    n = megabytes * 2 ** 20 // 4
    weights = [torch.nn.Parameter(torch.randn(n)) for _ in range(params)]
    for w in weights:
        w.grad = torch.randn(n)
    optimizer = torch.optim.AdamW(weights, lr=1e-3, **implementation)
    return stream_gbps(optimizer.step, 28 * n * params, repeats=5)


def tiny_op_us(iters: int = 20000, repeats: int = 7) -> float:
    """Microseconds of `x.add_(1)` on 16 floats, median of repeats after a warm-up."""
    x = torch.zeros(16)
    op = lambda: x.add_(1)  # noqa: E731
    seconds(op, iters)
    return statistics.median(seconds(op, iters) for _ in range(repeats)) * 1e6


def counted_op_us() -> float:
    """`tiny_op_us` under the communication counter every training step runs under."""
    with CommCounter({}):
        return tiny_op_us()


def run_worker(nproc: int, args: list[str]) -> dict:
    """Run `benchmarks.cluster_profile_worker` under torch.distributed.run, one thread per rank."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "benchmarks.cluster_profile_worker", *args, "--out", str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"worker failed ({proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def fit(name: str, n: int, times: dict[int, float]) -> tuple[float, float, float]:
    """(latency s, bandwidth GB/s, worst relative error) of `time = latency + wire / bandwidth`,
    least squares on the relative error over the message sizes."""
    wire = [WIRE_FACTOR[name](n) * size for size in times]
    t = list(times.values())
    w = [1 / ti ** 2 for ti in t]  # residual / time, squared
    sw, sx, sy = sum(w), sum(wi * x for wi, x in zip(w, wire)), sum(wi * y for wi, y in zip(w, t))
    sxx, sxy = sum(wi * x * x for wi, x in zip(w, wire)), sum(wi * x * y for wi, x, y in zip(w, wire, t))
    per_byte = (sw * sxy - sx * sy) / (sw * sxx - sx * sx)
    latency = (sy - per_byte * sx) / sw
    worst = max(abs(latency + per_byte * x - y) / y for x, y in zip(wire, t))
    return latency, 1 / per_byte / GB, worst


def device_memory_gb() -> float:
    """Half of MemTotal (/proc/meminfo), in GB."""
    with open("/proc/meminfo") as f:
        total_kb = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
    return total_kb * 1024 / 2 / GB


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo."""
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.machine())


def spread(values: list[float], digits: int = 3) -> str:
    """'min .. max' of `values`."""
    return f"{min(values):.{digits}f} .. {max(values):.{digits}f}"


def print_matmul() -> None:
    """matmul_tflops_fp32 (1 and 2 threads) and matmul_tflops_bf16."""
    fp32 = matmul_tflops(torch.float32, threads=1, repeats=5)
    fp32_2 = matmul_tflops(torch.float32, threads=2, repeats=5)
    bf16 = matmul_tflops(torch.bfloat16, threads=1, repeats=3)
    print(f"# F.linear fwd+bwd (6 T d_in d_out FLOPs), 1 thread, median over 27 shapes (T 256/1024/2048 x "
          f"d->d, d->4d, 4d->d, d 256/512/1024) of 5 repeats; min .. max {spread(fp32)}")
    print(f"matmul_tflops_fp32: {statistics.median(fp32):.3f}")
    print(f"# matmul_tflops_fp32_2threads: {statistics.median(fp32_2):.3f}  (same, 2 threads in one process; "
          f"min .. max {spread(fp32_2)}; x{statistics.median(fp32_2) / statistics.median(fp32):.2f} of 1 thread)")
    print(f"# same shapes in bf16, 1 thread, 3 repeats (oneDNN; this CPU has AMX-BF16); min .. max {spread(bf16)}")
    print(f"matmul_tflops_bf16: {statistics.median(bf16):.3f}")
    attention = attention_tflops()
    print(f"# causal SDPA fwd+bwd, fp32, 1 thread, nominal 12 b h hd s^2 FLOPs, 4 shapes (h x hd x s 8x32x256 .. "
          f"8x128x1024): {spread(attention)} TFLOP/s; the median / matmul_tflops_fp32")
    print(f"attention_efficiency: {statistics.median(attention) / statistics.median(fp32):.2f}")


def print_memory() -> None:
    """memory_gbps and the comparisons around it."""
    torch.set_num_threads(1)
    small, large = elementwise_gbps(64), elementwise_gbps(512)
    fresh = out_of_place_add_gbps(64)
    adamw = {name: adamw_gbps(impl) for name, impl in
             (("for_loop", {"foreach": False}), ("foreach", {"foreach": True}), ("fused", {"fused": True}))}
    ops = ", ".join(f"{k} {v:.1f}" for k, v in small.items())
    print(f"# bytes read + written / s, 1 thread, 64 MB fp32 tensors, in place: median of add(out=) 12 B/elt, "
          f"mul_ 8 B/elt, copy_ 8 B/elt ({ops}): {statistics.median(small.values()):.1f}")
    print(f"#   512 MB tensors (beyond the L3): {', '.join(f'{k} {v:.1f}' for k, v in large.items())}")
    print("# eager ops write fresh outputs: 64 MB out-of-place a + b (new output each call, page faults included)")
    print(f"memory_gbps: {fresh:.1f}")
    print(f"#   AdamW.step, 4 x 64 MB params, 28 B/elt: {', '.join(f'{k} {v:.1f}' for k, v in adamw.items())} "
          f"(default on CPU = for_loop)")


def print_collectives(runs: dict[int, dict]) -> None:
    """intra_node_gbps / latency and the per-collective fits and measured bandwidths."""
    fits = {(name, n): fit(name, n, {int(s): t for s, t in run["seconds"][name].items()})
            for n, run in runs.items() for name in WIRE_FACTOR}
    (ag_latency, ag_gbps, _), (rs_latency, rs_gbps, _) = fits["all_gather", 2], fits["reduce_scatter", 2]
    print("# gloo loopback, 2 processes x 1 thread, fits of time = latency + (n-1)/n S / bandwidth over S = 1 KB .. "
          "64 MB; FSDP's mix per unit: 2 all-gathers (forward, backward) and 1 reduce-scatter, same bytes each")
    print(f"intra_node_gbps: {3 / (2 / ag_gbps + 1 / rs_gbps):.3f}")
    print(f"intra_node_latency_us: {(2 * ag_latency + rs_latency) / 3 * 1e6:.0f}")
    print("# fitted per collective and n (latency us, bandwidth GB/s on ring wire bytes, worst relative error "
          "of the fit):")
    for (name, n), (lat, bw, worst) in fits.items():
        print(f"#   {name:<15s}n={n}  latency {lat * 1e6:7.0f} us  bandwidth {bw:6.3f} GB/s  worst {worst:5.0%}")
    print("# measured wire GB/s by message size " + " ".join(f"{s // 1024:>6d}K" for s in SIZES) + ":")
    for n, run in runs.items():
        for name in WIRE_FACTOR:
            row = " ".join(f"{WIRE_FACTOR[name](n) * s / run['seconds'][name][str(s)] / GB:7.3f}" for s in SIZES)
            print(f"#   {name:<15s}n={n}                  {row}")


def main() -> None:
    print(f"# cluster profile 'cpu': {cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}; "
          f"measured by python -m benchmarks.cluster_profile on {time.strftime('%Y-%m-%d')}")
    print_matmul()
    print_memory()
    torch.set_num_threads(1)
    tiny = tiny_op_us()
    runs = {n: run_worker(n, ["collectives", *(["--dtensor"] if n == 2 else [])]) for n in (2, 4)}
    op_us = runs[2]["op_us"]
    print(f"# x.add_(1) on 16 floats, 1 thread, median of 7 x 20000 calls, under the communication counter every "
          f"training step runs under (parallel.comm_stats.CommCounter; bare: {tiny:.2f} us)")
    print(f"kernel_overhead_us: {counted_op_us():.2f}")
    print(f"# the same op on a DTensor (16 floats per rank, Shard(0)) on a 2-rank gloo mesh, each rank 1 thread "
          f"(a plain tensor there: {op_us['tensor']:.2f} us)")
    print(f"dtensor_op_overhead_us: {op_us['dtensor'] - op_us['tensor']:.1f}")
    print("# gloo moves and reduces bytes with the cores that compute: nothing hides behind compute")
    print("comm_overlap: 0.0")
    print_collectives(runs)
    rss = run_worker(2, ["runtime"])["peak_rss_bytes"]
    print(f"# peak RSS (ru_maxrss) of a rank after importing torch, hydra, recipes.pretrain and joining a 2-rank "
          f"gloo group, no model (ranks: {', '.join(f'{r / GB:.3f}' for r in rss)} GB)")
    print(f"runtime_memory_gb: {max(rss) / GB:.3f}")
    print("# MemTotal of /proc/meminfo / 2 (per rank of a 2-rank run)")
    print(f"device_memory_gb: {device_memory_gb():.2f}")


if __name__ == "__main__":
    main()
