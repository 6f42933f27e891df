"""Forward and backward of one rank's share of a global batch: micro-batch by micro-batch on a whole
model, or through a pipeline schedule over this rank's stages.

Both return this rank's contribution to the step's loss (sum of its token losses divided by the
tokens of the whole global batch); summed over data-parallel (and pipeline) ranks it is the mean
token loss of the global batch. Gradients come out scaled so that the data-parallel reduction,
which averages, yields that same mean's gradient.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import partial
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining.schedules import _PipelineSchedule

from parallel.context_parallel import shard_sequence
from parallel.pipeline import SideInputs
from parallel.replica_reduction import ReplicaReduction
from titan.data.packing import document_ids, positions_in_documents
from titan.models.moe import auxiliary_loss_scale

ToLocal = Callable[[torch.Tensor], torch.Tensor]


class SequenceLosses:
    """Per-sequence loss sums of the loss computations made while recording (per-source metrics):
    one (losses of a micro-batch's sequences, tokens per sequence) per micro-batch, in micro-batch order."""

    def __init__(self) -> None:
        self.parts: list[tuple[torch.Tensor, int]] | None = None

    def start(self) -> None:
        self.parts = []

    def take(self) -> list[tuple[torch.Tensor, int]]:
        parts, self.parts = self.parts or [], None
        return parts


class StepRunner(Protocol):
    sequence_losses: SequenceLosses

    def train(self, batches: list[dict]) -> torch.Tensor: ...

    def eval(self, batches: list[dict]) -> torch.Tensor:
        """Sum of token cross-entropies over `batches` (on the ranks that compute the loss)."""


def token_loss_sum(logits: torch.Tensor, targets: torch.Tensor, record: SequenceLosses,
                   to_local: ToLocal) -> torch.Tensor:
    """The token cross-entropy summed over the batch (and, while `record` records, per sequence)."""
    if record.parts is None:
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum")
    losses = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
    record.parts.append((to_local(losses.detach()).reshape(targets.shape).sum(-1), targets.shape[-1]))
    return losses.sum()


def autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """Mixed-precision autocast to `dtype`, or a disabled one when it is None."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def split_tokens(batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = batch["tokens"].to(device, non_blocking=True)
    return tokens[:, :-1], tokens[:, 1:]


@dataclass(frozen=True)
class InputLayout:
    """How a batch of windows becomes this rank's model inputs: document ids (document masking),
    positions (restarted per document, or global ones under context parallelism) and this rank's
    share of the sequence under context parallelism."""

    eot_id: int | None = None  # set: document masking at these end-of-text tokens
    reset_positions: bool = False
    cp_rank: int = 0
    cp: int = 1

    def __call__(self, batch: dict, device: torch.device) -> tuple[tuple, torch.Tensor]:
        """((tokens, positions, documents), targets); positions and documents may be None."""
        inputs, targets = split_tokens(batch, device)
        documents = document_ids(inputs, self.eot_id) if self.eot_id is not None else None
        positions = None
        if documents is not None and self.reset_positions:
            positions = positions_in_documents(documents)
        elif documents is not None or self.cp > 1:
            positions = torch.arange(inputs.shape[1], device=device).expand_as(inputs)
        if self.cp > 1:
            inputs, targets, positions = (shard_sequence(t, self.cp_rank, self.cp) for t in (inputs, targets, positions))
            documents = shard_sequence(documents, self.cp_rank, self.cp) if documents is not None else None
        return (inputs, positions, documents), targets


class MicroBatchRunner:
    """Gradient accumulation over micro-batches on a model that holds every layer."""

    def __init__(self, model: nn.Module, device: torch.device, tokens_per_step: int, dp_size: int,
                 autocast_dtype: torch.dtype | None, loss_context: Callable[[], AbstractContextManager], to_local: ToLocal,
                 inputs: InputLayout = InputLayout(), replicas: ReplicaReduction | None = None):
        """`dp_size`: the ranks whose gradients the data-parallel reduction averages (dp x cp);
        `replicas`: the cross-replica reduction to start in the last backward and finish after it."""
        self.model, self.device, self.tokens_per_step, self.dp_size = model, device, tokens_per_step, dp_size
        self.replicas = replicas
        self.autocast_dtype, self.loss_context, self.to_local = autocast_dtype, loss_context, to_local
        self.inputs, self.sequence_losses = inputs, SequenceLosses()

    def _loss_sum(self, batch: dict) -> torch.Tensor:
        args, targets = self.inputs(batch, self.device)
        with autocast(self.device, self.autocast_dtype):
            logits = self.model(*args)
        return token_loss_sum(logits, targets, self.sequence_losses, self.to_local)

    def train(self, batches: list[dict]) -> torch.Tensor:
        total = torch.zeros((), device=self.device)
        for position, batch in enumerate(batches):
            if self.replicas is not None and position == len(batches) - 1:
                self.replicas.arm()
            with self.loss_context(), auxiliary_loss_scale(self.dp_size / self.tokens_per_step):
                part = self._loss_sum(batch) / self.tokens_per_step
                (part * self.dp_size).backward()
            total += self.to_local(part.detach())
        if self.replicas is not None:
            self.replicas.finish()
        return total

    def eval(self, batches: list[dict]) -> torch.Tensor:
        total = torch.zeros((), device=self.device)
        for batch in batches:
            with self.loss_context():
                total += self.to_local(self._loss_sum(batch).detach())
        return total


class ScaledTokenLoss:
    """The pipeline's loss function: token cross-entropy sum times a scale set per use."""

    def __init__(self, to_local: ToLocal) -> None:
        self.scale, self.to_local, self.sequence_losses = 1.0, to_local, SequenceLosses()

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return token_loss_sum(logits, targets, self.sequence_losses, self.to_local) * self.scale


class PipelineRunner:
    """Runs this rank's stages through a pipeline schedule; the loss lives on the last stage.

    torch's V-shaped schedules cannot run forward-only, so with `eval_needs_backward` eval runs the
    full schedule and then drops the gradients it left."""

    def __init__(self, schedule: _PipelineSchedule, loss_fn: ScaledTokenLoss, has_first: bool, has_last: bool,
                 device: torch.device, tokens_per_step: int, dp_size: int, autocast_dtype: torch.dtype | None,
                 loss_context: Callable[[], AbstractContextManager], to_local: ToLocal,
                 eval_needs_backward: bool, parts: list[nn.Module], n_microbatches: int,
                 side_inputs: SideInputs, inputs: InputLayout = InputLayout()):
        """`dp_size`: the ranks whose gradients the data-parallel reduction averages (dp x cp)."""
        self.schedule, self.loss_fn, self.has_first, self.has_last = schedule, loss_fn, has_first, has_last
        self.device, self.tokens_per_step, self.dp_size = device, tokens_per_step, dp_size
        self.autocast_dtype, self.loss_context, self.to_local = autocast_dtype, loss_context, to_local
        self.eval_needs_backward, self.parts = eval_needs_backward, parts
        self.n_microbatches, self.side_inputs, self.inputs = n_microbatches, side_inputs, inputs
        self.sequence_losses = loss_fn.sequence_losses  # the last stage's loss calls run in micro-batch order

    def _run(self, batches: list[dict], backward: bool, scale: float) -> torch.Tensor:
        """Sum of this rank's last-stage losses over `batches`, divided by `scale` (zero elsewhere)."""
        (inputs, positions, documents), targets = self.inputs({"tokens": torch.cat([b["tokens"] for b in batches])},
                                                              self.device)
        # Positions and document ids reach every stage beside the activations, split as the schedule splits.
        side = {"positions": positions, "documents": documents}
        chunks = {k: v.tensor_split(self.n_microbatches) if v is not None else [None] * self.n_microbatches
                  for k, v in side.items()}
        self.side_inputs.load([{k: chunks[k][i] for k in side} for i in range(self.n_microbatches)]
                              if positions is not None else [])
        args = (inputs,) if self.has_first else ()
        self.loss_fn.scale = scale
        losses: list[torch.Tensor] = []
        # Training keeps no last-stage outputs: only the losses are read (a vocabulary-wide tensor per micro-batch saved).
        run = partial(self.schedule.step, return_outputs=False) if backward else self.schedule.eval
        recorded = self.sequence_losses.parts
        before = len(recorded) if recorded is not None else 0
        with self.loss_context(), autocast(self.device, self.autocast_dtype), auxiliary_loss_scale(scale):
            run(*args, target=targets if self.has_last else None, losses=losses)
        if recorded is not None and len(recorded) - before > self.n_microbatches:
            # torch's first step runs the loss once more beforehand, to infer gradient shapes
            del recorded[before:len(recorded) - self.n_microbatches]
        total = torch.zeros((), device=self.device)
        for loss in losses:
            total += self.to_local(loss.detach())
        return total / scale

    def train(self, batches: list[dict]) -> torch.Tensor:
        # Backward through sum x dp / global tokens: the data-parallel average then gives the mean's gradient.
        return self._run(batches, backward=True, scale=self.dp_size / self.tokens_per_step) / self.tokens_per_step

    def eval(self, batches: list[dict]) -> torch.Tensor:
        if not self.eval_needs_backward:
            with torch.no_grad():
                return self._run(batches, backward=False, scale=1.0)
        with torch.enable_grad():
            total = self._run(batches, backward=True, scale=1.0)
        for part in self.parts:
            part.zero_grad(set_to_none=True)
        return total
