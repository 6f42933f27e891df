"""Stage split and placement (pure functions of parallel/pipeline.py)."""

from __future__ import annotations

import pytest

from parallel.errors import LayoutError
from parallel.pipeline import balanced_split, plan_stages


def test_balanced_split_even_without_extras():
    assert balanced_split([1.0] * 8, 4, 0.0, 0.0) == [2, 2, 2, 2]


def test_balanced_split_gives_the_output_stage_fewer_layers():
    # The output projection costs two layers: the last stage should hold two fewer.
    sizes = balanced_split([1.0] * 10, 2, 0.0, 2.0)
    assert sizes == [6, 4]
    assert sum(sizes) == 10


def test_balanced_split_minimizes_the_largest_stage():
    costs = [1.0] * 7
    sizes = balanced_split(costs, 3, 0.0, 0.0)
    assert max(sizes) == 3 and sum(sizes) == 7 and min(sizes) >= 1


def test_interleaved_placement_loops_over_ranks():
    layout = plan_stages(8, 2, 2, "interleaved_1f1b", 1.0, 0.0, 0.0, None)
    assert layout.stage_ranks == (0, 1, 0, 1)
    assert layout.stage_layers == ((0, 1), (2, 3), (4, 5), (6, 7))
    assert layout.stages_of(0) == [0, 2]


def test_v_placement_folds_back():
    layout = plan_stages(8, 2, 2, "zbv", 1.0, 0.0, 0.0, None)
    assert layout.stage_ranks == (0, 1, 1, 0)
    assert layout.last_stage_rank == 0


def test_explicit_split_is_used_and_checked():
    assert plan_stages(5, 2, 1, "1f1b", 1.0, 0.0, 0.0, (4, 1)).stage_layers == ((0, 1, 2, 3), (4,))
    with pytest.raises(LayoutError) as err:
        plan_stages(5, 2, 1, "1f1b", 1.0, 0.0, 0.0, (4, 2))
    assert err.value.key == "parallel.pp_layers_per_stage"


@pytest.mark.parametrize("args,key", [
    ((2, 2, 1, "1f1b"), None),
    ((3, 2, 2, "interleaved_1f1b"), "parallel.pp"),
    ((4, 2, 2, "1f1b"), "parallel.pp_virtual_stages"),
    ((4, 2, 1, "zbv"), "parallel.pp_virtual_stages"),
    ((4, 2, 1, "interleaved_1f1b"), "parallel.pp_virtual_stages"),
    ((4, 2, 1, "nope"), "parallel.pp_schedule"),
])
def test_impossible_splits_name_the_key(args, key):
    n_layers, pp, virtual, schedule = args
    if key is None:
        plan_stages(n_layers, pp, virtual, schedule, 1.0, 0.0, 0.0, None)
        return
    with pytest.raises(LayoutError) as err:
        plan_stages(n_layers, pp, virtual, schedule, 1.0, 0.0, 0.0, None)
    assert err.value.key == key
