"""One rank of `benchmarks.health` (under torchrun), in one of two modes.

    python -m torch.distributed.run --standalone --nproc-per-node 2 -m benchmarks.health_worker \
        micro --out DIR [--iters 2000] [--rounds 5] [--collectives 200] [--collective-rounds 20]
        [--metrics-iters 300]
    python -m torch.distributed.run --standalone --nproc-per-node 2 -m benchmarks.health_worker \
        recipe --variant on|off [--count DIR] -- <recipes.pretrain overrides>

``micro``: builds the health objects exactly as ``recipes/pretrain.py`` does, from the composed
default config (``HealthPolicy``, ``FaultInjection`` with ``debug.*`` off, ``HangWatchdog`` with the
default ``hang_factor`` and its background thread running, ``HangInjection``, ``StepProfiler`` with
``profile.steps=[]``, ``StepTiming``), with the flight recorder installed by
``parallel.mesh.init_process_group`` as in every distributed run, and times

- what the trainer calls for them on every step: each step hook's ``begin`` (in the recipe's order),
  ``FaultInjection.after_backward``, ``HealthPolicy.judge`` (a full spike window of realistic
  losses and norms), each hook's ``end``; against the same loop calling an empty function; and each
  part alone;
- ``StepTiming.metrics`` (an all-gather, the ``ranks.jsonl`` line on the writer, the straggler
  test), what a logged step adds, in lockstep on both ranks (the one-off host all-gather of its
  first call is timed apart);
- the flight recorder per collective: ``--collectives`` 1-element ``all_reduce`` calls with the
  recorder installed against uninstalled, alternating ``--collective-rounds`` times (the median of
  the per-round differences); and the recording wrapper around a no-op
  (no communication, so no network noise) against the bare no-op;
- the watchdog thread's own CPU time (``/proc/self/task/<tid>/schedstat``) over the whole run.

Each rank writes ``<out>/rank<r>.json`` (medians over ``--rounds``, seconds per call).

``recipe``: runs ``recipes.pretrain`` in this process (``parallel.mesh.run_main``, as ``python -m
recipes.pretrain``). ``--variant on`` changes nothing (``--count DIR``: notes the flight recorder's
newest sequence number at each step's begin and end, so the collectives each step issued are
counted, and writes ``DIR/rank<r>.json`` at the end). ``--variant off`` is the benchmark's own
off-switch, which the recipe does not have: the flight recorder is not installed; the watchdog,
hang injection, fault injection and step timing are left out of the trainer's step hooks and metric
sources (``faults=None``: no ``after_backward``); ``HealthPolicy.judge`` applies every step without
looking. The step profiler (off by default) stays in both.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from parallel import flight_recorder
from parallel.mesh import init_process_group, read_env, run_main, shutdown
from recipes.cli import compose_config
from titan.config import PretrainConfig, register_schemas
from titan.events import EventLog
from titan.faults import FaultInjection
from titan.health import HealthPolicy
from titan.profiling import StepProfiler
from titan.step_timing import StepTiming
from titan.watchdog import HangInjection, HangWatchdog


# ---------------------------------------------------------------------------------------------- micro


def thread_cpu_s(native_id: int) -> float:
    """CPU seconds a thread of this process has run (schedstat: nanoseconds on a CPU)."""
    with open(f"/proc/self/task/{native_id}/schedstat") as f:
        return int(f.read().split()[0]) / 1e9


def per_call(fn, n: int) -> float:
    """Seconds per iteration of `fn(i)` for i in range(n)."""
    began = time.perf_counter()
    for i in range(n):
        fn(i)
    return (time.perf_counter() - began) / n


def micro(args: argparse.Namespace) -> None:
    register_schemas()
    run_dir = args.out / "run"
    cfg: PretrainConfig = OmegaConf.to_object(compose_config("pretrain", [f"run.dir={run_dir}",
                                                                          "training.num_threads=1"]))
    env = read_env()
    torch.set_num_threads(1)
    init_process_group(env, cfg.parallel.timeout_s)  # installs the flight recorder, as in every run
    assert flight_recorder._patched, "the flight recorder was not installed by init_process_group"
    flight_recorder.set_dump_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device, rank = env.device, env.rank
    log = (lambda *a, **k: print(*a, **k, flush=True)) if env.is_writer else (lambda *a, **k: None)

    # As recipes/pretrain.py builds them.
    health = HealthPolicy(cfg.training.health)
    events = EventLog(run_dir, env.is_writer)
    faults = FaultInjection(cfg.debug, rank)
    watchdog, hang = HangWatchdog(cfg.training.health.hang_factor, rank), HangInjection(cfg.debug, rank)
    profiler = StepProfiler(cfg.profile.steps, run_dir, rank, device, log)
    timing = StepTiming(run_dir, cfg.training.health, device, env.is_writer, events, log)
    hooks = [watchdog, faults, timing, hang, profiler]

    rng = random.Random(1234 + rank)
    values = [(3.0 + rng.gauss(0, 0.02), 1.0 + rng.gauss(0, 0.05)) for _ in range(4096)]  # a calm run
    loss_t, grads = torch.tensor(3.0), [torch.zeros(4) for _ in range(8)]
    offset = [0]  # step numbers keep growing across calls, as in a run

    def full(i: int) -> None:
        step = offset[0] + i
        for hook in hooks:
            hook.begin(step)
        faults.after_backward(step, loss_t, grads)
        loss, norm = values[step % 4096]
        health.judge(step, loss, norm)
        for hook in hooks:
            hook.end(step)

    def nothing(i: int) -> None:
        pass

    def hook_calls(hook):
        def call(i: int) -> None:
            hook.begin(offset[0] + i)
            hook.end(offset[0] + i)
        return call

    def after_backward(i: int) -> None:
        faults.after_backward(offset[0] + i, loss_t, grads)

    def judge(i: int) -> None:
        loss, norm = values[(offset[0] + i) % 4096]
        health.judge(offset[0] + i, loss, norm)

    parts = {"empty loop": nothing, "all per-step calls": full,
             **{f"{type(h).__name__} begin+end": hook_calls(h) for h in hooks},
             "FaultInjection.after_backward": after_backward, "HealthPolicy.judge": judge}

    per_step: dict[str, list[float]] = {name: [] for name in parts}
    offset[0] = 1
    full(0)  # the first begin starts the watchdog thread
    offset[0] += 1
    wall_began = time.perf_counter()
    thread_began = thread_cpu_s(watchdog.thread.native_id)
    per_call(full, 300)  # fill the spike window (128) past spike_min_steps (64)
    offset[0] += 300
    for _ in range(args.rounds):
        for name, fn in parts.items():
            per_step[name].append(per_call(fn, args.iters))
            offset[0] += args.iters

    # A logged step: StepTiming.metrics, in lockstep. The first call also all-gathers the host names.
    timing.wall, timing.cpu = 0.6, 0.3  # a plausible step, the same on both ranks: no straggler
    dist.barrier()
    began = time.perf_counter()
    timing.metrics(offset[0])
    first_metrics = time.perf_counter() - began
    metrics_s: list[float] = []
    for _ in range(args.rounds):
        dist.barrier()
        metrics_s.append(per_call(lambda i: timing.metrics(offset[0] + i), args.metrics_iters))
        offset[0] += args.metrics_iters

    # The flight recorder per collective: real 1-element all_reduces, installed vs not, alternating.
    x = torch.ones(1)
    recorded_s, bare_s = [], []
    for round_index in range(args.collective_rounds):
        for installed in ((True, False) if round_index % 2 == 0 else (False, True)):
            (flight_recorder.install if installed else flight_recorder.uninstall)()
            dist.barrier()
            (recorded_s if installed else bare_s).append(per_call(lambda i: dist.all_reduce(x), args.collectives))
    flight_recorder.install()
    # The wrapper alone, around a no-op with all_reduce's and all_gather_into_tensor's signatures.
    flight_recorder.uninstall()
    wrapper: dict[str, list[float]] = {}
    out, inp = torch.zeros(2), torch.zeros(1)
    for name, original, call_args in (("all_reduce", dist.all_reduce, (x,)),
                                      ("all_gather_into_tensor", dist.all_gather_into_tensor, (out, inp))):
        def noop(*a, **k):
            return None
        wrapped = flight_recorder._wrap(noop, name, flight_recorder._by_parameter(original), False)
        wrapper[f"{name} wrapped"], wrapper[f"{name} bare"] = [], []
        for _ in range(args.rounds):
            wrapper[f"{name} wrapped"].append(per_call(lambda i: wrapped(*call_args), args.iters * 4))
            wrapper[f"{name} bare"].append(per_call(lambda i: noop(*call_args), args.iters * 4))
    flight_recorder.install()
    flight_recorder.clear()

    wall = time.perf_counter() - wall_began
    thread_cpu = thread_cpu_s(watchdog.thread.native_id) - thread_began
    result = {
        "rank": rank, "rounds": args.rounds, "iters": args.iters,
        "per_step_s": {name: statistics.median(v) for name, v in per_step.items()},
        "per_step_rounds_s": per_step,
        "metrics_s": statistics.median(metrics_s), "metrics_rounds_s": metrics_s, "metrics_first_s": first_metrics,
        "all_reduce_recorded_s": statistics.median(recorded_s), "all_reduce_bare_s": statistics.median(bare_s),
        "all_reduce_diff_s": statistics.median(a - b for a, b in zip(recorded_s, bare_s)),
        "all_reduce_rounds_s": {"recorded": recorded_s, "bare": bare_s},
        "wrapper_s": {name: statistics.median(v) for name, v in wrapper.items()},
        "watchdog_thread_cpu_s": thread_cpu, "wall_s": wall, "watchdog_poll_s": watchdog.poll_s,
        "hang_factor": watchdog.factor, "watchdog_threshold_s": watchdog.threshold(),
        "ranks_jsonl_lines": (sum(1 for _ in timing.path.open()) if env.is_writer else None),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{rank}.json").write_text(json.dumps(result, indent=1))
    watchdog.close()
    shutdown()


# ---------------------------------------------------------------------------------------------- recipe


class _Off:
    """Stands in for a health object the off-switch removes (filtered out of the trainer)."""

    def __init__(self, *args, **kwargs):
        pass

    def begin(self, step: int) -> None:
        pass

    def end(self, step: int) -> None:
        pass

    def metrics(self, step: int) -> dict:
        return {}

    def close(self) -> None:
        pass


def switch_off() -> None:
    import recipes.pretrain as pretrain
    from titan.trainer import Trainer

    class ApplyEveryStep(HealthPolicy):
        def judge(self, step: int, loss: float, grad_norm: float) -> str | None:
            return None

    class TrainerOff(Trainer):
        def __init__(self, *args, step_hooks=(), metric_sources=(), faults=None, **kwargs):
            super().__init__(*args, step_hooks=[h for h in step_hooks if not isinstance(h, _Off)],
                             metric_sources=[s for s in metric_sources if not isinstance(s, _Off)], faults=None,
                             **kwargs)

    flight_recorder.install = lambda: None  # parallel.mesh.init_process_group calls it through the module
    pretrain.HangWatchdog = pretrain.HangInjection = pretrain.FaultInjection = pretrain.StepTiming = _Off
    pretrain.HealthPolicy, pretrain.Trainer = ApplyEveryStep, TrainerOff


def recipe(args: argparse.Namespace, overrides: list[str]) -> None:
    import recipes.pretrain as pretrain

    if args.variant == "off":
        switch_off()
    marks: list[tuple[int, bool, int]] = []
    if args.count is not None:
        set_step = flight_recorder.set_step

        def counting(step: int, inside: bool) -> None:
            ring = flight_recorder._ring
            marks.append((step, inside, ring[-1][flight_recorder.SEQ] if ring else 0))
            set_step(step, inside)
        flight_recorder.set_step = counting

    def main(argv: list[str]) -> None:
        try:
            pretrain.main(argv)
        finally:
            if args.count is not None:
                args.count.mkdir(parents=True, exist_ok=True)
                rank = int(os.environ.get("RANK", "0"))
                (args.count / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "marks": marks}))

    run_main(main, overrides)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    m = sub.add_parser("micro")
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--iters", type=int, default=2000, help="iterations per timed loop")
    m.add_argument("--rounds", type=int, default=5)
    m.add_argument("--collectives", type=int, default=200, help="all_reduces per timed loop")
    m.add_argument("--collective-rounds", type=int, default=20, help="alternating installed / bare loops")
    m.add_argument("--metrics-iters", type=int, default=300, help="StepTiming.metrics calls per timed loop")
    r = sub.add_parser("recipe")
    r.add_argument("--variant", choices=("on", "off"), required=True)
    r.add_argument("--count", type=Path, default=None, help="folder for the per-step collective counts (on)")
    args, rest = parser.parse_known_args()
    if args.mode == "micro":
        if rest:
            parser.error(f"unexpected arguments {rest}")
        micro(args)
    else:
        recipe(args, [a for a in rest if a != "--"])


if __name__ == "__main__":
    sys.exit(main())
