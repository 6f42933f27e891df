"""Pipeline layouts through a real `torchrun -m recipes.pretrain`: every schedule, and PP composed
with FSDP and TP, give the single-process loss curve; impossible layouts fail fast with exit 2."""

from __future__ import annotations

import re

import pytest

from tests.helpers import assert_curves_match, read_metrics, run_recipe, run_torchrun

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
    run_dir = tmp_path_factory.mktemp("single")
    proc = run_recipe("recipes.pretrain", [*COMMON, f"run.dir={run_dir}"])
    assert proc.returncode == 0, proc.stderr
    return read_metrics(run_dir)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_pipeline_loss_curve_matches_single_process(name, reference, tmp_path):
    nproc, extra = LAYOUTS[name]
    proc = run_torchrun(nproc, "recipes.pretrain", [*COMMON, *extra, f"run.dir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = read_metrics(tmp_path)
    assert_curves_match(reference, got, rtol=1e-4, keys=("loss", "grad_norm", "eval_loss", "lr"))
    assert [r["tokens"] for r in got] == [r["tokens"] for r in reference]


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
