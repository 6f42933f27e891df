"""What the planner reads from a model once: its parameters grouped into the units FSDP shards,
each parameter with the dimension tensor parallelism splits, built on the meta device (no memory)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from parallel.plan import ModelPlan
from titan.config import ModelConfig
from titan.models import build_model
from titan.optim import muon_parameters


@dataclass(frozen=True)
class Param:
    """One parameter: its full shape, the dimension tp splits (None: whole on every tp rank) and
    whether it is a stack of experts (dim 0 split over ep, FSDP on dim 1)."""

    shape: tuple[int, ...]
    tp_dim: int | None = None
    expert: bool = False
    muon: bool = False  # stepped by Muon under optim=muon (one moment instead of AdamW's two)

    def local_shape(self, tp: int, ep: int) -> tuple[int, ...]:
        shape = list(self.shape)
        if self.tp_dim is not None:
            shape[self.tp_dim] //= tp
        if self.expert:
            shape[0] //= ep
        return tuple(shape)

    def elements(self, tp: int, ep: int, shards: int) -> int:
        """Elements of this rank's (padded) FSDP shard over `shards` ranks of its tp/ep-local tensor."""
        shape = self.local_shape(tp, ep)
        dim = 1 if self.expert else 0
        rows = math.ceil(shape[dim] / shards)
        return rows * math.prod(shape) // shape[dim]


Unit = tuple[Param, ...]


@dataclass(frozen=True)
class Block:
    """One transformer block: its own FSDP unit, and (MoE) the experts' unit."""

    index: int
    params: Unit
    experts: Unit = ()

    @property
    def sparse(self) -> bool:
        return bool(self.experts)


@dataclass(frozen=True)
class ModelFacts:
    """The model as FSDP units: the embedding, the blocks, the head (final norm + output) and the
    root (what is left, e.g. a weight shared by the embedding and the output)."""

    cfg: ModelConfig
    plan: ModelPlan
    embedding: Unit
    blocks: tuple[Block, ...]
    head: Unit
    root: Unit
    buffer_bytes: int  # rotary tables and statistics buffers, on every rank

    def params(self) -> int:
        units = [self.embedding, self.head, self.root, *(b.params + b.experts for b in self.blocks)]
        return sum(math.prod(p.shape) for unit in units for p in unit)


def unit_elements(unit: Unit, tp: int, ep: int, shards: int) -> int:
    """Elements of one rank's shard of a unit (`shards=1`: the whole tp/ep-local unit)."""
    return sum(p.elements(tp, ep, shards) for p in unit)


def _tp_dim(path: str, plan: ModelPlan, block_key: str | None) -> int | None:
    """Which dimension `apply_tensor_parallel` splits (weights are (out, in); embeddings (vocab, dim))."""
    if block_key is None:
        return 0 if path.startswith((plan.embedding + ".", plan.output + ".")) else None
    block = plan.block_plan(block_key)
    if any(path.startswith(r + ".") for r in block.replicated):
        return None
    if any(path == f"{c}.weight" for c in block.colwise):
        return 0
    if any(path == f"{r}.weight" for r in block.rowwise):
        return 1
    return None


_CACHE: dict[str, ModelFacts] = {}


def model_facts(cfg: ModelConfig) -> ModelFacts:
    """The facts of the model `cfg` describes (cached: the search asks many times)."""
    key = repr(cfg)
    if key not in _CACHE:
        _CACHE[key] = _read_facts(cfg)
    return _CACHE[key]


def _read_facts(cfg: ModelConfig) -> ModelFacts:
    model = build_model(cfg)
    seen: dict[Unit, Unit] = {}

    def interned(unit: Unit) -> Unit:
        """One tuple for equal units (the planner remembers results by a unit's identity)."""
        return seen.setdefault(unit, unit)

    plan = model.plan()
    blocks: nn.ModuleDict = model.get_submodule(plan.blocks)
    in_blocks = {id(p) for p in blocks.parameters()}
    muon = muon_parameters(model)
    built = []
    for key, block in blocks.items():
        experts_path = plan.experts if key in plan.sparse_blocks else None
        dense, experts = [], []
        for name, p in block.named_parameters():
            if experts_path and name.startswith(experts_path + "."):
                experts.append(Param(tuple(p.shape), None, expert=True, muon=id(p) in muon))
            else:
                dense.append(Param(tuple(p.shape), _tp_dim(name, plan, key), muon=id(p) in muon))
        built.append(Block(int(key), interned(tuple(dense)), interned(tuple(experts))))

    def unit(*paths: str) -> Unit:
        return tuple(Param(tuple(p.shape), _tp_dim(f"{path}.{n}", plan, None))
                     for path in paths for n, p in model.get_submodule(path).named_parameters())

    if plan.tied:
        root = tuple(Param(tuple(p.shape), 0 if p is model.get_submodule(plan.embedding).weight else None)
                     for p in model.parameters() if id(p) not in in_blocks)
        embedding, head = (), ()
    else:
        embedding, head, root = unit(plan.embedding), unit(plan.final_norm, plan.output), ()
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return ModelFacts(cfg, plan, embedding, tuple(built), head, root, buffers)
