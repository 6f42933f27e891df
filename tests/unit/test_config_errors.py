"""Every config / layout error names its key; the recipe turns them into exit code 2, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from parallel.errors import LayoutError
from parallel.mesh import ParallelDims
from titan.config import ConfigError, PretrainConfig, resolve_auto, validate
from titan.float8 import check_float8

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- ParallelDims

@pytest.mark.parametrize("kwargs,key", [
    (dict(dp_replicate=1, dp_shard=3, tp=1, pp=1, world_size=4), "parallel.dp_shard"),
    (dict(dp_replicate=2, dp_shard=2, tp=2, pp=1, world_size=4), "parallel.dp_shard"),
    (dict(dp_replicate=1, dp_shard=-1, tp=3, pp=1, world_size=4), "parallel.dp_shard"),
    (dict(dp_replicate=1, dp_shard=-1, tp=2, pp=3, world_size=8), "parallel.dp_shard"),
    (dict(dp_replicate=1, dp_shard=0, tp=1, pp=1, world_size=1), "parallel.dp_shard"),
    (dict(dp_replicate=1, dp_shard=-2, tp=1, pp=1, world_size=2), "parallel.dp_shard"),
    (dict(dp_replicate=0, dp_shard=-1, tp=1, pp=1, world_size=2), "parallel.dp_replicate"),
    (dict(dp_replicate=1, dp_shard=-1, tp=0, pp=1, world_size=2), "parallel.tp"),
    (dict(dp_replicate=1, dp_shard=-1, tp=1, pp=-1, world_size=2), "parallel.pp"),
    (dict(dp_replicate=1, dp_shard=-1, tp=1, pp=1, world_size=4, ep=3), "parallel.ep"),  # ep must divide dp_shard
    (dict(dp_replicate=2, dp_shard=-1, tp=1, pp=1, world_size=4, ep=4), "parallel.ep"),  # not dp_replicate
    (dict(dp_replicate=1, dp_shard=-1, tp=2, pp=1, world_size=4, ep=4), "parallel.ep"),  # nor tp
])
def test_parallel_dims_errors_name_the_key(kwargs, key):
    with pytest.raises(LayoutError) as info:
        ParallelDims(**kwargs)
    assert info.value.key == key
    assert f"`{key}`" in str(info.value) and "Fix:" in str(info.value)


@pytest.mark.parametrize("kwargs,dp_shard,dp_size", [
    (dict(dp_replicate=1, dp_shard=-1, tp=1, pp=1, world_size=1), 1, 1),
    (dict(dp_replicate=2, dp_shard=-1, tp=2, pp=1, world_size=8), 2, 4),
    (dict(dp_replicate=1, dp_shard=2, tp=2, pp=2, world_size=8), 2, 2),
])
def test_parallel_dims_valid_layouts(kwargs, dp_shard, dp_size):
    dims = ParallelDims(**kwargs)
    assert dims.dp_shard == dp_shard and dims.dp_size == dp_size


# ---------------------------------------------------------------- validate

def cfg_with(**changes) -> PretrainConfig:
    """Default config with `section.field=value` changes (given as section__field)."""
    cfg = PretrainConfig()
    for dotted, value in changes.items():
        *path, leaf = dotted.split("__")
        node = cfg
        for part in path:
            node = getattr(node, part)
        assert hasattr(node, leaf), dotted
        setattr(node, leaf, value)
    return cfg


def test_default_config_is_valid():
    validate(PretrainConfig(), world_size=1, dp_size=1)
    validate(cfg_with(training__global_batch_size=16, training__micro_batch_size=2), world_size=8, dp_size=8)


POSITIVE_KEYS = ["model.dim", "model.n_layers", "model.n_heads", "model.n_kv_heads", "model.vocab_size",
                 "model.ffn_hidden_dim", "model.max_seq_len", "training.steps", "training.global_batch_size",
                 "training.micro_batch_size", "training.seq_len", "optim.lr", "logging.log_interval",
                 "checkpoint.keep"]


@pytest.mark.parametrize("value", [0, -1])
@pytest.mark.parametrize("key", POSITIVE_KEYS)
def test_non_positive_values_are_refused(key, value):
    cfg = cfg_with(**{key.replace(".", "__"): value if key != "optim.lr" else float(value)})
    with pytest.raises(ConfigError) as info:
        validate(cfg, world_size=1, dp_size=1)
    assert info.value.key == key
    assert f"`{key}`" in str(info.value) and "Fix:" in str(info.value)


@pytest.mark.parametrize("changes,dp_size,world_size,key", [
    (dict(model__dim=64, model__n_heads=5), 1, 1, "model.n_heads"),  # heads do not divide dim
    (dict(model__dim=12, model__n_heads=4, model__n_kv_heads=2), 1, 1, "model.n_heads"),  # head dim 3 is odd
    (dict(model__dim=64, model__n_heads=4, model__n_kv_heads=3), 1, 1, "model.n_kv_heads"),
    (dict(model__dim=64, model__n_heads=4, model__n_kv_heads=8), 1, 1, "model.n_kv_heads"),
    (dict(training__seq_len=4096, model__max_seq_len=2048), 1, 1, "training.seq_len"),
    (dict(training__dtype="float16"), 1, 1, "training.dtype"),
    (dict(training__dtype="fp32"), 1, 1, "training.dtype"),
    (dict(lr__schedule="linear"), 1, 1, "lr.schedule"),
    (dict(optim__name="sgd"), 1, 1, "optim.name"),
    (dict(optim__implementation="fast"), 1, 1, "optim.implementation"),
    (dict(data__source="csv"), 1, 1, "data.source"),
    (dict(logging__wandb__mode="sync"), 1, 1, "logging.wandb.mode"),
    (dict(lr__warmup_steps=-1), 1, 1, "lr.warmup_steps"),
    (dict(parallel__fsdp_prefetch=-1), 2, 2, "parallel.fsdp_prefetch"),
    (dict(data__eval_fraction=0.0), 1, 1, "data.eval_fraction"),
    (dict(data__eval_fraction=1.0), 1, 1, "data.eval_fraction"),
    (dict(training__global_batch_size=16, training__micro_batch_size=1), 3, 3, "training.global_batch_size"),
    (dict(training__global_batch_size=10, training__micro_batch_size=4), 1, 1, "training.micro_batch_size"),
    (dict(training__global_batch_size=16, training__micro_batch_size=3), 2, 2, "training.micro_batch_size"),
    (dict(training__global_batch_size=16, training__micro_batch_size=16), 2, 4, "training.micro_batch_size"),
    (dict(), 1, 0, "world_size"),
    (dict(model__moe__top_k=4), 1, 1, "model.moe.top_k"),  # an MoE key on a dense model
    (dict(parallel__ep=2, training__micro_batch_size=2), 2, 2, "parallel.ep"),  # expert parallel on a dense model
    (dict(model__moe__n_experts=8, model__moe__top_k=9), 1, 1, "model.moe.top_k"),
    (dict(model__moe__n_experts=6, parallel__ep=4, training__micro_batch_size=2), 4, 4, "parallel.ep"),
    (dict(model__moe__n_experts=8, model__moe__score="relu"), 1, 1, "model.moe.score"),
    (dict(model__moe__n_experts=8, model__moe__first_dense=2), 1, 1, "model.moe.first_dense"),
    (dict(model__moe__n_experts=8, model__moe__hidden_dim=0), 1, 1, "model.moe.hidden_dim"),
])
def test_validation_errors_name_the_key(changes, dp_size, world_size, key):
    cfg = cfg_with(**changes)
    with pytest.raises(ConfigError) as info:
        validate(cfg, world_size=world_size, dp_size=dp_size)
    assert info.value.key == key
    assert f"`{key}`" in str(info.value) and "Fix:" in str(info.value)


def test_each_mutation_alone_is_the_only_problem():
    """The cases above fail for the stated reason, not because the base config is broken: the
    same shapes with the offending value fixed pass."""
    validate(cfg_with(model__dim=64, model__n_heads=4, model__n_kv_heads=4), 1, 1)
    validate(cfg_with(model__dim=16, model__n_heads=4, model__n_kv_heads=2), 1, 1)  # head dim 4
    validate(cfg_with(training__seq_len=2048, model__max_seq_len=2048), 1, 1)
    validate(cfg_with(training__global_batch_size=12, training__micro_batch_size=2), 3, 3)
    validate(cfg_with(training__dtype="bfloat16", lr__schedule="wsd", optim__implementation="for_loop",
                      data__source="jsonl", logging__wandb__mode="offline", lr__warmup_steps=0), 1, 1)


# ---------------------------------------------------------------- training.float8

def test_float8_without_torchao_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # `import torchao` now fails as if it were not installed
    monkeypatch.setitem(sys.modules, "torchao.float8", None)
    with pytest.raises(ConfigError) as info:
        check_float8(torch.device("cpu"))
    assert info.value.key == "training.float8" and "pip install .[float8]" in str(info.value)


def test_float8_refuses_gpus_without_float8_matmuls_and_sequence_parallel_on_gloo(monkeypatch):
    pytest.importorskip("torchao.float8", reason="training.float8 needs torchao: pip install .[float8]")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(ConfigError) as info:
        check_float8(torch.device("cuda"))
    assert info.value.key == "training.float8" and "compute capability 8.0" in str(info.value)
    with pytest.raises(ConfigError) as info:
        check_float8(torch.device("cpu"), sequence_parallel=True)
    assert info.value.key == "training.float8" and "parallel.sequence_parallel=false" in str(info.value)


# ---------------------------------------------------------------- the recipe's command line
# Each case is a real `python -m recipes.pretrain` process. They are started together by one
# module fixture (most of each one's time is importing torch), then checked one test per case.

DEBUG = ["model=debug", "training.steps=2", "training.seq_len=32", "eval.interval=0"]

CLI_CASES = {
    "unknown-key": (["training.nope=1"], "training.nope"),
    "bad-type": (["training.steps=abc"], "training.steps"),
    "zero-steps": (["training.steps=0"], "training.steps"),
    "batch-split": (["training.global_batch_size=10", "training.micro_batch_size=4"], "training.micro_batch_size"),
    "heads": (["model.n_heads=5"], "model.n_heads"),
    "data-path": (["data=text", "data.path=/nonexistent"], "data.path"),
    "resume-path": (["checkpoint.resume=/nonexistent/step-3"], "checkpoint.resume"),
    "moe-key-on-dense": (["model.moe.top_k=4"], "model.moe.top_k"),
    "ep-over-ranks": (["model=moe_debug", "parallel.ep=2"], "parallel.ep"),
}


def start_pretrain(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
               WANDB_MODE="disabled")
    return subprocess.Popen([sys.executable, "-m", "recipes.pretrain", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"{proc.args} ran over 120 s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("cli")
    started = {}
    for name, (args, _) in CLI_CASES.items():
        (root / name).mkdir()
        started[name] = start_pretrain([*DEBUG, f"run.dir={root / name / 'run'}", *args], cwd=root / name)
    # A real short run that leaves a committed checkpoint, then `checkpoint.resume=none` over it.
    existing = root / "existing"
    existing.mkdir()
    first = start_pretrain([*DEBUG, f"run.dir={existing / 'run'}"], cwd=existing)
    results = {name: finish(proc) for name, proc in started.items()}
    results["first-run"] = finish(first)
    before = snapshot(existing / "run")
    results["resume-none"] = finish(start_pretrain([*DEBUG, f"run.dir={existing / 'run'}", "checkpoint.resume=none"],
                                                   cwd=existing))
    results["paths"] = {name: root / name / "run" for name in CLI_CASES} | {"existing": existing / "run"}
    results["before"], results["after"] = before, snapshot(existing / "run")
    return results


def assert_config_error(proc: subprocess.CompletedProcess, key: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert key in proc.stderr, proc.stderr


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_config_errors_exit_2_naming_the_key(cli_runs, case):
    _, key = CLI_CASES[case]
    assert_config_error(cli_runs[case], key)
    assert not cli_runs["paths"][case].exists()  # refused before anything was written


def test_cli_resume_none_refuses_a_run_dir_with_checkpoints(cli_runs):
    first = cli_runs["first-run"]
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = cli_runs["paths"]["existing"]
    assert "checkpoints/step-2/COMMITTED" in cli_runs["before"]
    assert_config_error(cli_runs["resume-none"], "checkpoint.resume")
    assert cli_runs["after"] == cli_runs["before"]  # checkpoint, metrics and config untouched
    assert (run_dir / "checkpoints" / "step-2" / "COMMITTED").is_file()


@pytest.mark.parametrize("device,expected", [("cpu", False), ("cuda", True)])
def test_auto_defaults_resolve_by_device(device, expected):
    cfg = PretrainConfig()
    assert cfg.training.compile == "auto" and cfg.checkpoint.async_save == "auto"
    validate(cfg, 1, 1)
    said = str(expected).lower()
    assert resolve_auto(cfg, device) == [f"training.compile={said}", f"checkpoint.async_save={said}"]
    assert cfg.training.compile is expected and cfg.checkpoint.async_save is expected
    cfg = PretrainConfig()
    cfg.training.compile, cfg.checkpoint.async_save = False, True  # explicit values are kept
    assert resolve_auto(cfg, device) == []
    assert cfg.training.compile is False and cfg.checkpoint.async_save is True


@pytest.mark.parametrize("key", ["training.compile", "checkpoint.async_save"])
def test_auto_or_bool_keys_refuse_other_values(key):
    cfg = PretrainConfig()
    section, name = key.split(".")
    setattr(getattr(cfg, section), name, "yes")
    with pytest.raises(ConfigError) as err:
        validate(cfg, 1, 1)
    assert err.value.key == key and "auto" in str(err.value)
