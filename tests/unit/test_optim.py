"""LR schedules and the optimizer's parameter groups."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from titan.config import LRConfig, ModelConfig, OptimConfig
from titan.models.llama import Llama
from titan.optim import build_optimizer, build_scheduler, lr_multiplier


def curve(total: int, **kwargs) -> list[float]:
    cfg = LRConfig(**kwargs)
    return [lr_multiplier(step, total, cfg) for step in range(total)]


# ---------------------------------------------------------------- warmup

@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_warmup_is_a_linear_ramp_to_the_peak(schedule):
    warmup = 8
    values = curve(100, schedule=schedule, warmup_steps=warmup)[:warmup]
    assert values[0] == pytest.approx(1 / warmup)
    assert values[-1] == pytest.approx(1.0)
    steps = [b - a for a, b in zip(values, values[1:])]
    assert steps == pytest.approx([1 / warmup] * (warmup - 1))
    assert all(v > 0 for v in values)


def test_no_warmup_starts_at_the_peak():
    for schedule in ("cosine", "wsd", "constant"):
        assert lr_multiplier(0, 50, LRConfig(schedule=schedule, warmup_steps=0)) == pytest.approx(1.0)


# ---------------------------------------------------------------- cosine

@pytest.mark.parametrize("total,warmup", [(100, 10), (20, 0), (37, 5)])
def test_cosine_is_monotone_after_warmup_and_stays_in_range(total, warmup):
    floor = 0.1
    values = curve(total, schedule="cosine", warmup_steps=warmup, min_lr_ratio=floor)
    after = values[max(warmup - 1, 0):]
    assert all(b <= a + 1e-12 for a, b in zip(after, after[1:]))
    assert all(floor - 1e-12 <= v <= 1.0 + 1e-12 for v in after)
    assert after[0] == pytest.approx(1.0)
    # Half-way through the decay the factor is half-way between peak and floor.
    mid = warmup + (total - warmup) // 2
    cfg = LRConfig(schedule="cosine", warmup_steps=warmup, min_lr_ratio=floor)
    assert lr_multiplier(mid, total, cfg) == pytest.approx((1 + floor) / 2, abs=0.1)
    # Past the end it stays at the floor.
    assert lr_multiplier(total, total, cfg) == pytest.approx(floor)
    assert lr_multiplier(total + 50, total, cfg) == pytest.approx(floor)


@pytest.mark.parametrize("total,warmup,floor", [(100, 10, 0.1), (10, 2, 0.0), (37, 0, 0.25)])
def test_cosine_reaches_min_lr_ratio_on_the_last_step(total, warmup, floor):
    """The last optimizer step of the run (step total - 1, 0-based) trains at min_lr_ratio, as wsd
    does. Fails while the cosine progress is (step - warmup) / (total - warmup): then the floor is
    only reached at step `total`, which is never taken."""
    cfg = LRConfig(schedule="cosine", warmup_steps=warmup, min_lr_ratio=floor)
    assert lr_multiplier(total - 1, total, cfg) == pytest.approx(floor, abs=1e-9)
    assert lr_multiplier(total - 2, total, cfg) > floor


# ---------------------------------------------------------------- wsd

@pytest.mark.parametrize("total,warmup,fraction,floor", [(100, 10, 0.2, 0.1), (50, 0, 0.5, 0.0), (30, 3, 0.1, 0.3)])
def test_wsd_holds_then_decays_linearly_to_the_floor(total, warmup, fraction, floor):
    values = curve(total, schedule="wsd", warmup_steps=warmup, min_lr_ratio=floor, decay_fraction=fraction)
    decay_steps = round(total * fraction)
    decay_start = total - decay_steps
    assert values[warmup:decay_start] == pytest.approx([1.0] * (decay_start - warmup))
    decay = values[decay_start:]
    assert len(decay) == decay_steps
    assert decay[-1] == pytest.approx(floor)
    assert decay[0] < 1.0
    diffs = [b - a for a, b in zip([1.0] + decay, decay)]
    assert diffs == pytest.approx([-(1.0 - floor) / decay_steps] * decay_steps)


# ---------------------------------------------------------------- constant

def test_constant_after_warmup():
    values = curve(40, schedule="constant", warmup_steps=4, min_lr_ratio=0.1)
    assert values[3:] == pytest.approx([1.0] * 37)


# ---------------------------------------------------------------- optimizer and scheduler

def tiny_model() -> nn.Module:
    return Llama(ModelConfig(dim=16, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=32, ffn_hidden_dim=24,
                             max_seq_len=16))


def test_one_dim_params_have_no_weight_decay():
    model = tiny_model()
    opt = build_optimizer(model, OptimConfig(lr=1e-3, weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decay_names = {names[id(p)] for p in decay["params"]}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert no_decay_names == {n for n in names.values() if n.endswith("norm.weight")}
    assert "tok_embeddings.weight" in decay_names and "output.weight" in decay_names
    assert "layers.0.attention.wq.weight" in decay_names
    assert decay_names | no_decay_names == set(names.values()) and not decay_names & no_decay_names


def test_weight_decay_does_not_touch_norm_weights():
    model = tiny_model()
    opt = build_optimizer(model, OptimConfig(lr=0.1, weight_decay=0.5))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    norm_before = model.norm.weight.detach().clone()
    wq_before = model.layers["0"].attention.wq.weight.detach().clone()
    opt.step()
    assert torch.equal(model.norm.weight, norm_before)
    torch.testing.assert_close(model.layers["0"].attention.wq.weight, wq_before * (1 - 0.1 * 0.5))


def test_frozen_params_are_left_out():
    model = tiny_model()
    model.tok_embeddings.weight.requires_grad_(False)
    opt = build_optimizer(model, OptimConfig())
    assert all(p is not model.tok_embeddings.weight for g in opt.param_groups for p in g["params"])


@pytest.mark.parametrize("implementation,foreach", [("foreach", True), ("for_loop", False)])
def test_implementation_choice(implementation, foreach):
    opt = build_optimizer(tiny_model(), OptimConfig(implementation=implementation))
    assert opt.defaults["foreach"] is foreach


def test_optimizer_hyperparameters():
    opt = build_optimizer(tiny_model(), OptimConfig(lr=2e-3, beta1=0.8, beta2=0.9, eps=1e-6))
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["lr"] == 2e-3 and opt.defaults["betas"] == (0.8, 0.9) and opt.defaults["eps"] == 1e-6


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_scheduler_gives_the_expected_lr_after_n_steps(schedule):
    peak, total = 1e-2, 30
    lr_cfg = LRConfig(schedule=schedule, warmup_steps=5, min_lr_ratio=0.1, decay_fraction=0.3)
    model = nn.Linear(4, 4)
    opt = build_optimizer(model, OptimConfig(lr=peak))
    sched = build_scheduler(opt, lr_cfg, total)
    seen = []
    for step in range(total):
        seen.append(opt.param_groups[0]["lr"])
        assert all(g["lr"] == seen[-1] for g in opt.param_groups)  # both groups follow the schedule
        opt.step()
        sched.step()
    expected = [peak * lr_multiplier(step, total, lr_cfg) for step in range(total)]
    assert seen == pytest.approx(expected, rel=1e-12)
    assert seen[0] == pytest.approx(peak / 5)
    assert max(seen) == pytest.approx(peak)
    # The scheduler's state round-trips: a fresh one continues with the same lr.
    state = sched.state_dict()
    opt2 = build_optimizer(model, OptimConfig(lr=peak))
    sched2 = build_scheduler(opt2, lr_cfg, total)
    sched2.load_state_dict(state)
    assert sched2.get_last_lr()[0] == pytest.approx(sched.get_last_lr()[0])
    assert sched.last_epoch == total
    assert math.isfinite(sched.get_last_lr()[0])
