"""Global-cursor sampler, the stateful train loader built on it, and packed windows."""

from __future__ import annotations

import itertools
import pickle
import time

import numpy as np
import pytest
import torch

from titan.config import DataConfig, TrainingConfig
from titan.data.corpus import TokenStream
from titan.data.loader import DataBundle, train_loader
from titan.data.packing import PackedWindows, train_eval_split
from titan.data.sampler import GlobalCursorSampler

# torchdata calls the deprecated torch.set_vital; titan.data.loader silences it only outside pytest.
pytestmark = pytest.mark.filterwarnings("ignore:.*set_vital")


def sampler(n=37, gbs=8, mbs=2, rank=0, dp=1, seed=0, shuffle=True) -> GlobalCursorSampler:
    return GlobalCursorSampler(n, gbs, mbs, rank, dp, seed, shuffle=shuffle)


def take_steps(s: GlobalCursorSampler, it, steps: int) -> list[list[int]]:
    """This rank's indices for the next `steps` optimizer steps, one flat list per step."""
    per_step = s.global_batch_size // s.dp_size // s.micro_batch_size
    out = []
    for _ in range(steps):
        micro = [next(it) for _ in range(per_step)]
        assert all(len(m) == s.micro_batch_size for m in micro)
        out.append([i for m in micro for i in m])
    return out


def global_stream(n: int, seed: int, count: int) -> list[int]:
    """The single-rank reference: one global batch per step, the whole batch as one micro-batch."""
    s = sampler(n=n, gbs=1, mbs=1, seed=seed)
    return [b[0] for b in itertools.islice(iter(s), count)]


def union_over_ranks(n, gbs, mbs, dp, seed, steps, state=None) -> list[list[int]]:
    """Each step's global batch as the concatenation of all dp ranks' micro-batches (rank order)."""
    per_rank = []
    for rank in range(dp):
        s = sampler(n=n, gbs=gbs, mbs=mbs, rank=rank, dp=dp, seed=seed)
        if state is not None:
            s.load_state_dict(state)
        per_rank.append(take_steps(s, iter(s), steps))
    return [[i for rank in range(dp) for i in per_rank[rank][step]] for step in range(steps)]


# ---------------------------------------------------------------- order

def epoch(s: GlobalCursorSampler, e: int) -> list[int]:
    """The ids of epoch `e` in the sampler's order."""
    return s.ids_at(range(e * s.num_sequences, (e + 1) * s.num_sequences))


def test_order_depends_only_on_seed_and_epoch():
    torch.manual_seed(0)
    a = sampler(n=50, gbs=8, mbs=2, seed=4)
    torch.manual_seed(1)
    torch.rand(100)
    b = sampler(n=50, gbs=12, mbs=3, rank=2, dp=4, seed=4)
    for e in range(3):
        assert epoch(a, e) == epoch(b, e)
        assert sorted(epoch(a, e)) == list(range(50))
    assert epoch(a, 0) != epoch(a, 1)
    assert epoch(a, 0) != epoch(sampler(n=50, seed=5), 0)
    assert epoch(a, 0) != list(range(50))  # actually shuffled
    assert epoch(sampler(n=50, seed=4, shuffle=False), 3) == list(range(50))


@pytest.mark.parametrize("n", [1, 2, 3, 31, 32, 33, 127, 257, 65535, 65537])
def test_each_epoch_is_a_permutation_for_awkward_sizes(n):
    s = sampler(n=n, seed=9)
    for e in range(2):
        assert sorted(epoch(s, e)) == list(range(n))
    if n > 3:
        assert epoch(s, 0) != epoch(s, 1) and epoch(s, 0) != epoch(sampler(n=n, seed=10), 0)


def test_a_trillion_sequences_answer_at_once_in_constant_memory():
    """No permutation is materialized: the state is a few keys whatever the size."""
    n = 10**12
    s = sampler(n=n, gbs=1024, mbs=8, seed=1)
    began = time.perf_counter()
    ids = s.ids_at(range(n - 1000, n + 1000))  # across the first epoch's end
    assert time.perf_counter() - began < 1.0
    assert len(set(ids[:1000])) == 1000 and all(0 <= i < n for i in ids)
    assert len(pickle.dumps(s.epoch_order(0))) < 2000


@pytest.mark.parametrize("dp", [1, 2, 4])
@pytest.mark.parametrize("mbs", [1, 2, 4])
def test_union_of_ranks_is_the_global_batch(dp, mbs):
    n, gbs, seed, steps = 29, 16, 7, 5  # 80 sequences: the batches cross two epoch ends
    if (gbs // dp) % mbs:
        pytest.skip("micro-batch does not divide the per-rank batch")
    reference = global_stream(n, seed, gbs * steps)
    got = union_over_ranks(n, gbs, mbs, dp, seed, steps)
    assert got == [reference[s * gbs:(s + 1) * gbs] for s in range(steps)]


def test_ranks_take_disjoint_contiguous_slices():
    n, gbs, dp = 64, 16, 4
    reference = global_stream(n, 3, gbs)
    for rank in range(dp):
        s = sampler(n=n, gbs=gbs, mbs=2, rank=rank, dp=dp, seed=3)
        assert take_steps(s, iter(s), 1)[0] == reference[rank * 4:(rank + 1) * 4]


def test_epochs_wrap_and_each_epoch_is_a_permutation():
    n, gbs = 10, 4
    s = sampler(n=n, gbs=gbs, mbs=2, seed=1)
    steps = take_steps(s, iter(s), 10)  # 40 sequences = 4 epochs
    flat = [i for step in steps for i in step]
    for e in range(4):
        chunk = flat[e * n:(e + 1) * n]
        assert sorted(chunk) == list(range(n)), e
        assert chunk == epoch(s, e)
    # Step 2 covers global positions 8..11: the last two of epoch 0 and the first two of epoch 1.
    assert steps[2] == epoch(s, 0)[8:] + epoch(s, 1)[:2]
    assert flat[:n] != flat[n:2 * n]


def test_global_batch_larger_than_the_dataset():
    s = sampler(n=3, gbs=8, mbs=4, seed=2)
    first = take_steps(s, iter(s), 1)[0]
    expected = epoch(s, 0) + epoch(s, 1) + epoch(s, 2)[:2]
    assert first == expected


# ---------------------------------------------------------------- resume

@pytest.mark.parametrize("dp_before,dp_after", [(1, 1), (2, 2), (1, 4), (4, 2), (2, 1)])
@pytest.mark.parametrize("k", [0, 1, 3])
def test_state_dict_resumes_with_the_next_sequences(dp_before, dp_after, k):
    n, gbs, mbs, seed = 23, 8, 2, 5
    ran = union_over_ranks(n, gbs, mbs, dp_before, seed, k) if k else []
    s = sampler(n=n, gbs=gbs, mbs=mbs, rank=0, dp=dp_before, seed=seed)
    take_steps(s, iter(s), k)
    state = s.state_dict()
    assert state["consumed"] == k * gbs and state["seed"] == seed
    # Every rank holds the same state.
    for rank in range(1, dp_before):
        other = sampler(n=n, gbs=gbs, mbs=mbs, rank=rank, dp=dp_before, seed=seed)
        take_steps(other, iter(other), k)
        assert other.state_dict() == state

    resumed = union_over_ranks(n, gbs, mbs, dp_after, seed, 4, state=state)
    whole = global_stream(n, seed, (k + 4) * gbs)
    assert [i for step in ran + resumed for i in step] == whole  # no skip, no repeat


def test_state_survives_a_round_trip_through_json():
    import json

    s = sampler(n=11, gbs=4, mbs=2, seed=9)
    it = iter(s)
    take_steps(s, it, 3)
    state = json.loads(json.dumps(s.state_dict()))
    fresh = sampler(n=11, gbs=4, mbs=2, seed=9)
    fresh.load_state_dict(state)
    assert take_steps(fresh, iter(fresh), 2) == take_steps(s, it, 2)


def test_seed_mismatch_on_load_raises():
    s = sampler(seed=1)
    take_steps(s, iter(s), 1)
    other = sampler(seed=2)
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(s.state_dict())


# ---------------------------------------------------------------- through the StatefulDataLoader

def bundle(num_tokens: int = 2000, seq_len: int = 8) -> DataBundle:
    stream = TokenStream([np.arange(num_tokens, dtype=np.int64)])
    train, held_out = train_eval_split(stream, seq_len, 0.1)
    return DataBundle(train, held_out, num_tokens, num_tokens - 1)


def loader_ids(loader, count: int) -> list[list[int]]:
    out = []
    for batch in itertools.islice(iter(loader), count):
        # tokens are positions in the stream: window i starts at i * seq_len.
        assert torch.equal(batch["tokens"][:, 0], batch["ids"] * 8)
        out.append(batch["ids"].tolist())
    return out


@pytest.mark.parametrize("num_workers", [0, 1])
@pytest.mark.parametrize("dp_after", [2, 1])
def test_train_loader_state_dict_resumes_exactly(num_workers, dp_after):
    data = bundle()
    t = TrainingConfig(global_batch_size=8, micro_batch_size=2, seq_len=8, seed=3)
    d = DataConfig(num_workers=num_workers)
    steps_before, steps_after = 3, 4

    # Uninterrupted run of both dp ranks (dp=2: 2 micro-batches per rank and step).
    def rank_batches(rank, dp, count, state=None):
        loader = train_loader(data, d, t, rank, dp)
        if state is not None:
            loader.load_state_dict(state)
        return loader_ids(loader, count)

    full = {r: rank_batches(r, 2, 2 * (steps_before + steps_after)) for r in range(2)}
    whole = [i for step in range(steps_before + steps_after)
             for r in range(2) for mb in full[r][2 * step:2 * step + 2] for i in mb]

    loader = train_loader(data, d, t, 0, 2)
    it = iter(loader)
    before = [next(it)["ids"].tolist() for _ in range(2 * steps_before)]
    assert before == full[0][:2 * steps_before]
    state = loader.state_dict()

    micro_per_step = 8 // dp_after // 2
    resumed = {r: rank_batches(r, dp_after, micro_per_step * steps_after, state) for r in range(dp_after)}
    after = [i for step in range(steps_after) for r in range(dp_after)
             for mb in resumed[r][micro_per_step * step:micro_per_step * (step + 1)] for i in mb]
    assert after == whole[8 * steps_before:]
    if dp_after == 2:
        assert resumed[0] == full[0][2 * steps_before:]


# ---------------------------------------------------------------- packed windows

def test_windows_overlap_by_exactly_one_token():
    seq_len = 8
    stream = TokenStream([np.arange(0, 30), np.arange(30, 57), np.arange(57, 81)])  # 81 tokens, three arrays
    windows = PackedWindows(stream, 0, len(stream), seq_len)
    assert len(windows) == 10  # (81 - 1) // 8
    items = [windows[i] for i in range(len(windows))]
    for i, item in enumerate(items):
        tokens = item["tokens"]
        assert tokens.dtype == torch.int64 and tokens.shape == (seq_len + 1,)
        assert int(item["ids"]) == i
        assert tokens.tolist() == list(range(i * seq_len, i * seq_len + seq_len + 1))
    for a, b in zip(items, items[1:]):
        inputs_next, targets = b["tokens"][:-1], a["tokens"][1:]
        assert targets[-1] == inputs_next[0]  # the last target of window i is the first input of i+1
        assert a["tokens"][-1] == b["tokens"][0]
        assert not set(a["tokens"][:-1].tolist()) & set(b["tokens"][:-1].tolist())
    # Every token of the stream is an input exactly once and every token but the first a target once.
    inputs = [t for item in items for t in item["tokens"][:-1].tolist()]
    targets = [t for item in items for t in item["tokens"][1:].tolist()]
    assert inputs == list(range(80)) and targets == list(range(1, 81))
    with pytest.raises(IndexError):
        windows[len(windows)]


def test_windows_drop_less_than_one_window_of_tail():
    stream = TokenStream([np.arange(100)])
    windows = PackedWindows(stream, 0, 100, 8)
    last = windows[len(windows) - 1]["tokens"]
    assert 0 <= 99 - int(last[-1]) < 8


def test_train_eval_split_boundary():
    seq_len, n = 4, 203
    stream = TokenStream([np.arange(n)])
    train, held_out = train_eval_split(stream, seq_len, 0.25)
    boundary = int(n * 0.75)  # 152
    train_tokens = {t for i in range(len(train)) for t in train[i]["tokens"].tolist()}
    eval_tokens = {t for i in range(len(held_out)) for t in held_out[i]["tokens"].tolist()}
    assert max(train_tokens) < boundary  # no training window reads held-out tokens
    assert min(eval_tokens) == boundary and held_out[0]["tokens"][0] == boundary
    assert not train_tokens & eval_tokens
    assert max(train_tokens) >= boundary - seq_len  # the train split runs up to the boundary
    assert len(train) == (boundary - 1) // seq_len and len(held_out) == (n - boundary - 1) // seq_len
    assert held_out[len(held_out) - 1]["tokens"][-1] <= n - 1
