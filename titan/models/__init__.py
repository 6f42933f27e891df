"""Model definitions: the dense Llama decoder and its mixture-of-experts variant."""

from titan.config import ModelConfig
from titan.models.init import build_model, init_weights
from titan.models.llama import Llama
from titan.models.moe import MoETransformer, moe_flops_per_token
from titan.models.llama import flops_per_token as dense_flops_per_token


def flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token of the model `cfg` describes (active parameters only for MoE)."""
    return moe_flops_per_token(cfg, seq_len) if cfg.moe.n_experts else dense_flops_per_token(cfg, seq_len)


__all__ = ["Llama", "MoETransformer", "build_model", "flops_per_token", "init_weights"]
