"""Model definitions."""

from titan.models.llama import Llama, flops_per_token
from titan.models.init import build_model, init_weights

__all__ = ["Llama", "build_model", "flops_per_token", "init_weights"]
