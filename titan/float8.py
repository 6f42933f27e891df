"""Float8 training (`training.float8`) with torchao: the linears of the transformer blocks that the
model's plan splits for tensor parallelism (attention q/k/v/o, feed-forward w1/w2/w3) run their
matmuls in float8 with dynamic tensorwise scaling. The output projection, MoE routers and grouped
experts stay in the training dtype.

The conversion swaps `nn.Linear` for torchao's `Float8Linear` on the plain model, before any
parallelism; parameter names and values are those of `nn.Linear`, so checkpoints load into runs
with or without float8. Under FSDP the weights are all-gathered in float8, and their scales are
computed in one all-reduce after each optimizer step (and after each load) instead of one per weight.
Under tensor parallelism the linears take torchao's float8 styles (inputs cast to float8 before their
all-gather); with sequence parallelism those all-gathers carry float8, which gloo cannot. On the CPU the float8 matmuls are emulated: functional and slow, for tests only.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from parallel.plan import ModelPlan
from titan.config import ConfigError


def check_float8(device: torch.device, sequence_parallel: bool = False) -> None:
    """Refuse float8 where it cannot run: torchao missing, a GPU without float8 matmuls, sequence
    parallelism on gloo (its float8 all-gathers need NCCL; gloo has no float8 type)."""
    try:
        import torchao.float8  # noqa: F401
    except ImportError as exc:
        raise ConfigError("training.float8", f"float8 training needs torchao, which is not installed ({exc}).",
                          "pip install .[float8] (torchao), or set training.float8=false.") from exc
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        raise ConfigError("training.float8", f"{torch.cuda.get_device_name(device)} (compute capability "
                          f"{major}.{minor}) has no float8 matmuls; they need 8.9 or newer (Ada, Hopper, Blackwell).",
                          "run on such a GPU, or set training.float8=false.")
    if sequence_parallel and device.type == "cpu":
        raise ConfigError("training.float8", "float8 with sequence parallelism all-gathers float8 tensors, which "
                          "gloo (the CPU backend) cannot carry.",
                          "set parallel.sequence_parallel=false (float8 with plain TP works on CPU), or run on GPUs.")


def convert_to_float8(model: nn.Module, plan: ModelPlan, device: torch.device, fsdp: bool) -> None:
    """Swap the block linears of `model` (on the meta device, not yet parallelized) for `Float8Linear`s;
    `fsdp`: the weights will be sharded and all-gathered in float8."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    blocks: nn.ModuleDict = model.get_submodule(plan.blocks)
    names = {f"{plan.blocks}.{key}.{name}" for key in blocks
             for name in (*plan.block_plan(key).colwise, *plan.block_plan(key).rowwise)}
    config = Float8LinearConfig(enable_fsdp_float8_all_gather=fsdp, emulate=device.type == "cpu")
    convert_to_float8_training(model, config=config, module_filter_fn=lambda module, fqn: fqn in names)
    if fsdp:
        for name in names:
            model.get_submodule(name).register_state_dict_post_hook(_plain_weight)


def tp_styles() -> tuple[type, type]:
    """Tensor-parallel styles of float8 linears: their inputs are cast to float8 before the all-gather."""
    from torchao.float8.float8_tensor_parallel import Float8ColwiseParallel, Float8RowwiseParallel

    return Float8ColwiseParallel, Float8RowwiseParallel


def _plain_weight(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """Save the weight that FSDP all-gathers in float8 as the plain tensor it wraps (same storage, so
    loads in place still land in the parameter): checkpoints then load without torchao."""
    weight = state_dict[prefix + "weight"]
    state_dict[prefix + "weight"] = DTensor.from_local(weight.to_local()._tensor, weight.device_mesh,
                                                       weight.placements, shape=weight.shape, stride=weight.stride())


def keep_scales_fresh(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Precompute the float8 scales of FSDP-sharded weights (one all-reduce) whenever the weights
    change: after each optimizer step and after each load of a state dict (resume, rollback)."""
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    optimizer.register_step_post_hook(lambda *_: precompute_float8_dynamic_scale_for_fsdp(model))
    model.register_load_state_dict_post_hook(lambda *_: precompute_float8_dynamic_scale_for_fsdp(model))


def describe_float8(model: nn.Module, device: torch.device) -> str:
    """One line for the run's log: what computes in float8, and that the CPU only emulates it."""
    from torchao.float8.float8_linear import Float8Linear

    converted = sum(isinstance(module, Float8Linear) for module in model.modules())
    line = (f"float8: {converted} block linears (on this rank) train with torchao Float8Linear "
            "(dynamic tensorwise scaling)")
    if device.type == "cpu":
        line += "; on the CPU float8 matmuls are emulated: slow, meant for testing only"
    return line
