"""Muon under every kind of sharding, through real `torchrun -m recipes.pretrain` runs: loss and grad
norm of one process within 1e-4 (fp32) for FSDP, HSDP, pipeline x FSDP (with activation checkpointing
by operator), and a checkpoint written under fsdp4 resumes under tp2 x fsdp2 (FSDP over TP-sharded
matrices) with its Muon state on the same curve, every sequence seen once."""

from __future__ import annotations

import pytest

from tests.helpers import (assert_curves_match, assert_exactly_once, layout_metrics_matching, read_metrics,
                           run_torchrun, single_process_metrics)

COMMON = ["model=debug", "model.n_layers=4", "optim=muon", "training.steps=8", "training.seq_len=64",
          "training.global_batch_size=16", "training.micro_batch_size=2", "training.num_threads=1",
          "logging.log_interval=1", "eval.interval=4", "eval.steps=1", "logging.progress_bar=false",
          "logging.sequence_ids=true", "checkpoint.interval=4", "checkpoint.keep=2"]

LAYOUTS = {
    "hsdp2x2": (4, ["parallel.dp_replicate=2", "parallel.dp_shard=2"]),
    # with activation checkpointing by operator (matmul outputs kept, the rest recomputed)
    "pp2v2_fsdp2_ac_op": (4, ["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_virtual_stages=2",
                              "training.activation_checkpoint=op"]),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[dict]:
    return single_process_metrics(tmp_path_factory.mktemp("single"), COMMON)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_muon_loss_curve_matches_single_process(name, reference, tmp_path):
    nproc, extra = LAYOUTS[name]
    layout_metrics_matching(reference, nproc, [*COMMON, *extra], tmp_path)


def test_muon_checkpoint_of_fsdp4_resumes_on_tp2_fsdp2_on_the_same_curve(reference, tmp_path):
    full, resumed = tmp_path / "fsdp4", tmp_path / "tp2_fsdp2"
    layout_metrics_matching(reference, 4, [*COMMON], full)
    proc = run_torchrun(4, "recipes.pretrain", [*COMMON, "parallel.tp=2", "parallel.sequence_parallel=true",
                                                f"run.dir={resumed}",
                                                f"checkpoint.resume={full / 'checkpoints' / 'step-4'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = read_metrics(resumed)
    assert [r["step"] for r in after] == [5, 6, 7, 8]
    assert_curves_match([r for r in reference if r["step"] > 4], after, keys=("loss", "grad_norm", "eval_loss"))
    assert_exactly_once([full, resumed], steps=8, global_batch=16)
