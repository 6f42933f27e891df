"""Communication accounting against the closed form, one W&B run for many ranks, bad layouts."""

from __future__ import annotations

import re

import pytest

from benchmarks.fsdp_units import Units, fsdp_units
from tests.helpers import read_metrics, run_torchrun
from titan.config import ModelConfig
from titan.models import build_model

BASE = ["model=debug", "training.steps=2", "training.seq_len=64", "training.global_batch_size=16",
        "training.micro_batch_size=2", "training.num_threads=1", "logging.log_interval=1", "eval.interval=0",
        "checkpoint.enabled=false", "logging.progress_bar=false"]


def _units() -> Units:
    return fsdp_units(build_model(ModelConfig()))  # the debug shape, wrapped as apply_fsdp wraps it


def fsdp_step_bytes(shards: int, micro_batches: int) -> float:
    """Per rank and step: all-gather of every unit in forward, again in backward for the units that
    reshard after forward (the embedding and every block but the last), and a reduce-scatter of
    every unit; each moves (n - 1) x the unit's padded shard."""
    units = _units()
    gathered = units.shard_bytes(shards) + units.shard_bytes(shards, regathered_only=True)
    return micro_batches * (shards - 1) * (gathered + units.shard_bytes(shards))


def hsdp_replicate_bytes(replicas: int, shards: int, micro_batches: int) -> float:
    """All-reduce of each reduced gradient shard across the replicas: 2 (r - 1) / r x shard."""
    return micro_batches * 2 * (replicas - 1) / replicas * _units().shard_bytes(shards)


def tp_sequence_parallel_step_bytes(tp: int, micro_batches: int, micro_batch: int, seq_len: int) -> float:
    """Per rank and step with sequence parallelism: each block all-gathers its input before
    attention and the MLP and reduce-scatters their outputs (4 activation-sized collectives), and
    the same again in backward; the embedding output and the output projection's input add 4 more.
    Each moves (t - 1) / t of one full activation (micro_batch x seq_len x dim, fp32)."""
    cfg = ModelConfig()
    activation = micro_batch * seq_len * cfg.dim * 4
    return micro_batches * (tp - 1) / tp * activation * (8 * cfg.n_layers + 4)


@pytest.mark.parametrize("nproc,extra,expected", [
    (2, [], {"comm_gb/dp_shard": fsdp_step_bytes(2, 4)}),
    (4, ["parallel.dp_replicate=2", "parallel.dp_shard=2"],
     {"comm_gb/dp_shard": fsdp_step_bytes(2, 2), "comm_gb/dp_replicate": hsdp_replicate_bytes(2, 2, 2)}),
    (2, ["parallel.tp=2", "parallel.sequence_parallel=true"],
     {"comm_gb/tp": tp_sequence_parallel_step_bytes(2, 8, 2, 64)}),
])
def test_comm_bytes_match_closed_form(nproc, extra, expected, tmp_path):
    proc = run_torchrun(nproc, "recipes.pretrain", [*BASE, *extra, f"run.dir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    for row in read_metrics(tmp_path):
        for key, formula in expected.items():
            measured = row[key] * 1e9
            # Scalars (loss sum, grad-norm pieces, loss-parallel softmax statistics) add a little.
            assert formula <= measured <= formula * 1.01 + 256, (key, measured, formula)


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
