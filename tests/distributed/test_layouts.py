"""Every data/tensor-parallel layout, through a real `torchrun -m recipes.pretrain`, gives the
single-process initial weights and loss curve (fp32)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import layout_metrics_matching, run_torchrun, single_process_metrics

COMMON = ["model=debug", "training.steps=8", "training.seq_len=64", "training.global_batch_size=16",
          "training.micro_batch_size=2", "training.num_threads=1", "logging.log_interval=1", "eval.interval=4",
          "eval.steps=1", "checkpoint.enabled=false", "logging.progress_bar=false"]

LAYOUTS = {
    "fsdp2": (2, []),
    "fsdp4": (4, ["parallel.fsdp_prefetch=0"]),  # FSDP's own order (blocking all-gathers on gloo)
    "zero2": (4, ["parallel.reshard_after_forward=false"]),
    "hpz": (4, ["parallel.reshard_after_forward=2", "parallel.fsdp_prefetch=2"]),
    "hsdp2x2": (4, ["parallel.dp_replicate=2", "parallel.dp_shard=2"]),
    "ddp2": (2, ["parallel.dp_replicate=2", "parallel.dp_shard=1"]),
    "tp2": (2, ["parallel.tp=2"]),
    "tp2_sp": (2, ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    "tp2_fsdp2": (4, ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    "hsdp_tp": (8, ["parallel.dp_replicate=2", "parallel.dp_shard=2", "parallel.tp=2",
                    "parallel.sequence_parallel=true"]),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[dict]:
    return single_process_metrics(tmp_path_factory.mktemp("single"), COMMON)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_loss_curve_matches_single_process(name, reference, tmp_path):
    nproc, extra = LAYOUTS[name]
    got = layout_metrics_matching(reference, nproc, [*COMMON, *extra], tmp_path)
    assert any(k.startswith("comm_gb/") for k in got[-1]), got[-1]


def test_fsdp_units_gathered_ahead_asynchronously_and_exactly():
    proc = run_torchrun(2, None, [], script=str(Path(__file__).with_name("fsdp_prefetch_worker.py")), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fsdp prefetch ahead and exact" in proc.stdout


DUMP = str(Path(__file__).with_name("dump_init.py"))


def _initial_state(tmp_path: Path, name: str, nproc: int, extra: list[str]) -> dict[str, torch.Tensor]:
    out = tmp_path / f"{name}.pt"
    proc = run_torchrun(nproc, None, [str(out), "model=debug", "training.num_threads=1", *extra], script=DUMP)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out)


def test_initial_weights_identical_on_every_layout(tmp_path):
    single = _initial_state(tmp_path, "single", 1, [])
    for name, nproc, extra in [("fsdp2", 2, []), ("tp2_sp", 2, ["parallel.tp=2", "parallel.sequence_parallel=true"]),
                               ("hsdp2x2", 4, ["parallel.dp_replicate=2", "parallel.dp_shard=2"])]:
        state = _initial_state(tmp_path, name, nproc, extra)
        assert state.keys() == single.keys(), name
        for key, value in single.items():
            assert torch.equal(state[key], value), (name, key)


def test_tied_embeddings_stay_tied_under_tp_and_fsdp(tmp_path):
    single = _initial_state(tmp_path, "single", 1, ["model.tie_embeddings=true"])
    state = _initial_state(tmp_path, "tied", 4, ["parallel.tp=2", "model.tie_embeddings=true"])
    assert state.keys() == single.keys()
    for key, value in single.items():
        assert torch.equal(state[key], value), key
