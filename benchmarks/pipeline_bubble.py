"""Pipeline bubble of the framework's schedules, measured on stages of known cost, and a timeline PNG.

    python -m benchmarks.pipeline_bubble [--pp 2 4] [--schedules 1f1b:1 interleaved_1f1b:2 ...]
                                         [--microbatches 8] [--forward-ms 150] [--steps 2]
                                         [--timeout 90] [--json raw.json]
                                         [--png [PATH]] [--png-pp 4] [--png-each DIR]
    python -m benchmarks.pipeline_bubble --from-json raw.json --png      # re-analyse / redraw only

For each pp degree p, the configurations (schedule, virtual stages per rank v) run one after the
other under ``python -m torch.distributed.run --standalone --nproc-per-node p -m
benchmarks.pipeline_bubble --worker ...`` (gloo, CPU, one thread per rank). A launch that goes
``--timeout`` seconds without finishing a configuration is stopped; a configuration that fails or
hangs is reported as FAILED with its error, and the ones after it run in a fresh launch.

The pipeline is the framework's own: ``parallel.pipeline.plan_stages`` cuts ``p x v`` one-block
stages and places them (looped, or the V shape for ``zbv`` / ``dualpipev``), each rank wraps its
stages in torch's ``PipelineStage`` and ``parallel.pipeline.build_schedule`` builds the schedule
named as in ``parallel.pp_schedule``. Only the stage modules are toys: they cost a fixed time, spent
in ``time.sleep`` inside custom autograd functions on tiny tensors, so that what is measured is the
schedule (its order and dependencies, plus what gloo p2p and torch's runtime add), not CPU
contention between ranks sharing two cores:

- forward of a stage: ``T_F / v`` (``--forward-ms`` = T_F, default 150 ms per rank and microbatch);
- backward: ``T_B / v`` with ``T_B = 2 T_F``, as two equal halves on separate autograd nodes, one on
  the input path (dI) and one on the weight path (dW). A full backward (B) runs both; torch's
  zero-bubble schedules split them by the autograd graph (``stage_backward_input`` runs only the
  input path, ``stage_backward_weight`` later the weight path), so their I and W actions each cost
  ``T_B / 2v``. On stage 0 torch runs no I and the whole backward at W, as it does for a real model
  (the first stage's input is made to require grad inside the toy module so that its backward costs
  what any other stage's does);
- the sleeps run to a deadline counted from the start of the action (forward / backward / weight
  backward of one stage and microbatch), so each action lasts its nominal cost, torch's own Python
  work inside the action included (measured: actions end ~0.3 ms late, median). What remains
  between actions (schedule bookkeeping, p2p posting and waits) is measured, not hidden;
- Python's garbage collector runs between steps, not inside them.

Total work per rank is the same for every v: ``ideal = m (T_F + T_B)``.

Times are ``time.monotonic()`` (one clock for all processes of the machine), taken around every
``forward_one_chunk`` / ``backward_one_chunk`` / ``backward_weight_one_chunk`` of every stage and
around each ``schedule.step``; rank 0 collects them with ``dist.gather_object``. After
``--warmup`` step(s) (the first also runs torch's shape inference), ``--steps`` steps are measured;
the fastest is reported (every step does the same work; other processes on the machine can only
add time), with the median step time next to it:

- ``step``: from the earliest rank entering ``schedule.step`` to the last rank leaving it (all ranks
  leave a ``dist.barrier`` together just before);
- ``bubble = (step - ideal) / ideal``; theory for GPipe and 1F1B ``(p - 1) / m``, for interleaved
  1F1B ``(p - 1) / (v m)`` (same unit: the time a rank is not computing, over its compute time);
- ``idle`` per rank ``= 1 - busy / step``, busy being the summed duration of its actions (theory
  for the 1F1B family ``(p - 1) / (v m + p - 1)``);
- ``sim``: the step time of the same schedule (the order in which each rank ran its actions, as
  measured: torch's schedules are static) replayed with the nominal costs and free communication:
  the schedule's own ideal, defined for the zero-bubble schedules too, where no closed form is
  quoted. ``step - sim`` is what the runtime (gloo p2p, torch's schedule code, Python) adds;
- ``vs 1f1b``: step time over the 1F1B step time at the same p (equal work per rank); its theory is
  ``((v m + p - 1) / v) / (m + p - 1)`` for interleaved 1F1B, the ratio of the ``sim`` times for
  the zero-bubble schedules.

Goals: measured / theory bubble <= 1.10 for 1F1B, <= 1.25 for interleaved 1F1B with v = 2.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PNG = REPO / "benchmarks" / "pipeline_timeline.png"
# (schedule, virtual stages per rank), in table order.
CONFIGS = (("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2), ("interleaved_1f1b", 4), ("interleaved_zb", 2),
           ("zbv", 2), ("dualpipev", 2))
GOALS = {("1f1b", 1): 1.10, ("interleaved_1f1b", 2): 1.25}
WIDTH = 8  # features of the toy activations


# --------------------------------------------------------------------------------------------------
# Worker: one rank, running one or more configurations in turn (under torchrun).

# The action (forward / backward / weight-backward of one stage and microbatch) running now: its
# start and the nominal cost spent so far. Sleeps run to start + spent, so an action lasts its
# nominal cost; torch's own Python work inside the action is counted in it, not added to it.
_ACTION: dict = {"start": None, "spent": 0.0}


def _spend(seconds: float) -> None:
    if _ACTION["start"] is None:  # outside a timed action (e.g. shape inference): plain sleep
        time.sleep(seconds)
        return
    _ACTION["spent"] += seconds
    remaining = _ACTION["start"] + _ACTION["spent"] - time.monotonic()
    if remaining > 0:
        time.sleep(remaining)


def _toy_stage_cls():
    import torch
    from torch import nn

    class _Delay(torch.autograd.Function):
        """Identity whose backward costs `seconds` (the dI or the dW half of a stage's backward)."""

        @staticmethod
        def forward(ctx, x, seconds):
            ctx.seconds = seconds
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            _spend(ctx.seconds)
            return grad, None

    class _Compute(torch.autograd.Function):
        """`a + b` whose forward costs `seconds`; its backward is free (the costs sit in the two
        _Delay nodes under it, one on the input path and one on the weight path)."""

        @staticmethod
        def forward(ctx, a, b, seconds):
            if a.device.type != "meta":
                _spend(seconds)
            return a + b

        @staticmethod
        def backward(ctx, grad):
            return grad, grad.sum(0), None

    class ToyStage(nn.Module):
        def __init__(self, forward_s: float, input_grad_s: float, weight_grad_s: float):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(WIDTH))
            self.forward_s, self.input_grad_s, self.weight_grad_s = forward_s, input_grad_s, weight_grad_s

        def forward(self, x):
            if not x.requires_grad:  # first stage: its backward still does the dI work, as a real stage's does
                x = x.detach().requires_grad_()
            a = _Delay.apply(x, self.input_grad_s)
            b = _Delay.apply(self.weight, self.weight_grad_s)
            return _Compute.apply(a, b, self.forward_s)

    return ToyStage


def _timed(fn, stage_idx: int, kind_of, events: list):
    def run(chunk, *a, **k):
        start = _ACTION["start"] = time.monotonic()
        _ACTION["spent"] = 0.0
        try:
            return fn(chunk, *a, **k)
        finally:
            _ACTION["start"] = None
            events.append([stage_idx, kind_of(a, k), chunk, start, time.monotonic()])
    return run


def _full_backward(a: tuple, k: dict) -> str:
    # backward_one_chunk(bwd_chunk_id, loss=None, full_backward=True, last_backward=False)
    return "B" if k.get("full_backward", a[1] if len(a) > 1 else True) else "I"


def run_one(schedule_name: str, v: int, args: argparse.Namespace) -> dict | None:
    """Build the framework's pipeline for one configuration, run warm-up and measured steps,
    gather every rank's times on rank 0 (which returns them)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage

    from parallel.pipeline import build_schedule, plan_stages

    rank, p, m = dist.get_rank(), dist.get_world_size(), args.microbatches
    t_f = args.forward_ms / 1000.0 / v
    t_half_b = args.backward_ratio * args.forward_ms / 1000.0 / v / 2
    # One block per stage, p x v stages; plan_stages places them (looped, or V for zbv).
    layout = plan_stages(p * v, p, v, schedule_name, 1.0, 0.0, 0.0, None)
    ToyStage = _toy_stage_cls()
    events: list[list] = []
    stages = []
    for s in layout.stages_of(rank):
        stage = PipelineStage(ToyStage(t_f, t_half_b, t_half_b), s, layout.num_stages, torch.device("cpu"))
        stage.forward_one_chunk = _timed(stage.forward_one_chunk, s, lambda a, k: "F", events)
        stage.backward_one_chunk = _timed(stage.backward_one_chunk, s, _full_backward, events)
        stage.backward_weight_one_chunk = _timed(stage.backward_weight_one_chunk, s, lambda a, k: "W", events)
        stages.append(stage)
    schedule = build_schedule(schedule_name, stages, m, lambda out, target: (out * out).mean())
    has_first, has_last = 0 in layout.stages_of(rank), layout.num_stages - 1 in layout.stages_of(rank)
    x = torch.randn(m * args.microbatch_size, WIDTH)
    target = torch.zeros(m * args.microbatch_size, WIDTH)

    steps = []
    for i in range(args.warmup + args.steps):
        events.clear()
        # No collector pauses inside a measured step (a full collection of a process holding torch
        # takes tens of ms); collect between steps instead, as training loops commonly do.
        gc.collect()
        gc.disable()
        dist.barrier()
        start = time.monotonic()
        schedule.step(*((x,) if has_first else ()), target=target if has_last else None)
        end = time.monotonic()
        gc.enable()
        if i >= args.warmup:
            steps.append({"start": start, "end": end, "events": list(events)})
    payload = {"rank": rank, "stages": layout.stages_of(rank), "steps": steps}
    gathered = [None] * p if rank == 0 else None
    dist.gather_object(payload, gathered, dst=0)
    dist.barrier()
    if rank != 0:
        return None
    return {"schedule": schedule_name, "p": p, "v": v, "m": m, "forward_ms": args.forward_ms,
            "backward_ratio": args.backward_ratio, "stage_ranks": list(layout.stage_ranks), "ranks": gathered}


def worker(args: argparse.Namespace) -> None:
    """Runs the configurations of `--configs` in order; rank 0 writes `<out>/<i>.json` after each, so
    the driver sees progress. A configuration that raises writes `<i>.error` and ends the launch."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    out = Path(args.out)
    for i, item in enumerate(args.configs):
        name, v = item.split(":")
        try:
            result = run_one(name, int(v), args)
        except Exception as exc:
            (out / f"{i}.error").write_text(f"rank {dist.get_rank()}: {type(exc).__name__}: {exc}")
            raise
        if result is not None:
            (out / f"{i}.json.tmp").write_text(json.dumps(result))
            (out / f"{i}.json.tmp").rename(out / f"{i}.json")
    dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------
# Analysis.


def simulate(order: dict[str, list[list]], num_stages: int, costs: dict[str, float]) -> float | None:
    """Step time of `order` (per rank, the sequence of compute actions) with the nominal `costs`
    (`titan.report.replay`, the replay `recipes.report` draws a run's schedule with); None when a
    rank ran nothing or the order deadlocks."""
    from titan.report import replay  # here: the worker processes need no matplotlib

    if not order or not all(order.values()):
        return None
    try:
        timed = replay({int(r): [tuple(a) for a in acts] for r, acts in order.items()}, num_stages, costs)
    except ValueError:
        return None
    return max(action[4] for actions in timed for action in actions)


def analyse(result: dict) -> dict:
    """Numbers of one configuration from its raw times. The reported step is the fastest measured
    one: the work is the same every step and other processes on the machine can only add time;
    the median step is kept next to it."""
    p, v, m, sched = result["p"], result["v"], result["m"], result["schedule"]
    t_f = result["forward_ms"] / 1000.0
    t_b = t_f * result["backward_ratio"]
    ideal = m * (t_f + t_b)
    ranks = sorted(result["ranks"], key=lambda r: r["rank"])
    windows = []  # (step time, step index, start)
    for i in range(len(ranks[0]["steps"])):
        start = min(r["steps"][i]["start"] for r in ranks)
        windows.append((max(r["steps"][i]["end"] for r in ranks) - start, i, start))
    times = sorted(w[0] for w in windows)
    median = statistics.median(times)
    step, idx, t0 = min(windows)
    busy = [sum(e[4] - e[3] for e in r["steps"][idx]["events"]) for r in ranks]
    idle = [1 - b / step for b in busy]
    stage_costs = {"F": t_f / v, "B": t_b / v, "I": t_b / v / 2, "W": t_b / v / 2}
    # The order each rank ran its actions in, as measured (static for every torch schedule).
    order = {str(r["rank"]): [e[:3] for e in sorted(r["steps"][idx]["events"], key=lambda e: e[3])] for r in ranks}
    sim = simulate(order, p * v, stage_costs)
    closed = (p - 1) / (v * m) if sched in ("gpipe", "1f1b", "interleaved_1f1b") else None
    bubble, bubble_median = (step - ideal) / ideal, (median - ideal) / ideal
    timeline = [[[e[0], e[1], e[2], e[3] - t0, e[4] - t0] for e in r["steps"][idx]["events"]] for r in ranks]
    return {
        "schedule": sched, "p": p, "v": v, "m": m, "ideal_s": ideal, "step_s": step, "median_s": median,
        "steps_s": [w[0] for w in windows],
        "bubble": bubble, "theory": closed, "ratio": bubble / closed if closed else None,
        "ratio_median": bubble_median / closed if closed else None,
        "sim_s": sim, "sim_bubble": (sim - ideal) / ideal if sim else None,
        "busy_s": busy, "idle": idle, "idle_theory": (p - 1) / (v * m + p - 1) if closed else None,
        "goal": GOALS.get((sched, v)), "timeline": timeline, "stage_ranks": result["stage_ranks"],
    }


def add_relative(rows: list[dict]) -> None:
    """Step time against 1F1B's at the same p, and its theory."""
    base = {r["p"]: r for r in rows if r["schedule"] == "1f1b" and "error" not in r}
    for r in rows:
        if "error" in r or r["p"] not in base:
            continue
        p, v, m = r["p"], r["v"], r["m"]
        r["vs_1f1b"] = r["step_s"] / base[p]["step_s"]
        if r["schedule"] in ("1f1b", "interleaved_1f1b", "gpipe"):
            r["vs_1f1b_theory"] = ((v * m + p - 1) / v) / (m + p - 1)
        elif r["sim_s"] and base[p]["sim_s"]:
            r["vs_1f1b_theory"] = r["sim_s"] / base[p]["sim_s"]


def table(rows: list[dict]) -> str:
    head = ("p", "schedule", "v", "m", "step s", "median s", "ideal s", "sim s", "bubble", "theory",
            "meas/theory (median)", "idle min-max", "vs 1f1b", "theory", "goal")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['p']} | {r['schedule']} | {r['v']} | {r['m']} | FAILED: {r['error']} |"
                         + " |" * (len(head) - 5))
            continue

        def f(x, fmt="{:.3f}"):
            return "-" if x is None else fmt.format(x)

        goal = "-"
        if r["goal"]:
            goal = f"<= {r['goal']:.2f} " + ("met" if r["ratio"] <= r["goal"] else "MISSED")
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f} ({r['ratio_median']:.2f})"
        lines.append("| " + " | ".join([
            str(r["p"]), r["schedule"], str(r["v"]), str(r["m"]), f(r["step_s"]), f(r["median_s"]), f(r["ideal_s"]),
            f(r["sim_s"]), f(r["bubble"]), f(r["theory"]), ratio,
            f"{min(r['idle']):.3f}-{max(r['idle']):.3f}", f(r.get("vs_1f1b")), f(r.get("vs_1f1b_theory")), goal,
        ]) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# PNG, drawn with matplotlib by titan.plots (the timeline picture `recipes.report` draws too).


def draw(rows: list[dict], path: Path) -> None:
    """One panel per configuration, all on one time axis: a row per rank, a box per action (F blue,
    B orange, I green, W purple; lighter = later stage; microbatch number inside), idle time grey up
    to the step's end, and a red line where the same schedule would end with free communication
    (``sim``)."""
    from titan.plots import Timeline, draw_timelines  # here: the worker processes draw nothing

    panels = []
    for r in rows:
        if "error" in r:
            continue
        title = (f"{r['schedule']}  p={r['p']} v={r['v']} m={r['m']}: step {r['step_s']:.2f} s, "
                 f"ideal {r['ideal_s']:.2f} s, bubble {r['bubble']:.0%}"
                 + (f" (theory {r['theory']:.0%})" if r["theory"] else "")
                 + (f", sim {r['sim_s']:.2f} s" if r["sim_s"] else ""))
        panels.append(Timeline(title, r["timeline"], len(r["stage_ranks"]), r["step_s"], r["sim_s"]))
    if panels:
        draw_timelines(panels, path, "time (s)", "end with free communication (sim)")


# --------------------------------------------------------------------------------------------------
# Driver.


def _descendants(pid: int) -> list[int]:
    """Process ids below `pid` (torchrun starts its workers in sessions of their own)."""
    parents: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _stop(proc: subprocess.Popen) -> None:
    """Stop a hung launch: SIGTERM to torchrun (it stops its workers), then SIGKILL to whatever of
    it is left, by process id."""
    workers = _descendants(proc.pid)
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for pid in workers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _launch(p: int, configs: list[tuple[str, int]], out: Path, args: argparse.Namespace,
            progress) -> tuple[int | None, str]:
    """One torchrun launch running `configs` in turn (`progress(i)` as each finishes). Killed when
    no configuration finishes within --timeout seconds. Returns (exit code or None when killed,
    output tail)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={p}",
           "-m", "benchmarks.pipeline_bubble", "--worker", "--configs", *[f"{s}:{v}" for s, v in configs],
           "--microbatches", str(args.microbatches), "--microbatch-size", str(args.microbatch_size),
           "--forward-ms", str(args.forward_ms), "--backward-ratio", str(args.backward_ratio),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(x for x in (str(REPO), os.environ.get("PYTHONPATH")) if x))
    log = out / "launch.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
        done, last = -1, time.monotonic()
        while proc.poll() is None:
            time.sleep(0.2)
            n = sum(1 for i in range(len(configs)) if (out / f"{i}.json").exists())
            if n != done:
                for i in range(max(done, 0), n):
                    progress(i)
                done, last = n, time.monotonic()
            elif time.monotonic() - last > args.timeout:
                _stop(proc)
                return None, log.read_text()[-4000:]
    return proc.returncode, log.read_text()[-4000:]


def run_configs(p: int, configs: list[tuple[str, int]], args: argparse.Namespace) -> list[dict]:
    """Results of every configuration at pp degree `p`, in order. They share launches (a launch
    costs several seconds); after a launch fails, the configuration it failed on is reported
    as failed and the ones after it run in a fresh launch."""
    results: list[dict] = []
    pending = list(configs)
    begin = time.monotonic()
    while pending:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            def progress(i: int, pending=pending) -> None:
                schedule, v = pending[i]
                print(f"[{time.monotonic() - begin:6.1f}s] p={p} {schedule} v={v}: ok", file=sys.stderr, flush=True)

            rc, tail = _launch(p, pending, out, args, progress)
            ran = 0
            for i in range(len(pending)):
                f = out / f"{i}.json"
                if not f.exists():
                    break
                results.append(json.loads(f.read_text()))
                ran += 1
            if ran == len(pending):
                break
            schedule, v = pending[ran]
            errors = sorted(out.glob(f"{ran}.error"))
            if errors:
                why = errors[0].read_text().strip().splitlines()[0][:400]
            elif rc is None:
                why = f"no progress for {args.timeout:.0f}s (hang), launch killed"
            else:
                why = f"launch exited with code {rc}"
            results.append({"schedule": schedule, "v": v, "p": p, "m": args.microbatches, "error": why, "log": tail})
            print(f"[{time.monotonic() - begin:6.1f}s] p={p} {schedule} v={v}: FAILED: {why}", file=sys.stderr,
                  flush=True)
            pending = pending[ran + 1:]
    return results


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pp", type=int, nargs="+", default=[2, 4], help="pipeline degrees (ranks) to measure")
    ap.add_argument("--schedules", nargs="+", default=None,
                    help="configurations as schedule:v (default: "
                    + " ".join(f"{s}:{v}" for s, v in CONFIGS) + ")")
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--microbatch-size", type=int, default=2)
    ap.add_argument("--forward-ms", type=float, default=150.0,
                    help="forward cost per rank and microbatch, split over its v stages")
    ap.add_argument("--backward-ratio", type=float, default=2.0, help="backward cost / forward cost")
    ap.add_argument("--steps", type=int, default=2, help="measured steps (the fastest is reported, and the median)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=90.0,
                    help="seconds a launch may go without finishing a configuration before it is killed")
    ap.add_argument("--json", type=Path, help="write all raw times here")
    ap.add_argument("--from-json", type=Path, help="analyse / draw the raw times of an earlier --json, run nothing")
    ap.add_argument("--png", type=Path, nargs="?", const=DEFAULT_PNG,
                    help="draw the timelines of the --png-pp configurations "
                    f"(default path {DEFAULT_PNG.relative_to(REPO)})")
    ap.add_argument("--png-pp", type=int, default=None, help="pp degree drawn in --png (default: the largest)")
    ap.add_argument("--png-each", type=Path, help="also write one PNG per configuration into this folder")
    # worker-only (names chosen so that torchrun's own parser does not claim them as prefixes)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--configs", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return

    if args.from_json:
        raw = json.loads(args.from_json.read_text())
    else:
        configs = list(CONFIGS)
        if args.schedules:
            configs = [(s.split(":")[0], int(s.split(":")[1]) if ":" in s else 1) for s in args.schedules]
        raw = []
        for p in args.pp:
            raw.extend(run_configs(p, configs, args))
    rows = [r if "error" in r else analyse(r) for r in raw]
    add_relative(rows)
    print(table(rows))
    for r in rows:
        if "error" not in r:
            print(f"p={r['p']} {r['schedule']} v={r['v']}: steps {', '.join(f'{s:.3f}' for s in r['steps_s'])} s; "
                  f"idle per rank {', '.join(f'{i:.3f}' for i in r['idle'])}"
                  + (f" (theory {r['idle_theory']:.3f})" if r["idle_theory"] else ""))
        elif r.get("log"):
            print(f"--- p={r['p']} {r['schedule']} v={r['v']} failed; end of its launch's output:\n{r['log']}",
                  file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(raw))
    if args.png:
        pp = args.png_pp or max(r["p"] for r in rows)
        draw([r for r in rows if r["p"] == pp], args.png)
        print(f"wrote {args.png}")
    if args.png_each:
        for r in rows:
            if "error" not in r:
                draw([r], args.png_each / f"pipeline_p{r['p']}_{r['schedule']}_v{r['v']}.png")
        print(f"wrote one PNG per configuration to {args.png_each}")


if __name__ == "__main__":
    main()
