"""Data checks both recipes (pretrain, prepare_data) run, each failing with a :class:`ConfigError`.

:func:`check_source` runs before any work (is there a corpus at ``data.path``?), :func:`open_tokenizer`
loads ``data.tokenizer``, and :func:`check_windows` refuses a token stream too short for the
``seq_len + 1`` windows of the train and eval splits. Errors inside the corpus (a bad line, a
binary file, a damaged shard) are raised where it is read, in :mod:`titan.data.corpus`.
"""

from __future__ import annotations

from bisect import bisect_left
from itertools import count

import numpy as np

from titan.config import ConfigError, DataConfig
from titan.data.corpus import SUFFIXES, TokenStream, corpus_files, read_shard_meta
from titan.data.mixture import MixedWindows
from titan.data.packing import PackedWindows, train_eval_split
from titan.data.tokenizer import Tokenizer, load_tokenizer


def check_source(d: DataConfig) -> None:
    """Fail before any work when the corpus is not there: no path, no matching files, no meta.json."""
    if d.source == "pydoc":
        return
    if d.source == "mix":
        for i, source in enumerate(d.sources):
            read_shard_meta(source.path, f"data.sources[{i}].path")
        return
    if not d.path:
        raise ConfigError("data.path", f"data={d.name} needs a corpus path; none given.",
                          "set data.path=<file|folder|glob>.")
    if d.source == "tokens":
        read_shard_meta(d.path)
    elif d.source in SUFFIXES:
        corpus_files(d.source, d.path)


def open_tokenizer(d: DataConfig) -> Tokenizer:
    """`data.tokenizer` loaded, or a ConfigError naming the key to fix."""
    try:
        return load_tokenizer(d.tokenizer, d.eot_token)
    except KeyError as exc:
        raise ConfigError("data.eot_token", f"{exc.args[0]}.",
                          "set data.eot_token=<the tokenizer's end-of-text token>.") from None
    except (OSError, ValueError) as exc:
        raise ConfigError("data.tokenizer", f"cannot load {d.tokenizer!r}: {exc}.",
                          "use `byte` or the path of a Hugging Face tokenizer.json.") from None


def check_data_windows(train: PackedWindows | MixedWindows, held_out: PackedWindows | MixedWindows,
                       eval_fraction: float, need_eval: bool) -> None:
    """`check_windows` on the corpus, or on every source of a mixture."""
    if isinstance(train, MixedWindows):
        for i, (name, part, held) in enumerate(zip(train.names, train.parts, held_out.parts)):
            check_windows(part, held, eval_fraction, need_eval, f"data.sources[{i}].path", f"source {name!r}",
                          key=f"data.sources[{i}].path")
    else:
        check_windows(train, held_out, eval_fraction, need_eval)


def check_windows(train: PackedWindows, held_out: PackedWindows, eval_fraction: float, need_eval: bool,
                  path_key: str = "data.path", what: str = "the corpus", key: str = "training.seq_len") -> None:
    """Refuse a stream without one train window (and one eval window when evals run)."""
    if len(train) >= 1 and (len(held_out) >= 1 or not need_eval):
        return
    tokens, seq_len = len(train.stream), train.seq_len
    needed = _min_tokens(seq_len, eval_fraction, need_eval)
    splits = "train and eval splits" if need_eval else "train split"
    problem = (f"{what} has {tokens:,} tokens, too few for one window of training.seq_len + 1 = {seq_len + 1} "
               f"tokens in each of its {splits} (the eval split is the last data.eval_fraction={eval_fraction} of "
               f"the stream): it needs at least {needed:,} tokens.")
    longest = _max_seq_len(tokens, seq_len, eval_fraction, need_eval)
    shorter = f"lower training.seq_len to {longest} or less, or " if longest else ""
    raise ConfigError(key, problem, f"{shorter}add data to {path_key} (at least {needed:,} tokens).")


def _min_tokens(seq_len: int, eval_fraction: float, need_eval: bool) -> int:
    """The shortest stream that fits `seq_len`."""
    share = min(eval_fraction, 1.0 - eval_fraction) if need_eval else 1.0 - eval_fraction
    lower = max(seq_len + 1, int(seq_len / share) - 1)  # no shorter stream fits a window in each split
    return next(n for n in count(lower) if _fits(n, seq_len, eval_fraction, need_eval))


def _max_seq_len(tokens: int, seq_len: int, eval_fraction: float, need_eval: bool) -> int:
    """The longest seq_len below `seq_len` that `tokens` fit; 0 when none does (fitting shrinks as seq_len grows)."""
    return bisect_left(range(1, seq_len), True, key=lambda s: not _fits(tokens, s, eval_fraction, need_eval))


def _fits(tokens: int, seq_len: int, eval_fraction: float, need_eval: bool) -> bool:
    """Whether a stream of `tokens` gives one train (and eval) window, cut as the loader cuts it."""
    zeros = TokenStream([np.broadcast_to(np.uint16(0), (tokens,))])  # its length, and no memory
    train, held_out = train_eval_split(zeros, seq_len, eval_fraction)
    return len(train) >= 1 and (len(held_out) >= 1 or not need_eval)
