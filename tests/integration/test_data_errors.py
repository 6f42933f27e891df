"""Bad data is refused alike by `recipes.pretrain` and `recipes.prepare_data`: exit 2 and one paragraph
naming the file, the line where it applies and the fix, never a traceback; damaged token shards too."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from subprocess import CompletedProcess

import pytest

from tests.helpers import FAST, run_recipe
from titan.checkpoint.manifest import file_record
from titan.config import ConfigError
from titan.data.corpus import SHARD_META, load_token_shards

LINES = [json.dumps({"text": f"document {i}: " + "words " * 20}) for i in range(3)]


def write(path: Path, data: str | bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return str(path)


# case -> (data source, how to make data.path under a folder, what stderr must hold)
CASES = {
    "bad-json": ("jsonl", lambda d: write(d / "bad.jsonl", f'{LINES[0]}\n{{"text": "a" "b"}}\n'),
                 ["bad.jsonl:2 is not valid JSON", "column 14", "Fix: give one JSON object per line"]),
    "missing-field": ("jsonl", lambda d: write(d / "nofield.jsonl", f'{LINES[0]}\n\n{{"body": "x", "id": 3}}\n'),
                      ["`data.text_field`", "nofield.jsonl:3 has no field 'text'", "its fields: body, id",
                       "Fix: set data.text_field=<one of them>"]),
    "not-a-string": ("jsonl", lambda d: write(d / "notstr.jsonl", f'{LINES[0]}\n{{"text": ["a", "b"]}}\n'),
                     ["`data.text_field`", "notstr.jsonl:2: field 'text' is an array, not a string", "Fix: make"]),
    "not-utf8-jsonl": ("jsonl", lambda d: write(d / "latin1.jsonl", f"{LINES[0]}\n".encode() +
                                                '{"text": "café"}\n'.encode("latin-1")),
                       ["latin1.jsonl:2 is not UTF-8 (byte 0xe9 at column 14)", "Fix: convert the file to UTF-8"]),
    "binary-txt": ("text", lambda d: write(d / "archive.txt", gzip.compress(os.urandom(4000))),
                   ["archive.txt is not UTF-8 text", "the first on line 1", "Fix: decompress or convert archive.txt"]),
    "empty-folder": ("jsonl", lambda d: write(d / "empty" / "notes.csv", "a,b\n").rsplit("/", 1)[0],
                     ["the folder", "empty holds no .jsonl or .json (plain, .gz or .zst) files", "Fix: point data.path at a .jsonl"]),
    "glob-matches-nothing": ("text", lambda d: str(d / "*.nothing"),
                             ["the glob", "*.nothing' matches no files", "Fix: point data.path at a .txt or .md"]),
    "blank-corpus": ("jsonl", lambda d: write(d / "blank.jsonl", '\n{"text": ""}\n  \n{"text": " "}\n'),
                     ["blank.jsonl holds no text", ".jsonl or .json (plain, .gz or .zst) file(s) searched",
                      "Fix: point data.path at the .jsonl or .json (plain, .gz or .zst) files"]),
}
TOO_SMALL = ["`training.seq_len`", "the corpus has 300 tokens", "needs at least 1,281 tokens",
             "Fix: lower training.seq_len to 14 or less, or add data to data.path (at least 1,281 tokens)"]


def pretrain(source: str, path: str, run_dir: Path, *extra: str) -> list:
    return ["recipes.pretrain", [*FAST, f"data={source}", f"data.path={path}", "training.steps=1",
                                 f"run.dir={run_dir}", *extra]]


def prepare(source: str, path: str, out: Path, *extra: str) -> list:
    return ["recipes.prepare_data", [f"data={source}", f"data.path={path}", f"out={out}", *extra]]


def run_all(jobs: dict) -> dict[str, CompletedProcess]:
    """Run recipe subprocesses side by side (most of each one's time is importing torch)."""
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        futures = {key: pool.submit(run_recipe, module, args, 120) for key, (module, args) in jobs.items()}
        return {key: future.result() for key, future in futures.items()}


def error_line(proc: CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, CompletedProcess]:
    root = tmp_path_factory.mktemp("data-errors")
    jobs = {}
    for name, (source, make, _) in CASES.items():
        path = make(root / name)
        jobs[f"{name}/pretrain"] = pretrain(source, path, root / name / "run")
        jobs[f"{name}/prepare_data"] = prepare(source, path, root / name / "shards")
    jobs["too-small"] = pretrain("text", write(root / "small" / "small.txt", "x" * 299), root / "small" / "run")
    few = write(root / "few" / "mostly.txt", b"good text\n" * 100 + b"\xff\xfe\n")
    jobs["few-undecodable"] = prepare("text", few, root / "few" / "shards")
    return run_all(jobs)


@pytest.mark.parametrize("case", CASES)
def test_bad_corpus_is_refused_alike_by_both_recipes(runs, case):
    lines = []
    for recipe in ("pretrain", "prepare_data"):
        proc = runs[f"{case}/{recipe}"]
        assert proc.returncode == 2, (recipe, proc.stderr[-3000:])
        assert "Traceback" not in proc.stderr
        lines.append(error_line(proc))
        for expected in CASES[case][2]:
            assert expected in lines[-1], (recipe, lines[-1])
    assert lines[0] == lines[1]  # one piece of code says it for both


def test_corpus_too_small_for_the_windows(runs):
    proc = runs["too-small"]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = error_line(proc)
    assert all(expected in line for expected in TOO_SMALL), line


def test_a_few_undecodable_bytes_are_warned_of(runs):
    proc = runs["few-undecodable"]
    assert proc.returncode == 0, proc.stderr
    assert "warning: " in proc.stderr and "mostly.txt: 2 undecodable byte(s)" in proc.stderr
    assert "the first on line 101" in proc.stderr


def test_damaged_token_shards_are_refused(tmp_path):
    corpus = write(tmp_path / "corpus.jsonl", "".join(line + "\n" for line in LINES * 20))
    good = tmp_path / "shards"
    proc = run_recipe(*prepare("jsonl", corpus, good, "shard_tokens=1000"), timeout=120)
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((good / SHARD_META).read_text())
    assert len(meta["shards"]) > 1
    assert all(file_record(good / s["file"]) == {"size": s["size"], "xxh3_64": s["xxh3_64"]} for s in meta["shards"])

    truncated, flipped = shutil.copytree(good, tmp_path / "truncated"), shutil.copytree(good, tmp_path / "flipped")
    shard, size = "tokens-00001.bin", meta["shards"][1]["size"]
    os.truncate(truncated / shard, size - 6)  # an even count: whole tokens, silently fewer of them before
    data = bytearray((flipped / shard).read_bytes())
    data[100] ^= 0x01
    (flipped / shard).write_bytes(bytes(data))
    procs = run_all({"truncated": pretrain("tokens", truncated, tmp_path / "run-t"),
                     "flipped": pretrain("tokens", flipped, tmp_path / "run-f", "data.verify_checksums=true")})
    expected = {"truncated": f"token shard {truncated / shard} is truncated or padded: {size - 6} bytes found, "
                             f"{SHARD_META} records {size}",
                "flipped": f"token shard {flipped / shard} is altered: xxh3_64 checksum"}
    for name, proc in procs.items():
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        line = error_line(proc)
        assert expected[name] in line and "Fix: re-run `python -m recipes.prepare_data`" in line, line

    # A meta.json written before XXH3-64 records CRC-32 (zlib): still checked, the altered shard still found.
    for s in meta["shards"]:
        del s["xxh3_64"]
        s["crc32"] = zlib.crc32((good / s["file"]).read_bytes())
    for folder in (good, flipped):
        (folder / SHARD_META).write_text(json.dumps(meta))
    assert len(load_token_shards(str(good), verify_checksums=True)[0]) == meta["num_tokens"]
    with pytest.raises(ConfigError, match=f"{shard} is altered: crc32 checksum"):
        load_token_shards(str(flipped), verify_checksums=True)

    # An older meta.json without sizes or checksums: the size is tokens x 2 bytes; checksums cannot be checked.
    for s in meta["shards"]:
        del s["size"], s["crc32"]
    (truncated / SHARD_META).write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=f"{size - 6} bytes found, meta.json records {size}"):
        load_token_shards(str(truncated))
    (flipped / SHARD_META).write_text(json.dumps(meta))
    assert len(load_token_shards(str(flipped))[0]) == meta["num_tokens"]
    with pytest.raises(ConfigError, match="records no checksums"):
        load_token_shards(str(flipped), verify_checksums=True)
