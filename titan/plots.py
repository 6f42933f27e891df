"""The report's pictures, drawn with matplotlib's Agg backend (PNG files, no display): a run's curves
and per-rank heat map (`write_plots`), and pipeline timelines (`draw_timelines`, which
benchmarks/pipeline_bubble.py draws its measured steps with too)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from titan.report import STAGE_COSTS, Run, finite, pipeline_schedule

KIND_COLORS = {"F": "#346ec8", "B": "#d66028", "I": "#2e9646", "W": "#8c46aa"}
KIND_NAMES = {"F": "F forward", "B": "B backward", "I": "I input grad", "W": "W weight grad"}
IDLE_COLOR = "#e8e8e8"
DPI = 100


@dataclass
class Timeline:
    """One pipeline step: per pp rank, its actions as (stage, kind F/B/I/W, microbatch, start, end)."""

    title: str
    ranks: Sequence[Sequence[Sequence[Any]]]
    num_stages: int
    end: float  # the step's end: a rank's time without an action before it is idle
    marker: float | None = None  # a red line (e.g. where the step would end with free communication)


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")


def _shade(kind: str, stage: int, num_stages: int) -> tuple[float, float, float]:
    """Later stages are lighter shades of their kind's color."""
    amount = 0.5 * stage / max(1, num_stages - 1)
    return tuple(c + (1 - c) * amount for c in to_rgb(KIND_COLORS[kind]))


def draw_timelines(timelines: list[Timeline], path: Path, xlabel: str, marker_label: str = "") -> None:
    """One panel per timeline on one time axis: a row per rank, a box per action (F blue, B orange,
    I green, W purple; lighter = later stage; microbatch number inside), idle time grey up to the
    step's end, and each timeline's marker as a red line."""
    span = max(max([t.end, *(a[4] for rank in t.ranks for a in rank)]) for t in timelines)
    rows = sum(len(t.ranks) for t in timelines)
    width = 14.0
    fig = _figure(width, 1.0 + 0.45 * len(timelines) + 0.3 * rows)
    axes = fig.subplots(len(timelines), 1, sharex=True, squeeze=False,
                        gridspec_kw={"height_ratios": [len(t.ranks) for t in timelines]})[:, 0]
    inches_per_unit = 0.85 * width / span  # the axes take about 85% of the width
    kinds = set()
    for ax, t in zip(axes, timelines):
        for rank, actions in enumerate(t.ranks):
            ax.broken_barh([(0, t.end)], (rank - 0.45, 0.9), facecolors=IDLE_COLOR)
            # At least a pixel wide: stage 0's empty input-gradient backward is left out.
            drawn = [a for a in actions if (a[4] - a[3]) * inches_per_unit * DPI >= 1]
            kinds.update(a[1] for a in drawn)
            ax.broken_barh([(a[3], a[4] - a[3]) for a in drawn], (rank - 0.45, 0.9), edgecolor="white", linewidth=0.6,
                           facecolors=[_shade(a[1], a[0], t.num_stages) for a in drawn])
            for stage, _, mb, start, end in drawn:
                if (end - start) * inches_per_unit * 72 >= 6 * len(str(mb)) + 2:  # fits, in points
                    ax.text((start + end) / 2, rank, str(mb), ha="center", va="center", fontsize=7,
                            color="white" if stage < t.num_stages / 2 else "black")
        if t.marker is not None:
            ax.axvline(t.marker, color="red", linewidth=1.5)
        ax.set_yticks(range(len(t.ranks)), [f"rank {r}" for r in range(len(t.ranks))], fontsize=8)
        ax.set_ylim(len(t.ranks) - 0.5, -0.5)
        ax.set_title(t.title, fontsize=9, loc="left")
    axes[-1].set_xlim(0, span * 1.01)
    axes[-1].set_xlabel(xlabel)
    handles = [Patch(color=KIND_COLORS[k], label=KIND_NAMES[k]) for k in KIND_NAMES if k in kinds]
    handles.append(Patch(color=IDLE_COLOR, label="idle"))
    if marker_label and any(t.marker is not None for t in timelines):
        handles.append(Line2D([], [], color="red", label=marker_label))
    fig.legend(handles=handles, loc="outside upper left", ncol=len(handles), fontsize=8, frameon=False,
               title="lighter = later stage, number = microbatch", title_fontsize=8, alignment="left")
    _save(fig, path)


def write_plots(run: Run, out: Path) -> list[str]:
    """Draw each picture the run has data for into `out`: one line per picture, written or skipped and why."""
    lines = []
    for name, draw in PLOTS:
        why = draw(run, out / name)
        lines.append(f"wrote {out / name}" if why is None else f"skipped {name}: {why}")
    return lines


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """Steps that logged `key`, and its values (nan where null: a non-finite value)."""
    have = [r for r in rows if key in r]
    return [r["step"] for r in have], [math.nan if r[key] is None else r[key] for r in have]


def _step_axis(ax: Any) -> None:
    """Steps on the x axis: whole numbers, a light grid."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)


def _curves(path: Path, title: str, ylabel: str, curves: list[tuple[str, list[int], list[float]]]) -> str | None:
    """One panel of lines over the step; None once drawn, else why not."""
    curves = [c for c in curves if c[1]]
    if not curves:
        return "nothing logged for it in metrics.jsonl"
    fig = _figure(8, 4.5)
    ax = fig.subplots()
    for label, steps, values in curves:
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=label)
    ax.set(title=title, ylabel=ylabel)
    _step_axis(ax)
    if len(curves) > 1:
        ax.legend()
    _save(fig, path)
    return None


def _loss(run: Run, path: Path) -> str | None:
    return _curves(path, "loss", "cross-entropy", [("loss", *_series(run.metrics, "loss")),
                                                   ("eval loss", *_series(run.metrics, "eval_loss"))])


def _lr(run: Run, path: Path) -> str | None:
    return _curves(path, "learning rate", "lr", [("lr", *_series(run.metrics, "lr"))])


def _comm(run: Run, path: Path) -> str | None:
    dims = sorted({k for r in run.metrics for k in r if k.startswith("comm_gb/")})
    if not dims:
        return "no comm_gb/<dim> in metrics.jsonl (none are logged by a one-process run)"
    return _curves(path, "communication per mesh dimension (rank 0)", "GB per step",
                   [(k.split("/", 1)[1], *_series(run.metrics, k)) for k in dims])


def _grad_norm(run: Run, path: Path) -> str | None:
    steps, norms = _series(run.metrics, "grad_norm")
    if not steps:
        return "no grad_norm in metrics.jsonl"
    fig = _figure(8, 4.5)
    ax = fig.subplots()
    ax.plot(steps, norms, marker="o" if len(steps) < 30 else None, markersize=3, label="grad norm (before clipping)")
    undone = [row for r in run.skipped_data for row in r.get("dropped", []) if row.get("grad_norm") is not None]
    if undone:
        ax.scatter([r["step"] for r in undone], [r["grad_norm"] for r in undone], color="red", marker="x",
                   label="steps undone by a rollback")
        norms = [*norms, *(r["grad_norm"] for r in undone)]
    positive = [n for n in finite(norms) if n > 0]
    if positive and max(positive) > 100 * min(positive):  # a spike: keep the ordinary steps readable
        ax.set_yscale("log")
    for i, r in enumerate(r for r in run.metrics if r.get("skipped")):
        ax.axvline(r["step"], color="red", linestyle=":", label=None if i else "skipped step")
    for i, r in enumerate(run.skipped_data):
        ax.axvline(r["rolled_back_to"], color="purple", linestyle="--", label=None if i else "rolled back to")
    ax.set(title="gradient norm", ylabel="norm")
    _step_axis(ax)
    ax.legend()
    _save(fig, path)
    return None


def _throughput(run: Run, path: Path) -> str | None:
    steps, speed = _series(run.metrics, "tokens_per_s")
    if not steps:
        return "no tokens_per_s in metrics.jsonl"
    mfu_steps, mfu = _series(run.metrics, "mfu")
    fig = _figure(8, 6)
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.plot(steps, speed, color="tab:blue")
    top.set(title="throughput", ylabel="tokens/s")
    bottom.plot(mfu_steps, [100 * v for v in mfu], color="tab:green")
    bottom.set_ylabel("MFU (%)")
    for ax in (top, bottom):
        _step_axis(ax)
    _save(fig, path)
    return None


def _step_time(run: Run, path: Path) -> str | None:
    if not run.ranks:
        return "no ranks.jsonl (per-rank step times)"
    steps = [r["step"] for r in run.ranks]
    world = max(len(r["compute_s"]) for r in run.ranks)
    hosts = run.ranks[-1].get("hosts") or [""] * world
    fig = _figure(10, 1.5 + 0.8 * min(world, 32))
    for ax, key, title in zip(fig.subplots(1, 2, sharey=True), ("compute_s", "step_s"),
                              ("compute time per rank (s)", "wall time per rank (s)")):
        grid = [[r[key][rank] if rank < len(r[key]) else math.nan for r in run.ranks] for rank in range(world)]
        image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis",
                          extent=(-0.5, len(steps) - 0.5, world - 0.5, -0.5))
        ticks = list(range(0, len(steps), max(1, len(steps) // 10)))
        ax.set_xticks(ticks, [str(steps[i]) for i in ticks])
        ax.set(title=title, xlabel="logged step")
        fig.colorbar(image, ax=ax)
    if world <= 32:
        fig.axes[0].set_yticks(range(world), [f"rank {r} {hosts[r] if r < len(hosts) else ''}" for r in range(world)])
    _save(fig, path)
    return None


def _pipeline(run: Run, path: Path) -> str | None:
    replay = pipeline_schedule(run)
    if isinstance(replay, str):
        return replay
    title = (f"{replay.schedule}: pp={replay.pp}, {replay.virtual} stage(s) per rank, {replay.microbatches} "
             f"microbatches; bubble {replay.bubble:.0%} (idle over compute time)")
    costs = ", ".join(f"{k} = {v:g}" for k, v in STAGE_COSTS.items())
    draw_timelines([Timeline(title, replay.actions, replay.num_stages, replay.end)], path,
                   f"time, in forwards of one stage ({costs}; communication free)")
    return None


PLOTS: tuple[tuple[str, Callable[[Run, Path], str | None]], ...] = (
    ("loss.png", _loss), ("lr.png", _lr), ("grad_norm.png", _grad_norm), ("throughput.png", _throughput),
    ("step_time.png", _step_time), ("comm.png", _comm), ("pipeline.png", _pipeline))
