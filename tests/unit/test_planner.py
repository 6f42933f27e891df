"""The planner: its activation counts against a traced block, its errors, its search, its memory
prediction against a measured single-rank run."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils._python_dispatch import TorchDispatchMode

from recipes.cli import compose_config
from tests.helpers import run_recipe
from titan.config import ModelConfig, MoEConfig, register_schemas
from titan.models import build_model
from titan.planner.memory import block_activations
from titan.planner.plan import make_plan
from titan.planner.timing import OPS_PER_BLOCK


def saved_bytes(cfg: ModelConfig, batch: int, seq: int) -> int:
    """Bytes of the distinct storages block 0 saves for backward (parameters and buffers excluded),
    read from its autograd graph after a real forward."""
    model = build_model(cfg)
    model.to_empty(device="cpu")
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    model.reset_buffers()
    owned = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    x = torch.randn(batch, seq, cfg.dim, requires_grad=True)
    out = model.layers["0"](x, model.rope_cos, model.rope_sin)
    storages, seen, todo = {}, set(), [out.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for name in dir(node):
            value = getattr(node, name, None) if name.startswith("_saved_") else None
            if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() not in owned:
                storages[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
        todo.extend(f for f, _ in node.next_functions)
    return sum(storages.values())


def test_dense_block_activations_equal_a_traced_block():
    cfg = ModelConfig(dim=80, n_layers=1, n_heads=5, n_kv_heads=1, ffn_hidden_dim=96, max_seq_len=64)
    assert block_activations(False, cfg, 3 * 32, 1, False, 1, 4) == saved_bytes(cfg, 3, 32)


def test_moe_block_activations_match_a_traced_block():
    cfg = ModelConfig(dim=80, n_layers=1, n_heads=5, n_kv_heads=1, ffn_hidden_dim=96, max_seq_len=64,
                      moe=MoEConfig(n_experts=6, top_k=2, hidden_dim=48, n_shared_experts=1))
    # Routing indices and per-token weights (a few int64 / fp32 per token) are left out: within 3%.
    assert block_activations(True, cfg, 3 * 32, 1, False, 1, 4) == pytest.approx(saved_bytes(cfg, 3, 32), rel=0.03)


def plan_command(*args: str) -> subprocess.CompletedProcess:
    return run_recipe("recipes.plan", list(args), timeout=120)


def test_search_ranks_layouts_for_8b_on_h100_in_seconds():
    began = time.perf_counter()
    proc = plan_command("model=llama3_8b", "cluster=h100_ib", "training.dtype=bfloat16", "training.seq_len=8192",
                        "training.global_batch_size=64", "--search", "--top", "3")
    assert proc.returncode == 0, proc.stderr
    assert time.perf_counter() - began < 60
    lines = proc.stdout.splitlines()
    assert "layouts the recipe accepts" in lines[0]
    ranked = [float(line.split()[1]) for line in lines[2:] if line.split()[0].isdigit()]
    assert len(ranked) == 3 and ranked == sorted(ranked, reverse=True)
    launches = [line.strip() for line in lines if line.strip().startswith("python -m launch")]
    assert len(launches) == 3 and all("--nproc-per-node 8" in line and "parallel.tp=" in line for line in launches)


def test_impossible_layout_gets_the_recipe_error():
    proc = plan_command("model=llama3_8b", "cluster=h100_ib", "parallel.tp=3")
    assert proc.returncode == 2
    assert "config error at `parallel." in proc.stderr and "Traceback" not in proc.stderr


def test_layout_that_does_not_fit_says_by_how_much_and_what_to_change():
    proc = plan_command("model=llama3_8b", "cluster=h100_ib", "training.dtype=bfloat16", "training.seq_len=8192",
                        "training.global_batch_size=32", "training.micro_batch_size=4")
    assert proc.returncode == 2, proc.stdout
    assert "fits: NO" in proc.stdout
    assert "GB more than" in proc.stderr and "Fix: set " in proc.stderr, proc.stderr


def test_plan_json_is_consistent():
    proc = plan_command("model=small", "--json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    rank = plan["memory"][0]
    parts = ("params", "grads", "optimizer", "activations", "transient", "gathered", "buffers", "runtime")
    assert rank["peak"] == pytest.approx(sum(rank[k] for k in parts))
    assert plan["time"]["step_s"] > 0 and 0 < plan["time"]["mfu"] < 1


@pytest.mark.parametrize("extra", [[], ["training.activation_checkpoint=full", "training.micro_batch_size=2"],
                                   ["optim=muon"], ["training.activation_checkpoint=op"]])
def test_memory_prediction_within_10_percent_of_a_measured_rank(extra, tmp_path):
    """One rank, the real trainer under torch's MemTracker (`benchmarks.memory_worker`) against the
    plan's peak without the runtime part (which only RSS sees)."""
    overrides = ["model=debug", "model.dim=256", "model.n_layers=4", "model.n_heads=8", "model.n_kv_heads=4",
                 "model.ffn_hidden_dim=768", "model.vocab_size=8192", "training.seq_len=128",
                 "training.global_batch_size=4", "training.micro_batch_size=4", "training.steps=2",
                 "eval.interval=0", "checkpoint.enabled=false", "logging.progress_bar=false",
                 "training.num_threads=1", *extra]
    proc = run_recipe("benchmarks.memory_worker", ["--out", str(tmp_path), *overrides])
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = json.loads((tmp_path / "rank0.json").read_text())["tracker_peak"]["Total"]
    register_schemas()
    cfg = OmegaConf.to_object(compose_config("pretrain", [*overrides, "cluster=cpu"]))
    rank = make_plan(cfg, cfg.cluster, 1).memory[0]
    assert rank.peak - rank.runtime == pytest.approx(measured, rel=0.10)


def dispatched_ops(cfg: ModelConfig) -> int:
    """Ops one block's forward + backward dispatches (the sum that seeds the backward included)."""
    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.ops += 1
            return func(*args, **(kwargs or {}))

    model = build_model(cfg)
    model.to_empty(device="cpu")
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    model.reset_buffers()
    x = torch.randn(2, 32, cfg.dim, requires_grad=True)
    with Count():
        model.layers["0"](x, model.rope_cos, model.rope_sin).sum().backward()
    return Count.ops


@pytest.mark.parametrize("moe", [MoEConfig(), MoEConfig(n_experts=8, top_k=2, hidden_dim=64, n_shared_experts=1,
                                                        first_dense=0)])
def test_ops_per_block_match_a_dispatched_block(moe):
    cfg = ModelConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, ffn_hidden_dim=128, max_seq_len=64, moe=moe)
    assert dispatched_ops(cfg) == pytest.approx(OPS_PER_BLOCK[bool(moe.n_experts)], rel=0.05)


def test_muon_keeps_one_moment_for_the_block_matrices():
    register_schemas()
    adamw, muon = (OmegaConf.to_object(compose_config("pretrain", ["model=debug", "cluster=cpu", *extra]))
                   for extra in ([], ["optim=muon"]))
    matrices = sum(p.numel() for name, p in build_model(adamw.model).named_parameters()
                   if p.ndim >= 2 and name.startswith("layers."))
    saved = make_plan(adamw, adamw.cluster, 1).memory[0].optimizer - make_plan(muon, muon.cluster, 1).memory[0].optimizer
    assert saved == 4 * matrices
