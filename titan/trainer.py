"""The training loop: micro-batches, gradient accumulation, clipping, eval, metrics, checkpoints.

The loss of a step is the mean token loss over the whole global batch: each micro-batch adds
``sum of its token losses / tokens in the global batch``, and the data-parallel ranks sum their
parts, so the number is the same whatever the layout.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Collection, Iterator, Protocol, Sequence

import torch
import torch.distributed as dist
from torch import nn

from parallel.comm_stats import CommCounter
from titan.config import PretrainConfig
from titan.errors import NonFiniteStepError
from titan.faults import FaultInjection
from titan.health import HealthPolicy
from titan.metrics import MetricsLogger, ThroughputMeter, peak_memory_gb
from titan.runners import StepRunner


class StepHook(Protocol):
    """Told when each training step starts and ends (profiler, hang watchdog, timing)."""

    def begin(self, step: int) -> None: ...

    def end(self, step: int) -> None: ...


class MetricSource(Protocol):
    """Adds to the record of each logged step (called on every rank: it may be collective)."""

    def metrics(self, step: int) -> dict[str, Any]: ...


Rollback = Callable[["TrainState"], tuple["TrainState", torch.optim.lr_scheduler.LRScheduler, Iterator[dict]]]


@dataclass
class TrainState:
    """Progress that a checkpoint carries besides model, optimizer and data cursor."""

    step: int = 0
    tokens: int = 0
    skipped: int = 0  # steps not applied (health policy); the LR schedule stands at step - skipped


@dataclass
class ParallelContext:
    """What the loop needs from the parallel layout, so it reads the same on every layout."""

    runner: StepRunner  # forward + backward of this rank's share of a batch
    dp_size: int = 1
    dp_group: dist.ProcessGroup | None = None  # ranks that take different sequences
    loss_group: dist.ProcessGroup | None = None  # ranks whose loss parts add up: dp (x cp, each holding part of a sequence)
    pp_group: dist.ProcessGroup | None = None  # the loss is computed on the last stage only
    # Scales gradients so their global L2 norm is at most max_norm; returns the norm before.
    clip_grad_norm: Callable[[list[torch.Tensor], float], torch.Tensor] = torch.nn.utils.clip_grad_norm_
    comm_counter: Callable[[], CommCounter] | None = None  # counts collective bytes on logged steps

    def global_sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum a per-rank loss part over data- and context-parallel ranks and pipeline stages."""
        if self.loss_group is not None:
            dist.all_reduce(value, group=self.loss_group)
        if self.pp_group is not None:
            dist.all_reduce(value, group=self.pp_group)
        return value


class Trainer:
    def __init__(self, cfg: PretrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, batches: Iterator[dict],
                 eval_batches: Callable[[], Iterator[dict]], par: ParallelContext, device: torch.device,
                 metrics: MetricsLogger, throughput: ThroughputMeter, state: TrainState,
                 health: HealthPolicy | None = None, rollback: Rollback | None = None,
                 on_step_end: Callable[[TrainState], bool] = lambda state: False,
                 on_batches: Callable[[int, list[dict]], None] | None = None,
                 after_update: Callable[[bool], dict[str, Any]] = lambda applied: {},
                 step_hooks: Sequence[StepHook] = (), metric_sources: Sequence[MetricSource] = (),
                 faults: FaultInjection | None = None, log_steps: Collection[int] = ()):
        """`health` judges each step (default: `training.health`); `rollback` restores the newest
        checkpoint past bad data and returns the state, LR schedule and batches to go on with (none:
        a run of bad steps stops the run). `after_update(applied)` runs after
        every step (e.g. the expert-bias update) and returns metrics for the step's record;
        `step_hooks` hear each step's start and end; `metric_sources` add to logged records, and
        `log_steps` are logged whatever `logging.log_interval` says."""
        self.cfg, self.model, self.optimizer, self.scheduler = cfg, model, optimizer, scheduler
        self.batches, self.eval_batches, self.par, self.device = batches, eval_batches, par, device
        self.metrics, self.throughput = metrics, throughput
        self.state, self.on_step_end, self.on_batches, self.after_update = state, on_step_end, on_batches, after_update
        self.step_hooks, self.metric_sources, self.rollback = step_hooks, metric_sources, rollback
        self.health = health or HealthPolicy(cfg.training.health)
        self.faults, self.log_steps = faults, log_steps
        t = cfg.training
        self.accum_steps = t.global_batch_size // par.dp_size // t.micro_batch_size
        self.tokens_per_step = t.global_batch_size * t.seq_len
        self.source_names = [s.name for s in cfg.data.sources]  # a mixture's: losses per source are logged

    def train_step(self, per_source: bool = False) -> tuple[float, float, str | None, dict[str, Any]]:
        """One step over the global batch, applied unless the health policy skips it; returns (loss,
        grad_norm before clipping, why it was skipped or None, the metrics of `after_update` and, with
        `per_source`, the loss of each source of a mixture from the same forward pass)."""
        step = self.state.step + 1
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        batches = [next(self.batches) for _ in range(self.accum_steps)]
        if self.on_batches is not None:
            self.on_batches(step, batches)
        per_source = per_source and bool(self.source_names)
        if per_source:
            self.par.runner.sequence_losses.start()
        loss = self.par.global_sum(self.par.runner.train(batches))
        sources = self.source_losses(batches, "loss") if per_source else {}
        max_norm = self.cfg.training.grad_clip if self.cfg.training.grad_clip > 0 else math.inf
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.faults is not None:
            loss = self.faults.after_backward(step, loss, [p.grad for p in params])
        grad_norm = self.par.clip_grad_norm(params, max_norm)
        loss_value, norm_value = loss.item(), float(grad_norm)
        skipped = self.health.judge(step, loss_value, norm_value)
        if skipped is None:
            self.optimizer.step()
            self.scheduler.step()
        return loss_value, norm_value, skipped, {**sources, **self.after_update(skipped is None)}

    def source_losses(self, batches: list[dict], prefix: str) -> dict[str, float]:
        """`<prefix>/<source>`: the token-mean loss of each mixture source in `batches`, from the
        per-sequence losses the runner recorded (summed over the ranks that hold parts of them)."""
        n = len(self.source_names)
        sums = torch.zeros(2 * n, dtype=torch.float64)
        parts = self.par.runner.sequence_losses.take()
        if parts:  # the ranks that compute the loss (every rank, or the last pipeline stage)
            losses = torch.cat([p.reshape(-1) for p, _ in parts]).double().cpu()
            tokens = torch.cat([torch.full((p.numel(),), float(t), dtype=torch.float64) for p, t in parts])
            sources = torch.cat([b["source"].reshape(-1) for b in batches])
            if len(sources) != len(losses):
                raise RuntimeError(f"{len(losses)} sequence losses for {len(sources)} sequences")
            sums.index_add_(0, sources, losses)
            sums.index_add_(0, sources + n, tokens)
        sums = self.par.global_sum(sums.to(self.device)).cpu()
        return {f"{prefix}/{name}": float(sums[s] / sums[n + s]) for s, name in enumerate(self.source_names)
                if sums[n + s] > 0}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """`eval_loss`: the mean token loss over the held-out batches (and `eval_loss/<source>` per
        source of a mixture)."""
        self.model.eval()
        batches = list(self.eval_batches())
        total = torch.zeros((), device=self.device)
        if self.source_names:
            self.par.runner.sequence_losses.start()
        for start in range(0, len(batches), self.accum_steps):
            total += self.par.runner.eval(batches[start:start + self.accum_steps])
        tokens = sum(b["tokens"][:, 1:].numel() for b in batches) * self.par.dp_size
        sources = self.source_losses(batches, "eval_loss") if self.source_names else {}
        return {"eval_loss": (self.par.global_sum(total) / tokens).item(), **sources}

    def fit(self) -> TrainState:
        cfg, state = self.cfg, self.state
        self.throughput.reset(state.tokens)
        while state.step < cfg.training.steps:
            lr = self.scheduler.get_last_lr()[0]
            step = state.step + 1
            last = step == cfg.training.steps
            do_eval = cfg.eval.interval > 0 and (step % cfg.eval.interval == 0 or last)
            do_log = do_eval or last or step % cfg.logging.log_interval == 0 or step in self.log_steps
            counter = self.par.comm_counter() if do_log and self.par.comm_counter else None
            for hook in self.step_hooks:
                hook.begin(step)
            with counter or nullcontext():
                loss, grad_norm, skipped, extra = self.train_step(per_source=do_log)
            for hook in self.step_hooks:
                hook.end(step)
            state.step = step
            state.tokens += self.tokens_per_step
            state.skipped += skipped is not None
            self.metrics.advance(state.step)
            if do_log or skipped:
                record = {"step": state.step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": state.tokens,
                          **self.throughput.measure(state.tokens), "mem_gb": peak_memory_gb(self.device),
                          "skipped_steps": state.skipped}
                if skipped:
                    record.update(skipped=True, skip_reason=skipped)
                record.update(extra)
                for source in self.metric_sources:
                    record.update(source.metrics(state.step))
                if counter is not None:
                    record.update(counter.by_dim_gb())
                if do_eval:
                    record.update(self.evaluate())
                    self.throughput.reset(state.tokens)  # eval time is not training throughput
                self.metrics.log(record)
            if skipped and self.health.wants_rollback():
                if self.rollback is None:
                    raise NonFiniteStepError(f"step {step}: {self.health.consecutive} bad steps in a row "
                                             "(training.health.max_consecutive_skips) and no rollback here.")
                state, self.scheduler, self.batches = self.rollback(state)
                self.state = state
                self.throughput.reset(state.tokens)
                continue
            if self.on_step_end(state):
                break
        return state
