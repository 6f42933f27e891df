"""After each optimizer step of a mixture-of-experts model: the step's routing statistics summed
over every rank, the auxiliary-loss-free bias update (DeepSeek-V3), and the `moe/*` metrics.

Each MoE layer counts, during training forwards, the tokens routed to each of its experts, the rows
its experts computed, and its summed balancing loss and z-loss. Here every rank writes the layers
it holds into one (MoE layers x values) table, which is summed over the data- and context-parallel
ranks and the pipeline stages (a layer lives on one stage; tensor-parallel ranks compute the same
numbers and are not summed), so every rank sees the global load of every layer and moves its
biases by the same amounts: `bias += rate x sign(mean load - load)`, outside the gradient.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import torch
from torch import nn

from parallel.tensors import local_tensor
from titan.config import ModelConfig
from titan.models.moe import MoE, is_moe_layer

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.moe$")


class ExpertBalance:
    def __init__(self, model: nn.Module, cfg: ModelConfig, global_sum: Callable[[torch.Tensor], torch.Tensor]):
        self.cfg, self.global_sum = cfg, global_sum
        self.rate, self.top_k, self.n_experts = cfg.moe.bias_update_rate, cfg.moe.top_k, cfg.moe.n_experts
        self.layer_ids = [i for i in range(cfg.n_layers) if is_moe_layer(cfg.moe, i)]
        self.local: dict[int, MoE] = {}
        for name, module in model.named_modules():
            match = _LAYER.search(name)
            if match and isinstance(module, MoE):
                self.local[int(match.group(1))] = module

    @torch.no_grad()
    def after_step(self, applied: bool = True) -> dict[str, Any]:
        """Reduce the step's statistics, update the biases (unless the step was not `applied`), clear
        the counters; the step's metrics."""
        device = next(iter(self.local.values())).load.device if self.local else torch.device("cpu")
        table = torch.zeros(len(self.layer_ids), self.n_experts + 5, dtype=torch.float64, device=device)
        for row, layer_id in enumerate(self.layer_ids):
            layer = self.local.get(layer_id)
            if layer is not None:
                table[row] = torch.cat([layer.load, layer.totals, local_tensor(layer.experts.processed).view(1)])
                layer.reset_buffers()
                layer.experts.reset_buffers()
        table = self.global_sum(table)
        load, tokens, sequences, balance, z_loss, processed = table[:, :self.n_experts], *table[:, self.n_experts:].T
        mean = load.mean(dim=1, keepdim=True)
        if self.rate and applied:
            for row, layer_id in enumerate(self.layer_ids):
                layer = self.local.get(layer_id)
                if layer is not None:
                    layer.router.expert_bias.add_(self.rate * torch.sign(mean[row] - load[row]).float())
        return self._metrics(load, mean, tokens, sequences, balance, z_loss, processed)

    def _metrics(self, load: torch.Tensor, mean: torch.Tensor, tokens: torch.Tensor, sequences: torch.Tensor,
                 balance: torch.Tensor, z_loss: torch.Tensor, processed: torch.Tensor) -> dict[str, Any]:
        relative = load / mean.clamp(min=1e-12)
        per_layer = relative.max(dim=1).values
        metrics: dict[str, Any] = {
            "moe/aux_loss": (balance / sequences.clamp(min=1)).mean().item(),
            "moe/z_loss": (z_loss / tokens.clamp(min=1)).mean().item(),
            "moe/load_max_mean": per_layer.max().item(),
            "moe/tokens_dropped": int(round((tokens * self.top_k - processed).sum().item())),
        }
        metrics.update({f"moe/load_max_mean/layer_{i}": v.item() for i, v in zip(self.layer_ids, per_layer)})
        metrics["moe/expert_load"] = {str(i): [round(v, 4) for v in row.tolist()]
                                      for i, row in zip(self.layer_ids, relative)}
        return metrics
