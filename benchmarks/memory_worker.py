"""One rank of `benchmarks.memory`: build the recipe's model and optimizer, train a few steps, and
write what this rank holds and its peak memory to `<out>/rank<r>.json`.

    python -m torch.distributed.run --standalone --nproc-per-node N -m benchmarks.memory_worker \
        --out DIR [recipe overrides ...]

It mirrors `recipes/pretrain.py` (same config, layout, model, initialization, optimizer, schedule,
loader and the real `Trainer`) but logs nothing and saves nothing, on any layout the recipe takes
(FSDP, HSDP, TP, PP, CP, EP, activation checkpointing, gradient accumulation). Memory is measured
two ways:

- `LiveBytes`, a dispatch mode (device-agnostic, so it works on CPU): every tensor storage that is
  alive (parameters, gradients, optimizer states and the tensors that ops create: activations,
  FSDP's all-gather and reduce-scatter buffers, pipeline buffers, temporaries), at the moment their
  sum peaks, with the phase (forward, backward, optimizer, other) and step it peaked in. This is the
  benchmark's "measured" number.
- Peak resident set size: ``VmHWM`` after the steps minus ``VmHWM`` before the model is built (the
  process after imports and process-group setup). Includes allocator slack, gloo buffers and the
  init-time full-size temporaries; a cross-check.

The shard-size checks (chunk formula, `uneven`) hold for data-parallel layouts only: with tp, pp,
cp or ep > 1 they are recorded as null.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import time
import weakref
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from torch._guards import active_fake_mode
from torch.distributed._tools.common_utils import get_untyped_storages
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from benchmarks.worker_setup import setup_worker
from parallel.mesh import shutdown
from titan.build import Layout, build_parallel_model
from titan.config import ModelConfig, PretrainConfig
from titan.data.loader import train_loader
from titan.metrics import MetricsLogger, ThroughputMeter
from titan.models import build_model
from titan.optim import build_optimizer, build_scheduler
from titan.runners import PipelineRunner
from titan.trainer import Trainer, TrainState

# What a storage is made as, by the phase that makes it (forward: autograd's saved tensors and FSDP's
# all-gathers; backward and the optimizer step: temporaries; other: batches, clipping, the loss sum).
MADE_AS = {"forward": "Activation", "backward": "Temp", "optimizer": "Temp", "other": "Other"}
KINDS = ("Parameter", "Buffer", "Gradient", "Optstate", "Activation", "Temp", "Other")


class LiveBytes(TorchDispatchMode):
    """Bytes of the live tensor storages by kind (the keys of MemTracker's snapshots), and a copy
    of them when their total peaks.

    A storage counts from the first op that returns it (or its first resize) until it is freed (a
    weak reference's callback), at its current size: `UntypedStorage.resize_`, which no dispatch
    mode sees and with which FSDP2 frees and re-allocates unsharded parameters, is patched to follow.
    Storages are made as `MADE_AS` of the phase; each time the total passes its peak, the modules'
    parameters and buffers, the gradients and the optimizer states are labelled first, so the
    breakdown at the peak is exact. Labels stick (FSDP2's unsharded parameters stay Parameter while
    freed). Phases: optimizer (in `optimizer.step`), backward (in autograd's engine), forward (in
    what `during("forward", ...)` wraps), other (the rest)."""

    def __init__(self, modules: list[nn.Module], optimizer: torch.optim.Optimizer):
        super().__init__()
        self.modules, self.optimizer = modules, optimizer
        self.live: dict[int, list] = {}  # id(storage) -> [bytes, kind, weak reference]
        self.current = dict.fromkeys(KINDS, 0)
        self.total = 0
        self.peak = {**self.current, "Total": 0}
        self.phase, self.step, self.peak_phase, self.peak_step = "other", 0, "other", 0
        self.step_times: list[float] = []
        self._began = 0.0
        self._resize = torch.UntypedStorage.resize_

    # Trainer step hook: the step and its wall time.
    def begin(self, step: int) -> None:
        self.step, self._began = step, time.perf_counter()

    def end(self, step: int) -> None:
        self.step_times.append(time.perf_counter() - self._began)

    def during(self, phase: str, fn: Callable) -> Callable:
        """`fn`, run in `phase`."""
        def run(*args: Any, **kwargs: Any) -> Any:
            self.phase = phase
            try:
                return fn(*args, **kwargs)
            finally:
                self.phase = "other"
        return run

    def _now(self) -> str:
        return "backward" if torch._C._current_graph_task_id() != -1 else self.phase

    def _see(self, st: torch.UntypedStorage, kind: str, relabel: bool = False) -> None:
        entry = self.live.get(id(st))
        if entry is None:
            size = st.nbytes()
            self.live[id(st)] = [size, kind, weakref.ref(st, partial(self._freed, id(st)))]
            self.current[kind] += size
            self.total += size
        elif relabel and entry[1] != kind:
            self.current[entry[1]] -= entry[0]
            self.current[kind] += entry[0]
            entry[1] = kind

    def _see_tensor(self, t: torch.Tensor, kind: str, relabel: bool = False) -> None:
        if t.device.type != "meta":
            for st in get_untyped_storages(t):
                self._see(st, kind, relabel)

    def _freed(self, key: int, _: weakref.ref) -> None:
        size, kind, _ = self.live.pop(key)
        self.current[kind] -= size
        self.total -= size

    def _resized(self, st: torch.UntypedStorage, size: int) -> None:
        self._resize(st, size)
        entry = self.live.get(id(st))
        if entry is None:
            self._see(st, MADE_AS[self._now()])
        else:
            self.current[entry[1]] += st.nbytes() - entry[0]
            self.total += st.nbytes() - entry[0]
            entry[0] = st.nbytes()
        self._update_peak()

    def _label(self) -> None:
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        params += [p for m in self.modules for p in m.parameters()]
        for p in params:
            self._see_tensor(p, "Parameter", relabel=True)
            if p.grad is not None:
                self._see_tensor(p.grad, "Gradient", relabel=True)
        for b in (b for m in self.modules for b in m.buffers()):
            self._see_tensor(b, "Buffer", relabel=True)
        for state in self.optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    self._see_tensor(value, "Optstate", relabel=True)

    def _update_peak(self) -> None:
        if self.total > self.peak["Total"]:
            self._label()
            self.peak = {**self.current, "Total": self.total}
            self.peak_phase, self.peak_step = self._now(), self.step

    def _phase_hooks(self) -> list:
        return [self.optimizer.register_step_pre_hook(lambda *_: setattr(self, "phase", "optimizer")),
                self.optimizer.register_step_post_hook(lambda *_: setattr(self, "phase", "other"))]

    def __enter__(self) -> LiveBytes:
        self._hooks = self._phase_hooks()
        torch.UntypedStorage.resize_ = lambda st, size: self._resized(st, size)
        self._label()
        self.peak = {**self.current, "Total": self.total}
        return super().__enter__()

    def __exit__(self, *args: Any) -> None:
        torch.UntypedStorage.resize_ = self._resize
        for hook in self._hooks:
            hook.remove()
        super().__exit__(*args)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if DTensor in types:
            return NotImplemented  # let DTensor run its local ops, which come back here
        out = func(*args, **(kwargs or {}))
        if active_fake_mode() is None:  # not DTensor's shape propagation
            made_as = MADE_AS[self._now()]
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self._see_tensor(t, made_as)
            self._update_peak()
        return out


# A tiny model whose first dimensions do not split evenly over 2 or 4 ranks (509 vocabulary rows,
# 10-row norms and attention, 5-row MLP), so that the last ranks hold short or empty chunks.
UNEVEN = ModelConfig(name="uneven", dim=10, n_layers=1, n_heads=1, n_kv_heads=1, vocab_size=509,
                     ffn_hidden_dim=5, max_seq_len=16)


def vm_kib(field: str) -> int:
    """A `/proc/self/status` field (VmHWM, VmRSS) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def chunk_rows(d0: int, shards: int, rank: int) -> tuple[int, int]:
    """(rows this rank holds, rows of its padded buffer) for `torch.chunk` of `d0` rows over `shards`:
    chunks of ceil(d0 / shards) rows, the last non-empty one shorter, any after it empty; FSDP2 pads
    every rank's buffer to the full chunk."""
    chunk = math.ceil(d0 / shards)
    return max(0, min(chunk, d0 - rank * chunk)), chunk


def expected_shard_bytes(full_shapes: dict[str, torch.Size], shards: int, rank: int) -> tuple[int, int]:
    """(local bytes, padded bytes) of fp32 parameters on `rank` by the chunk formula."""
    local = padded = 0
    for shape in full_shapes.values():
        d0, rest = shape[0], math.prod(shape[1:])
        rows, chunk = chunk_rows(d0, shards, rank)
        local += rows * rest * 4
        padded += chunk * rest * 4
    return local, padded


def measured_shard_bytes(model: nn.Module) -> tuple[int, int]:
    """(sum of `to_local()` bytes, bytes of the distinct storages behind them) over the parameters."""
    local, storages = 0, {}
    for p in model.parameters():
        t = p.to_local() if isinstance(p, DTensor) else p
        local += t.numel() * t.element_size()
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return local, sum(storages.values())


def shard_check(model: nn.Module, full_shapes: dict[str, torch.Size], shards: int, rank: int) -> dict:
    local, storage = measured_shard_bytes(model)
    exp_local, exp_padded = expected_shard_bytes(full_shapes, shards, rank)
    return {"local_bytes": local, "storage_bytes": storage, "expected_local_bytes": exp_local,
            "expected_padded_bytes": exp_padded}


def full_shapes_of(cfg: ModelConfig) -> dict[str, torch.Size]:
    return {name: p.shape for name, p in build_model(cfg).named_parameters()}


def uneven_check(cfg: PretrainConfig, layout: Layout, device: torch.device, shards: int, rank: int) -> dict:
    """The chunk formula on a model with uneven first dimensions, sharded over the same layout."""
    small = dataclasses.replace(cfg, model=UNEVEN)
    model, _ = build_parallel_model(small, layout, device)
    return shard_check(model, full_shapes_of(UNEVEN), shards, rank)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for rank<r>.json")
    args, overrides = parser.parse_known_args()

    cfg, env, dims, data, layout = setup_worker(overrides)
    data_parallel = dims.tp == dims.pp == dims.cp == dims.ep == 1  # where the chunk formula applies
    shards = dims.dp_shard if dims.dp_size > 1 else 1
    shard_rank = layout.mesh["dp_shard"].get_local_rank() if layout.mesh is not None else 0
    uneven = uneven_check(cfg, layout, env.device, shards, shard_rank) if data_parallel else None

    hwm_before = vm_kib("VmHWM")
    model, par = build_parallel_model(cfg, layout, env.device)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.lr, cfg.training.steps)
    loader = train_loader(data, cfg.data, cfg.training, layout.dp_rank, dims.dp_size)
    shards_info = (shard_check(model, full_shapes_of(cfg.model), shards, shard_rank) if data_parallel else
                   dict.fromkeys(("local_bytes", "storage_bytes", "expected_local_bytes", "expected_padded_bytes")))
    tracker = LiveBytes(par.runner.parts if isinstance(par.runner, PipelineRunner) else [model], optimizer)
    par.runner.train = tracker.during("forward", par.runner.train)
    par = dataclasses.replace(par, comm_counter=None)  # one dispatch mode at a time: the tracker's
    trainer = Trainer(cfg, model, optimizer, scheduler, iter(loader), lambda: iter(()), par, env.device,
                      MetricsLogger([]), ThroughputMeter(1, env.world_size, 1.0), TrainState(), step_hooks=[tracker])
    with tracker:
        trainer.fit()
    result = {"rank": env.rank, "world_size": env.world_size, "dims": dataclasses.asdict(dims),
              "accum_steps": trainer.accum_steps, "shards": shards, "shard_rank": shard_rank, **shards_info,
              "uneven": uneven, "tracker_peak": tracker.peak, "peak_phase": tracker.peak_phase,
              "peak_step": tracker.peak_step, "step_time_s": statistics.median(tracker.step_times[1:] or tracker.step_times),
              "rss_peak_delta_bytes": (vm_kib("VmHWM") - hwm_before) * 1024, "hwm_before_bytes": hwm_before * 1024}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{env.rank}.json").write_text(json.dumps(result, indent=1))
    del trainer, optimizer, model
    if dist.is_initialized():
        shutdown()


if __name__ == "__main__":
    main()
