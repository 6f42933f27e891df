"""Weighted mixtures of sources: counts per step, layout independence, exactly-once per source across
resumes and reshapes, weight changes, max_epochs, and the config errors."""

from __future__ import annotations

import numpy as np
import pytest

from titan.config import ConfigError, DataConfig, SourceConfig, validate_sources
from titan.data.mixture import MixSource, MixtureOrder, apportion
from titan.data.sampler import GlobalCursorSampler

WEB, CODE = 1000, 400  # windows per source


def mixed_sampler(rank: int, dp: int, weights=(0.7, 0.3), gbs: int = 20, mbs: int = 1, seed: int = 3,
                  max_epochs=(None, None)) -> GlobalCursorSampler:
    order = MixtureOrder([MixSource("web", WEB, weights[0], max_epochs[0]),
                          MixSource("code", CODE, weights[1], max_epochs[1])], gbs, seed)
    return GlobalCursorSampler(WEB + CODE, gbs, mbs, rank, dp, seed, mixture=order)


def global_batches(dp: int, steps: int, state: dict | None = None, **kw) -> tuple[list[list[int]], dict]:
    """Each step's global batch (keys, rank order) over `dp` ranks, and the state after them."""
    per_rank, states = [], []
    for rank in range(dp):
        s = mixed_sampler(rank, dp, **kw)
        if state is not None:
            s.load_state_dict(state)
        it = iter(s)
        per_step = s.local_batch_size // s.micro_batch_size
        per_rank.append([[k for _ in range(per_step) for k in next(it)] for _ in range(steps)])
        states.append(s.state_dict())
    assert all(st == states[0] for st in states)
    return [[k for rank in range(dp) for k in per_rank[rank][step]] for step in range(steps)], states[0]


def source(keys: list[int]) -> list[str]:
    return ["web" if k < WEB else "code" for k in keys]


def test_a_70_30_mixture_takes_the_proportional_counts_every_step_on_1_2_and_4_ranks():
    batches = {dp: global_batches(dp, 50)[0] for dp in (1, 2, 4)}
    assert batches[1] == batches[2] == batches[4]
    for keys in batches[1]:
        web = source(keys).count("web")
        assert abs(web - 0.7 * 20) <= 1 and len(keys) == 20  # 14 exactly here
    totals = [source(k).count("web") for k in batches[1]]
    assert sum(totals) == 0.7 * 20 * 50


@pytest.mark.parametrize("weights,gbs", [((0.7, 0.3), 16), ((1, 2), 7), ((0.05, 0.95), 8)])
def test_counts_stay_within_one_sequence_of_the_weights_per_step_and_cumulatively(weights, gbs):
    order = MixtureOrder([MixSource("a", 100, weights[0]), MixSource("b", 100, weights[1])], gbs, 0)
    share = weights[0] / sum(weights)
    drawn = 0
    for block in range(200):
        count = order.counts(block)[0]
        drawn += count
        assert abs(count - share * gbs) < 1 + 1e-9
        assert abs(drawn - share * gbs * (block + 1)) < 1 + 1e-9


def test_apportion_sums_to_the_total_and_rounds_each_share():
    assert apportion(10, [3.3, 3.3, 3.4]) == [3, 3, 4]
    assert apportion(5, [-0.2, 2.6, 2.6]) == [0, 3, 2]
    assert sum(apportion(16, [11.2, 4.8])) == 16


@pytest.mark.parametrize("dp_before,dp_after", [(1, 2), (2, 4), (4, 1)])
def test_resume_on_another_dp_size_draws_every_window_of_each_source_once_per_epoch(dp_before, dp_after):
    first, state = global_batches(dp_before, 23)
    rest, _ = global_batches(dp_after, 27, state)
    straight, _ = global_batches(1, 50)
    assert first + rest == straight
    keys = [k for batch in straight for k in batch]  # 1000 sequences: 700 of web, 300 of code (under one epoch)
    web, code = [k for k in keys if k < WEB], [k for k in keys if k >= WEB]
    assert len(web) == 700 == len(set(web)) and len(code) == 300 == len(set(code))


def test_each_source_wraps_into_a_new_order_after_its_epoch():
    batches = global_batches(1, 100)[0]  # code: 6 a step, 600 draws of 400 windows
    code = [[k for k in batch if k >= WEB] for batch in batches]
    first_epoch = [k for batch in code[:66] for k in batch]  # 396 draws, all before the epoch's end
    assert len(first_epoch) == 396 == len(set(first_epoch))
    drawn = [k for batch in code for k in batch]
    assert sorted(set(drawn)) == list(range(WEB, WEB + CODE)) and max(drawn.count(k) for k in set(drawn)) == 2
    second_epoch = [k for batch in code[67:] for k in batch]
    assert len(set(second_epoch)) == len(second_epoch) and second_epoch != first_epoch[:len(second_epoch)]


def test_changed_weights_apply_from_the_next_block_and_keep_what_was_drawn():
    first, state = global_batches(2, 10)
    rest, after = global_batches(2, 10, state, weights=(0.5, 0.5))
    assert [source(b).count("web") for b in rest] == [10] * 10
    assert after["mix"]["weights"] == [0.5, 0.5]
    seen = [k for b in first + rest for k in b]
    assert len(seen) == len(set(seen))  # still no window twice


def test_a_source_at_its_max_epochs_drops_out_and_the_others_take_its_share():
    batches, _ = global_batches(1, 40, max_epochs=(None, 0.5))  # code: 200 windows, then gone
    code = [k for b in batches for k in b if k >= WEB]
    assert len(code) == 200 == len(set(code))
    assert source(batches[-1]) == ["web"] * 20
    order = MixtureOrder([MixSource("a", 10, 1.0, 1.0), MixSource("b", 10, 1.0, 1.0)], 4, 0)
    with pytest.raises(ConfigError, match="data.sources"):
        order.ids_at(range(0, 40))


def test_a_trillion_windows_index_in_constant_time():
    order = MixtureOrder([MixSource("web", 10**12, 0.9), MixSource("code", 10**9, 0.1)], 1024, 1)
    keys = order.ids_at(range(1024 * 7, 1024 * 8))
    assert len(set(keys)) == 1024 and np.bincount(order.source_of(np.array(keys))).tolist() == [922, 102]


@pytest.mark.parametrize("sources,key", [
    ([], "data.sources"),
    ([SourceConfig("web", "/x", -1.0)], "data.sources[0].weight"),
    ([SourceConfig("web", "/x", 0.0), SourceConfig("code", "/y", 0.0)], "data.sources"),
    ([SourceConfig("web", "/x"), SourceConfig("web", "/y")], "data.sources[0].name"),
    ([SourceConfig("a/b", "/x")], "data.sources[0].name"),
    ([SourceConfig("web", "/x", 1.0, 0.0)], "data.sources[0].max_epochs"),
])
def test_bad_mixtures_name_the_key(sources, key):
    with pytest.raises(ConfigError) as err:
        validate_sources(DataConfig(name="mix", source="mix", sources=sources))
    assert err.value.key == key
