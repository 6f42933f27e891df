"""Layout-independent initialization: each parameter's value is a function of (seed, name) only.

The model is built on the meta device, parallelized (sharded) if needed, materialized with
``to_empty``, then every parameter draws its *full* value from a generator seeded by a hash of the
seed and its global name, and keeps its local shard. So a rank, a shard count or a pipeline cut
never changes what a weight starts as.
"""

from __future__ import annotations

import hashlib
import math

import torch

from parallel.tensors import copy_full_into, local_device, tie_parameters
from titan.config import ModelConfig
from titan.models.llama import Llama
from titan.models.moe import MoETransformer

RESIDUAL_OUTPUTS = ("attention.wo.weight", "feed_forward.w2.weight", "moe.experts.w2", "moe.shared.w2.weight")


def build_model(cfg: ModelConfig) -> Llama:
    """Build the model on the meta device: no memory, no values yet. A dense Llama, or its
    mixture-of-experts variant when `model.moe.n_experts` > 0."""
    with torch.device("meta"):
        return MoETransformer(cfg) if cfg.moe.n_experts else Llama(cfg)


def name_seed(seed: int, name: str) -> int:
    """A 63-bit generator seed from the run seed and a parameter's global name."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def init_std(cfg: ModelConfig, name: str) -> float | None:
    """Standard deviation for a weight, or None for norm weights (initialized to one)."""
    if name.endswith("norm.weight"):
        return None
    if name.endswith(RESIDUAL_OUTPUTS):
        return cfg.init_std / math.sqrt(2 * cfg.n_layers)
    return cfg.init_std


@torch.no_grad()
def init_weights(model: Llama, cfg: ModelConfig, seed: int) -> None:
    """Fill every parameter from (seed, name) and reset the buffers (rotary tables, expert biases)."""
    tie_parameters(model, model.plan().tied)  # to_empty unties shared tensors unless FSDP holds them
    for name, param in model.named_parameters():
        std = init_std(cfg, name)
        device = local_device(param)
        if std is None:
            full = torch.ones(param.shape, dtype=torch.float32, device=device)
        else:
            generator = torch.Generator(device=device).manual_seed(name_seed(seed, name))
            full = torch.empty(param.shape, dtype=torch.float32, device=device).normal_(0.0, std, generator=generator)
        copy_full_into(param, full.to(param.dtype))
    for module in model.modules():
        if hasattr(module, "reset_buffers"):
            module.reset_buffers()
