"""Hugging Face folders out and in: transformers loads an export offline with the same logits and
token ids; `model.init_from` starts from such a folder on any layout. Mixtures of experts export as
Glm4Moe (sigmoid routing) or Mixtral (softmax routing), come back in whole, and what no transformers
class computes is refused."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from recipes.export import ExportConfig, export, load_model_state, saved_model_config
from tests.helpers import FAST, run_recipe, run_torchrun
from titan.checkpoint import CheckpointManager
from titan.checkpoint.hf import (INDEX, check_init_from, hf_config, hf_state_dict, load_hf_weights, load_pretrained,
                                 save_hf_weights)
from titan.config import ConfigError, ModelConfig, MoEConfig
from titan.data.tokenizer import ByteTokenizer
from titan.models import Llama, MoETransformer, build_model, init_weights

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
DUMP = str(Path(__file__).parents[1] / "distributed" / "dump_init.py")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("run")
    proc = run_recipe("recipes.pretrain", [*FAST, "training.steps=4", "eval.interval=0", "checkpoint.interval=2",
                                           f"run.dir={run_dir}"])
    assert proc.returncode == 0, proc.stderr
    return run_dir


def _our_model(run_dir: Path, state: dict[str, torch.Tensor]) -> Llama:
    cfg = ModelConfig(**yaml.safe_load((run_dir / "config.yaml").read_text())["model"])
    model = Llama(cfg)
    model.load_state_dict(state)
    return model.eval()


def _export(run_dir: Path, out: Path, *extra: str, step: int = 4) -> None:
    proc = run_recipe("recipes.export", [f"checkpoint={run_dir / 'checkpoints' / f'step-{step}'}", f"out={out}", *extra])
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("shard", [False, True])
def test_export_loads_in_transformers_with_equal_logits(trained, tmp_path, monkeypatch, shard):
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "hf"
    _export(trained, out, *(["max_shard_gb=0.0002"] if shard else []))
    assert (out / "model.safetensors.index.json").is_file() == shard
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours = _our_model(trained, load_hf_weights(out))
    tokens = torch.randint(0, 257, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, ours(tokens), rtol=0, atol=1e-5)
    tokenizer = AutoTokenizer.from_pretrained(out)
    text = "Pre-training on the Python docs: naïve café, 🏖️, tabs\tand\nnewlines."
    assert tokenizer(text)["input_ids"] == ByteTokenizer().encode(text)
    assert tokenizer.decode(ByteTokenizer().encode(text)) == text
    assert tokenizer.eos_token_id == ByteTokenizer.eot_id
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_export_weights_equal_the_checkpoint(trained, tmp_path):
    out = tmp_path / "hf"
    _export(trained, out)
    proc = run_recipe("recipes.export", [f"checkpoint={trained / 'checkpoints' / 'step-4'}", f"out={out}"])
    assert proc.returncode == 2 and "config error at `out`" in proc.stderr  # refuses to overwrite
    proc = run_recipe("recipes.export", [f"checkpoint={trained / 'checkpoints'}", f"out={tmp_path / 'x'}"])
    assert proc.returncode == 2 and "config error at `checkpoint`" in proc.stderr


def test_init_from_hf_folder_on_tensor_parallel_layout(trained, tmp_path, monkeypatch):
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    from transformers import AutoModelForCausalLM

    out = tmp_path / "hf"
    _export(trained, out)
    dumped = tmp_path / "init.pt"
    proc = run_torchrun(2, None, [str(dumped), "model=debug", "training.num_threads=1", "parallel.tp=2",
                                  "parallel.sequence_parallel=true", f"model.init_from={out}"], script=DUMP)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = torch.load(dumped)
    expected = load_hf_weights(out)
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = torch.randint(0, 257, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(_our_model(trained, state)(tokens), hf(tokens).logits, rtol=0, atol=1e-5)


def test_init_from_folder_of_another_shape_is_refused(trained, tmp_path):
    out = tmp_path / "hf"
    _export(trained, out)
    proc = run_recipe("recipes.pretrain", [*FAST, "model.dim=128", f"model.init_from={out}", f"run.dir={tmp_path / 'r'}"])
    assert proc.returncode == 2 and "config error at `model.init_from`" in proc.stderr


def test_overwrite_replaces_a_sharded_export_whole(trained, tmp_path):
    """A small export over a sharded one leaves no stale shard or index: readers get the new weights."""
    out = tmp_path / "hf"
    _export(trained, out, "max_shard_gb=0.0002", step=2)
    assert (out / INDEX).is_file() and len(list(out.glob("model-*-of-*.safetensors"))) > 1
    old = load_hf_weights(out)

    _export(trained, out, "overwrite=true")  # step 4, one weights file
    assert sorted(p.name for p in out.iterdir() if "safetensors" in p.name) == ["model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # the staging folder is gone
    export(ExportConfig(checkpoint=str(trained / "checkpoints" / "step-4"), out=str(tmp_path / "ref")))
    new, expected = load_hf_weights(out), load_hf_weights(tmp_path / "ref")
    assert new.keys() == expected.keys() == old.keys()
    assert all(torch.equal(new[k], expected[k]) for k in new) and not all(torch.equal(new[k], old[k]) for k in new)


def test_failed_export_leaves_the_previous_one(trained, tmp_path, monkeypatch):
    out = tmp_path / "hf"
    _export(trained, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def disk_full(state, folder: Path, *args) -> None:
        (folder / "model-00001-of-00002.safetensors").write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("recipes.export.save_hf_weights", disk_full)
    with pytest.raises(OSError, match="No space"):
        export(ExportConfig(checkpoint=str(trained / "checkpoints" / "step-2"), out=str(out), overwrite=True))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]
    with pytest.raises(ConfigError, match="would delete"):  # replacing the run folder would delete the checkpoint
        export(ExportConfig(checkpoint=str(trained / "checkpoints" / "step-4"), out=str(trained), overwrite=True))


MOE_RUNS = {  # moe_debug: 4 blocks, the first dense, 8 experts (2 per token) and 1 shared, sigmoid routing
    "sigmoid": ["model.moe.bias_update_rate=0.01"],
    "softmax": ["model.moe.score=softmax", "model.moe.n_shared_experts=0", "model.moe.first_dense=0",
                "model.moe.bias_update_rate=0"],
}
MOE_CLASSES = {"sigmoid": "Glm4MoeForCausalLM", "softmax": "MixtralForCausalLM"}


@pytest.fixture(scope="module", params=list(MOE_RUNS))
def moe_export(request, tmp_path_factory) -> tuple[Path, Path]:
    """The last checkpoint of a 3-step MoE run, and its export."""
    run_dir = tmp_path_factory.mktemp(f"moe-{request.param}")
    args = [a for a in FAST if not a.startswith("model=")] + ["model=moe_debug", *MOE_RUNS[request.param]]
    proc = run_recipe("recipes.pretrain", [*args, "training.steps=3", "eval.interval=0", f"run.dir={run_dir}"])
    assert proc.returncode == 0, proc.stderr
    step, out = run_dir / "checkpoints" / "step-3", run_dir / "hf"
    export(ExportConfig(checkpoint=str(step), out=str(out)))
    return step, out


def _checkpoint(step: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    cfg = saved_model_config(CheckpointManager.read_train_state(step)["config"]["model"])
    return cfg, load_model_state(step, cfg)


def _hf_model(out: Path, monkeypatch) -> torch.nn.Module:
    """transformers' model of an export, loaded offline with no missing, unexpected or reshaped weight."""
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    from transformers import AutoModelForCausalLM

    hf, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    return hf.eval()


def test_moe_export_loads_in_transformers_with_equal_logits(moe_export, monkeypatch):
    step, out = moe_export
    cfg, state = _checkpoint(step)
    hf = _hf_model(out, monkeypatch)
    assert type(hf).__name__ == MOE_CLASSES[cfg.moe.score]
    ours = MoETransformer(cfg)
    ours.load_state_dict(state)
    tokens = torch.randint(0, 257, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = ours.eval()(tokens)
        torch.testing.assert_close(hf(tokens).logits, logits, rtol=0, atol=1e-4)
        if cfg.moe.score == "sigmoid":  # the trained expert biases steer the routing transformers reproduces
            assert all(v.any() for k, v in state.items() if k.endswith("expert_bias"))
            for layer in hf.model.layers[cfg.moe.first_dense:]:
                layer.mlp.gate.e_score_correction_bias.zero_()
            assert (hf(tokens).logits - logits).abs().max() > 1e-3


def test_moe_export_comes_back_whole_through_init_from(moe_export, tmp_path):
    step, out = moe_export
    cfg, state = _checkpoint(step)
    cfg.init_from = str(out)
    check_init_from(cfg)
    model = build_model(cfg)
    model.to_empty(device="cpu")
    init_weights(model, cfg, seed=0)
    load_pretrained(model, out)
    got = model.state_dict()
    assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)

    with pytest.raises(ConfigError, match=r"model\.init_from.*moe\.top_k: 2 there vs 3 here"):
        check_init_from(replace(cfg, moe=replace(cfg.moe, top_k=3)))
    with pytest.raises(ConfigError, match=r"moe\.n_experts: 8 there vs 0 here"):
        check_init_from(replace(cfg, moe=MoEConfig()))
    key, value = {"sigmoid": ("use_qk_norm", True), "softmax": ("sliding_window", 16)}[cfg.moe.score]
    (tmp_path / "config.json").write_text(json.dumps({**json.loads((out / "config.json").read_text()), key: value}))
    with pytest.raises(ConfigError, match=f"{key}: {value!r} there"):  # attention ours cannot compute
        check_init_from(replace(cfg, init_from=str(tmp_path)))


def test_glm4_moe_export_without_shared_experts(tmp_path, monkeypatch):
    """Glm4Moe always holds shared experts: without ours they are empty, and load as such both ways."""
    cfg = ModelConfig(name="t", n_layers=3, moe=MoEConfig(n_experts=4, top_k=2, hidden_dim=16, first_dense=1))
    model = MoETransformer(cfg)
    init_weights(model, cfg, seed=3)
    for name, bias in model.named_buffers():
        if name.endswith("expert_bias"):
            bias.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(4))
    (tmp_path / "config.json").write_text(json.dumps(hf_config(cfg, eot_id=256)))
    save_hf_weights(hf_state_dict(model.state_dict(), cfg), tmp_path, max_shard_bytes=1 << 30)
    hf = _hf_model(tmp_path, monkeypatch)
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, model.eval()(tokens), rtol=0, atol=1e-4)
    state, back = model.state_dict(), load_hf_weights(tmp_path)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


@pytest.mark.parametrize("score, key, value", [
    ("sigmoid", "every", 2), ("softmax", "every", 2), ("softmax", "n_shared_experts", 1),
    ("softmax", "first_dense", 1), ("softmax", "normalize_weights", False), ("softmax", "route_scale", 2.5)])
def test_moe_export_no_transformers_class_computes_is_refused(score, key, value):
    cfg = ModelConfig(n_layers=4, moe=MoEConfig(n_experts=8, score=score, **{key: value}))
    with pytest.raises(ConfigError) as refused:
        hf_config(cfg, eot_id=256)
    assert refused.value.key == f"model.moe.{key}" and "\n" not in str(refused.value) and " Fix: " in str(refused.value)


def test_mixtral_export_refuses_expert_biases():
    """Mixtral's router has no selection bias: a softmax model trained with one does not export."""
    cfg = ModelConfig(n_layers=2, moe=MoEConfig(n_experts=4, score="softmax"))
    state = {"layers.0.moe.router.expert_bias": torch.tensor([0.0, 0.1, 0.0, 0.0])}
    with pytest.raises(ConfigError, match=r"model\.moe\.bias_update_rate.*Fix: train with model\.moe\.bias_update_rate=0"):
        hf_state_dict(state, cfg)
