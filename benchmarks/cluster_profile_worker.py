"""Worker of `benchmarks.cluster_profile`, one process per rank under ``torch.distributed.run``:

    python -m torch.distributed.run --standalone --nproc-per-node N -m benchmarks.cluster_profile_worker \
        collectives --out FILE [--sizes 1024,4096,...] [--repeats 5] [--dtensor]
    python -m torch.distributed.run --standalone --nproc-per-node 2 -m benchmarks.cluster_profile_worker \
        runtime --out FILE

``collectives``: seconds per gloo collective and message size (slowest rank, median of repeats),
and with ``--dtensor`` the cost of one op on a tiny DTensor. ``runtime``: peak RSS of a rank that has imported the
recipe and joined the process group, before any model exists. Rank 0 writes the JSON to FILE.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

COLLECTIVES = ("all_gather", "reduce_scatter", "all_reduce", "all_to_all")


def collective_call(name: str, size: int, world: int) -> Callable[[], None]:
    """One call of collective `name` on a fp32 message of `size` bytes: the all-gather's output, the
    reduce-scatter's input, the all-reduce's tensor, the all-to-all's input (= output)."""
    numel = size // 4
    full, shard = torch.ones(numel), torch.ones(numel // world)
    calls = {  # all_gather_single / reduce_scatter_single: the new names of *_into_tensor / *_tensor
        "all_gather": lambda: dist.all_gather_single(full, shard),
        "reduce_scatter": lambda: dist.reduce_scatter_single(shard, full),
        "all_reduce": lambda: dist.all_reduce(full),
        "all_to_all": lambda: dist.all_to_all_single(torch.empty_like(full), full),
    }
    return calls[name]


def time_per_call(call: Callable[[], None], iters: int) -> float:
    """Seconds per call on this rank, over `iters` calls started together after a barrier."""
    dist.barrier()
    start = time.perf_counter()
    for _ in range(iters):
        call()
    return (time.perf_counter() - start) / iters


def iterations(size: int) -> int:
    """Calls per timed repeat: enough that a repeat of a small message lasts a few ms."""
    return max(1, min(50, (1 << 20) // size))


def time_collectives(sizes: list[int], repeats: int) -> dict[str, dict[int, float]]:
    """Median over repeats of the slowest rank's seconds per call, per collective and size."""
    world = dist.get_world_size()
    raw: list[tuple[str, int, list[float]]] = []
    for name in COLLECTIVES:
        for size in sizes:
            call = collective_call(name, size, world)
            call()  # warm-up: connections, buffers
            raw.append((name, size, [time_per_call(call, iterations(size)) for _ in range(repeats)]))
    slowest = torch.tensor([t for _, _, times in raw for t in times], dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    per_rep = slowest.view(len(raw), repeats).tolist()
    result: dict[str, dict[int, float]] = {name: {} for name in COLLECTIVES}
    for (name, size, _), times in zip(raw, per_rep):
        result[name][size] = statistics.median(times)
    return result


def dtensor_op_us(iters: int = 20000, repeats: int = 5) -> dict[str, float]:
    """Microseconds of `x.add_(1)` on a tiny DTensor (16 floats per rank, Shard(0) on a 1-D mesh
    over all ranks) and on a plain 16-float tensor, median of repeats."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    tensors = {"dtensor": distribute_tensor(torch.zeros(16 * dist.get_world_size()), mesh, [Shard(0)]),
               "tensor": torch.zeros(16)}
    result = {}
    for name, x in tensors.items():
        for _ in range(iters // 10):
            x.add_(1)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(iters):
                x.add_(1)
            times.append((time.perf_counter() - start) / iters * 1e6)
        result[name] = statistics.median(times)
    return result


def collectives(args: argparse.Namespace) -> dict:
    """Collective timings and the DTensor op overhead, on a plain gloo process group."""
    dist.init_process_group("gloo")
    sizes = [int(s) for s in args.sizes.split(",")]
    result = {"world": dist.get_world_size(), "seconds": time_collectives(sizes, args.repeats),
              "op_us": dtensor_op_us() if args.dtensor else {}}
    dist.barrier()
    return result


def runtime(_: argparse.Namespace) -> dict:
    """Peak RSS (bytes) of each rank after importing torch, hydra and `recipes.pretrain` and joining a
    gloo process group the way the recipe does (`parallel.mesh.init_process_group`)."""
    for module in ("hydra", "recipes.pretrain"):  # measured: what a training process has loaded
        importlib.import_module(module)
    from parallel.mesh import init_process_group, read_env

    init_process_group(read_env())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    peaks: list[int] = [0] * dist.get_world_size()
    dist.all_gather_object(peaks, peak)
    return {"peak_rss_bytes": peaks}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("task", choices=("collectives", "runtime"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sizes", default=",".join(str(1024 * 4 ** k) for k in range(9)))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtensor", action="store_true", help="also time an op on a tiny DTensor")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    result = {"collectives": collectives, "runtime": runtime}[args.task](args)
    if dist.get_rank() == 0:
        args.out.write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
