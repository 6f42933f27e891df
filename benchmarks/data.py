"""The data layer at scale: preparation speed, the index of a huge corpus, and the loader's share of a step.

    python -m benchmarks.data [--megabytes 40] [--workers 2] [--steps 40]

(a) `python -m recipes.prepare_data` on a JSON Lines corpus (pydoc's documents repeated to
    `--megabytes` of text) with a byte-level BPE of 8,192 ids trained on pydoc, `--workers` processes,
    against the raw Hugging Face `tokenizers` batch encode of the same documents in the same chunks by
    the same number of processes (a `multiprocessing` pool, nothing written, its start-up included):
    tokens/s of the recipe (its own clock, from starting its pool to writing meta.json; the whole
    command with its imports is printed too) / tokens/s of the raw encode. Goal >= 0.8.
(b) The index of 10^9 sequences: a single-source sampler and a two-source mixture over 10^9 windows
    (no token data behind them: the index is what grows with the corpus); seconds to the first global
    batch and the memory the index holds (tracemalloc peak while building it and drawing the batch).
    Goal < 1 s and < 50 MB.
(c) The train loader's time per step on `small` (pydoc, seq 256, global batch 16, one rank):
    the median time to draw one step's micro-batches, against the median step time of the recipe on
    the same config (`metrics.jsonl`). Goal < 2%.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from pydoc_data.topics import topics

REPO = Path(__file__).resolve().parents[1]
CHUNK_DOCS = 256  # what titan.data.prepare sends a worker at a time


def train_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=8192, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([topics[k] for k in sorted(topics)], trainer)
    tok.save(str(path))


def write_corpus(path: Path, megabytes: int) -> list[str]:
    docs, size, i = [], 0, 0
    keys = sorted(topics)
    while size < megabytes * 1e6:
        doc = f"{topics[keys[i % len(keys)]]}\n(copy {i // len(keys)})"
        docs.append(doc)
        size += len(doc.encode())
        i += 1
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return docs


_tokenizer = None


def _init(path: str) -> None:
    global _tokenizer
    from tokenizers import Tokenizer

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _tokenizer = Tokenizer.from_file(path)


def _count(docs: list[str]) -> int:
    encode = getattr(_tokenizer, "encode_batch_fast", _tokenizer.encode_batch)  # the recipe's encoder: no offsets
    return sum(len(e.ids) + 1 for e in encode(docs, add_special_tokens=False))


def raw_encode(docs: list[str], tokenizer: Path, workers: int) -> tuple[int, float]:
    """(tokens, seconds) of the plain pool encode, pool start-up included."""
    began = time.perf_counter()
    chunks = [docs[i:i + CHUNK_DOCS] for i in range(0, len(docs), CHUNK_DOCS)]
    with multiprocessing.get_context("spawn").Pool(workers, initializer=_init, initargs=(str(tokenizer),)) as pool:
        tokens = sum(pool.imap(_count, chunks, chunksize=1))
    return tokens, time.perf_counter() - began


def prepare_speed(args: argparse.Namespace, tmp: Path) -> bool:
    tokenizer, corpus = tmp / "tokenizer.json", tmp / "corpus.jsonl"
    train_tokenizer(tokenizer)
    docs = write_corpus(corpus, args.megabytes)
    print(f"(a) prepare_data vs raw tokenizers encode: {len(docs):,} documents, {corpus.stat().st_size / 1e6:.1f} MB "
          f"JSONL, BPE 8192, {args.workers} processes", flush=True)
    rows = []
    for round_ in range(args.rounds):  # alternate, so a noisy spell hits both
        tokens, raw_s = raw_encode(docs, tokenizer, args.workers)
        out = tmp / f"out{round_}"
        began = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "recipes.prepare_data", "data=jsonl", f"data.path={corpus}",
                               f"data.tokenizer={tokenizer}", f"out={out}", f"workers={args.workers}",
                               "progress_bar=false"], cwd=REPO, capture_output=True, text=True)
        command_s = time.perf_counter() - began
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        meta = json.loads((out / "meta.json").read_text())
        assert meta["num_tokens"] == tokens, (meta["num_tokens"], tokens)
        recipe_s = float(re.search(r"\(([\d.]+) s, \d+ worker", proc.stdout).group(1))  # its own clock: pool to meta.json
        ratio = raw_s / recipe_s
        rows.append(ratio)
        print(f"  round {round_ + 1}: raw {tokens / raw_s:,.0f} tokens/s ({raw_s:.2f} s), recipe "
              f"{tokens / recipe_s:,.0f} tokens/s ({recipe_s:.2f} s; the command with its imports {command_s:.2f} s): "
              f"recipe / raw {ratio:.3f}", flush=True)
    ratio = statistics.median(rows)
    print(f"  median recipe / raw {ratio:.3f}; goal >= 0.8: {'met' if ratio >= 0.8 else 'NOT met'}")
    return ratio >= 0.8


def index_at_scale() -> bool:
    from titan.data.mixture import MixSource, MixtureOrder
    from titan.data.sampler import GlobalCursorSampler

    print("(b) the index of 10^9 sequences, resumed deep in a long run: seconds to the first global batch, "
          "memory it holds")
    deep = 1024 * 10**6  # a million steps of 1024 sequences in
    mixed = {"seed": 1, "consumed": deep, "skip": [], "mix": {"names": ["web", "code"], "block_size": 1024,
             "block": 10**6, "drawn": [int(0.7 * deep), int(0.3 * deep)], "deficit": [0.0, 0.0], "weights": [0.7, 0.3]}}
    ok = True
    for name, build, state in (
        ("one source", lambda: GlobalCursorSampler(10**9, 1024, 8, 0, 8, 1), {"seed": 1, "consumed": deep}),
        ("mixture 0.7/0.3", lambda: GlobalCursorSampler(
            10**9, 1024, 8, 0, 8, 1, mixture=MixtureOrder([MixSource("web", 7 * 10**8, 0.7),
                                                           MixSource("code", 3 * 10**8, 0.3)], 1024, 1)), mixed),
    ):
        tracemalloc.start()
        began = time.perf_counter()
        sampler = build()
        sampler.load_state_dict(state)
        first = next(iter(sampler))
        seconds = time.perf_counter() - began
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        met = seconds < 1 and peak < 50e6
        ok &= met
        print(f"  {name:16s} first batch {seconds * 1e3:.1f} ms, peak {peak / 1e6:.3f} MB ({len(first)} ids): "
              f"{'met' if met else 'NOT met'}")
    return ok


def loader_share(args: argparse.Namespace, tmp: Path) -> bool:
    from omegaconf import OmegaConf

    from recipes.cli import compose_config
    from titan.config import register_schemas
    from titan.data.loader import load_data, train_loader

    overrides = ["training.global_batch_size=16", "training.micro_batch_size=8", "training.num_threads=1"]
    run_dir = tmp / "run"
    proc = subprocess.run([sys.executable, "-m", "recipes.pretrain", *overrides, f"training.steps={args.steps}",
                           "logging.log_interval=1", "eval.interval=0", "checkpoint.enabled=false",
                           "logging.progress_bar=false", f"run.dir={run_dir}"], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"})
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    step_s = statistics.median(r["tokens"] / r["step"] / r["tokens_per_s"] for r in rows[2:])
    register_schemas()
    cfg = OmegaConf.to_object(compose_config("pretrain", overrides))
    data = load_data(cfg.data, cfg.training.seq_len)
    loader = iter(train_loader(data, cfg.data, cfg.training, 0, 1))
    per_step = cfg.training.global_batch_size // cfg.training.micro_batch_size
    times = []
    for _ in range(args.steps):
        began = time.perf_counter()
        for _ in range(per_step):
            next(loader)
        times.append(time.perf_counter() - began)
    loader_s = statistics.median(times[2:])
    share = loader_s / step_s
    print(f"(c) loader on `small` (seq 256, global batch 16, 1 rank): {loader_s * 1e3:.2f} ms per step, training step "
          f"{step_s * 1e3:.0f} ms: {share:.2%}; goal < 2%: {'met' if share < 0.02 else 'NOT met'}")
    return share < 0.02


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--megabytes", type=int, default=40)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="titan-data-") as tmp:
        results = [prepare_speed(args, Path(tmp)), index_at_scale(), loader_share(args, Path(tmp))]
    print(f"all goals: {'met' if all(results) else 'NOT met'}")


if __name__ == "__main__":
    main()
