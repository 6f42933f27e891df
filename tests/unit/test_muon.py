"""Muon: the update of each matrix against a plain per-matrix reference, the AdamW part against
torch's AdamW, which parameters each takes, and its hyper-parameters' validation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from titan.config import ConfigError, ModelConfig, MoEConfig, OptimConfig, PretrainConfig, validate
from titan.models import build_model
from titan.muon import orthogonalize
from titan.optim import build_optimizer


def reference_muon_step(weight: torch.Tensor, grad: torch.Tensor, buf: torch.Tensor, lr: float, wd: float,
                        momentum: float, scale: str) -> None:
    """One Muon step of one matrix, written out plainly (Nesterov, five quintic Newton-Schulz steps)."""
    buf.mul_(momentum).add_(grad, alpha=1 - momentum)
    update = (1 - momentum) * grad + momentum * buf
    x = update / (update.norm() + 1e-7)
    transposed = x.shape[0] > x.shape[1]
    if transposed:
        x = x.T
    for _ in range(5):
        a = x @ x.T
        x = 3.4445 * x - 4.7750 * (a @ x) + 2.0315 * (a @ a @ x)
    if transposed:
        x = x.T
    rows, cols = weight.shape
    factor = math.sqrt(max(1.0, rows / cols)) if scale == "spectral" else 0.2 * math.sqrt(max(rows, cols))
    weight.mul_(1 - lr * wd).add_(x, alpha=-lr * factor)


def small_moe() -> nn.Module:
    return build_model(ModelConfig(dim=16, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=32, ffn_hidden_dim=24,
                                   max_seq_len=16, moe=MoEConfig(n_experts=4, top_k=2, hidden_dim=8)))


def muon_config(**kwargs) -> OptimConfig:
    return OptimConfig(name="muon", lr=1e-3, muon_lr=0.05, weight_decay=0.1, **kwargs)


def test_orthogonalize_flattens_the_singular_values_and_keeps_the_directions():
    g = torch.randn(3, 40, 24, dtype=torch.float64)
    o = orthogonalize(g, 5)
    values = torch.linalg.svdvals(o)
    assert values.min() > 0.6 and values.max() < 1.25
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    assert torch.linalg.matrix_norm(o - u @ vh, ord=2).max() < 0.45  # near U V^T, not a random orthogonal matrix


@pytest.mark.parametrize("scale", ["spectral", "adamw_rms"])
def test_every_block_matrix_takes_the_reference_update_over_steps(scale):
    torch.manual_seed(0)
    model = small_moe()
    opt = build_optimizer(model, muon_config(muon_scale=scale))
    muon_group = opt.param_groups[0]
    assert muon_group["muon"] and muon_group["lr"] == 0.05
    names = {id(p): n for n, p in model.named_parameters()}
    expected = {names[id(p)]: p.detach().clone() for p in muon_group["params"]}
    buffers = {n: torch.zeros_like(w) for n, w in expected.items()}
    for _ in range(3):
        grads = {n: torch.randn_like(p) for n, p in model.named_parameters()}
        for n, p in model.named_parameters():
            p.grad = grads[n].clone()
        opt.step()
        for n, w in expected.items():
            for e in range(w.shape[0]) if w.ndim == 3 else [None]:  # stacked experts: each is a matrix
                pick = (lambda t: t[e]) if e is not None else (lambda t: t)
                reference_muon_step(pick(w), pick(grads[n]), pick(buffers[n]), 0.05, 0.1, 0.95, scale)
    for p in muon_group["params"]:
        torch.testing.assert_close(p.detach(), expected[names[id(p)]], rtol=1e-5, atol=1e-6)


def test_the_rest_takes_torch_adamw_steps():
    torch.manual_seed(0)
    model, twin = small_moe(), small_moe()
    twin.load_state_dict(model.state_dict())
    opt = build_optimizer(model, muon_config())
    names = {id(p): n for n, p in model.named_parameters()}
    rest = {names[id(p)] for g in opt.param_groups[1:] for p in g["params"]}
    twin_params = dict(twin.named_parameters())
    reference = torch.optim.AdamW(
        [{"params": [twin_params[n] for n in sorted(rest) if twin_params[n].ndim >= 2], "weight_decay": 0.1},
         {"params": [twin_params[n] for n in sorted(rest) if twin_params[n].ndim < 2], "weight_decay": 0.0}],
        lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    for _ in range(3):
        for n, p in model.named_parameters():
            p.grad = torch.randn_like(p)
            twin_params[n].grad = p.grad.clone()
        opt.step()
        reference.step()
    for n in rest:
        torch.testing.assert_close(dict(model.named_parameters())[n], twin_params[n], rtol=1e-6, atol=1e-7)
    assert {k for g in opt.param_groups[1:] for p in g["params"] for k in opt.state[p]} == {"step", "exp_avg",
                                                                                             "exp_avg_sq"}


def test_muon_takes_the_block_matrices_and_experts_but_not_routers_embeddings_or_norms():
    model = small_moe()
    opt = build_optimizer(model, muon_config())
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for p in opt.param_groups[0]["params"]}
    assert "layers.0.attention.wq.weight" in muon and "layers.1.moe.experts.w1" in muon
    assert not any("router" in n or "norm" in n for n in muon)
    assert "tok_embeddings.weight" not in muon and "output.weight" not in muon
    assert {n for g in opt.param_groups for p in g["params"] for n in [names[id(p)]]} == set(names.values())


@pytest.mark.parametrize("key,value", [("optim.momentum", 1.0), ("optim.ns_steps", 0), ("optim.muon_lr", 0.0),
                                       ("optim.muon_scale", "mup")])
def test_bad_muon_settings_name_their_key(key, value):
    cfg = PretrainConfig()
    cfg.optim.name = "muon"
    setattr(cfg.optim, key.split(".")[1], value)
    with pytest.raises(ConfigError) as err:
        validate(cfg, 1, 1)
    assert err.value.key == key
