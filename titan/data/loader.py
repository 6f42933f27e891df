"""Build the train and eval loaders for one data-parallel rank."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterator

import torch

# torchdata 0.11 calls torch.set_vital, which newer torch deprecates or removes.
warnings.filterwarnings("ignore", message=".*set_vital.*")
if not hasattr(torch, "set_vital"):
    torch.set_vital = lambda *args, **kwargs: True  # type: ignore[attr-defined]
from torchdata.stateful_dataloader import StatefulDataLoader  # noqa: E402

from titan.config import DataConfig, TrainingConfig  # noqa: E402
from titan.data.checks import open_tokenizer  # noqa: E402
from titan.data.corpus import build_stream, load_token_shards  # noqa: E402
from titan.data.packing import PackedWindows, train_eval_split  # noqa: E402
from titan.data.sampler import GlobalCursorSampler  # noqa: E402


@dataclass
class DataBundle:
    train: PackedWindows
    eval: PackedWindows
    vocab_size: int  # of the tokenizer that produced the tokens
    eot_id: int  # the end-of-text token that joins documents


def load_data(cfg: DataConfig, seq_len: int) -> DataBundle:
    """Tokenize (or memory-map) the corpus and split it into train and held-out windows."""
    if cfg.source == "tokens":
        stream, meta = load_token_shards(cfg.path, cfg.verify_checksums)
        vocab_size, eot_id = int(meta["vocab_size"]), int(meta["eot_id"])
    else:
        tokenizer = open_tokenizer(cfg)
        stream = build_stream(cfg.source, cfg.path, tokenizer, cfg.text_field)
        vocab_size, eot_id = tokenizer.vocab_size, tokenizer.eot_id
    train, held_out = train_eval_split(stream, seq_len, cfg.eval_fraction)
    return DataBundle(train, held_out, vocab_size, eot_id)


def train_loader(data: DataBundle, cfg: DataConfig, t: TrainingConfig, dp_rank: int, dp_size: int,
                 new_seed: bool = False) -> StatefulDataLoader:
    """Endless loader of this rank's micro-batches, in the global-cursor order (`new_seed`: a loaded
    state drawn with another seed continues from its cursor with `t.seed`)."""
    sampler = GlobalCursorSampler(len(data.train), t.global_batch_size, t.micro_batch_size, dp_rank, dp_size, t.seed,
                                  new_seed=new_seed)
    sampler.skip_ranges(cfg.skip_ranges)
    return StatefulDataLoader(data.train, batch_sampler=sampler, num_workers=cfg.num_workers)


SAMPLER_STATE = "_index_sampler_state"  # where StatefulDataLoader keeps its batch sampler's state


def data_cursor(state: dict) -> int:
    """The global position a train loader's state (`loader.state_dict()`) goes on from."""
    return int(state[SAMPLER_STATE]["consumed"])


def skipping(state: dict, ranges: list[list[int]]) -> dict:
    """A train loader state that also never draws the global positions in `ranges` ([start, end))."""
    sampler = dict(state[SAMPLER_STATE])
    sampler["skip"] = [*sampler.get("skip", []), *ranges]
    return {**state, SAMPLER_STATE: sampler}


def eval_batches(data: DataBundle, t: TrainingConfig, dp_rank: int, dp_size: int, steps: int) -> Iterator[dict]:
    """The same held-out micro-batches at every eval: `steps` global batches in stream order."""
    sampler = GlobalCursorSampler(len(data.eval), t.global_batch_size, t.micro_batch_size, dp_rank, dp_size,
                                  t.seed, shuffle=False)
    loader = StatefulDataLoader(data.eval, batch_sampler=sampler)
    micro_per_step = t.global_batch_size // dp_size // t.micro_batch_size
    for _, batch in zip(range(steps * micro_per_step), loader):
        yield batch
