"""What a run folder says about its run, for `recipes.report`: read what exists of it and summarize.

A run may be finished, running or crashed: every file may be missing, and a JSON-lines file may end
in a torn line (dropped with a warning). The files: ``config.yaml`` (the resolved config),
``metrics.jsonl`` (a row per logged step), ``ranks.jsonl`` (every rank's step times),
``skipped_data.jsonl`` (a row per rollback), ``events.jsonl`` (start, resume, rollback, straggler,
done, stopped, failed), ``checkpoints/step-<N>/`` (committed when holding ``COMMITTED``) and
``run.lock`` (held while the run runs).
"""

from __future__ import annotations

import fcntl
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from parallel.mesh import ParallelDims
from parallel.pipeline import schedule_actions
from titan.build import pipeline_layout, pipeline_microbatches
from titan.checkpoint import committed_steps
from titan.config import PretrainConfig
from titan.metrics import read_jsonl
from titan.run_dir import LOCK_FILE

RUN_FILES = ("config.yaml", "metrics.jsonl", "events.jsonl")
LAST_LOGGED = 10  # throughput and MFU: the mean over this many last logged steps
SHOWN = 3  # skipped steps listed with their reasons
FINAL_EVENTS = {"done": "finished", "stopped": "stopped", "failed": "failed"}
# Nominal costs of one stage's actions in the pipeline picture, in forwards of one stage.
STAGE_COSTS = {"F": 1.0, "B": 2.0, "I": 1.0, "W": 1.0}

Action = tuple[int, str, int, float, float]  # stage, kind (F/B/I/W), microbatch, start, end


class NotARunError(ValueError):
    """The folder does not exist or holds none of a run's files."""


def _stderr(text: str) -> None:
    print(text, file=sys.stderr)


@dataclass
class Run:
    dir: Path
    config: DictConfig  # empty when config.yaml is missing
    metrics: list[dict[str, Any]]  # one row per logged step, by step
    ranks: list[dict[str, Any]]
    skipped_data: list[dict[str, Any]]
    events: list[dict[str, Any]]
    checkpoints: list[int]  # steps of the committed checkpoints, oldest first
    locked: bool  # run.lock is held: a process runs in the folder

    def setting(self, key: str, default: Any = None) -> Any:
        """A config value by dotted key (`training.steps`)."""
        return OmegaConf.select(self.config, key, default=default)

    @property
    def world_size(self) -> int | None:
        """Ranks of the latest start or resume (else of the per-rank times), or None when unknown."""
        sizes = [e["world_size"] for e in self.events if e.get("event") in ("start", "resume") and "world_size" in e]
        if sizes:
            return sizes[-1]
        return len(self.ranks[-1]["compute_s"]) if self.ranks else None


def read_run(run_dir: Path, warn: Callable[[str], None] = _stderr) -> Run:
    """Everything the folder holds about its run; raises NotARunError for a folder that is no run's."""
    if not run_dir.is_dir():
        raise NotARunError(f"{run_dir} does not exist or is not a folder.")
    if not any((run_dir / name).is_file() for name in RUN_FILES):
        raise NotARunError(f"{run_dir} is not a run folder: it holds none of {', '.join(RUN_FILES)}.")
    metrics = {row["step"]: row for row in _jsonl(run_dir / "metrics.jsonl", warn)}  # a step logged twice: the last
    return Run(run_dir, _config(run_dir / "config.yaml", warn), [metrics[s] for s in sorted(metrics)],
               _jsonl(run_dir / "ranks.jsonl", warn), _jsonl(run_dir / "skipped_data.jsonl", warn),
               _jsonl(run_dir / "events.jsonl", warn),
               [int(p.name.split("-")[1]) for p in committed_steps(run_dir / "checkpoints")], lock_held(run_dir))


def _jsonl(path: Path, warn: Callable[[str], None]) -> list[dict[str, Any]]:
    return read_jsonl(path, warn) if path.is_file() else []


def _config(path: Path, warn: Callable[[str], None]) -> DictConfig:
    if not path.is_file():
        return OmegaConf.create()
    try:
        return OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException) as exc:
        warn(f"warning: {path} does not parse ({str(exc).splitlines()[0]}); the report goes on without it")
        return OmegaConf.create()


def lock_held(run_dir: Path) -> bool:
    """Whether a process holds the run's lock (tried without waiting); False where locks do not work."""
    path = run_dir / LOCK_FILE
    if not path.is_file():
        return False
    with path.open("rb") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return False
    return False  # closing the file dropped the lock just taken


def status(run: Run) -> str:
    """running, finished, stopped (by a signal: resumable), failed (gave up) or crashed (ended without a word)."""
    if run.locked:
        return "running"
    if run.events:
        return FINAL_EVENTS.get(run.events[-1].get("event"), "crashed")
    steps = run.setting("training.steps")
    return "finished" if run.metrics and steps and run.metrics[-1]["step"] >= steps else "crashed"


def finite(values: list[Any]) -> list[float]:
    """The finite numbers among `values` (a non-finite metric is logged as null)."""
    return [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


def summary(run: Run) -> list[str]:
    """The summary's lines: progress, throughput, losses, skipped steps, stragglers, checkpoints, resumes."""
    rows, final = run.metrics, run.events[-1] if run.events and run.events[-1].get("event") in FINAL_EVENTS else {}
    step = final.get("step", rows[-1]["step"] if rows else 0)
    tokens = final.get("tokens", rows[-1]["tokens"] if rows else 0)
    world = f", {run.world_size} rank{'s' if run.world_size > 1 else ''}" if run.world_size else ""
    why = f" ({final['reason']})" if "reason" in final else ""
    lines = [f"run {run.dir} ({run.setting('run.name', 'unnamed')}): {status(run)}{why}",
             f"steps: {step} of {run.setting('training.steps', '?')}, {tokens:,} tokens{world}"]
    recent = rows[-LAST_LOGGED:]
    speed, mfu = finite([r.get("tokens_per_s") for r in recent]), finite([r.get("mfu") for r in recent])
    memory = finite([r.get("mem_gb") for r in rows])
    if speed:
        lines.append(f"throughput: {statistics.mean(speed):,.0f} tokens/s"
                     + (f", MFU {statistics.mean(mfu):.1%}" if mfu else "")
                     + f" (mean of the last {len(recent)} logged steps)"
                     + (f"; peak memory {max(memory):.2f} GB" if memory else ""))
    lines += [_loss_line(rows, key, label) for key, label in (("loss", "loss"), ("eval_loss", "eval loss"))
              if any(key in r for r in rows)]
    lines += [_skipped_line(run), _rollback_line(run), _straggler_line(run), _checkpoint_line(run), _resume_line(run)]
    comm = {k.split("/", 1)[1]: v for k, v in rows[-1].items() if k.startswith("comm_gb/")} if rows else {}
    if comm:
        lines.append(f"communication at step {rows[-1]['step']} (rank 0, per step): "
                     + ", ".join(f"{dim} {gb * 1e3:.2f} MB" for dim, gb in sorted(comm.items())))
    return lines


def _loss_line(rows: list[dict[str, Any]], key: str, label: str) -> str:
    logged = [(r["step"], r[key]) for r in rows if finite([r.get(key)])]
    if not logged:
        return f"{label}: no finite value logged"
    best = min(logged, key=lambda sv: sv[1])
    return f"{label}: last {logged[-1][1]:.4f} (step {logged[-1][0]}), best {best[1]:.4f} (step {best[0]})"


def _skipped_line(run: Run) -> str:
    skipped = [r for r in run.metrics if r.get("skipped")]
    count = run.metrics[-1].get("skipped_steps", len(skipped)) if run.metrics else 0
    shown = "; ".join(f"step {r['step']}: {r.get('skip_reason', 'no reason logged')}" for r in skipped[:SHOWN])
    more = f"; {len(skipped) - SHOWN} more" if len(skipped) > SHOWN else ""
    return f"skipped steps: {count}" + (f" ({shown}{more})" if skipped else "")


def _rollback_line(run: Run) -> str:
    if not run.skipped_data:
        return "rollbacks: none"
    parts = []
    for r in run.skipped_data:
        ranges = ", ".join(f"{a}..{b - 1}" for a, b in r.get("ranges", []))
        why = r.get("reason") or (f"{r['bad_steps']} bad steps in a row" if "bad_steps" in r else "")
        parts.append(f"at step {r['step']} back to step {r['rolled_back_to']}"
                     + (f", positions {ranges} never drawn again" if ranges else "") + (f" ({why})" if why else ""))
    return f"rollbacks: {len(parts)}: " + "; ".join(parts)


def _straggler_line(run: Run) -> str:
    named = [e for e in run.events if e.get("event") == "straggler"]
    if not named:
        return "stragglers: none named"
    return "stragglers: " + "; ".join(f"rank {e.get('rank')} on {e.get('host', '?')} ({e.get('factor', 0):.1f}x the "
                                      f"median compute time, named at step {e['step']})" for e in named)


def _checkpoint_line(run: Run) -> str:
    if not run.checkpoints:
        return "checkpoints: none committed"
    return (f"checkpoints: {len(run.checkpoints)} committed (steps {', '.join(map(str, run.checkpoints))}); "
            f"newest {run.dir / 'checkpoints' / f'step-{run.checkpoints[-1]}'}")


def _resume_line(run: Run) -> str:
    resumes = [e for e in run.events if e.get("event") == "resume"]
    if not resumes:
        return "resumes: none"
    return f"resumes: {len(resumes)}: " + "; ".join(f"at step {e['step']} from {e.get('from', '?')}" for e in resumes)


@dataclass
class ScheduleReplay:
    """One step of a pipeline schedule replayed with the nominal STAGE_COSTS, communication free."""

    schedule: str
    pp: int
    virtual: int
    microbatches: int
    num_stages: int
    actions: list[list[Action]]  # per pp rank
    end: float

    @property
    def bubble(self) -> float:
        """Time a rank does not compute over its compute time."""
        ideal = self.microbatches * self.virtual * (STAGE_COSTS["F"] + STAGE_COSTS["B"])
        return (self.end - ideal) / ideal


def pipeline_schedule(run: Run) -> ScheduleReplay | str:
    """The schedule of the run's pipeline layout (stages and microbatches derived as the recipe
    does), or why there is none."""
    if run.setting("parallel.pp", 1) <= 1:
        return "the run has no pipeline (parallel.pp = 1)"
    try:
        cfg: PretrainConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(PretrainConfig), run.config))
        p = cfg.parallel
        world = run.world_size or p.pp * p.tp * p.cp * p.dp_replicate * max(p.dp_shard, 1)
        dims = ParallelDims(1, -1, p.tp, p.pp, world, p.cp)  # only the data-parallel size counts here
        layout = pipeline_layout(cfg, p.pp)
        m = pipeline_microbatches(cfg, dims, layout)
        order = schedule_actions(p.pp_schedule, p.pp, p.pp_virtual_stages, m)
    except (ValueError, OmegaConfBaseException) as exc:
        return f"its layout cannot be derived from config.yaml: {str(exc).splitlines()[0]}"
    actions = replay(order, layout.num_stages)
    end = max(a[4] for rank in actions for a in rank)
    return ScheduleReplay(p.pp_schedule, p.pp, p.pp_virtual_stages, m, layout.num_stages, actions, end)


def replay(order: dict[int, list[tuple[int, str, int]]], num_stages: int,
           costs: dict[str, float] = STAGE_COSTS) -> list[list[Action]]:
    """Start and end of every action of `order` (per rank, in run order) with the nominal `costs`,
    each starting once its rank is free and its inputs exist (communication is free). On stage 0
    (whose input needs no gradient) torch runs no I and the whole backward at W. A ValueError when
    the order deadlocks under these dependencies."""
    done: dict[tuple[int, str, int], float] = {}
    timed: dict[int, list[Action]] = {r: [] for r in order}
    free = dict.fromkeys(order, 0.0)
    progress = True
    while progress:
        progress = False
        for r, todo in order.items():
            while len(timed[r]) < len(todo):
                stage, kind, mb = todo[len(timed[r])]
                if kind == "F":
                    deps = [(stage - 1, "F", mb)] if stage > 0 else []
                elif kind in ("B", "I"):
                    deps = [(stage, "F", mb)] + ([(stage + 1, "bwd", mb)] if stage < num_stages - 1 else [])
                else:
                    deps = [(stage, "I", mb)]
                if any(d not in done for d in deps):
                    break
                start = max([free[r], *(done[d] for d in deps)])
                free[r] = done[(stage, kind, mb)] = start + _stage_cost(stage, kind, costs)
                if kind in ("B", "I"):
                    done[(stage, "bwd", mb)] = free[r]
                timed[r].append((stage, kind, mb, start, free[r]))
                progress = True
    if any(len(timed[r]) < len(todo) for r, todo in order.items()):
        raise ValueError("the schedule's order deadlocks")  # torch's schedules never do
    return [timed[r] for r in sorted(timed)]


def _stage_cost(stage: int, kind: str, costs: dict[str, float]) -> float:
    if stage == 0 and kind == "I":
        return 0.0
    if stage == 0 and kind == "W":
        return costs["I"] + costs["W"]
    return costs[kind]
