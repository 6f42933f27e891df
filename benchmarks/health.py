"""Health checks (issue 13): their step-time overhead on the normal path, and the time from a hang
to the stack dumps, measured in one run.

    python -m benchmarks.health [--model small] [--steps 12] [--warmup 2] [--rounds 3] [--goal 0.01]
                                [--busy-threshold 0.5] [--retries 0] [--hang-step 8] [--hang-factor 10]
                                [--timeout-s 10] [--long-limit 6] [--skip-overhead] [--skip-hang]

(1) Overhead. The recipe has no switch that turns the health machinery off, so what it adds per step
is measured piece by piece and set against the real step time:

(a) ``benchmarks/health_worker.py micro`` under ``torchrun --nproc-per-node 2`` (1 thread per rank)
    builds the objects as ``recipes/pretrain.py`` does, from the default config: ``HealthPolicy``,
    ``FaultInjection`` (``debug.*`` off), ``HangWatchdog`` (``hang_factor`` 10, its thread running),
    ``HangInjection``, ``StepProfiler`` (off), ``StepTiming``, with the flight recorder installed by
    ``init_process_group``. It times what the trainer calls for them on every step (every hook's
    ``begin`` and ``end`` in the recipe's order, ``after_backward``, ``judge`` over a full spike
    window) against an empty loop; ``StepTiming.metrics`` (all-gather + ``ranks.jsonl`` line +
    straggler test) in lockstep, what a logged step adds; the flight recorder's cost per collective
    (its wrapper around a no-op against the bare no-op, and 1-element ``all_reduce`` loops installed
    against uninstalled, alternating); the watchdog thread's CPU time. The larger rank counts.
(b) ``model=small`` runs of ``recipes.pretrain`` (2 ranks x 1 thread, ``--steps`` steps,
    ``log_interval=1``, no eval, no checkpoints), through ``health_worker recipe``: ``--variant on``
    is the recipe unchanged (it also counts the collectives each step issues, from the flight
    recorder's sequence numbers at each step's begin and end); ``--variant off`` is the benchmark's
    own off-switch (no flight recorder; watchdog, hang and fault injection and step timing out of the
    trainer; ``judge`` applies every step). They alternate in ``--rounds``; a run's number is the
    median step time (tokens per step / ``tokens_per_s``) after ``--warmup`` steps.
(c) Overhead per step = the per-step calls + collectives per step x the recorder's cost per
    collective + the watchdog thread's CPU per second x the step time + ``StepTiming.metrics`` /
    ``log_interval``, for ``log_interval`` 1 (worst case) and 10 (the default), over the median step
    time of the ``on`` runs. Goal <= ``--goal`` (1%). The on / off step-time ratio of (b) is the
    end-to-end cross-check; at a few per cent of noise it cannot resolve a 0.1% difference.

(2) Time from fault to stack dump: ``torchrun --nproc-per-node 2 -m recipes.pretrain model=debug
    debug.hang_rank=1 debug.hang_step=<k>`` with ``parallel.timeout_s`` and
    ``training.health.hang_factor``; once with ``--hang-factor`` (the default 10: the watchdog's
    3 s floor, ``min_seconds``, decides) and once with a factor chosen from the first run's median
    step so the limit is about ``--long-limit`` s (the factor decides), the timeout raised to at
    least three times that (the median moves with the machine's load). The benchmark timestamps the stderr lines as they arrive and polls
    ``<run.dir>/hang/rank-<N>.txt`` every 10 ms: from the injection (rank 1's line ``stops
    answering at step k``, printed at the hang step's start) to the hung rank's watchdog dump, the
    live rank's watchdog dump, the live rank's collective-timeout dump (exit 3), and the hung rank's
    note that torchrun's SIGTERM ended it. Expected: the watchdog dumps at the limit
    ``max(hang_factor x median step, 3 s)`` plus at most the polling period (0.25 s); the timeout
    dump at ``parallel.timeout_s`` (plus the step's time to its first collective).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.overhead import busy_cpu_seconds, own_children_cpu_seconds

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("on", "off")
MIN_SECONDS, POLL_S = 3.0, 0.25  # HangWatchdog's defaults, as recipes/pretrain.py builds it
DUMP_TITLE = re.compile(r"step (\d+) has run ([\d.]+) s, over ([\d.]+) s \(training\.health\.hang_factor=([\d.]+) "
                        r"x the median step time ([\d.]+) s\)")


def env(threads: int = 1) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "WANDB_MODE": "disabled"}


def torchrun(ranks: int, module: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", "-m", module]


def run(cmd: list[str], what: str) -> float:
    """Run `cmd`; the cores other processes kept busy meanwhile."""
    busy0, mine0, wall0 = busy_cpu_seconds(), own_children_cpu_seconds(), time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True)
    wall = time.perf_counter() - wall0
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed ({proc.returncode}):\n{' '.join(cmd)}\n{proc.stderr[-4000:]}")
    return max(0.0, ((busy_cpu_seconds() - busy0) - (own_children_cpu_seconds() - mine0)) / wall)


def us(seconds: float) -> str:
    return f"{seconds * 1e6:9.1f}"


# ---------------------------------------------------------------------------------------------- (1a)


def micro(tmp: Path) -> list[dict]:
    out = tmp / "micro"
    others = run([*torchrun(2, "benchmarks.health_worker"), "micro", "--out", str(out)], "micro worker")
    records = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    print(f"\n(1a) per-call costs, 2 ranks x 1 thread, median of {records[0]['rounds']} rounds, microseconds "
          f"(others kept {others:.2f} cores busy)")
    print(f"{'what':40s} {'rank 0':>9s} {'rank 1':>9s}")
    for name in records[0]["per_step_s"]:
        print(f"{name:40s} {us(records[0]['per_step_s'][name])} {us(records[1]['per_step_s'][name])}")
    rows = [("StepTiming.metrics (logged step)", "metrics_s"), ("  its first call (host names too)", "metrics_first_s"),
            ("all_reduce, 1 float, recorder on", "all_reduce_recorded_s"),
            ("all_reduce, 1 float, recorder off", "all_reduce_bare_s"),
            ("  median per-round difference", "all_reduce_diff_s")]
    for label, key in rows:
        print(f"{label:40s} {us(records[0][key])} {us(records[1][key])}")
    for name in records[0]["wrapper_s"]:
        print(f"{'recorder wrapper: ' + name:40s} {us(records[0]['wrapper_s'][name])} "
              f"{us(records[1]['wrapper_s'][name])}")
    for r in records:
        r["thread_cpu_per_s"] = r["watchdog_thread_cpu_s"] / r["wall_s"]
    print(f"{'watchdog thread CPU per second of wall':40s} {us(records[0]['thread_cpu_per_s'])} "
          f"{us(records[1]['thread_cpu_per_s'])}")
    return records


def costs(records: list[dict]) -> dict[str, float]:
    """Per-step costs, the larger rank's each."""
    def top(fn):
        return max(fn(r) for r in records)
    return {
        "calls": top(lambda r: r["per_step_s"]["all per-step calls"] - r["per_step_s"]["empty loop"]),
        "judge": top(lambda r: r["per_step_s"]["HealthPolicy.judge"] - r["per_step_s"]["empty loop"]),
        "wrapper": top(lambda r: max(r["wrapper_s"][f"{n} wrapped"] - r["wrapper_s"][f"{n} bare"]
                                     for n in ("all_reduce", "all_gather_into_tensor"))),
        "collective_diff": top(lambda r: r["all_reduce_diff_s"]),
        "thread_per_s": top(lambda r: r["thread_cpu_per_s"]),
        "metrics": top(lambda r: r["metrics_s"]),
    }


# ---------------------------------------------------------------------------------------------- (1b)


def recipe_run(variant: str, args: argparse.Namespace, tmp: Path) -> tuple[list[float], dict | None, float]:
    """One fresh run: step times after warmup, the collective counts (on), the cores others kept busy."""
    run_dir = tmp / f"{variant}-{time.monotonic_ns()}"
    count = run_dir.with_name(run_dir.name + "-count")
    cmd = [*torchrun(2, "benchmarks.health_worker"), "recipe", "--variant", variant,
           *(["--count", str(count)] if variant == "on" else []), "--",
           f"model={args.model}", f"training.steps={args.steps}", "training.num_threads=1", "logging.log_interval=1",
           "eval.interval=0", "checkpoint.enabled=false", "logging.progress_bar=false", f"run.dir={run_dir}"]
    others = run(cmd, f"recipe {variant}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    per_step = rows[-1]["tokens"] / rows[-1]["step"]
    times = [per_step / r["tokens_per_s"] for r in rows if r["step"] > args.warmup]
    counts = None
    if variant == "on":
        counts = {r: json.loads((count / f"rank{r}.json").read_text())["marks"] for r in range(2)}
    return times, counts, others


def collectives_per_step(counts: dict, warmup: int) -> tuple[float, float]:
    """(median collectives inside a step, between its end and the next step's begin), max over ranks."""
    inside, between = [], []
    for marks in counts.values():
        begin = {step: seq for step, is_begin, seq in marks if is_begin}
        end = {step: seq for step, is_begin, seq in marks if not is_begin}
        steps = sorted(s for s in begin if s > warmup and s in end and s + 1 in begin)
        inside.append(statistics.median(end[s] - begin[s] for s in steps))
        between.append(statistics.median(begin[s + 1] - end[s] for s in steps))
    return max(inside), max(between)


def recipe_rounds(args: argparse.Namespace, tmp: Path) -> tuple[dict[str, list[float]], tuple[float, float]]:
    print(f"\n(1b) recipe step time, model={args.model}, 2 ranks x 1 thread, log_interval=1, {args.steps} steps "
          f"(median after {args.warmup}), {args.rounds} alternating rounds")
    print(f"{'round':>5s} {'variant':8s} {'median s':>8s} {'min s':>6s} {'max s':>6s} {'others busy':>11s} "
          f"{'tries':>5s}")
    medians: dict[str, list[float]] = {v: [] for v in VARIANTS}
    counted: list[tuple[float, float]] = []
    for round_index in range(1, args.rounds + 1):
        for variant in (VARIANTS if round_index % 2 else VARIANTS[::-1]):
            for tries in range(1, args.retries + 2):
                times, counts, others = recipe_run(variant, args, tmp)
                if others <= args.busy_threshold:
                    break
            medians[variant].append(statistics.median(times))
            if counts is not None:
                counted.append(collectives_per_step(counts, args.warmup))
            print(f"{round_index:5d} {variant:8s} {medians[variant][-1]:8.3f} {min(times):6.3f} {max(times):6.3f} "
                  f"{others:6.2f} cores {tries:5d}", flush=True)
    inside = max(c[0] for c in counted)
    between = max(c[1] for c in counted)
    return medians, (inside, between)


def report_overhead(c: dict[str, float], medians: dict[str, list[float]], inside: float, between: float,
                    goal: float) -> bool:
    step = statistics.median(medians["on"])
    # On a logged step, the `between` collectives hold StepTiming.metrics' all-gather (its recorder
    # cost is inside the metrics time) and the preemption check's all-reduce (every step).
    n = inside + between - 1
    print(f"\n(1c) collectives per step (flight recorder): {inside:g} inside the step + {between:g} between steps "
          f"(the preemption check's all_reduce, every step; StepTiming.metrics' all-gather, logged steps): "
          f"{n:g} per step on the normal path, + 1 on a logged step (in the metrics time)")
    recorder = max(c["wrapper"], c["collective_diff"])
    print(f"recorder cost per collective: wrapper {c['wrapper'] * 1e6:.1f} us, real all_reduce difference "
          f"{c['collective_diff'] * 1e6:.1f} us; counted: the larger, {recorder * 1e6:.1f} us")
    thread = c["thread_per_s"] * step
    print(f"median step time (on): {step:.3f} s\n")
    print(f"{'per step':44s} {'log_interval=1':>15s} {'log_interval=10':>15s}")
    parts = [("hook begin/end + after_backward + judge", c["calls"], c["calls"]),
             ("  of which HealthPolicy.judge", c["judge"], c["judge"]),
             (f"flight recorder ({n:g} x {recorder * 1e6:.1f} us)", n * recorder, n * recorder),
             ("watchdog thread CPU", thread, thread),
             ("StepTiming.metrics / log_interval", c["metrics"], c["metrics"] / 10)]
    for label, one, ten in parts:
        print(f"{label:44s} {one * 1e3:12.3f} ms {ten * 1e3:12.3f} ms")
    totals = [sum(p[i] for p in parts if not p[0].startswith("  ")) for i in (1, 2)]
    print(f"{'total':44s} {totals[0] * 1e3:12.3f} ms {totals[1] * 1e3:12.3f} ms")
    ratios = [t / step for t in totals]
    met = all(r <= goal for r in ratios)
    print(f"{'total / step time':44s} {ratios[0]:14.4%} {ratios[1]:14.4%}   goal <= {goal:.0%}: "
          f"{'met' if met else 'NOT met'}")
    per_round = [a / b for a, b in zip(medians["on"], medians["off"])]
    print(f"\nend-to-end cross-check: on / off step time {statistics.median(per_round):.3f} (rounds "
          f"{', '.join(f'{r:.3f}' for r in per_round)}); medians {step:.3f} s / "
          f"{statistics.median(medians['off']):.3f} s")
    return met


# ---------------------------------------------------------------------------------------------- (2)


MARKERS = {  # name -> (file, text that shows the section is written)
    "hung rank 1: watchdog dump": ("rank-1.txt", "has run"),
    "live rank 0: watchdog dump": ("rank-0.txt", "has run"),
    "live rank 0: timeout dump (exit 3)": ("rank-0.txt", "a collective failed"),
    "hung rank 1: SIGTERM note": ("rank-1.txt", "SIGTERM received"),
}


def hang_run(args: argparse.Namespace, factor: float, timeout: float, tmp: Path) -> dict:
    run_dir = tmp / f"hang-{factor:g}-{time.monotonic_ns()}"
    k = args.hang_step
    cmd = [*torchrun(2, "recipes.pretrain"), "model=debug", f"training.steps={k + 4}", "training.num_threads=1",
           "logging.log_interval=1", "eval.interval=0", "checkpoint.enabled=false", "logging.progress_bar=false",
           "debug.hang_rank=1", f"debug.hang_step={k}", f"parallel.timeout_s={timeout:g}",
           f"training.health.hang_factor={factor:g}", f"run.dir={run_dir}"]
    lines: list[tuple[float, str]] = []
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            bufsize=1)

    def read() -> None:
        for line in proc.stderr:
            lines.append((time.time(), line))
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    seen: dict[str, float] = {}
    deadline = time.time() + timeout + 120
    while proc.poll() is None and time.time() < deadline:
        now = time.time()
        for name, (file, text) in MARKERS.items():
            path = run_dir / "hang" / file
            if name not in seen and path.exists() and text in path.read_text(errors="replace"):
                seen[name] = now
        time.sleep(0.01)
    ended = time.time()
    if proc.poll() is None:
        proc.kill()
        raise SystemExit(f"hang run did not end within {timeout + 120:.0f} s:\n{' '.join(cmd)}")
    reader.join(10)
    for name, (file, text) in MARKERS.items():  # written in the last 10 ms: count them at the exit
        path = run_dir / "hang" / file
        if name not in seen and path.exists() and text in path.read_text(errors="replace"):
            seen[name] = ended
    err = "".join(line for _, line in lines)
    injected = next((t for t, line in lines if "stops answering at step" in line), None)
    if injected is None:
        raise SystemExit(f"no injection line in the hang run's stderr:\n{' '.join(cmd)}\n{err[-4000:]}")
    hung, live = ((run_dir / "hang" / f"rank-{r}.txt").read_text() if (run_dir / "hang" / f"rank-{r}.txt").exists()
                  else "" for r in (1, 0))
    title = DUMP_TITLE.search(hung)
    timeout_section = live[live.find("a collective failed"):] if "a collective failed" in live else ""
    waited = re.search(r"([\d.]+)s ago .*DID NOT RETURN", timeout_section)
    codes = {int(r): int(c) for r, c in re.findall(r"rank\s*:\s*(\d+) \(local_rank.*\n\s*exitcode\s*:\s*(-?\d+)", err)}
    rows = [json.loads(line) for line in (run_dir / "ranks.jsonl").read_text().splitlines() if line.strip()]
    before = [r["step_s"][1] for r in rows if 2 <= r["step"] < k]  # the watchdog leaves out the first step
    return {"cmd": cmd, "factor": factor, "timeout": timeout, "after": {n: t - injected for n, t in seen.items()},
            "ended": ended - injected, "returncode": proc.returncode, "codes": codes,
            "title": title.groups() if title else None, "waited": float(waited.group(1)) if waited else None,
            "median_step": statistics.median(before) if before else float("nan"),
            "stack": "injected_hang_sleeps_forever" in hung}


def report_hang(result: dict) -> bool:
    factor, timeout, after = result["factor"], result["timeout"], result["after"]
    expected_limit = max(factor * result["median_step"], MIN_SECONDS)
    print(f"\n$ {' '.join(result['cmd'][result['cmd'].index('recipes.pretrain') + 1:])}")
    if result["title"]:
        step, ran, limit, _, median = result["title"]
        print(f"hung rank's dump: step {step} has run {ran} s, over {limit} s (hang_factor {factor:g} x its median "
              f"{median} s, floor {MIN_SECONDS:g} s); rank 1's median step in ranks.jsonl {result['median_step']:.3f} s "
              f"-> expected limit {expected_limit:.2f} s")
        limit = float(limit)
    else:
        print("hung rank's dump: NO watchdog title found")
        limit = expected_limit
    print(f"{'after the injection':36s} {'s':>7s}  expected")
    ok = True
    bounds = {"hung rank 1: watchdog dump": (limit, limit + POLL_S + 0.15),
              "live rank 0: watchdog dump": (limit - 0.5, limit + POLL_S + 0.5),
              "live rank 0: timeout dump (exit 3)": (timeout, timeout + 1.5)}
    for name in MARKERS:
        t = after.get(name)
        low, high = bounds.get(name, (None, None))
        expect = f"{low:.2f} .. {high:.2f}" if low is not None else "after the timeout dump (torchrun's SIGTERM)"
        good = t is not None and (low is None or low <= t <= high)
        ok &= good
        print(f"{name:36s} {'-' if t is None else f'{t:7.2f}'}  {expect}  {'ok' if good else 'OUT'}")
    print(f"{'job ended (torchrun exit ' + str(result['returncode']) + ')':36s} {result['ended']:7.2f}  "
          f"exit codes {result['codes']}")
    if result["waited"] is not None:
        print(f"live rank's collective that never returned: issued {result['waited']:.2f} s before its timeout dump "
              f"(parallel.timeout_s={timeout:g})")
    ok &= result["codes"].get(0) == 3 and result["stack"]
    return ok


def hangs(args: argparse.Namespace, tmp: Path) -> tuple[bool, list[dict]]:
    print(f"\n(2) time from fault to stack dump: model=debug, 2 ranks x 1 thread, debug.hang_rank=1 "
          f"debug.hang_step={args.hang_step}")
    first = hang_run(args, args.hang_factor, args.timeout_s, tmp)
    ok = report_hang(first)
    median = float(first["title"][4]) if first["title"] else first["median_step"]
    factor = math.ceil(args.long_limit / median)
    second = hang_run(args, factor, max(args.timeout_s, 3 * args.long_limit), tmp)
    ok &= report_hang(second)
    return ok, [first, second]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="small", help="(1b): the model of the step-time runs")
    parser.add_argument("--steps", type=int, default=12, help="(1b): optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="(1b): leading steps left out")
    parser.add_argument("--rounds", type=int, default=3, help="(1b): alternating on / off rounds")
    parser.add_argument("--goal", type=float, default=0.01, help="(1c): overhead / step time")
    parser.add_argument("--busy-threshold", type=float, default=0.5,
                        help="(1b): repeat a run during which other processes kept more cores than this busy")
    parser.add_argument("--retries", type=int, default=0, help="(1b): repeats of a busy run")
    parser.add_argument("--hang-step", type=int, default=8, help="(2): the step at which rank 1 hangs")
    parser.add_argument("--hang-factor", type=float, default=10.0, help="(2): hang_factor of the first run")
    parser.add_argument("--timeout-s", type=float, default=10.0, help="(2): parallel.timeout_s of the first run")
    parser.add_argument("--long-limit", type=float, default=6.0,
                        help="(2): the second run's hang_factor is chosen for a limit of about this many s")
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--skip-hang", action="store_true")
    args = parser.parse_args(argv)
    if args.steps <= args.warmup + 2:
        parser.error("--steps must leave steps after --warmup")
    if args.hang_step < 4:
        parser.error("--hang-step must be >= 4 (the watchdog needs steps to take a median of)")

    print(f"health: {os.cpu_count()} CPUs, 1-min load {os.getloadavg()[0]:.2f}", flush=True)
    began = time.perf_counter()
    verdicts = []
    with tempfile.TemporaryDirectory(prefix="titan-health-") as tmp:
        if not args.skip_overhead:
            c = costs(micro(Path(tmp)))
            medians, (inside, between) = recipe_rounds(args, Path(tmp))
            met = report_overhead(c, medians, inside, between, args.goal)
            verdicts.append(f"overhead <= {args.goal:.0%} of the step: {'met' if met else 'NOT met'}")
        if not args.skip_hang:
            ok, results = hangs(args, Path(tmp))
            verdicts.append(f"hang dumps within the expected bounds: {'yes' if ok else 'NO'}")
            if not args.skip_overhead:
                debug = statistics.median(r["median_step"] for r in results)
                total = c["calls"] + c["metrics"] + 20 * max(c["wrapper"], c["collective_diff"]) + \
                    c["thread_per_s"] * debug
                print(f"\nfor scale: the log_interval=1 overhead (20 collectives counted, more than debug issues) against model=debug's median "
                      f"step in these runs ({debug:.3f} s): {total / debug:.2%}")
    print(f"\n{'; '.join(verdicts)}")
    print(f"total wall time {time.perf_counter() - began:.0f}s")


if __name__ == "__main__":
    main()
