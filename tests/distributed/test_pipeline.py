"""Pipeline layouts through a real `torchrun -m recipes.pretrain`: every schedule, and PP composed
with FSDP and TP, give the single-process loss curve; impossible layouts fail fast with exit 2."""

from __future__ import annotations

import re

import pytest

from tests.helpers import layout_metrics_matching, run_torchrun, single_process_metrics

COMMON = ["model=debug", "model.n_layers=4", "training.steps=6", "training.seq_len=64", "training.global_batch_size=16",
          "training.micro_batch_size=2", "training.num_threads=1", "logging.log_interval=1", "eval.interval=3",
          "eval.steps=1", "checkpoint.enabled=false", "logging.progress_bar=false"]

LAYOUTS = {
    "1f1b": (2, ["parallel.pp=2", "parallel.pp_schedule=1f1b"]),
    "gpipe": (2, ["parallel.pp=2", "parallel.pp_schedule=gpipe"]),
    "interleaved_1f1b": (2, ["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_virtual_stages=2"]),
    "interleaved_zb": (2, ["parallel.pp=2", "parallel.pp_schedule=interleaved_zb", "parallel.pp_virtual_stages=2"]),
    "zbv": (2, ["parallel.pp=2", "parallel.pp_schedule=zbv", "parallel.pp_virtual_stages=2"]),
    "dualpipev": (2, ["parallel.pp=2", "parallel.pp_schedule=dualpipev", "parallel.pp_virtual_stages=2"]),
    "pp2_fsdp2": (4, ["parallel.pp=2"]),
    "pp2_tp2": (4, ["parallel.pp=2", "parallel.tp=2", "parallel.sequence_parallel=true"]),
    "pp2v2_tp2_fsdp2": (8, ["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_virtual_stages=2",
                            "parallel.tp=2", "parallel.sequence_parallel=true"]),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[dict]:
    return single_process_metrics(tmp_path_factory.mktemp("single"), COMMON)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_pipeline_loss_curve_matches_single_process(name, reference, tmp_path):
    nproc, extra = LAYOUTS[name]
    layout_metrics_matching(reference, nproc, [*COMMON, *extra], tmp_path)


@pytest.mark.parametrize("extra,key", [
    (["model.n_layers=2", "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_virtual_stages=2"], "parallel.pp"),
    (["training.micro_batch_size=16"], "parallel.pp_microbatches"),
    (["parallel.pp_schedule=interleaved_1f1b", "parallel.pp_virtual_stages=2", "parallel.pp_microbatches=3",
      "training.global_batch_size=6", "training.micro_batch_size=2"], "parallel.pp_microbatches"),
    (["parallel.pp_layers_per_stage=[3,2]"], "parallel.pp_layers_per_stage"),
    (["parallel.pp_schedule=zbv"], "parallel.pp_virtual_stages"),
])
def test_impossible_pipeline_fails_fast_with_exit_2(extra, key, tmp_path):
    args = [*COMMON, "parallel.pp=2", *extra, f"run.dir={tmp_path / 'run'}"]
    proc = run_torchrun(2, "recipes.pretrain", args, timeout=120)
    assert proc.returncode != 0
    assert re.search(r"exitcode\s*:\s*2\b", proc.stderr), proc.stderr[-2000:]
    assert f"config error at `{key}`" in proc.stderr, proc.stderr[-2000:]
    # torchrun's agent prints its own report; none of our code may show up in a traceback.
    assert not re.search(r'File ".*/(titan|parallel|recipes)/', proc.stderr), proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()
