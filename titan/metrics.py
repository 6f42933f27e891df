"""Training metrics and where they go: the console (rich progress bar), metrics.jsonl and W&B.

Only the writer rank builds sinks; every other rank gets an empty :class:`MetricsLogger`, so the
trainer calls the same code everywhere and exactly one rank writes.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import resource
import socket
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Protocol
from urllib.parse import urlparse

import torch

from titan.errors import StorageError

def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this rank: allocator peak on GPU, peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


class ThroughputMeter:
    """Tokens/s, TFLOP/s and MFU over the interval since the last call."""

    def __init__(self, flops_per_token: int, world_size: int, peak_tflops: float):
        self.flops_per_token, self.world_size, self.peak_tflops = flops_per_token, world_size, peak_tflops
        self.last_time = time.perf_counter()
        self.last_tokens = 0

    def reset(self, tokens: int) -> None:
        self.last_time, self.last_tokens = time.perf_counter(), tokens

    def measure(self, tokens: int) -> dict[str, float]:
        now = time.perf_counter()
        tokens_per_s = (tokens - self.last_tokens) / max(now - self.last_time, 1e-9)
        self.reset(tokens)
        tflops = self.flops_per_token * tokens_per_s / self.world_size / 1e12  # per device
        return {"tokens_per_s": tokens_per_s, "tflops": tflops, "mfu": tflops / self.peak_tflops}


class Sink(Protocol):
    def log(self, metrics: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def strict_json(record: dict[str, Any]) -> str:
    """One line of standard JSON: NaN and infinities (which `json` would write bare) become null, at
    any depth."""
    return json.dumps(_finite_or_null(record), allow_nan=False)


def _finite_or_null(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    return value


class JsonlSink:
    """One JSON object per logged step in `<run.dir>/metrics.jsonl`."""

    def __init__(self, path: Path, append: bool):
        self.path = path
        self.file = path.open("a" if append else "w", encoding="utf-8")

    def truncate_after(self, step: int) -> None:
        """Drop the lines past `step` (a rollback) and go on appending."""
        self.file.close()
        truncate_after_step(self.path, step)
        self.file = self.path.open("a", encoding="utf-8")

    def log(self, metrics: dict[str, Any]) -> None:
        try:
            self.file.write(strict_json(metrics) + "\n")
            self.file.flush()
        except OSError as exc:
            raise StorageError(f"step {metrics['step']}: could not write {self.file.name} ({exc.strerror or exc}). "
                               "Fix: free space on that disk or move the run folder to a working one (run.dir), "
                               "then rerun the same command: it resumes from the newest committed checkpoint.") from exc

    def close(self) -> None:
        try:
            self.file.close()
        except OSError:  # every line was flushed when written; a failed write was reported then
            pass


def read_jsonl(path: Path, warn: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """The objects of a JSON-lines file; a line that does not parse (the torn last line of a process
    killed mid-write) is dropped with a warning naming the file and line."""
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
        else:
            warn(f"warning: {path}:{number} is not a complete JSON record (a write cut short?); dropped it")
    return rows


def truncate_after_step(path: Path, step: int, warn: Callable[[str], None] = print) -> None:
    """Drop JSON lines whose `step` is past `step` (what a crashed attempt logged after its last
    checkpoint) and lines that do not parse; rewrite the file atomically."""
    if not path.is_file():
        return
    keep = [row for row in read_jsonl(path, warn) if row["step"] <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(strict_json(row) + "\n" for row in keep), encoding="utf-8")
    tmp.replace(path)


class ConsoleSink:
    """A rich progress bar with the latest numbers, plus one printed line per logged step."""

    FIELDS = (("loss", "loss", "{:.4f}"), ("eval_loss", "eval", "{:.4f}"), ("lr", "lr", "{:.2e}"),
              ("grad_norm", "gnorm", "{:.3f}"), ("tokens_per_s", "tok/s", "{:,.0f}"), ("tflops", "tflops", "{:.3f}"),
              ("mfu", "mfu", "{:.1%}"), ("mem_gb", "mem_gb", "{:.2f}"), ("moe/load_max_mean", "load max/mean", "{:.2f}"))

    def __init__(self, total_steps: int, first_step: int, show_bar: bool):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        console = Console()
        self.progress = Progress(BarColumn(bar_width=30), MofNCompleteColumn(), TimeRemainingColumn(),
                                 TextColumn("{task.description}"), console=console,
                                 disable=not (show_bar and console.is_terminal))
        self.task = self.progress.add_task("", total=total_steps, completed=first_step)
        self.progress.start()

    @staticmethod
    def format(metrics: dict[str, Any]) -> str:
        parts = [f"step {metrics['step']}"]
        parts += [f"{label} {fmt.format(metrics[key])}" for key, label, fmt in ConsoleSink.FIELDS if key in metrics]
        for prefix, label in (("loss/", "loss"), ("eval_loss/", "eval")):  # a mixture's sources
            per_source = [f"{key[len(prefix):]} {value:.4f}" for key, value in metrics.items() if key.startswith(prefix)]
            if per_source:
                parts.append(f"{label} by source: {', '.join(per_source)}")
        if metrics.get("skipped"):
            parts.append(f"SKIPPED: {metrics['skip_reason']}")
        return " | ".join(parts)

    def advance(self, step: int) -> None:
        self.progress.update(self.task, completed=step)

    def log(self, metrics: dict[str, Any]) -> None:
        line = self.format(metrics)
        self.progress.update(self.task, completed=metrics["step"], description=line.split(" | ", 2)[1])
        self.progress.console.print(line, highlight=False, soft_wrap=True)

    def close(self) -> None:
        self.progress.stop()


WANDB_DEFAULT_URL = "https://api.wandb.ai"


def wandb_problem(mode: str, timeout_s: float = 5.0) -> str | None:
    """Why an online W&B run cannot start on this machine (no API key, server out of reach), or None.
    Checked before any work, so a missing login never ends a run after the model is built."""
    if mode != "online":
        return None
    url = os.environ.get("WANDB_BASE_URL", WANDB_DEFAULT_URL)
    parsed = urlparse(url)
    if not (os.environ.get("WANDB_API_KEY") or _netrc_has(parsed.hostname or "")):
        return f"no W&B API key is configured for {url} (no WANDB_API_KEY, no entry in ~/.netrc)"
    proxy = urllib.request.getproxies().get(parsed.scheme)
    target = urlparse(proxy) if proxy and not urllib.request.proxy_bypass(parsed.hostname or "") else parsed
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        socket.create_connection((target.hostname, port), timeout=timeout_s).close()
    except OSError as exc:
        return f"the W&B server {url} cannot be reached from this machine ({exc.strerror or exc})"
    return None


def _netrc_has(host: str) -> bool:
    try:
        return netrc.netrc(os.environ.get("NETRC") or None).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandbSink:
    """A W&B run under `<run.dir>/wandb`; its id is kept in the run dir so a resume continues it.
    A W&B failure after the start (the server gone, a full disk) is reported once and training goes
    on: metrics.jsonl and the console keep every step."""

    def __init__(self, run_dir: Path, project: str, name: str | None, entity: str | None, mode: str,
                 config: dict[str, Any], run_id: str | None):
        import wandb

        self.run = wandb.init(project=project, name=name, entity=entity, mode=mode, dir=str(run_dir),
                              config=config, id=run_id, resume="allow" if run_id else None)
        self.run_id = self.run.id
        self.failed = False

    def _guarded(self, action: Callable[[], None]) -> None:
        if self.failed:
            return
        try:
            action()
        except Exception as exc:  # noqa: BLE001 - any W&B failure must not stop training
            self.failed = True
            print(f"warning: W&B stopped working ({type(exc).__name__}: {exc}); training goes on and logs to "
                  "metrics.jsonl and the console.", flush=True)

    def log(self, metrics: dict[str, Any]) -> None:
        self._guarded(lambda: self.run.log(wandb_values(metrics), step=metrics["step"]))
        for title, key in (("step skipped", "skip_reason"), ("straggler", "straggler")):
            if key in metrics:
                self._guarded(lambda: self.run.alert(title=title, text=f"step {metrics['step']}: {metrics[key]}",
                                                     level="WARN"))

    def close(self) -> None:
        self._guarded(self.run.finish)


def wandb_values(metrics: dict[str, Any]) -> dict[str, Any]:
    """A step's record as W&B values: a per-layer table of loads (`moe/expert_load`: layer -> load of
    each expert / mean) becomes one bar histogram per layer (`moe/expert_load/layer_<i>`, the load
    over the expert index)."""
    import wandb

    values = {k: v for k, v in metrics.items() if k not in ("step", "moe/expert_load", "skip_reason", "straggler")}
    for layer, loads in metrics.get("moe/expert_load", {}).items():
        edges = [float(e) for e in range(len(loads) + 1)]
        values[f"moe/expert_load/layer_{layer}"] = wandb.Histogram(np_histogram=(loads, edges))
    return values


class MetricsLogger:
    """Fans metrics out to the sinks (none on non-writer ranks)."""

    def __init__(self, sinks: list[Sink] | None = None):
        self.sinks = sinks or []

    def advance(self, step: int) -> None:
        for sink in self.sinks:
            if isinstance(sink, ConsoleSink):
                sink.advance(step)

    def log(self, metrics: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.log(metrics)

    def truncate_after(self, step: int) -> None:
        """The files' records past `step` go (a rollback replays those steps)."""
        for sink in self.sinks:
            if isinstance(sink, JsonlSink):
                sink.truncate_after(step)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
