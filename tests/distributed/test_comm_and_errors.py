"""Communication accounting against the closed form, one W&B run for many ranks, bad layouts."""

from __future__ import annotations

import re

import pytest

from omegaconf import OmegaConf

from recipes.cli import compose_config
from tests.helpers import read_metrics, run_torchrun
from titan.config import register_schemas
from titan.planner.plan import make_plan

BASE = ["model=debug", "training.steps=2", "training.seq_len=64", "training.global_batch_size=16",
        "training.micro_batch_size=2", "training.num_threads=1", "logging.log_interval=1", "eval.interval=0",
        "checkpoint.enabled=false", "logging.progress_bar=false", "cluster=cpu"]


def planned(nproc: int, overrides: list[str]):
    """The planner's plan of the same run (its bytes per dimension are the closed forms of
    `parallel.costs` over the FSDP units of `titan.planner.facts`)."""
    register_schemas()
    cfg = OmegaConf.to_object(compose_config("pretrain", overrides))
    return make_plan(cfg, cfg.cluster, nproc)


@pytest.mark.parametrize("nproc,extra,dims", [
    (2, [], {"dp_shard"}),
    (4, ["parallel.dp_replicate=2", "parallel.dp_shard=2"], {"dp_shard", "dp_replicate"}),
    (2, ["parallel.tp=2", "parallel.sequence_parallel=true"], {"tp"}),
    (2, ["parallel.pp=2"], {"pp"}),
])
def test_comm_bytes_match_the_planner(nproc, extra, dims, tmp_path):
    """Bytes per mesh dimension of real runs against the planner's closed forms; the run logs the
    planner's prediction at step 1 (`cluster=cpu`), and `recipes.plan --check` reads it back."""
    proc = run_torchrun(nproc, "recipes.pretrain", [*BASE, *extra, f"run.dir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = planned(nproc, [*BASE, *extra])
    expected = {f"comm_gb/{dim}": nbytes for dim, nbytes in plan.time.traffic_by_dim().items()}
    assert {k.split("/")[1] for k in expected} == dims
    rows = read_metrics(tmp_path)
    for row in rows:
        for key, formula in expected.items():
            measured = row[key] * 1e9
            # Scalars (loss sum, grad-norm pieces, loss-parallel softmax statistics) add a little.
            assert formula <= measured <= formula * 1.01 + 256, (key, measured, formula)
    assert rows[0]["step"] == 1
    assert rows[0]["plan_tokens_per_s"] == pytest.approx(plan.time.tokens_per_s)
    assert rows[0]["plan_mem_gb"] == pytest.approx(plan.memory[0].peak / 1e9)
    assert "plan_mem_gb" not in rows[1]


def test_one_wandb_run_for_four_ranks(tmp_path):
    proc = run_torchrun(4, "recipes.pretrain", [*BASE, "logging.wandb.enabled=true", "logging.wandb.mode=offline",
                                                f"run.dir={tmp_path}"],
                        env={"WANDB_MODE": "offline", "WANDB_DISABLE_GIT": "true", "WANDB_DISABLE_CODE": "true",
                             "WANDB_CONFIG_DIR": str(tmp_path / ".wandb-config"),
                             "WANDB_CACHE_DIR": str(tmp_path / ".wandb-cache"),
                             "WANDB_DATA_DIR": str(tmp_path / ".wandb-data")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [p for p in (tmp_path / "wandb").iterdir() if p.name.startswith("offline-run-")]
    assert len(runs) == 1, runs
    assert len(list(runs[0].glob("*.wandb"))) == 1


@pytest.mark.parametrize("extra,key", [
    (["parallel.dp_shard=3"], "parallel.dp_shard"),
    (["parallel.tp=2", "model.n_kv_heads=1"], "parallel.tp"),
    (["parallel.hierarchical=true", "parallel.tp=4"], "parallel.tp"),
    (["parallel.reshard_after_forward=3"], "parallel.reshard_after_forward"),
])
def test_bad_layout_fails_fast_with_exit_2(extra, key, tmp_path):
    proc = run_torchrun(2, "recipes.pretrain", [*BASE, *extra, f"run.dir={tmp_path / 'run'}"], timeout=120)
    assert proc.returncode != 0
    # torchrun's agent exits 1 on any worker failure; the workers' own exit code is 2.
    assert re.search(r"exitcode\s*:\s*2\b", proc.stderr), proc.stderr[-2000:]
    assert f"config error at `{key}`" in proc.stderr
    assert not re.search(r'File ".*/(titan|parallel|recipes)/', proc.stderr), proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()
