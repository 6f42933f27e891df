"""Build the model for this rank's place in the layout: mesh -> meta model -> (pipeline cut) ->
parallelize -> initialize from the seed -> the runner the trainer drives it with."""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from parallel.comm_stats import CommCounter, mesh_group_names
from parallel.data_parallel import check_reshard_after_forward
from parallel.errors import LayoutError
from parallel.grad_norm import clip_grad_norm_
from parallel.context_parallel import check_cp_degree
from parallel.mesh import (DistEnv, ParallelDims, build_expert_mesh, build_mesh, describe_mesh, hierarchical_dims,
                           loss_group)
from parallel.parallelize import parallelize
from parallel.plan import ModelPlan
from parallel.replica_reduction import ReplicaReduction
from parallel.pipeline import (V_SHAPED, PipelineLayout, SideInputs, StageUnion, build_schedule, plan_stages,
                               stage_module)
from parallel.tensor_parallel import check_tp_degree
from titan.checkpoint.hf import check_init_from, load_pretrained
from titan.config import ConfigError, PretrainConfig, on_device
from titan.float8 import check_float8, convert_to_float8, tp_styles
from titan.models import Llama, build_model, flops_per_token, init_weights
from titan.runners import InputLayout, MicroBatchRunner, PipelineRunner, ScaledTokenLoss, StepRunner
from titan.trainer import ParallelContext


@dataclass
class Layout:
    dims: ParallelDims
    mesh: DeviceMesh | None
    dp_mesh: DeviceMesh | None  # the flattened (dp_replicate, dp_shard) dimension
    expert_mesh: DeviceMesh | None = None  # (pp, dp_replicate, expert_shard, ep, tp) when ep > 1

    @property
    def dp_rank(self) -> int:
        return self.dp_mesh.get_local_rank() if self.dp_mesh is not None else 0


def resolve_dims(cfg: PretrainConfig, env: DistEnv) -> ParallelDims:
    """Parallel degrees from the config (or the node topology when hierarchical), validated."""
    p = cfg.parallel
    dp_replicate, dp_shard = p.dp_replicate, p.dp_shard
    if p.hierarchical:
        dp_replicate, dp_shard = hierarchical_dims(env, p.tp, p.pp, p.cp)
    return ParallelDims(dp_replicate, dp_shard, p.tp, p.pp, env.world_size, p.cp, p.ep)


def build_layout(dims: ParallelDims, env: DistEnv) -> Layout:
    if env.world_size == 1:
        return Layout(dims, None, None)
    mesh, dp_mesh = build_mesh(dims, env.device.type)
    return Layout(dims, mesh, dp_mesh, build_expert_mesh(mesh, dims) if dims.ep > 1 else None)


def report_mesh(layout: Layout, env: DistEnv, run_dir: Path) -> None:
    """Every rank says where it sits: one line on its output and `<run.dir>/mesh/rank-<N>.json`."""
    if layout.mesh is None:
        return
    record = describe_mesh(layout.mesh, env, layout.expert_mesh)
    folder = run_dir / "mesh"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank-{env.rank}.json").write_text(json.dumps(record, indent=1) + "\n")
    place = " ".join(f"{name} {record['coordinate'][name]}/{size}" for name, size in record["shape"].items())
    groups = ", ".join(f"{name} group {ranks}" for name, ranks in {**record["groups"], **record.get("expert_groups", {})}.items()
                       if len(ranks) > 1)
    print(f"mesh: rank {env.rank} (node {env.node_rank}, local rank {env.local_rank}, host {record['host']}): "
          f"{place}; {groups}", flush=True)


def check_layout(cfg: PretrainConfig, dims: ParallelDims, device: torch.device, plan: ModelPlan | None = None) -> None:
    """Everything about the layout that can be refused before any process group exists (`plan`: the
    model's, when the caller has it already)."""
    if cfg.parallel.cpu_offload and device.type == "cpu":
        raise ConfigError("parallel.cpu_offload", "offloading to CPU memory needs an accelerator; this run is on "
                          "the CPU already.", "set parallel.cpu_offload=false.")
    plan = plan or build_model(cfg.model).plan()
    if cfg.model.init_from:
        check_init_from(cfg.model)
    if cfg.training.float8:
        check_float8(device, cfg.parallel.sequence_parallel and dims.tp > 1)
    if dims.tp > 1:
        check_tp_degree(plan, dims.tp)
    if dims.cp > 1:
        check_cp_degree(plan, dims.cp, cfg.training.seq_len)
    if dims.fsdp_size > 1:
        check_reshard_after_forward(cfg.parallel.reshard_after_forward, dims.dp_shard * dims.cp)
    if dims.pp > 1:
        if cfg.model.tie_embeddings:
            raise LayoutError("model.tie_embeddings", "tied embeddings would live on two pipeline stages.",
                              "set model.tie_embeddings=false to use pipeline parallelism, or parallel.pp=1.")
        pipeline_microbatches(cfg, dims, pipeline_layout(cfg, dims.pp))


def _to_local(value: torch.Tensor) -> torch.Tensor:
    return value.full_tensor() if isinstance(value, DTensor) else value


def pipeline_layout(cfg: PretrainConfig, pp: int) -> PipelineLayout:
    """Stages balanced by estimated FLOPs: blocks, plus the output projection on the last stage."""
    m, p = cfg.model, cfg.parallel
    per_token = flops_per_token(m, cfg.training.seq_len)
    output_cost = 6 * m.dim * m.vocab_size
    layer_cost = (per_token - output_cost) / m.n_layers
    return plan_stages(m.n_layers, pp, p.pp_virtual_stages, p.pp_schedule, layer_cost, 0.0, output_cost,
                       tuple(p.pp_layers_per_stage) if p.pp_layers_per_stage else None)


def pipeline_microbatches(cfg: PretrainConfig, dims: ParallelDims, layout: PipelineLayout) -> int:
    local = cfg.training.global_batch_size // dims.dp_size
    n = cfg.parallel.pp_microbatches or local // cfg.training.micro_batch_size
    if local % n:
        raise ConfigError("parallel.pp_microbatches", f"{n} microbatches do not split the {local} sequences each "
                          "data-parallel rank gets per step.", "choose a divisor of global_batch_size / dp.")
    stages_per_rank = layout.num_stages // dims.pp
    # DualPipeV runs both halves of its V at once: it needs a microbatch per stage.
    least = layout.num_stages if cfg.parallel.pp_schedule == "dualpipev" else dims.pp
    if n < least or (stages_per_rank > 1 and n % dims.pp):
        raise ConfigError("parallel.pp_microbatches", f"{cfg.parallel.pp_schedule} over pp={dims.pp} needs at least "
                          f"{least} microbatches{' (a multiple of pp)' if stages_per_rank > 1 else ''}, got {n}.",
                          "lower training.micro_batch_size, raise training.global_batch_size or set "
                          "parallel.pp_microbatches.")
    return n


def _parallelize_part(part: nn.Module, cfg: PretrainConfig, layout: Layout, use_loss_parallel: bool,
                      device: torch.device) -> ReplicaReduction | None:
    """(float8) -> TP -> activation checkpointing -> compile -> FSDP on one model part, then materialize and init."""
    if cfg.training.float8:
        convert_to_float8(part, part.plan(), device, fsdp=layout.dims.fsdp_size > 1)
    replicas = parallelize(part, part.plan(), dims=layout.dims, mesh=layout.mesh, expert_mesh=layout.expert_mesh,
                sequence_parallel=cfg.parallel.sequence_parallel,
                loss_parallel=use_loss_parallel, reshard_after_forward=cfg.parallel.reshard_after_forward,
                activation_checkpoint=cfg.training.activation_checkpoint,
                activation_checkpoint_every=cfg.training.activation_checkpoint_every,
                compile=on_device(cfg.training.compile, device.type),
                param_dtype=torch.bfloat16 if cfg.training.dtype == "bfloat16" else None,
                cpu_offload=cfg.parallel.cpu_offload, linear_styles=tp_styles() if cfg.training.float8 else None,
                fsdp_prefetch=cfg.parallel.fsdp_prefetch)
    part.to_empty(device="cpu" if cfg.parallel.cpu_offload else device)
    init_weights(part, cfg.model, cfg.training.seed)
    if cfg.model.init_from:
        load_pretrained(part, Path(cfg.model.init_from))
    return replicas


def build_parallel_model(cfg: PretrainConfig, layout: Layout, device: torch.device,
                         data_eot_id: int | None = None) -> tuple[nn.Module, ParallelContext]:
    """The model (or this rank's pipeline stages) parallelized and initialized from the seed, and
    what the trainer needs to drive it. The layout must have passed `check_layout`."""
    dims, mesh = layout.dims, layout.mesh
    use_loss_parallel = dims.tp > 1 and cfg.parallel.loss_parallel
    tokens_per_step = cfg.training.global_batch_size * cfg.training.seq_len
    # Under FSDP, mixed precision comes from its policy; otherwise from autocast.
    autocast_dtype = torch.bfloat16 if cfg.training.dtype == "bfloat16" and dims.fsdp_size == 1 else None
    loss_context = loss_parallel if use_loss_parallel else nullcontext
    inputs = InputLayout(data_eot_id if cfg.data.document_mask else None, cfg.data.reset_positions,
                         mesh["cp"].get_local_rank() if dims.cp > 1 else 0, dims.cp)
    model = build_model(cfg.model)
    runner: StepRunner
    if dims.pp == 1:
        replicas = _parallelize_part(model, cfg, layout, use_loss_parallel, device)
        runner = MicroBatchRunner(model, device, tokens_per_step, dims.fsdp_size, autocast_dtype, loss_context,
                                  _to_local, inputs, replicas)
    else:
        model, runner = _build_pipeline(model, cfg, layout, device, use_loss_parallel, tokens_per_step,
                                        autocast_dtype, loss_context, inputs)
    pp_group = mesh["pp"].get_group() if dims.pp > 1 else None
    par = ParallelContext(
        runner=runner,
        dp_size=dims.dp_size,
        dp_group=layout.dp_mesh.get_group() if layout.dp_mesh is not None else None,
        loss_group=loss_group(mesh, layout.dp_mesh, dims) if dims.fsdp_size > 1 else None,
        pp_group=pp_group,
        clip_grad_norm=partial(clip_grad_norm_, pp_group=pp_group),
        comm_counter=partial(CommCounter, mesh_group_names(mesh, layout.dp_mesh, layout.expert_mesh)) if mesh is not None else None,
    )
    return model, par


def _build_pipeline(model: Llama, cfg: PretrainConfig, layout: Layout, device: torch.device, use_loss_parallel: bool,
                    tokens_per_step: int, autocast_dtype: torch.dtype | None, loss_context,
                    inputs: InputLayout) -> tuple[nn.Module, PipelineRunner]:
    dims, mesh = layout.dims, layout.mesh
    stages_layout = pipeline_layout(cfg, dims.pp)
    n_microbatches = pipeline_microbatches(cfg, dims, stages_layout)
    pp_mesh = mesh["pp"]
    pp_rank = pp_mesh.get_local_rank()
    plan = model.plan()
    parts, stages = [], []
    for stage in stages_layout.stages_of(pp_rank):
        part = stage_module(model, plan, stages_layout, stage)
        _parallelize_part(part, cfg, layout, use_loss_parallel, device)
        parts.append(part)
        stages.append(PipelineStage(part, stage, stages_layout.num_stages, device, group=pp_mesh.get_group()))
    loss_fn = ScaledTokenLoss(_to_local)
    schedule = build_schedule(cfg.parallel.pp_schedule, stages, n_microbatches, loss_fn)
    local = stages_layout.stages_of(pp_rank)
    runner = PipelineRunner(schedule, loss_fn, has_first=0 in local, has_last=stages_layout.num_stages - 1 in local,
                            device=device, tokens_per_step=tokens_per_step, dp_size=dims.fsdp_size,
                            autocast_dtype=autocast_dtype, loss_context=loss_context, to_local=_to_local,
                            eval_needs_backward=cfg.parallel.pp_schedule in V_SHAPED, parts=parts,
                            n_microbatches=n_microbatches, side_inputs=SideInputs(stages), inputs=inputs)
    return StageUnion(parts, plan), runner
