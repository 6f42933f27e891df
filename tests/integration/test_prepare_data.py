"""`python -m recipes.prepare_data`: shards read back as direct tokenization, train on them, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydoc_data.topics import topics
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tests.helpers import FAST, read_metrics, run_recipe
from titan.data.corpus import load_token_shards
from titan.data.tokenizer import load_tokenizer

SHARD_TOKENS = 1000
DOCS = [f"{topics[k]}\nnote {i}: héllo 🙂" for i, k in enumerate(sorted(topics)[:12])]


def write_corpus(folder: Path) -> Path:
    folder.mkdir()
    path = folder / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": doc, "id": i}) + "\n" for i, doc in enumerate(DOCS)) + "\n",
                    encoding="utf-8")
    return path


def train_tokenizer(path: Path) -> Path:
    """A small byte-level BPE with an `<|endoftext|>` token, trained on pydoc text."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([topics[k] for k in sorted(topics)[:40]], trainer)
    tok.save(str(path))
    return path


@pytest.mark.parametrize("kind", ["byte", "hf"])
def test_shards_match_direct_tokenization_and_train(tmp_path, kind):
    corpus = write_corpus(tmp_path / "corpus")
    spec = "byte" if kind == "byte" else str(train_tokenizer(tmp_path / "tokenizer.json"))
    out = tmp_path / "data" / "shards"
    proc = run_recipe("recipes.prepare_data", ["data=jsonl", f"data.path={corpus}", f"data.tokenizer={spec}",
                                               f"out={out}", f"shard_tokens={SHARD_TOKENS}"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"data=tokens data.path={out}" in proc.stdout

    tokenizer = load_tokenizer(spec)
    expected = np.concatenate([ids + [tokenizer.eot_id] for ids in tokenizer.encode_batch(DOCS)])
    stream, meta = load_token_shards(str(out))
    assert np.array_equal(stream.read(0, len(stream)), expected)
    assert meta["dtype"] == "uint16" and meta["num_tokens"] == len(expected)
    assert meta["vocab_size"] == tokenizer.vocab_size and meta["eot_id"] == tokenizer.eot_id
    sizes = [s["tokens"] for s in meta["shards"]]
    assert len(sizes) >= 3 and all(n == SHARD_TOKENS for n in sizes[:-1]) and 0 < sizes[-1] <= SHARD_TOKENS
    assert [s["file"] for s in meta["shards"]] == [f"tokens-{i:05d}.bin" for i in range(len(sizes))]
    assert sorted(p.name for p in out.iterdir()) == sorted(["meta.json", *(s["file"] for s in meta["shards"])])
    assert [p.name for p in out.parent.iterdir()] == ["shards"]  # no temporary folder left behind

    run_dir = tmp_path / "run"
    proc = run_recipe("recipes.pretrain", [*FAST, "data=tokens", f"data.path={out}", "training.steps=5",
                                           "training.seq_len=32", "eval.interval=0", "logging.log_interval=1",
                                           f"run.dir={run_dir}"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[-1]["tokens"] == 5 * 8 * 32  # FAST's global batch of 8 windows of 32 tokens


def test_existing_out_is_refused_unless_overwrite(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    out = tmp_path / "shards"
    out.mkdir()
    (out / "keep.txt").write_text("not ours")
    args = ["data=jsonl", f"data.path={corpus}", f"out={out}"]
    proc = run_recipe("recipes.prepare_data", args, timeout=120)
    assert proc.returncode == 2
    assert "`out`" in proc.stderr and "overwrite=true" in proc.stderr and "Traceback" not in proc.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    proc = run_recipe("recipes.prepare_data", [*args, "overwrite=true"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "tokens-00000.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "shards"]


def test_failure_mid_corpus_leaves_no_out(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    with corpus.open("a", encoding="utf-8") as f:
        f.write('{"body": "no text field"}\n')
    proc = run_recipe("recipes.prepare_data", ["data=jsonl", f"data.path={corpus}", f"out={tmp_path / 'shards'}",
                                               f"shard_tokens={SHARD_TOKENS}"], timeout=120)
    assert proc.returncode == 2 and "data.text_field" in proc.stderr, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]


@pytest.mark.parametrize("path_arg", [[], ["data.path=/nonexistent/corpus.jsonl"]])
def test_missing_data_path_exits_2(tmp_path, path_arg):
    proc = run_recipe("recipes.prepare_data", ["data=jsonl", *path_arg, f"out={tmp_path / 'shards'}"], timeout=120)
    assert proc.returncode == 2
    assert "data.path" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "shards").exists()
