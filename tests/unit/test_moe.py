"""The mixture-of-experts layer against reference formulas: routing, grouped experts, the dropless
combine, the balancing and z-losses' gradients, the auxiliary-loss-free bias, active FLOPs."""

from __future__ import annotations

import math

import pytest
import torch

from titan.config import ModelConfig, MoEConfig
from titan.expert_balance import ExpertBalance
from titan.models import build_model, flops_per_token, init_weights
from titan.models.llama import flops_per_token as dense_flops
from titan.models.moe import MoE, GroupedExperts, Router, auxiliary_loss_scale

DIM = 16


def reference_route(x: torch.Tensor, gate: torch.Tensor, bias: torch.Tensor, moe: MoEConfig):
    """Per token, in plain Python: scores, top-k of scores + bias (ties to the lower index), weights."""
    picks, weights = [], []
    for token in x.double():
        logits = [float(token @ row) for row in gate.double()]
        if moe.score == "sigmoid":
            scores = [1 / (1 + math.exp(-v)) for v in logits]
        else:
            top = max(logits)
            exp = [math.exp(v - top) for v in logits]
            scores = [e / sum(exp) for e in exp]
        ranked = sorted(range(len(scores)), key=lambda e: (-(scores[e] + float(bias[e])), e))[:moe.top_k]
        w = [scores[e] for e in ranked]
        if moe.normalize_weights:
            w = [v / sum(w) for v in w]
        picks.append(ranked)
        weights.append([v * moe.route_scale for v in w])
    return torch.tensor(picks), torch.tensor(weights, dtype=torch.float64)


@pytest.mark.parametrize("score", ["sigmoid", "softmax"])
@pytest.mark.parametrize("normalize", [True, False])
def test_router_matches_the_reference_formula(score, normalize):
    moe = MoEConfig(n_experts=8, top_k=3, score=score, normalize_weights=normalize, route_scale=2.5)
    router = Router(DIM, moe)
    torch.manual_seed(0)
    torch.nn.init.normal_(router.gate.weight, std=0.5)
    router.expert_bias.copy_(torch.linspace(-0.3, 0.3, 8))
    x = torch.randn(32, DIM)
    _, _, weights, indices = router(x)
    ref_indices, ref_weights = reference_route(x, router.gate.weight.detach(), router.expert_bias, moe)
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(weights.double(), ref_weights, rtol=1e-5, atol=1e-6)


def test_router_breaks_ties_by_expert_index_and_keeps_the_bias_out_of_the_weights():
    moe = MoEConfig(n_experts=6, top_k=2, score="sigmoid", normalize_weights=False)
    router = Router(DIM, moe)
    torch.nn.init.zeros_(router.gate.weight)  # every score 0.5: all tied
    _, _, weights, indices = router(torch.randn(4, DIM))
    assert indices.tolist() == [[0, 1]] * 4
    router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.1, 0.2, 0.0]))
    _, _, weights, indices = router(torch.randn(4, DIM))
    assert indices.tolist() == [[4, 3]] * 4  # the bias picks the experts...
    assert torch.allclose(weights, torch.full_like(weights, 0.5))  # ...but never weighs them


@pytest.mark.parametrize("counts", [[5, 0, 7, 1], [0, 0, 0, 3], [0, 0, 0, 0]])
def test_grouped_experts_match_the_per_expert_loop(counts):
    torch.manual_seed(1)
    looped, grouped = GroupedExperts(4, DIM, 12, "looped"), GroupedExperts(4, DIM, 12, "grouped")
    for a, b in zip(looped.parameters(), grouped.parameters()):
        torch.nn.init.normal_(a, std=0.3)
        b.data.copy_(a.data)
    x = torch.randn(sum(counts), DIM)
    grad = torch.randn(sum(counts), DIM)
    outs = []
    for experts in (looped, grouped):
        rows = x.clone().requires_grad_()
        out = experts(rows, torch.tensor(counts))
        out.backward(grad)
        outs.append((out, rows.grad, [p.grad for p in experts.parameters()]))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1])
    for a, b in zip(outs[0][2], outs[1][2]):
        torch.testing.assert_close(a, b)


def swiglu(x, w1, w2, w3):
    return torch.nn.functional.silu(x @ w1.T) * (x @ w3.T) @ w2.T


def test_moe_layer_is_dropless_and_matches_a_per_token_loop():
    moe_cfg = MoEConfig(n_experts=8, top_k=2, hidden_dim=12, n_shared_experts=1)
    layer = MoE(DIM, moe_cfg).double()
    torch.manual_seed(2)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    layer.reset_buffers()
    x = torch.randn(2, 5, DIM, dtype=torch.float64)
    out = layer(x)
    _, _, weights, indices = layer.router(x.reshape(-1, DIM))
    e = layer.experts
    expected = []
    for t, token in enumerate(x.reshape(-1, DIM)):
        routed = sum(weights[t, j] * swiglu(token, e.w1[i], e.w2[i], e.w3[i]) for j, i in enumerate(indices[t].tolist()))
        expected.append(routed + layer.shared(token))
    torch.testing.assert_close(out.reshape(-1, DIM), torch.stack(expected))
    assert layer.load.sum() == 10 * 2 and float(layer.experts.processed) == 10 * 2  # every routed copy computed


def test_balancing_and_z_loss_gradients_equal_adding_them_to_the_objective():
    """The injected gradients are those of coef x (sequence-level balance loss) + coef x z-loss,
    scaled like the token loss."""
    def make(aux: float, z: float) -> MoE:
        torch.manual_seed(3)
        layer = MoE(DIM, MoEConfig(n_experts=6, top_k=2, hidden_dim=8, aux_loss_coef=aux, z_loss_coef=z)).double()
        for p in layer.parameters():
            torch.nn.init.normal_(p, std=0.4)
        return layer

    batch, seq, scale = 3, 7, 0.25
    x = torch.randn(batch, seq, DIM, dtype=torch.float64)
    g = torch.randn(batch, seq, DIM, dtype=torch.float64)
    injected = make(0.1, 0.01)
    with auxiliary_loss_scale(scale):
        (injected(x) * g).sum().backward()

    explicit = make(0.0, 0.0)
    out = explicit(x)
    logits, scores, _, indices = explicit.router(x.reshape(-1, DIM))
    balance = 0.0
    for b in range(batch):
        rows = slice(b * seq, (b + 1) * seq)
        share = torch.bincount(indices[rows].flatten(), minlength=6).double() * 6 / (seq * 2)
        normalized = scores[rows] / scores[rows].sum(dim=-1, keepdim=True)
        balance = balance + (share * normalized.mean(dim=0)).sum()
    z = (torch.logsumexp(logits, dim=-1) ** 2).sum()
    ((out * g).sum() + scale * (0.1 * seq * balance + 0.01 * z)).backward()
    for (name, a), b in zip(injected.named_parameters(), explicit.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")  # router in fp32


def test_auxiliary_loss_free_bias_evens_out_a_skewed_load():
    cfg = ModelConfig(n_layers=1, moe=MoEConfig(n_experts=8, top_k=2, hidden_dim=16, bias_update_rate=0.005))
    model = build_model(cfg)
    model.to_empty(device="cpu")
    init_weights(model, cfg, seed=5)
    gate = model.layers["0"].moe.router.gate.weight
    with torch.no_grad():  # one expert's gate aligned with the data's mean direction: it gets nearly every token
        gate[3] += 3.0 * torch.ones(cfg.dim) / math.sqrt(cfg.dim)
    balance = ExpertBalance(model, cfg, global_sum=lambda t: t)
    tokens = torch.randint(0, cfg.vocab_size, (8, 64), generator=torch.Generator().manual_seed(0))
    model.train()
    ratios = []
    for _ in range(100):
        model(tokens)
        ratios.append(balance.after_step()["moe/load_max_mean"])
    assert ratios[0] > 2.0, ratios[0]
    assert max(ratios[-10:]) <= 1.2, ratios[-10:]
    bias = model.layers["0"].moe.router.expert_bias
    assert bias[3] < 0 and not bias.requires_grad


def test_flops_count_active_experts_only():
    base = dict(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=512, ffn_hidden_dim=192)
    few = ModelConfig(**base, moe=MoEConfig(n_experts=8, top_k=2, hidden_dim=32, n_shared_experts=1, first_dense=1))
    many = ModelConfig(**base, moe=MoEConfig(n_experts=64, top_k=2, hidden_dim=32, n_shared_experts=1, first_dense=1))
    # 56 more experts per MoE layer add only their router rows (6 x dim x 56 per token per layer), no expert FLOPs.
    assert flops_per_token(many, 128) - flops_per_token(few, 128) == 3 * 6 * 64 * 56
    # Three experts of 32 active = one dense SwiGLU of 96 (+ the router's 8 x dim).
    dense = ModelConfig(**{**base, "ffn_hidden_dim": 96})
    assert flops_per_token(few, 128) == dense_flops(dense, 128) + 3 * 6 * 64 * 8 + 6 * 3 * 64 * (192 - 96)
