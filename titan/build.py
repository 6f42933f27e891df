"""Build the model for this rank's place in the layout: mesh -> meta model -> parallelize -> init."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from parallel.comm_stats import CommCounter, mesh_group_names
from parallel.grad_norm import clip_grad_norm_
from parallel.mesh import DistEnv, ParallelDims, build_mesh, hierarchical_dims
from parallel.parallelize import parallelize
from titan.config import ConfigError, PretrainConfig
from titan.models import build_model, init_weights
from titan.trainer import ParallelContext


@dataclass
class Layout:
    dims: ParallelDims
    mesh: DeviceMesh | None
    dp_rank: int


def resolve_dims(cfg: PretrainConfig, env: DistEnv) -> ParallelDims:
    """Parallel degrees from the config (or the node topology when hierarchical), validated."""
    p = cfg.parallel
    dp_replicate, dp_shard = p.dp_replicate, p.dp_shard
    if p.hierarchical:
        dp_replicate, dp_shard = hierarchical_dims(env, p.tp, p.pp)
    return ParallelDims(dp_replicate, dp_shard, p.tp, p.pp, env.world_size)


def build_layout(dims: ParallelDims, env: DistEnv) -> Layout:
    if env.world_size == 1:
        return Layout(dims, None, 0)
    mesh = build_mesh(dims, env.device.type)
    return Layout(dims, mesh, mesh["dp"].get_local_rank())


def _to_local(value: torch.Tensor) -> torch.Tensor:
    return value.full_tensor() if isinstance(value, DTensor) else value


def build_parallel_model(cfg: PretrainConfig, layout: Layout, device: torch.device) -> tuple[nn.Module, ParallelContext]:
    """The model parallelized and initialized from the seed, and what the trainer needs to drive it."""
    dims, mesh = layout.dims, layout.mesh
    if cfg.parallel.cpu_offload and device.type == "cpu":
        raise ConfigError("parallel.cpu_offload", "offloading to CPU memory needs an accelerator; this run is on "
                          "the CPU already.", "set parallel.cpu_offload=false.")
    model = build_model(cfg.model)
    plan = model.plan()
    use_loss_parallel = dims.tp > 1 and cfg.parallel.loss_parallel
    param_dtype = torch.bfloat16 if cfg.training.dtype == "bfloat16" else None
    parallelize(model, plan, dims=dims, mesh=mesh, sequence_parallel=cfg.parallel.sequence_parallel,
                loss_parallel=use_loss_parallel, reshard_after_forward=cfg.parallel.reshard_after_forward,
                activation_checkpoint=cfg.training.activation_checkpoint,
                activation_checkpoint_every=cfg.training.activation_checkpoint_every,
                compile=cfg.training.compile, param_dtype=param_dtype, cpu_offload=cfg.parallel.cpu_offload)
    model.to_empty(device="cpu" if cfg.parallel.cpu_offload else device)
    init_weights(model, cfg.model, cfg.training.seed)
    par = ParallelContext(
        dp_size=dims.dp_size,
        dp_group=mesh["dp"].get_group() if mesh is not None else None,
        clip_grad_norm=partial(clip_grad_norm_, pp_group=None),
        loss_context=loss_parallel if use_loss_parallel else nullcontext,
        to_local=_to_local,
        autocast=dims.dp_size == 1,
        comm_counter=partial(CommCounter, mesh_group_names(mesh)) if mesh is not None else None,
    )
    return model, par
