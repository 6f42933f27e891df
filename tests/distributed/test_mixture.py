"""`data=mix` in real runs: proportional counts per step, exactly-once per source across a resume on
another dp size, per-source train and eval losses, and the one-paragraph errors."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest

import titan.trainer
from tests.helpers import assert_exactly_once, read_metrics, run_recipe, run_torchrun
from titan.data.corpus import load_token_shards
from titan.data.packing import train_eval_split

SEQ, BATCH = 64, 10
ARGS = ["model=debug", f"training.seq_len={SEQ}", f"training.global_batch_size={BATCH}", "training.micro_batch_size=1",
        "training.num_threads=1", "logging.log_interval=2", "eval.interval=4", "eval.steps=1", "checkpoint.interval=4",
        "logging.progress_bar=false", "logging.sequence_ids=true", "data=mix"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> dict[str, Path]:
    """Two prepared sources: the pydoc corpus and a JSON Lines corpus of this project's source code."""
    root = tmp_path_factory.mktemp("mix")
    code = root / "code.jsonl"
    code.write_text("".join(json.dumps({"text": inspect.getsource(m)}) + "\n" for m in (titan.trainer, inspect)))
    out = {"docs": root / "docs", "code": root / "code", "tiny": root / "tiny"}
    tiny = root / "tiny.jsonl"
    tiny.write_text(json.dumps({"text": "too short"}) + "\n")
    for args in (["data=pydoc"], ["data=jsonl", f"data.path={code}"], ["data=jsonl", f"data.path={tiny}"]):
        name = {"data=pydoc": "docs"}.get(args[0]) or ("code" if "code" in args[-1] else "tiny")
        proc = run_recipe("recipes.prepare_data", [*args, f"out={out[name]}"], timeout=120)
        assert proc.returncode == 0, proc.stderr
    return out


def sources(prepared: dict[str, Path], docs: float = 0.7, code: float = 0.3, extra: str = "") -> str:
    return (f"data.sources=[{{name: docs, path: {prepared['docs']}, weight: {docs}}}, "
            f"{{name: code, path: {prepared['code']}, weight: {code}}}{extra}]")


def train_windows(path: Path) -> int:
    stream, _ = load_token_shards(str(path))
    return len(train_eval_split(stream, SEQ, 0.05)[0])


def test_mixture_counts_resume_on_another_dp_size_and_per_source_losses(prepared, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    proc = run_torchrun(2, "recipes.pretrain", [*ARGS, sources(prepared), "training.steps=8", f"run.dir={first}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_recipe("recipes.pretrain", [*ARGS, sources(prepared), "training.steps=12", f"run.dir={first}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout + proc.stderr

    # A straight one-process run draws the same batches: the resume on 1 rank went on where 2 ranks stopped.
    proc = run_recipe("recipes.pretrain", [*ARGS, sources(prepared), "training.steps=12", f"run.dir={second}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_exactly_once([first, second], 12, BATCH)
    docs = train_windows(prepared["docs"])
    for line in (second / "sequence_ids.jsonl").read_text().splitlines():
        ids = json.loads(line)["ids"]
        assert sum(i < docs for i in ids) == 7  # 0.7 x 10 every step

    rows = read_metrics(first)
    for row in rows:
        assert row["loss"] == pytest.approx(0.7 * row["loss/docs"] + 0.3 * row["loss/code"], rel=1e-5)
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [4, 8, 12]
    for row in evals:  # each source's held-out tail, one global batch each: equal tokens
        assert row["eval_loss"] == pytest.approx((row["eval_loss/docs"] + row["eval_loss/code"]) / 2, rel=1e-5)
        assert row["eval_loss/docs"] != row["eval_loss/code"]


def test_changed_weights_on_resume_take_effect_and_are_logged(prepared, tmp_path):
    run = tmp_path / "run"
    proc = run_recipe("recipes.pretrain", [*ARGS, sources(prepared), "training.steps=4", f"run.dir={run}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_recipe("recipes.pretrain", [*ARGS, sources(prepared, 0.5, 0.5), "training.steps=6", f"run.dir={run}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "data mixture weights changed from [0.7, 0.3] to [0.5, 0.5]" in proc.stderr
    docs = train_windows(prepared["docs"])
    rows = [json.loads(line) for line in (run / "sequence_ids.jsonl").read_text().splitlines()]
    assert [sum(i < docs for i in r["ids"]) for r in rows] == [7, 7, 7, 7, 5, 5]


@pytest.mark.parametrize("override,key", [
    ("zero", "data.sources"),
    ("no_shards", "data.sources[1].path"),
    ("tiny", "data.sources[2].path"),
    ("negative", "data.sources[0].weight"),
])
def test_bad_mixtures_exit_2_with_one_paragraph(prepared, tmp_path, override, key):
    value = {"zero": sources(prepared, 0, 0),
             "no_shards": f"data.sources=[{{name: docs, path: {prepared['docs']}}}, {{name: none, path: {tmp_path}}}]",
             "tiny": sources(prepared, extra=f", {{name: tiny, path: {prepared['tiny']}}}"),
             "negative": sources(prepared, -0.5)}[override]
    proc = run_recipe("recipes.pretrain", [*ARGS, value, "training.steps=2", f"run.dir={tmp_path / 'run'}"], timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"config error at `{key}`" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("layout", [["parallel.pp=2"], ["parallel.tp=2", "parallel.loss_parallel=true"]])
def test_per_source_losses_match_one_process_under_pp_and_tp(prepared, tmp_path, layout):
    """The per-sequence losses come from the pipeline's last stage, or from vocabulary-parallel logits."""
    args = [*ARGS, sources(prepared), "training.steps=4", "checkpoint.enabled=false", "logging.log_interval=1"]
    reference = tmp_path / "one"
    assert run_recipe("recipes.pretrain", [*args, f"run.dir={reference}"]).returncode == 0
    proc = run_torchrun(2, "recipes.pretrain", [*args, *layout, f"run.dir={tmp_path / 'two'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    keys = ("loss", "loss/docs", "loss/code")
    for want, got in zip(read_metrics(reference), read_metrics(tmp_path / "two"), strict=True):
        assert got["step"] == want["step"] and all(got[k] == pytest.approx(want[k], rel=1e-4) for k in keys)
    assert "eval_loss/code" in got and got["eval_loss/code"] == pytest.approx(want["eval_loss/code"], rel=1e-4)
