"""The step health policy and skipped data ranges, against hand-made numbers."""

from __future__ import annotations

import math

import pytest

from titan.config import HealthConfig
from titan.data.sampler import GlobalCursorSampler
from titan.errors import NonFiniteStepError
from titan.health import HealthPolicy


def test_non_finite_steps_are_skipped_and_a_run_of_them_asks_for_a_rollback():
    policy = HealthPolicy(HealthConfig(max_consecutive_skips=2))
    assert policy.judge(1, 5.0, 1.0) is None
    assert "the loss is nan" in policy.judge(2, math.nan, 1.0)
    assert not policy.wants_rollback()
    assert "gradient norm is inf" in policy.judge(3, 5.0, math.inf)
    assert policy.wants_rollback()
    assert policy.judge(4, 5.0, 1.0) is None and not policy.wants_rollback()  # a good step resets the count


def test_spikes_are_judged_against_the_recent_window_once_it_is_long_enough():
    policy = HealthPolicy(HealthConfig(spike_sigmas=3.0, spike_window=4, spike_min_steps=3))
    assert policy.judge(1, 10.0, 1.0) is None
    assert policy.judge(2, 50.0, 1.0) is None  # too few steps to judge
    for step, loss in enumerate([10.0, 10.2, 9.8], start=3):
        assert policy.judge(step, loss, 1.0) is None
    # window (4): 50, 10, 10.2, 9.8 -> mean 20, std ~17.3: 70 is under 3 sigmas, 80 over
    assert policy.judge(6, 70.0, 1.0) is None
    window = [10.0, 10.2, 9.8, 70.0]
    mean = sum(window) / 4
    std = math.sqrt(sum((v - mean) ** 2 for v in window) / 4)
    reason = policy.judge(7, mean + 3 * std + 0.1, 1.0)
    assert reason and "loss" in reason and "spiked" in reason
    assert "gradient norm" in policy.judge(8, 10.0, 100.0)


def test_fail_policy_stops_at_a_non_finite_step_and_applies_spikes():
    policy = HealthPolicy(HealthConfig(policy="fail", spike_min_steps=2))
    for step in range(1, 4):
        policy.judge(step, 1.0 + step * 0.01, 1.0)
    assert policy.judge(4, 1000.0, 1.0) is None
    with pytest.raises(NonFiniteStepError, match="step 5: the loss is nan"):
        policy.judge(5, math.nan, 1.0)


def test_health_state_round_trips():
    policy = HealthPolicy(HealthConfig())
    policy.judge(1, 2.0, 1.0)
    policy.judge(2, math.nan, 1.0)
    other = HealthPolicy(HealthConfig())
    other.load_state_dict(policy.state_dict())
    assert other.state_dict() == policy.state_dict() == {"losses": [2.0], "norms": [1.0], "consecutive": 1}


def test_sampler_never_draws_skipped_positions_on_any_layout():
    def steps(dp: int, skip: list[list[int]]) -> list[list[int]]:
        batches = []
        for rank in range(dp):
            sampler = GlobalCursorSampler(50, 8, 2, rank, dp, seed=3)
            sampler.skip_ranges(skip)
            it = iter(sampler)
            batches.append([sum((next(it) for _ in range(8 // dp // 2)), []) for _ in range(4)])
        return [sum((b[s] for b in batches), []) for s in range(4)]

    plain = GlobalCursorSampler(50, 8, 2, 0, 1, seed=3)
    ids = plain.ids_at(range(60))
    expected = [ids[0:8], ids[8:10] + ids[20:26], ids[26:29] + ids[30:35], ids[35:43]]
    for dp in (1, 2, 4):
        assert steps(dp, [[10, 20], [29, 30], [12, 15]]) == expected, dp
    sampler = GlobalCursorSampler(50, 8, 2, 0, 1, seed=3)
    sampler.skip_ranges([[10, 20]])
    sampler.skip_ranges([[18, 25], [40, 41]])
    assert sampler.skip == [(10, 25), (40, 41)]
    state = sampler.state_dict()
    restored = GlobalCursorSampler(50, 8, 2, 0, 1, seed=3)
    restored.load_state_dict(state)
    assert restored.skip == sampler.skip
