"""Layout-independent initialization: a parameter's value depends only on (seed, name)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from titan.config import ModelConfig
from titan.models.init import build_model, init_std, init_weights
from titan.models.llama import Llama, rope_tables

CFG = ModelConfig(name="debug", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512,
                  ffn_hidden_dim=192, max_seq_len=64, init_std=0.02)
RESIDUAL = ("attention.wo.weight", "feed_forward.w2.weight")


def materialized(cfg: ModelConfig = CFG, seed: int = 0) -> Llama:
    """The recipe's path: meta build, to_empty, init."""
    model = build_model(cfg)
    model.to_empty(device="cpu")
    init_weights(model, cfg, seed)
    return model


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_same_seed_same_values_whatever_the_global_rng_or_build_order():
    torch.manual_seed(0)
    a = params(materialized(seed=5))
    torch.manual_seed(12345)
    torch.randn(1000)  # consume the global generator
    other = materialized(dataclasses.replace(CFG, n_layers=3), seed=5)  # another model built in between
    b = params(materialized(seed=5))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert torch.equal(params(other)["layers.1.attention.wq.weight"], a["layers.1.attention.wq.weight"])


def test_meta_materialized_equals_direct_cpu_build():
    direct = Llama(CFG)
    with torch.no_grad():
        for p in direct.parameters():
            p.fill_(7.0)  # whatever the constructor drew is overwritten
    init_weights(direct, CFG, seed=9)
    meta = materialized(seed=9)
    a, b = params(direct), params(meta)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # Non-persistent rotary tables are recomputed after to_empty left them as garbage.
    cos, sin = rope_tables(CFG.dim // CFG.n_heads, CFG.max_seq_len, CFG.rope_theta)
    assert torch.equal(meta.rope_cos, cos) and torch.equal(meta.rope_sin, sin)


def test_values_do_not_depend_on_the_number_of_layers():
    two = params(materialized(dataclasses.replace(CFG, n_layers=2), seed=3))
    four = params(materialized(dataclasses.replace(CFG, n_layers=4), seed=3))
    for name in ("layers.1.attention.wq.weight", "layers.0.attention.wk.weight", "layers.1.feed_forward.w1.weight",
                 "layers.1.feed_forward.w3.weight", "tok_embeddings.weight", "output.weight"):
        assert torch.equal(two[name], four[name]), name
    # Residual outputs draw the same normals, scaled by init_std / sqrt(2 n_layers).
    for name in ("layers.1.attention.wo.weight", "layers.0.feed_forward.w2.weight"):
        torch.testing.assert_close(four[name], two[name] * math.sqrt(2 * 2) / math.sqrt(2 * 4), rtol=1e-6, atol=0)
        assert not torch.equal(four[name], two[name])


def test_values_do_not_depend_on_other_parameters_shapes():
    base = params(materialized(seed=3))
    other = params(materialized(dataclasses.replace(CFG, vocab_size=300, ffn_hidden_dim=128), seed=3))
    for name in ("layers.0.attention.wq.weight", "layers.1.attention.wv.weight"):
        assert torch.equal(base[name], other[name]), name


def test_different_seeds_differ():
    a, b = params(materialized(seed=1)), params(materialized(seed=2))
    for name in a:
        if "norm" not in name:
            assert not torch.equal(a[name], b[name]), name


def test_different_names_differ():
    p = params(materialized(seed=1))
    assert not torch.equal(p["layers.0.attention.wq.weight"], p["layers.1.attention.wq.weight"])
    assert not torch.equal(p["layers.0.attention.wk.weight"], p["layers.0.attention.wv.weight"])
    assert not torch.equal(p["layers.0.feed_forward.w1.weight"], p["layers.0.feed_forward.w3.weight"])
    assert not torch.equal(p["tok_embeddings.weight"], p["output.weight"])
    # Not just a shifted copy of one stream: same-shape weights are uncorrelated.
    x, y = p["layers.0.attention.wq.weight"].flatten(), p["layers.1.attention.wq.weight"].flatten()
    assert abs(torch.corrcoef(torch.stack([x, y]))[0, 1]) < 0.1


def test_norm_weights_are_ones():
    model = Llama(CFG)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(-3, 3)
    init_weights(model, CFG, seed=0)
    norms = {n: p for n, p in model.named_parameters() if n.endswith("norm.weight")}
    assert len(norms) == 2 * CFG.n_layers + 1
    for name, p in norms.items():
        assert torch.equal(p, torch.ones_like(p)), name


@pytest.mark.parametrize("n_layers", [2, 8])
def test_statistics_match_the_configured_std(n_layers):
    cfg = dataclasses.replace(CFG, n_layers=n_layers, init_std=0.05)
    model = materialized(cfg, seed=11)
    residual_std = 0.05 / math.sqrt(2 * n_layers)
    pooled_residual = []
    for name, p in model.named_parameters():
        expected = init_std(cfg, name)
        if name.endswith("norm.weight"):
            assert expected is None
            continue
        if name.endswith(RESIDUAL):
            assert expected == pytest.approx(residual_std)
            pooled_residual.append(p.detach().flatten())
        else:
            assert expected == pytest.approx(0.05)
        n = p.numel()  # >= 4096 here: the sample std is within ~10% of the truth by far
        assert p.std().item() == pytest.approx(expected, rel=0.1), name
        assert abs(p.mean().item()) < 5 * expected / math.sqrt(n), name
    pooled = torch.cat(pooled_residual)
    assert pooled.std().item() == pytest.approx(residual_std, rel=0.02)
    big = model.tok_embeddings.weight.detach()
    assert big.std().item() == pytest.approx(0.05, rel=0.02)
