"""Llama-3-style decoder in plain PyTorch: RMSNorm, rotary embeddings, GQA attention, SwiGLU.

Parameter names follow one scheme on every layout: ``tok_embeddings``, ``layers.<global index>.
{attention,feed_forward,attention_norm,ffn_norm}.*``, ``norm``, ``output``. Layers live in a
``ModuleDict`` keyed by their global index, so a pipeline stage that keeps layers 4..7 still names
them ``layers.4`` .. ``layers.7``. Head counts are read from the weights at run time, so tensor
parallelism (which shards q/k/v column-wise) needs no change here.

Rotary embeddings use the "rotate half" convention of Hugging Face Llama: the first half of each
head dimension pairs with the second half, so exported q/k weights need no permutation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from parallel.plan import BlockPlan, ModelPlan
from parallel.tensors import LastCallMemo
from titan.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_tables(head_dim: int, max_seq_len: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (max_seq_len, head_dim) in the rotate-half layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (batch, heads, seq, head_dim) by position; cos/sin are (seq, head_dim) or (batch, 1, seq, head_dim)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class CausalAttention(nn.Module):
    """Scaled dot-product attention of queries over keys: causal by position, and, given document
    ids, block-causal (a token sees only earlier tokens of its own document). Queries and keys carry
    their own positions and documents, so the keys may be more than the queries (context parallel
    gathers them from other ranks). Without positions the keys are a whole sequence from position 0
    and the queries its last tokens (all of them in a plain forward).

    Document masks are additive float tensors built once and shared by every layer: SDPA keeps the
    mask it is given for backward, so one mask object per micro-batch is held, not one per layer."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_positions: torch.Tensor | None,
                k_positions: torch.Tensor | None, q_documents: torch.Tensor | None = None,
                k_documents: torch.Tensor | None = None) -> torch.Tensor:
        gqa = q.shape[1] != k.shape[1]
        if q_positions is None and q.shape[2] == k.shape[2]:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        if q_positions is None:
            mask = causal_lower_right(q.shape[2], k.shape[2])
        else:
            mask = _SHARED_MASK(q_positions, k_positions, q_documents, k_documents, q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def attention_mask(q_positions: torch.Tensor, k_positions: torch.Tensor, q_documents: torch.Tensor | None,
                   k_documents: torch.Tensor | None) -> torch.Tensor:
    """(batch, queries, keys) booleans: key position <= query position, and the same document."""
    mask = k_positions.unsqueeze(1) <= q_positions.unsqueeze(2)
    if q_documents is not None:
        mask &= k_documents.unsqueeze(1) == q_documents.unsqueeze(2)
    return mask


def additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where attention is allowed, -inf elsewhere."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


# The mask of the last (positions, documents) seen: the layers of one forward build it once.
_SHARED_MASK = LastCallMemo(lambda q_positions, k_positions, q_documents, k_documents, dtype: additive(
    attention_mask(q_positions, k_positions, q_documents, k_documents), dtype).unsqueeze(1))


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim = cfg.dim // cfg.n_heads
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)
        self.core = CausalAttention()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor | None = None,
                documents: torch.Tensor | None = None) -> torch.Tensor:
        """`cos`/`sin` are the full rotary tables; `x` holds the whole sequence here (under sequence
        parallelism it has been gathered). Without `positions` the tokens sit at 0..seq-1; with them,
        (batch, seq) positions pick the rotary rows and order the causal mask."""
        batch, seq, _ = x.shape
        # -1 heads: under tensor parallelism each rank holds a slice of the heads.
        q = self.wq(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        if positions is None:
            cos, sin = cos[:seq].to(q.dtype), sin[:seq].to(q.dtype)
        else:
            cos, sin = cos[positions].unsqueeze(1).to(q.dtype), sin[positions].unsqueeze(1).to(q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = self.core(q, k, v, positions, positions, documents, documents)
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_hidden_dim)

    @property
    def mlp(self) -> nn.Module:
        """The feed-forward part (an MoE layer in a mixture-of-experts block)."""
        return self.feed_forward

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor | None = None,
                documents: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, positions, documents)
        return x + self.mlp(self.ffn_norm(x))


class Llama(nn.Module):
    """Decoder-only transformer. Any of tok_embeddings / norm / output may be None on a
    pipeline stage that does not own them; forward then passes hidden states through."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleDict({str(i): self.make_block(cfg, i) for i in range(cfg.n_layers)})
        self.norm: RMSNorm | None = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output: nn.Linear | None = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_tables(cfg.dim // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def make_block(self, cfg: ModelConfig, index: int) -> nn.Module:
        """Block number `index` (all alike here; a mixture-of-experts model makes some sparse)."""
        return TransformerBlock(cfg)

    def reset_buffers(self) -> None:
        """Recompute the rotary tables in place (after materializing from the meta device)."""
        cos, sin = rope_tables(self.cfg.dim // self.cfg.n_heads, self.cfg.max_seq_len, self.cfg.rope_theta,
                               device=self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def plan(self) -> ModelPlan:
        """Where this model may be split, for parallel/ (which knows nothing of Llama)."""
        return ModelPlan(
            embedding="tok_embeddings", blocks="layers", final_norm="norm", output="output",
            tied=(("output.weight", "tok_embeddings.weight"),) if self.cfg.tie_embeddings else (),
            block=BlockPlan(colwise=("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3"),
                            rowwise=("attention.wo", "feed_forward.w2"), norms=("attention_norm", "ffn_norm"),
                            tp_inputs={"attention": 5, "feed_forward": 1}, attention="attention.core"),
            tp_divisible={"model.n_heads": self.cfg.n_heads, "model.n_kv_heads": self.cfg.n_kv_heads,
                          "model.vocab_size": self.cfg.vocab_size, "model.ffn_hidden_dim": self.cfg.ffn_hidden_dim},
        )

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                documents: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids -> logits; on a pipeline stage, hidden states in or out where it lacks the
        embedding or the output. `positions` (batch, seq): each token's place in its sequence (or
        in its document), for the rotary embedding and the causal order; `documents` (batch, seq):
        document ids, to keep packed documents from attending to each other."""
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        for layer in self.layers.values():
            h = layer(h, self.rope_cos, self.rope_sin, positions, documents)
        h = self.norm(h) if self.norm is not None else h
        return self.output(h) if self.output is not None else h


def linear_param_count(model: nn.Module) -> int:
    """Parameters that take part in matmuls (every nn.Linear weight, counted once if tied)."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        if isinstance(module, nn.Linear) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            total += module.weight.numel()
    return total


def flops_per_token(cfg: ModelConfig, seq_len: int, mlp_params: int | None = None) -> int:
    """Training FLOPs per token: 6 x matmul parameters a token goes through + 12 x layers x dim x
    seq_len (attention scores and values, forward + backward, counted as a full square as matmul
    counters do). `mlp_params`: the feed-forward parameters a token uses over all layers (a
    mixture of experts passes its active ones); dense SwiGLUs by default."""
    head_dim = cfg.dim // cfg.n_heads
    attn = cfg.dim * cfg.n_heads * head_dim + 2 * cfg.dim * cfg.n_kv_heads * head_dim + cfg.n_heads * head_dim * cfg.dim
    if mlp_params is None:
        mlp_params = cfg.n_layers * 3 * cfg.dim * cfg.ffn_hidden_dim
    matmul_params = cfg.n_layers * attn + mlp_params + cfg.dim * cfg.vocab_size
    return 6 * matmul_params + 12 * cfg.n_layers * cfg.n_heads * head_dim * seq_len
