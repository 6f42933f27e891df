"""Hugging Face folders out and in: transformers loads an export offline with the same logits and
token ids; `model.init_from` starts from such a folder on any layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from recipes.export import ExportConfig, export
from tests.helpers import FAST, run_recipe, run_torchrun
from titan.checkpoint.hf import INDEX, load_hf_weights
from titan.config import ConfigError, ModelConfig
from titan.data.tokenizer import ByteTokenizer
from titan.models import Llama

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
