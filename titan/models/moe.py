"""Mixture-of-experts variant of the Llama decoder (DeepSeek-V3 / OLMoE style), in plain PyTorch.

Every `moe.every`-th block after the first `moe.first_dense` replaces its SwiGLU with an MoE layer:
a token-choice top-k router, `n_experts` SwiGLU experts whose weights are stacked (expert on dim 0,
so one global name holds every expert and checkpoints reshape across expert-parallel degrees), and
optional shared experts every token goes through. Dropless: every routed token is computed.

Load balancing, after DeepSeek-V3: a per-expert bias added to the scores for the *selection* only
(never to the weights, never through the gradient), moved after each optimizer step by
:mod:`titan.expert_balance` from the global load; plus an optional sequence-level balancing loss
and router z-loss. Those two are not part of the reported loss: their gradient is injected where
they arise (:class:`_AddLossGradient`), scaled like the token loss, so they work on any pipeline
stage. Ties in the selection go to the lower expert index (a stable sort), so routing is the same
on every layout.

Names: ``layers.<i>.moe.router.gate.weight`` (E x dim), ``...moe.router.expert_bias`` (E, a
persistent buffer), ``...moe.experts.w1`` / ``w3`` (E x hidden x dim), ``...moe.experts.w2``
(E x dim x hidden), ``...moe.shared.{w1,w2,w3}.weight``; dense blocks keep ``feed_forward``.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from parallel.pipeline import in_shape_inference
from parallel.plan import BlockPlan, ModelPlan
from parallel.tensors import inverse_permutation, local_tensor
from titan.config import ModelConfig, MoEConfig
from titan.models.llama import Attention, FeedForward, Llama, RMSNorm, TransformerBlock, flops_per_token

_LOSS_SCALE: ContextVar[float] = ContextVar("moe_loss_scale", default=1.0)


@contextmanager
def auxiliary_loss_scale(scale: float) -> Iterator[None]:
    """Within this block, the balancing and z-losses reach backward multiplied by `scale`: the factor
    the runner applies to a micro-batch's summed token loss (so both are means over the global batch)."""
    token = _LOSS_SCALE.set(scale)
    try:
        yield
    finally:
        _LOSS_SCALE.reset(token)


class _AddLossGradient(torch.autograd.Function):
    """Identity on `out`; in backward, `loss` receives gradient `scale` as if it had been added to the
    objective (Megatron's trick: the loss needs no path to the end of the network)."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, loss: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        ctx.loss_shape, ctx.loss_dtype = loss.shape, loss.dtype
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, torch.full(ctx.loss_shape, ctx.scale, dtype=ctx.loss_dtype, device=grad.device), None


class Router(nn.Module):
    """Token-choice top-k over sigmoid or softmax scores; `expert_bias` shifts only the selection."""

    def __init__(self, dim: int, moe: MoEConfig):
        super().__init__()
        self.top_k, self.score, self.normalize, self.scale = moe.top_k, moe.score, moe.normalize_weights, moe.route_scale
        self.gate = nn.Linear(dim, moe.n_experts, bias=False)
        self.register_buffer("expert_bias", torch.zeros(moe.n_experts, dtype=torch.float32))

    def reset_buffers(self) -> None:
        self.expert_bias.zero_()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tokens, dim) -> logits and scores (tokens, E), weights and expert indices (tokens, top_k)."""
        logits = F.linear(x.float(), self.gate.weight.float())
        scores = logits.sigmoid() if self.score == "sigmoid" else logits.softmax(dim=-1)
        choice = scores.detach() + self.expert_bias
        indices = torch.sort(choice, dim=-1, descending=True, stable=True).indices[:, :self.top_k]
        weights = scores.gather(1, indices)
        if self.normalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return logits, scores, weights * self.scale, indices


class GroupedExperts(nn.Module):
    """`n_experts` SwiGLUs with stacked weights, applied to tokens grouped by expert.

    Under expert parallelism the weights are shards (this rank's experts) and the tokens arrive
    grouped by local expert; `counts` always matches the experts held here."""

    def __init__(self, n_experts: int, dim: int, hidden_dim: int, impl: str):
        super().__init__()
        self.impl = impl
        self.w1 = nn.Parameter(torch.empty(n_experts, hidden_dim, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, hidden_dim))
        self.w3 = nn.Parameter(torch.empty(n_experts, hidden_dim, dim))
        self.register_buffer("processed", torch.zeros((), dtype=torch.float64), persistent=False)

    def reset_buffers(self) -> None:
        self.processed.zero_()

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """(rows, dim) grouped by expert, `counts` (experts,) rows per expert -> (rows, dim)."""
        w1, w2, w3 = (local_tensor(w) for w in (self.w1, self.w2, self.w3))
        _record(local_tensor(self.processed), counts.sum())
        if self._grouped(x):
            offsets = torch.cumsum(counts, 0, dtype=torch.int32)
            hidden = F.silu(torch._grouped_mm(x, w1.transpose(-2, -1), offs=offsets)) * torch._grouped_mm(
                x, w3.transpose(-2, -1), offs=offsets)
            return torch._grouped_mm(hidden, w2.transpose(-2, -1), offs=offsets)
        outputs = [F.linear(F.silu(F.linear(rows, w1[e])) * F.linear(rows, w3[e]), w2[e])
                   for e, rows in enumerate(torch.split(x, counts.tolist()))]
        return torch.cat(outputs) if outputs else x

    def _grouped(self, x: torch.Tensor) -> bool:
        """torch._grouped_mm where it runs: on CPU always; CUDA needs aligned groups, left to
        `experts_impl=grouped` until they are padded. Never for float64 or no rows (unsupported)."""
        if x.shape[0] == 0 or self.impl == "looped" or x.dtype == torch.float64:
            return False
        return self.impl == "grouped" or x.device.type == "cpu"


@torch.compiler.disable
def _record(total: torch.Tensor, value: torch.Tensor) -> None:
    """Add `value` to a statistics buffer, in training forwards only: not in the recomputation
    activation checkpointing does during backward (it would count the tokens twice), nor in a
    pipeline stage's shape inference (placeholder inputs)."""
    if torch.is_grad_enabled() and torch._C._current_graph_task_id() == -1 and not in_shape_inference():
        total.add_(value.detach().to(total.dtype))


class MoE(nn.Module):
    """Router -> experts (dropless) -> weighted sum of each token's top-k outputs (+ shared experts).

    Per training forward it adds to its statistics buffers: tokens routed to each expert, token and
    sequence counts, and the summed (unweighted) balancing loss and z-loss, which
    :mod:`titan.expert_balance` reads, reduces over ranks and clears after each step."""

    def __init__(self, dim: int, moe: MoEConfig):
        super().__init__()
        self.n_experts, self.top_k = moe.n_experts, moe.top_k
        self.aux_loss_coef, self.z_loss_coef = moe.aux_loss_coef, moe.z_loss_coef
        self.router = Router(dim, moe)
        self.experts = GroupedExperts(moe.n_experts, dim, moe.hidden_dim, moe.experts_impl)
        self.shared = FeedForward(dim, moe.hidden_dim * moe.n_shared_experts) if moe.n_shared_experts else None
        self.register_buffer("load", torch.zeros(moe.n_experts, dtype=torch.float64), persistent=False)
        # tokens, sequences, summed balancing loss, summed z-loss
        self.register_buffer("totals", torch.zeros(4, dtype=torch.float64), persistent=False)

    def reset_buffers(self) -> None:
        self.load.zero_()
        self.totals.zero_()

    @staticmethod
    def sum_over_sequence(value: torch.Tensor) -> torch.Tensor:
        """Sum of `value` over the ranks holding parts of these sequences (context parallelism sets
        it); here each rank holds whole sequences."""
        return value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, dim = x.shape
        flat = x.reshape(-1, dim)
        logits, scores, weights, indices = self.router(flat)
        out = self._routed(flat, weights, indices).view(batch, seq, dim)
        if self.shared is not None:
            out = out + self.shared(x)
        balance, full_seq = self._balance_loss(scores, indices, batch)
        z_loss = torch.logsumexp(logits, dim=-1).square().sum()
        if self.training:
            _record(self.load, torch.bincount(indices.flatten(), minlength=self.n_experts))
            # sequences: the share of each sequence held here, so the counts add up to whole ones
            _record(self.totals, torch.stack([flat.new_tensor(batch * seq, dtype=torch.float64),
                                              flat.new_tensor(batch * seq / full_seq, dtype=torch.float64),
                                              balance.detach().double(), z_loss.detach().double()]))
        objective = self.aux_loss_coef * full_seq * balance + self.z_loss_coef * z_loss
        if self.training and objective.requires_grad:
            out = _AddLossGradient.apply(out, objective, _LOSS_SCALE.get())
        return out

    def _routed(self, flat: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Copies of each token grouped by expert, through the experts, back in token order, weighted
        and summed over the top k (in a fixed order, so the sum is the same on every layout)."""
        tokens, k = indices.shape
        expert_of = indices.flatten()
        order = torch.argsort(expert_of, stable=True)
        counts = torch.bincount(expert_of, minlength=self.n_experts)
        grouped = self.experts(flat[order // k], counts)
        outputs = grouped[inverse_permutation(order)].view(tokens, k, -1)
        return (outputs * weights.unsqueeze(-1).to(outputs.dtype)).sum(dim=1)

    def _balance_loss(self, scores: torch.Tensor, indices: torch.Tensor, batch: int) -> tuple[torch.Tensor, int]:
        """Sum over sequences of DeepSeek-V3's sequence-wise balance loss sum_i f_i P_i, with f_i the
        share of the sequence's routed slots that went to expert i (x E / k) and P_i its mean
        normalized score; and the sequences' whole length. When a sequence is split over ranks, the
        counts are summed over them first and each rank returns its tokens' part of the sum."""
        counts = torch.zeros(batch, self.n_experts, device=scores.device).scatter_add_(
            1, indices.reshape(batch, -1), torch.ones(indices.numel() // batch, device=scores.device).expand(batch, -1))
        counts = self.sum_over_sequence(counts)
        full_seq = int(counts[0].sum().item()) // self.top_k
        share = counts * self.n_experts / (full_seq * self.top_k)
        normalized = scores / scores.sum(dim=-1, keepdim=True)
        mean_score = normalized.view(batch, -1, self.n_experts).sum(dim=1) / full_seq
        return (share * mean_score).sum(), full_seq


class MoEBlock(TransformerBlock):
    """A transformer block whose feed-forward is an MoE layer."""

    def __init__(self, cfg: ModelConfig):
        nn.Module.__init__(self)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.moe = MoE(cfg.dim, cfg.moe)

    @property
    def mlp(self) -> nn.Module:
        return self.moe


def is_moe_layer(moe: MoEConfig, index: int) -> bool:
    """Whether block `index` holds an MoE layer: every `every`-th one from `first_dense` on."""
    return moe.n_experts > 0 and index >= moe.first_dense and (index - moe.first_dense) % moe.every == 0


class MoETransformer(Llama):
    """The Llama decoder with MoE layers in the blocks `is_moe_layer` picks."""

    def make_block(self, cfg: ModelConfig, index: int) -> nn.Module:
        return MoEBlock(cfg) if is_moe_layer(cfg.moe, index) else TransformerBlock(cfg)

    def plan(self) -> ModelPlan:
        dense = super().plan()
        b = dense.block
        sparse = BlockPlan(colwise=b.colwise[:3], rowwise=b.rowwise[:1], norms=b.norms,
                           tp_inputs={"attention": b.tp_inputs["attention"]}, attention=b.attention,
                           replicated=("moe",), sequence_sums=("moe",))
        keys = tuple(str(i) for i in range(self.cfg.n_layers) if is_moe_layer(self.cfg.moe, i))
        return ModelPlan(embedding=dense.embedding, blocks=dense.blocks, final_norm=dense.final_norm,
                         output=dense.output, block=dense.block, tied=dense.tied, tp_divisible=dense.tp_divisible,
                         sparse_blocks=keys, sparse_block=sparse, experts="moe.experts")


def moe_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token counting the experts a token is routed to (and the shared ones and
    the router), not the idle ones."""
    moe = cfg.moe
    n_sparse = sum(is_moe_layer(moe, i) for i in range(cfg.n_layers))
    sparse = cfg.dim * moe.n_experts + 3 * cfg.dim * moe.hidden_dim * (moe.top_k + moe.n_shared_experts)
    dense = 3 * cfg.dim * cfg.ffn_hidden_dim
    return flops_per_token(cfg, seq_len, n_sparse * sparse + (cfg.n_layers - n_sparse) * dense)
