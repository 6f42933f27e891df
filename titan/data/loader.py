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

from titan.config import ConfigError, DataConfig, SourceConfig, TrainingConfig  # noqa: E402
from titan.data.checks import open_tokenizer  # noqa: E402
from titan.data.corpus import build_stream, load_token_shards  # noqa: E402
from titan.data.mixture import MixedWindows, MixSource, MixtureOrder  # noqa: E402
from titan.data.packing import PackedWindows, train_eval_split  # noqa: E402
from titan.data.sampler import GlobalCursorSampler  # noqa: E402


@dataclass
class DataBundle:
    train: PackedWindows | MixedWindows
    eval: PackedWindows | MixedWindows
    vocab_size: int  # of the tokenizer that produced the tokens
    eot_id: int  # the end-of-text token that joins documents
    sources: tuple[SourceConfig, ...] = ()  # data=mix: the mixture's sources (train and eval are MixedWindows)


def load_data(cfg: DataConfig, seq_len: int) -> DataBundle:
    """Tokenize (or memory-map) the corpus and split it into train and held-out windows (per source
    for a mixture: each source's tail is its held-out part)."""
    if cfg.source == "mix":
        streams = [load_token_shards(s.path, cfg.verify_checksums) for s in cfg.sources]
        vocab_size, eot_id = check_same_tokens(cfg.sources, [meta for _, meta in streams])
        splits = [train_eval_split(stream, seq_len, cfg.eval_fraction) for stream, _ in streams]
        names = [s.name for s in cfg.sources]
        return DataBundle(MixedWindows([t for t, _ in splits], names), MixedWindows([e for _, e in splits], names),
                          vocab_size, eot_id, tuple(cfg.sources))
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
    mixture = None
    if data.sources:
        mixture = MixtureOrder([MixSource(s.name, len(part), s.weight, s.max_epochs)
                                for s, part in zip(data.sources, data.train.parts)], t.global_batch_size, t.seed)
    sampler = GlobalCursorSampler(len(data.train), t.global_batch_size, t.micro_batch_size, dp_rank, dp_size, t.seed,
                                  new_seed=new_seed, mixture=mixture)
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
    """The same held-out micro-batches at every eval: `steps` global batches in stream order (of each
    source's held-out part, one source after the other, for a mixture)."""
    parts = data.eval.parts if isinstance(data.eval, MixedWindows) else [data.eval]
    micro_per_step = t.global_batch_size // dp_size // t.micro_batch_size
    for source, part in enumerate(parts):
        sampler = GlobalCursorSampler(len(part), t.global_batch_size, t.micro_batch_size, dp_rank, dp_size,
                                      t.seed, shuffle=False)
        for _, batch in zip(range(steps * micro_per_step), StatefulDataLoader(part, batch_sampler=sampler)):
            yield {**batch, "source": torch.full_like(batch["ids"], source)} if data.sources else batch


def check_same_tokens(sources: list[SourceConfig], metas: list[dict]) -> tuple[int, int]:
    """(vocab size, end-of-text id) the sources share; refuses sources of different tokenizers."""
    first = metas[0]
    for i, meta in enumerate(metas[1:], 1):
        if (meta["vocab_size"], meta["eot_id"], meta.get("tokenizer")) != (first["vocab_size"], first["eot_id"],
                                                                        first.get("tokenizer")):
            raise ConfigError(f"data.sources[{i}].path", f"{sources[i].path} was tokenized with "
                              f"{meta.get('tokenizer')} (vocab {meta['vocab_size']}, end-of-text {meta['eot_id']}), "
                              f"{sources[0].path} with {first.get('tokenizer')} (vocab {first['vocab_size']}, end-of-text "
                              f"{first['eot_id']}).", "prepare every source with the same data.tokenizer.")
    return int(first["vocab_size"]), int(first["eot_id"])
