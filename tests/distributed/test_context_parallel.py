"""Context parallel and document masking through real torchrun runs: the attention alone against
unsplit SDPA, loss / grad-norm / eval-loss parity with one process on every layout that composes CP
(FSDP, HSDP, TP + SP, PP with a looped and a V-shaped schedule, activation checkpointing, compile),
with and without document masking, and a resume from cp2 onto one process with exactly-once data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydoc_data.topics import topics

from tests.helpers import (assert_curves_match, assert_exactly_once, layout_metrics_matching, read_metrics,
                           run_recipe, run_torchrun, single_process_metrics)

WORKER = str(Path(__file__).with_name("cp_attention_worker.py"))

COMMON = ["model=debug", "model.n_layers=4", "training.steps=6", "training.seq_len=64", "training.global_batch_size=8",
          "training.micro_batch_size=2", "training.num_threads=1", "logging.log_interval=1", "eval.interval=3",
          "eval.steps=1", "checkpoint.enabled=false", "logging.progress_bar=false", "data=jsonl"]

LAYOUTS = {
    "cp2": (2, ["parallel.cp=2"]),
    "cp4": (4, ["parallel.cp=4"]),
    "cp2_fsdp2": (4, ["parallel.cp=2", "parallel.dp_shard=2"]),
    "cp2_tp2": (4, ["parallel.cp=2", "parallel.tp=2", "parallel.sequence_parallel=true"]),
    "hsdp_cp2": (4, ["parallel.cp=2", "parallel.dp_replicate=2", "parallel.dp_shard=1"]),
    "cp2_ac_compile": (2, ["parallel.cp=2", "training.activation_checkpoint=full", "training.compile=true"]),
    "cp2_pp2_interleaved": (4, ["parallel.cp=2", "parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b",
                                "parallel.pp_virtual_stages=2"]),
    "cp2_pp2_dualpipev": (4, ["parallel.cp=2", "parallel.pp=2", "parallel.pp_schedule=dualpipev",
                              "parallel.pp_virtual_stages=2"]),
}
MASKS = {"causal": [], "documents": ["data.document_mask=true"]}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Short documents (20-150 characters of the Python docs), so most windows hold several."""
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    lines = []
    for number, key in enumerate(sorted(topics)[:60]):
        text = topics[key]
        lines += [json.dumps({"text": text[i:i + 20 + (i * 7 + number) % 130]}) for i in range(0, len(text), 150)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def references(corpus, tmp_path_factory) -> dict[str, list[dict]]:
    return {mask: single_process_metrics(tmp_path_factory.mktemp(mask), [*COMMON, f"data.path={corpus}", *extra])
            for mask, extra in MASKS.items()}


@pytest.mark.parametrize("world", [2, 4])
def test_cp_attention_matches_unsplit_attention_and_its_gradients(world):
    proc = run_torchrun(world, None, [], script=WORKER, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"cp attention matches at world {world}" in proc.stdout


def test_document_mask_changes_the_loss(references):
    causal, masked = references["causal"], references["documents"]
    assert all(a["loss"] != b["loss"] for a, b in zip(causal[1:], masked[1:]))
    assert causal[0]["loss"] != masked[0]["loss"]


# The default run covers both attention paths on cp2, cp2 x tp2 and cp2 x pp2, and the document path
# everywhere; the other cases run with `make test-slow` (the suite's time budget).
SLOW = {("cp4", "causal"), ("cp2_fsdp2", "causal"), ("hsdp_cp2", "causal"), ("cp2_ac_compile", "causal"),
        ("cp2_ac_compile", "documents"), ("cp2_pp2_dualpipev", "causal"), ("cp2_pp2_dualpipev", "documents")}
CASES = [pytest.param(name, mask, marks=[pytest.mark.slow] if (name, mask) in SLOW else [], id=f"{name}-{mask}")
         for name in LAYOUTS for mask in MASKS]


@pytest.mark.parametrize("name,mask", CASES)
def test_cp_layouts_match_single_process(name, mask, references, corpus, tmp_path):
    nproc, extra = LAYOUTS[name]
    got = layout_metrics_matching(references[mask], nproc, [*COMMON, f"data.path={corpus}", *MASKS[mask], *extra],
                                  tmp_path)
    assert any("comm_gb/cp" in row for row in got)


def test_resume_from_cp2_on_one_process_continues_with_exactly_once_data(corpus, tmp_path):
    args = [*COMMON, f"data.path={corpus}", "data.document_mask=true", "logging.sequence_ids=true",
            "checkpoint.enabled=true", "checkpoint.interval=3", "checkpoint.keep=3"]
    full = tmp_path / "cp2"
    proc = run_torchrun(2, "recipes.pretrain", [*args, "parallel.cp=2", f"run.dir={full}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = tmp_path / "single"
    proc = run_recipe("recipes.pretrain", [*args, f"checkpoint.resume={full / 'checkpoints' / 'step-3'}",
                                           f"run.dir={resumed}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "parallel.cp: 2 -> 1" in proc.stdout
    assert_curves_match([r for r in read_metrics(full) if r["step"] > 3], read_metrics(resumed),
                        keys=("loss", "grad_norm", "eval_loss"))
    assert_exactly_once([full, resumed], steps=6, global_batch=8)
