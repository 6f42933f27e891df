"""Mixture of experts and expert parallelism through real torchrun runs: the token dispatch alone at
uneven and empty loads, loss / grad-norm / eval-loss / balancing-metric parity with one process on
every layout that composes EP (FSDP, HSDP, TP + SP, PP interleaved, CP, activation checkpointing +
compile), no token dropped, and resumes that reshape the experts (ep2 -> one process, fsdp4 ->
ep2 x tp2) on the same curve with exactly-once data and the expert biases kept."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import (assert_curves_match, assert_exactly_once, layout_metrics_matching, read_metrics,
                           run_recipe, run_torchrun, single_process_metrics)

WORKER = str(Path(__file__).with_name("ep_dispatch_worker.py"))

# A fast bias step makes routing depend on the bias state, so a lost or unequal bias shows in the loss.
COMMON = ["model=moe_debug", "training.steps=4", "training.seq_len=64", "training.global_batch_size=8",
          "training.micro_batch_size=2", "training.num_threads=1", "logging.log_interval=1", "eval.interval=2",
          "eval.steps=1", "checkpoint.enabled=false", "logging.progress_bar=false", "model.moe.bias_update_rate=0.01",
          "model.moe.z_loss_coef=0.001", "model.moe.aux_loss_coef=0.01"]
KEYS = ("loss", "grad_norm", "eval_loss", "moe/aux_loss", "moe/z_loss", "moe/load_max_mean")

LAYOUTS = {
    "ep2": (2, ["parallel.ep=2"]),
    "ep4": (4, ["parallel.ep=4"]),
    "ep2_fsdp4": (4, ["parallel.ep=2"]),
    "ep2_tp2_sp": (4, ["parallel.ep=2", "parallel.tp=2", "parallel.sequence_parallel=true"]),
    "ep2_pp2_interleaved": (4, ["parallel.ep=2", "parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b",
                                "parallel.pp_virtual_stages=2"]),
    "hsdp_ep2": (4, ["parallel.ep=2", "parallel.dp_replicate=2", "parallel.dp_shard=2"]),
    "ep2_cp2": (4, ["parallel.ep=2", "parallel.cp=2", "data.document_mask=true"]),
    "ep2_ac_compile": (2, ["parallel.ep=2", "training.activation_checkpoint=full", "training.compile=true"]),
}
SLOW = {"ep4", "ep2_ac_compile"}  # `make test-slow` (the suite's time budget)


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict[str, list[dict]]:
    return {"causal": single_process_metrics(tmp_path_factory.mktemp("causal"), COMMON),
            "documents": single_process_metrics(tmp_path_factory.mktemp("documents"),
                                                [*COMMON, "data.document_mask=true"])}


@pytest.mark.parametrize("world", [2, 4])
def test_dispatch_round_trip_matches_local_experts_at_uneven_and_empty_loads(world):
    proc = run_torchrun(world, None, [], script=WORKER, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"ep dispatch matches at world {world}" in proc.stdout


@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.slow] if n in SLOW else []) for n in LAYOUTS])
def test_ep_layouts_match_single_process(name, references, tmp_path):
    nproc, extra = LAYOUTS[name]
    reference = references["documents" if "data.document_mask=true" in extra else "causal"]
    got = layout_metrics_matching(reference, nproc, [*COMMON, *extra], tmp_path)
    assert_curves_match(reference, got, keys=KEYS)
    assert all(row["moe/tokens_dropped"] == 0 for row in got)
    assert all(row["comm_gb/ep"] > 0 for row in got)


def test_bias_moves_routing_and_reference_balances(references):
    """The bias state matters here (else the resume checks below could not see it lost)."""
    rows = references["causal"]
    assert all(row["moe/tokens_dropped"] == 0 for row in rows)
    loads = rows[-1]["moe/expert_load"]
    assert set(loads) == {"1", "2", "3"} and all(len(v) == 8 for v in loads.values())
    assert rows[-1]["moe/load_max_mean"] == max(rows[-1][f"moe/load_max_mean/layer_{i}"] for i in (1, 2, 3))


RESUME = [*COMMON, "logging.sequence_ids=true", "checkpoint.enabled=true", "checkpoint.interval=2",
          "checkpoint.keep=3"]


def _resume(tmp_path: Path, first: tuple[int, list[str]], then: tuple[int, list[str]], name: str) -> None:
    """Run `first` for 4 steps, resume its step-2 checkpoint on `then`: steps 3-4 match, and every
    sequence is seen exactly once."""
    full, resumed = tmp_path / f"{name}-full", tmp_path / f"{name}-resumed"
    proc = run_torchrun(first[0], "recipes.pretrain", [*RESUME, *first[1], f"run.dir={full}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    args = [*RESUME, *then[1], f"checkpoint.resume={full / 'checkpoints' / 'step-2'}", f"run.dir={resumed}"]
    proc = run_recipe("recipes.pretrain", args) if then[0] == 1 else run_torchrun(then[0], "recipes.pretrain", args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_curves_match([r for r in read_metrics(full) if r["step"] > 2], read_metrics(resumed), keys=KEYS)
    assert_exactly_once([full, resumed], steps=4, global_batch=8)


def test_resume_ep2_on_one_process_keeps_the_curve_and_the_biases(tmp_path):
    _resume(tmp_path, (2, ["parallel.ep=2"]), (1, []), "ep2-to-1")


def test_resume_fsdp4_on_ep2_tp2_keeps_the_curve(tmp_path):
    _resume(tmp_path, (4, []), (4, ["parallel.ep=2", "parallel.tp=2", "parallel.sequence_parallel=true"]),
            "fsdp4-to-ep2tp2")
