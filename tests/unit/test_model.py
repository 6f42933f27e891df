"""The Llama model: shapes, parameter names, tying, RoPE, GQA, FLOPs, and equality with HF Llama."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from titan.config import ModelConfig
from titan.models.init import build_model, init_weights
from titan.models.llama import Llama, apply_rope, flops_per_token, linear_param_count, rope_tables

DEBUG = ModelConfig(name="debug", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512,
                    ffn_hidden_dim=192, max_seq_len=128)

PER_LAYER = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "attention.wo.weight",
             "feed_forward.w1.weight", "feed_forward.w2.weight", "feed_forward.w3.weight",
             "attention_norm.weight", "ffn_norm.weight")


def make_model(cfg: ModelConfig = DEBUG, seed: int = 0) -> Llama:
    model = Llama(cfg)
    init_weights(model, cfg, seed)
    return model


# ---------------------------------------------------------------- shapes and names

@pytest.mark.parametrize("cfg", [DEBUG, dataclasses.replace(DEBUG, n_layers=3, n_kv_heads=1, vocab_size=100)])
def test_output_shape_and_dtype(cfg):
    model = make_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (3, 17))
    logits = model(tokens)
    assert logits.shape == (3, 17, cfg.vocab_size)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_parameter_shapes():
    cfg = DEBUG
    head_dim = cfg.dim // cfg.n_heads
    shapes = {n: tuple(p.shape) for n, p in make_model(cfg).named_parameters()}
    assert shapes["tok_embeddings.weight"] == (cfg.vocab_size, cfg.dim)
    assert shapes["layers.0.attention.wq.weight"] == (cfg.n_heads * head_dim, cfg.dim)
    assert shapes["layers.0.attention.wk.weight"] == (cfg.n_kv_heads * head_dim, cfg.dim)
    assert shapes["layers.0.attention.wv.weight"] == (cfg.n_kv_heads * head_dim, cfg.dim)
    assert shapes["layers.0.attention.wo.weight"] == (cfg.dim, cfg.n_heads * head_dim)
    assert shapes["layers.1.feed_forward.w1.weight"] == (cfg.ffn_hidden_dim, cfg.dim)
    assert shapes["layers.1.feed_forward.w3.weight"] == (cfg.ffn_hidden_dim, cfg.dim)
    assert shapes["layers.1.feed_forward.w2.weight"] == (cfg.dim, cfg.ffn_hidden_dim)
    assert shapes["layers.1.attention_norm.weight"] == (cfg.dim,)
    assert shapes["norm.weight"] == (cfg.dim,)
    assert shapes["output.weight"] == (cfg.vocab_size, cfg.dim)


def test_parameter_names_are_keyed_by_global_layer_index():
    names = [n for n, _ in build_model(dataclasses.replace(DEBUG, n_layers=3)).named_parameters()]
    expected = ["tok_embeddings.weight"]
    expected += [f"layers.{i}.{suffix}" for i in range(3) for suffix in PER_LAYER]
    expected += ["norm.weight", "output.weight"]
    assert sorted(names) == sorted(expected)
    assert len(names) == len(set(names))


def test_layer_names_do_not_depend_on_other_layers():
    """A stage that keeps layers 2..3 of 4 still names them layers.2 / layers.3, with the same
    names as in the full model; a 2-layer model names its layers like the first two of 4."""
    full = {n for n, _ in build_model(dataclasses.replace(DEBUG, n_layers=4)).named_parameters()}
    two = {n for n, _ in build_model(DEBUG).named_parameters()}
    assert two <= full
    assert {n for n in full - two if n.startswith("layers.")} == {f"layers.{i}.{s}" for i in (2, 3) for s in PER_LAYER}

    stage = build_model(dataclasses.replace(DEBUG, n_layers=4))
    del stage.layers["0"], stage.layers["1"]
    stage_names = {n for n, _ in stage.named_parameters()}
    assert {n for n in stage_names if n.startswith("layers.")} == {f"layers.{i}.{s}" for i in (2, 3) for s in PER_LAYER}
    assert stage_names <= full


def test_pipeline_style_split_reproduces_full_forward():
    """Cutting the model into two stages (None for the parts a stage does not own) gives the
    same logits as the whole model."""
    cfg = dataclasses.replace(DEBUG, n_layers=4)
    full = make_model(cfg, seed=3)
    first, second = make_model(cfg, seed=3), make_model(cfg, seed=3)
    for i in ("2", "3"):
        del first.layers[i]
    for i in ("0", "1"):
        del second.layers[i]
    first.norm = first.output = None
    second.tok_embeddings = None
    tokens = torch.randint(0, cfg.vocab_size, (2, 11))
    with torch.no_grad():
        hidden = first(tokens)
        assert hidden.shape == (2, 11, cfg.dim)
        torch.testing.assert_close(second(hidden), full(tokens), rtol=0, atol=0)


# ---------------------------------------------------------------- tied embeddings

def _assert_tied(model: Llama) -> None:
    assert model.output.weight is model.tok_embeddings.weight
    assert model.output.weight.data_ptr() == model.tok_embeddings.weight.data_ptr()
    names = [n for n, _ in model.named_parameters()]
    assert "tok_embeddings.weight" in names and "output.weight" not in names
    with torch.no_grad():
        model.tok_embeddings.weight[3, 5] = 123.0
    assert model.output.weight[3, 5].item() == 123.0


def test_tied_embeddings_share_storage():
    cfg = dataclasses.replace(DEBUG, tie_embeddings=True)
    model = make_model(cfg)
    _assert_tied(model)
    # The one shared tensor gets gradient from both uses.
    model(torch.randint(0, cfg.vocab_size, (1, 5))).sum().backward()
    assert model.tok_embeddings.weight.grad is not None and model.output.weight.grad is model.tok_embeddings.weight.grad


def test_tied_embeddings_stay_tied_through_meta_materialization():
    """The recipe's path: build on meta -> to_empty -> init_weights. The model must still be tied
    (and then equal a model built directly on the CPU)."""
    cfg = dataclasses.replace(DEBUG, tie_embeddings=True)
    model = build_model(cfg)
    model.to_empty(device="cpu")
    init_weights(model, cfg, seed=0)
    direct = make_model(cfg, seed=0)
    assert model.output.weight is model.tok_embeddings.weight
    torch.testing.assert_close(model.output.weight, direct.output.weight, rtol=0, atol=0)
    _assert_tied(model)


def test_untied_embeddings_are_separate():
    model = make_model(DEBUG)
    assert model.output.weight.data_ptr() != model.tok_embeddings.weight.data_ptr()
    assert not torch.equal(model.output.weight, model.tok_embeddings.weight.view_as(model.output.weight))


# ---------------------------------------------------------------- RoPE

def reference_rope(x: torch.Tensor, theta: float, positions: torch.Tensor) -> torch.Tensor:
    """Rotate (..., seq, head_dim) in float64 as complex numbers: dim i pairs with dim i + head_dim/2
    and turns by the angle pos * theta^(-2i/head_dim)."""
    head_dim = x.shape[-1]
    half = head_dim // 2
    x64 = x.double()
    z = torch.complex(x64[..., :half], x64[..., half:])
    i = torch.arange(half, dtype=torch.float64)
    angle = positions.double()[:, None] * theta ** (-2.0 * i / head_dim)  # (seq, half)
    rotated = z * torch.polar(torch.ones_like(angle), angle)
    return torch.cat([rotated.real, rotated.imag], dim=-1)


@pytest.mark.parametrize("head_dim,theta", [(16, 10000.0), (8, 500000.0), (32, 10.0)])
def test_apply_rope_matches_complex_reference(head_dim, theta):
    seq = 96
    x = torch.randn(2, 3, seq, head_dim)
    cos, sin = rope_tables(head_dim, seq, theta)
    got = apply_rope(x, cos, sin)
    want = reference_rope(x, theta, torch.arange(seq))
    assert got.shape == x.shape and got.dtype == x.dtype
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=5e-5)
    # Position 0 is the identity; a rotation keeps each pair's norm.
    torch.testing.assert_close(got[..., 0, :], x[..., 0, :])
    pair_norm = lambda t: t[..., : head_dim // 2] ** 2 + t[..., head_dim // 2:] ** 2  # noqa: E731
    torch.testing.assert_close(pair_norm(got), pair_norm(x), rtol=1e-5, atol=1e-5)


def test_apply_rope_pairs_first_half_with_second_half():
    """A vector with only dim 0 set rotates into dim head_dim/2 (not dim 1, as the interleaved
    convention would)."""
    head_dim = 8
    cos, sin = rope_tables(head_dim, 4, 10000.0)
    x = torch.zeros(1, 1, 4, head_dim)
    x[..., 0] = 1.0
    out = apply_rope(x, cos, sin)[0, 0, 1]  # position 1, frequency theta^0 = 1: angle 1 rad
    expected = torch.zeros(head_dim)
    expected[0], expected[head_dim // 2] = math.cos(1.0), math.sin(1.0)
    torch.testing.assert_close(out, expected)


def test_rope_scores_depend_only_on_position_difference():
    head_dim, seq = 16, 40
    cos, sin = rope_tables(head_dim, seq, 10000.0)
    q_vec, k_vec = torch.randn(head_dim), torch.randn(head_dim)
    q = apply_rope(q_vec.expand(1, 1, seq, head_dim).contiguous(), cos, sin)[0, 0].double()
    k = apply_rope(k_vec.expand(1, 1, seq, head_dim).contiguous(), cos, sin)[0, 0].double()
    scores = q @ k.T  # scores[m, n] = <R_m q, R_n k>
    for shift in (1, 5, 17):
        torch.testing.assert_close(scores[shift:, shift:], scores[:-shift, :-shift], rtol=1e-4, atol=1e-4)
    # ... and it really depends on the difference (the rotation is not the identity).
    diagonal_offsets = torch.stack([scores.diagonal(d)[0] for d in range(-5, 6)])
    assert diagonal_offsets.std() > 1e-2


# ---------------------------------------------------------------- attention: causality and GQA

def test_attention_is_causal():
    model = make_model(dataclasses.replace(DEBUG, init_std=0.1))
    tokens = torch.randint(0, DEBUG.vocab_size, (1, 12))
    changed = tokens.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % DEBUG.vocab_size
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :8], b[:, :8], rtol=0, atol=0)
    assert not torch.allclose(a[:, 8:], b[:, 8:])


@pytest.mark.parametrize("n_kv_heads", [1, 2])
def test_gqa_equals_mha_with_repeated_kv_heads(n_kv_heads):
    """Query head h of a GQA model reads kv head h // (n_heads / n_kv_heads): the same model with
    n_kv_heads = n_heads and every kv head repeated that way gives the same logits."""
    gqa_cfg = dataclasses.replace(DEBUG, n_heads=4, n_kv_heads=n_kv_heads, init_std=0.1)
    mha_cfg = dataclasses.replace(gqa_cfg, n_kv_heads=4)
    gqa, mha = make_model(gqa_cfg, seed=1), make_model(mha_cfg, seed=2)
    head_dim = gqa_cfg.dim // gqa_cfg.n_heads
    group = gqa_cfg.n_heads // n_kv_heads
    mha_params = dict(mha.named_parameters())
    with torch.no_grad():
        for name, p in gqa.named_parameters():
            if name.endswith(("attention.wk.weight", "attention.wv.weight")):
                heads = p.view(n_kv_heads, head_dim, gqa_cfg.dim)
                mha_params[name].copy_(heads.repeat_interleave(group, dim=0).reshape(-1, gqa_cfg.dim))
            else:
                mha_params[name].copy_(p)
        assert gqa.layers["0"].attention.wk.weight.shape[0] == n_kv_heads * head_dim
        tokens = torch.randint(0, gqa_cfg.vocab_size, (2, 13))
        torch.testing.assert_close(gqa(tokens), mha(tokens), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- FLOPs

@pytest.mark.parametrize("cfg,seq_len", [
    (DEBUG, 32),
    (dataclasses.replace(DEBUG, n_layers=3, n_kv_heads=1, ffn_hidden_dim=100, vocab_size=300), 128),
    (dataclasses.replace(DEBUG, tie_embeddings=True, n_kv_heads=4), 7),
])
def test_flops_per_token_matches_module_linear_weights(cfg, seq_len):
    model = build_model(cfg)
    linears = {id(m.weight): m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear)}
    matmul_params = sum(linears.values())
    assert linear_param_count(model) == matmul_params
    expected = 6 * matmul_params + 12 * cfg.n_layers * cfg.dim * seq_len
    assert flops_per_token(cfg, seq_len) == expected


# ---------------------------------------------------------------- Hugging Face equivalence

HF_NAMES = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


def hf_name(name: str) -> str:
    if name.startswith("tok_embeddings."):
        return "model.embed_tokens." + name.split(".", 1)[1]
    if name.startswith("norm."):
        return "model." + name
    if name.startswith("output."):
        return "lm_head." + name.split(".", 1)[1]
    _, index, rest = name.split(".", 2)
    module, leaf = rest.rsplit(".", 1)
    return f"model.layers.{index}.{HF_NAMES[module]}.{leaf}"


@pytest.mark.parametrize("tie", [False, True])
def test_logits_match_hugging_face_llama(tie):
    transformers = pytest.importorskip("transformers")
    cfg = dataclasses.replace(DEBUG, tie_embeddings=tie, init_std=0.1)
    model = make_model(cfg, seed=7)
    with torch.no_grad():  # non-trivial norm weights, so swapped norms would show
        gen = torch.Generator().manual_seed(0)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)

    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_hidden_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        tie_word_embeddings=tie, attention_bias=False, mlp_bias=False, hidden_act="silu",
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).float().eval()
    hf_params = dict(hf.named_parameters(remove_duplicate=False))
    ours = dict(model.named_parameters(remove_duplicate=False))
    assert {hf_name(n) for n in ours} == set(hf_params)
    with torch.no_grad():
        for name, p in ours.items():
            target = hf_params[hf_name(name)]
            assert target.shape == p.shape, name
            target.copy_(p)

    tokens = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours_logits = model(tokens)
        hf_logits = hf(input_ids=tokens).logits
    assert ours_logits.abs().max() > 0.1  # the comparison is not between near-zero numbers
    torch.testing.assert_close(ours_logits, hf_logits, rtol=1e-5, atol=1e-5)
