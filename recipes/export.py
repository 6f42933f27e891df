"""Export a checkpoint as a Hugging Face Llama folder that `transformers` loads offline.

`python -m recipes.export checkpoint=<step dir> out=<dir>` writes config.json, model.safetensors
(sharded with an index past `max_shard_gb`) and the tokenizer files.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from recipes.cli import config_errors, fail
from titan.checkpoint import COMMIT_MARKER, CheckpointManager
from titan.checkpoint.hf import hf_config, save_hf_weights, write_byte_tokenizer, write_tokenizer_config
from titan.checkpoint.manifest import CorruptCheckpointError
from titan.config import ConfigError, ModelConfig
from titan.data.corpus import SHARD_META
from titan.data.tokenizer import load_tokenizer
from titan.models import build_model


@dataclass
class ExportConfig:
    checkpoint: str = "???"  # <run.dir>/checkpoints/step-<N>
    out: str = "???"  # the folder to write
    max_shard_gb: float = 5.0
    overwrite: bool = False


def tokenizer_spec(saved: dict) -> tuple[str, str | None]:
    """The tokenizer the checkpoint's run trained with (for token shards: the one that wrote them)."""
    data = saved["data"]
    if data["source"] == "tokens":
        meta = json.loads((Path(data["path"]) / SHARD_META).read_text())
        return meta["tokenizer"], data.get("eot_token")
    return data["tokenizer"], data.get("eot_token")


def export(cfg: ExportConfig) -> Path:
    step_dir, out = Path(cfg.checkpoint).expanduser().resolve(), Path(cfg.out).expanduser().resolve()
    if not (step_dir / COMMIT_MARKER).is_file():
        raise ConfigError("checkpoint", f"{step_dir} is not a committed checkpoint folder.",
                          "point it at <run.dir>/checkpoints/step-<N>.")
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise ConfigError("out", f"{out} already exists and is not empty.", "pick a new folder or pass overwrite=true.")
    try:
        CheckpointManager.verify(step_dir)
    except CorruptCheckpointError as exc:
        raise ConfigError("checkpoint", f"{exc}.", "export an intact (e.g. the previous) checkpoint.") from exc
    saved = CheckpointManager.read_train_state(step_dir)["config"]
    model_cfg = ModelConfig(**saved["model"])
    model = build_model(model_cfg)
    model.to_empty(device="cpu")
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(step_dir))
    out.mkdir(parents=True, exist_ok=True)
    spec, eot_token = tokenizer_spec(saved)
    tokenizer = load_tokenizer(spec, eot_token)
    if spec == "byte":
        write_byte_tokenizer(out, model_cfg.max_seq_len)
    else:
        source = Path(spec) / "tokenizer.json" if Path(spec).is_dir() else Path(spec)
        shutil.copyfile(source, out / "tokenizer.json")
        write_tokenizer_config(out, tokenizer.decode([tokenizer.eot_id]) or eot_token, model_cfg.max_seq_len)
    (out / "config.json").write_text(json.dumps(hf_config(model_cfg, tokenizer.eot_id), indent=1))
    full = {k: v.detach().to(torch.float32) for k, v in state["model"].items()}
    save_hf_weights(full, out, model_cfg.tie_embeddings, int(cfg.max_shard_gb * 1e9))
    return out


def parse(argv: list[str]) -> ExportConfig:
    """`key=value` arguments typed by ExportConfig (plain OmegaConf: `checkpoint` is also the name
    of a config group of the pretrain recipe, which Hydra would take this key for)."""
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        raise SystemExit(0)
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(ExportConfig), OmegaConf.from_dotlist(argv))
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            fail(f"config error at `{missing[0]}`: no value given. Fix: pass {missing[0]}=<value>.")
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "<argument>"
        fail(f"config error at `{key}`: {str(exc).splitlines()[0]}. Fix: use checkpoint=<step dir> out=<dir> "
             "[max_shard_gb=<float>] [overwrite=true].")


def main(argv: list[str]) -> None:
    cfg = parse(argv)
    with config_errors():
        out = export(cfg)
    print(f"exported to {out}: config.json, safetensors weights, tokenizer files "
          "(load with transformers' AutoModelForCausalLM / AutoTokenizer)")


if __name__ == "__main__":
    main(sys.argv[1:])
