"""One rank of `benchmarks.moe` (b): run the real recipe (`recipes.pretrain.main`, the function
`python -m recipes.pretrain` calls) under expert parallelism while recording, per rank, the routing
of every training forward and what `parallel.comm_stats.CommCounter` counted on each logged step;
then write everything to `<out>/rank<r>.json`.

    python -m torch.distributed.run --standalone --nproc-per-node N -m benchmarks.moe_worker \
        --out DIR [recipe overrides ...]

Two observers, neither of which changes what the recipe computes:

- A global module forward hook (`torch.nn.modules.module.register_module_forward_hook`) on every
  `titan.models.moe.Router` call with gradients enabled (the training forwards; eval is off): the
  per-expert row counts of that call, ``bincount(indices, minlength=E)`` over this rank's tokens.
  Every rank calls its routers in the same order (micro-batches, then MoE layers), so call ``j`` on
  one rank and call ``j`` on another are the same layer and micro-batch: the driver pairs them to
  know what each rank sent and received.
- `CommCounter.by_dim_gb`, which the trainer calls on logged steps to fill `comm_gb/<dim>`, is
  wrapped to keep a copy of its result per step on every rank (only rank 0 writes metrics.jsonl).

With ``--memory`` it is instead one rank of `benchmarks.moe` (d): the approach of
`benchmarks/memory_worker.py` (MemTracker peak over a few steps of the real `Trainer`, and the peak
RSS growth) on the recipe's model, optimizer, schedule, loader, health policy and expert-bias update,
writing the tracker's peak snapshot, this rank's parameter bytes and the RSS growth.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist

from parallel import comm_stats
from parallel.mesh import run_main, shutdown
from recipes import pretrain
from titan.models.moe import Router


def memory(out: Path, overrides: list[str]) -> None:
    """Peak memory of a few training steps on this rank (module docstring)."""
    import dataclasses

    from torch.distributed._tools.mem_tracker import MemTracker

    from benchmarks.memory_worker import measured_shard_bytes, vm_kib
    from benchmarks.worker_setup import setup_worker
    from titan.build import build_parallel_model
    from titan.data.loader import train_loader
    from titan.expert_balance import ExpertBalance
    from titan.health import HealthPolicy
    from titan.metrics import MetricsLogger, ThroughputMeter
    from titan.optim import build_optimizer, build_scheduler
    from titan.trainer import Trainer, TrainState

    cfg, env, dims, data, layout = setup_worker(overrides)
    hwm_before = vm_kib("VmHWM")
    model, par = build_parallel_model(cfg, layout, env.device)
    par = dataclasses.replace(par, comm_counter=None)  # one dispatch mode at a time: the tracker's
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.lr, cfg.training.steps)
    loader = train_loader(data, cfg.data, cfg.training, layout.dp_rank, dims.dp_size)
    local_bytes, storage_bytes = measured_shard_bytes(model)
    balance = ExpertBalance(model, cfg.model, par.global_sum)
    tracker = MemTracker()
    # The tracker refuses a second forward of the root module unless its per-module stats are
    # cleared after each step (the overall peak is kept). No rollback: no step is bad here.
    trainer = Trainer(cfg, model, optimizer, scheduler, iter(loader), lambda: iter(()), par, env.device,
                      MetricsLogger([]), ThroughputMeter(1, env.world_size, 1.0), TrainState(),
                      HealthPolicy(cfg.training.health), None,
                      on_step_end=lambda state: bool(tracker.reset_mod_stats()),  # False: go on
                      after_update=balance.after_step)
    tracker.track_external(model, optimizer)
    with tracker:
        trainer.fit()
    peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
    result = {"rank": env.rank, "world_size": env.world_size, "ep": dims.ep, "local_bytes": local_bytes,
              "storage_bytes": storage_bytes, "tracker_peak": dict(peak),
              "rss_peak_delta_bytes": (vm_kib("VmHWM") - hwm_before) * 1024}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{env.rank}.json").write_text(json.dumps(result, indent=1))
    del trainer, optimizer, model
    shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for rank<r>.json")
    parser.add_argument("--memory", action="store_true", help="measure peak memory instead (benchmarks.moe (d))")
    args, overrides = parser.parse_known_args()
    if args.memory:
        memory(args.out, overrides)
        return

    routing: list[list[int]] = []  # per training router call: rows per expert (this rank's tokens)
    counted: list[dict[str, float]] = []  # per logged step: CommCounter.by_dim_gb()

    def record_routing(module: torch.nn.Module, inputs: tuple, output: tuple) -> None:
        if isinstance(module, Router) and torch.is_grad_enabled():
            indices = output[3]
            routing.append(torch.bincount(indices.flatten(), minlength=module.gate.weight.shape[0]).tolist())

    original = comm_stats.CommCounter.by_dim_gb

    def by_dim_gb(self) -> dict[str, float]:
        result = original(self)
        counted.append(dict(result))
        return result

    def run(argv: list[str]) -> None:
        comm_stats.CommCounter.by_dim_gb = by_dim_gb
        handle = torch.nn.modules.module.register_module_forward_hook(record_routing)
        try:
            pretrain.main(argv)
        finally:
            handle.remove()
            comm_stats.CommCounter.by_dim_gb = original
        rank = dist.get_rank() if dist.is_initialized() else 0
        result = {"rank": rank, "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                  "routing": routing, "counted": counted}
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"rank{rank}.json").write_text(json.dumps(result))

    run_main(run, overrides)  # as `python -m recipes.pretrain`: tears the process groups down and exits


if __name__ == "__main__":
    main()
