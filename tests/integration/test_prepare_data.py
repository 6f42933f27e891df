"""`python -m recipes.prepare_data`: shards read back as direct tokenization, train on them, refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydoc_data.topics import topics
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tests.helpers import FAST, REPO_ROOT, read_metrics, run_recipe, subprocess_env, wait_for
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
    assert len(sizes) >= 3 and all(n >= SHARD_TOKENS for n in sizes[:-1]) and 0 < sizes[-1]
    ends = np.cumsum(sizes)
    assert all(expected[end - 1] == tokenizer.eot_id for end in ends)  # every shard ends at a document's end
    assert sum(s["documents"] for s in meta["shards"]) == meta["num_documents"] == len(DOCS)
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


def test_failure_mid_corpus_leaves_no_trainable_out(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    with corpus.open("a", encoding="utf-8") as f:  # past the first chunks of documents the workers get
        f.write("".join(json.dumps({"text": DOCS[i % len(DOCS)]}) + "\n" for i in range(600)))
        f.write('{"body": "no text field"}\n')
    out = tmp_path / "shards"
    args = ["data=jsonl", f"data.path={corpus}", f"out={out}", f"shard_tokens={SHARD_TOKENS}", "workers=1"]
    proc = run_recipe("recipes.prepare_data", args, timeout=120)
    assert proc.returncode == 2 and "data.text_field" in proc.stderr, proc.stderr
    assert not (out / "meta.json").exists() and (out / "progress.json").exists()  # kept for a resume
    assert (out / "tokens-00000.bin").exists()
    proc = run_recipe("recipes.pretrain", [*FAST, "data=tokens", f"data.path={out}"], timeout=120)
    assert proc.returncode == 2 and "meta.json" in proc.stderr
    corpus.write_text(corpus.read_text().replace('"body"', '"text"'))  # fixed: other inputs, so start over
    proc = run_recipe("recipes.prepare_data", args, timeout=120)
    assert proc.returncode == 2 and "unfinished preparation of other inputs" in proc.stderr
    assert run_recipe("recipes.prepare_data", [*args, "overwrite=true"], timeout=120).returncode == 0


@pytest.mark.parametrize("path_arg", [[], ["data.path=/nonexistent/corpus.jsonl"]])
def test_missing_data_path_exits_2(tmp_path, path_arg):
    proc = run_recipe("recipes.prepare_data", ["data=jsonl", *path_arg, f"out={tmp_path / 'shards'}"], timeout=120)
    assert proc.returncode == 2
    assert "data.path" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "shards").exists()


def write_formats(folder: Path) -> dict[str, tuple[str, Path]]:
    """DOCS in every input format prepare_data reads: (data= source, path)."""
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    folder.mkdir()
    lines = "".join(json.dumps({"text": doc}) + "\n" for doc in DOCS).encode()
    (folder / "c.jsonl.gz").write_bytes(gzip.compress(lines))
    (folder / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    table = pa.table({"id": list(range(len(DOCS))), "text": DOCS})
    pq.write_table(table, folder / "c.parquet", row_group_size=5)
    saved = folder / "hf"  # the layout of datasets' save_to_disk: Arrow IPC stream files and state.json
    saved.mkdir()
    for i, part in enumerate((table.slice(0, 7), table.slice(7))):
        with pa.ipc.new_stream(str(saved / f"data-{i:05d}-of-00002.arrow"), table.schema) as writer:
            writer.write_table(part)
    (saved / "state.json").write_text(json.dumps({"_data_files": [{"filename": f"data-{i:05d}-of-00002.arrow"}
                                                                  for i in range(2)]}))
    texts = folder / "texts"
    texts.mkdir()
    for i, doc in enumerate(DOCS):
        (texts / f"{i:03d}.txt").write_text(doc, encoding="utf-8")
    return {"gz": ("jsonl", folder / "c.jsonl.gz"), "zst": ("jsonl", folder / "c.jsonl.zst"),
            "parquet": ("parquet", folder / "c.parquet"), "hf": ("hf", saved), "text": ("text", texts)}


def test_every_input_format_gives_the_shards_of_plain_jsonl_with_any_number_of_workers(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    reference = tmp_path / "reference"
    base = [f"shard_tokens={SHARD_TOKENS}"]
    assert run_recipe("recipes.prepare_data", ["data=jsonl", f"data.path={corpus}", f"out={reference}", "workers=1",
                                               *base], timeout=120).returncode == 0
    want = load_token_shards(str(reference))
    for name, (source, path) in write_formats(tmp_path / "formats").items():
        out = tmp_path / name
        proc = run_recipe("recipes.prepare_data", [f"data={source}", f"data.path={path}", f"out={out}", "workers=2",
                                                   *base], timeout=120)
        assert proc.returncode == 0, (name, proc.stderr[-2000:])
        got = load_token_shards(str(out))
        assert np.array_equal(got[0].read(0, len(got[0])), want[0].read(0, len(want[0]))), name
        assert [s["tokens"] for s in got[1]["shards"]] == [s["tokens"] for s in want[1]["shards"]], name


def test_a_parquet_file_without_the_text_column_is_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["a", "b"]}), tmp_path / "c.parquet")
    proc = run_recipe("recipes.prepare_data", ["data=parquet", f"data.path={tmp_path / 'c.parquet'}",
                                               f"out={tmp_path / 'out'}"], timeout=120)
    assert proc.returncode == 2 and "config error at `data.text_field`" in proc.stderr and "body" in proc.stderr


def test_an_interrupted_preparation_resumes_without_redoing_finished_shards(tmp_path):
    corpus = tmp_path / "big.jsonl"
    corpus.write_text("".join(json.dumps({"text": DOCS[i % len(DOCS)] * 20}) + "\n" for i in range(300)))
    args = ["data=jsonl", f"data.path={corpus}", "shard_tokens=200000", "workers=1"]
    reference = tmp_path / "reference"
    assert run_recipe("recipes.prepare_data", [*args, f"out={reference}"], timeout=300).returncode == 0
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "recipes.prepare_data", *args, f"out={out}"], cwd=REPO_ROOT,
                            env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: (out / "tokens-00001.bin").exists(), 120)
    proc.kill()
    proc.wait()
    assert not (out / "meta.json").exists()
    recorded = [s["file"] for s in json.loads((out / "progress.json").read_text())["shards"]]
    kept = {name: (out / name).stat().st_mtime_ns for name in recorded}  # (a shard renamed but not yet recorded is redone)
    assert kept
    proc = run_recipe("recipes.prepare_data", [*args, f"out={out}"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resuming:" in proc.stdout
    assert all((out / name).stat().st_mtime_ns == mtime for name, mtime in kept.items())
    got, want = load_token_shards(str(out)), load_token_shards(str(reference))
    assert np.array_equal(got[0].read(0, len(got[0])), want[0].read(0, len(want[0])))
    assert [s["xxh3_64"] for s in got[1]["shards"]] == [s["xxh3_64"] for s in want[1]["shards"]]
    assert not (out / "progress.json").exists()


def test_print_a_mixture_of_prepared_folders(tmp_path):
    outs = []
    for name in ("web", "code"):
        corpus = write_corpus(tmp_path / f"corpus-{name}")
        outs.append(tmp_path / name)
        assert run_recipe("recipes.prepare_data", ["data=jsonl", f"data.path={corpus}", f"out={outs[-1]}"],
                          timeout=120).returncode == 0
    proc = run_recipe("recipes.prepare_data", ["--mix", *map(str, outs)], timeout=60)
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.splitlines()[0]
    assert line.startswith("data=mix data.sources='[{name: web, path: ") and "weight: 0.5000" in line


def test_tokenizer_workers_do_not_import_the_callers_main_module(tmp_path):
    """Workers start from a server that imported only the encoder: a recipe's __main__ (and torch with it)
    is not re-imported in each of them."""
    marker = tmp_path / "imported"
    script = tmp_path / "main_script.py"
    script.write_text(
        "import os\n"
        "if __name__ != '__main__':\n"
        f"    open({str(marker)!r}, 'a').write(__name__ + '\\n')\n"
        "from titan.data.encoding import encode_documents\n"
        "if __name__ == '__main__':\n"
        "    chunks = list(encode_documents(['one doc', 'two'] * 600, 'byte', None, 2))\n"
        "    print(sum(len(c.lengths) for c in chunks))\n")
    proc = subprocess.run([sys.executable, str(script)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                          env=subprocess_env())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["1200"]
    assert not marker.exists(), marker.read_text()
