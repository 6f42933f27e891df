"""Export a checkpoint as a Hugging Face folder that `transformers` loads offline: a Llama, or for a
mixture of experts a Glm4Moe (sigmoid routing) or Mixtral (softmax routing); a mixture of experts
that no transformers class computes exactly is refused.

`python -m recipes.export checkpoint=<step dir> out=<dir>` writes config.json, model.safetensors
(sharded with an index past `max_shard_gb`) and the tokenizer files. The folder is written beside
`out` and swapped in whole: with `overwrite=true` nothing of a previous export (say, its weight
shards and index) is left, and a failed export leaves the previous one as it was.
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
from recipes.help import UnknownSection, help_request, render_help
from titan.checkpoint import COMMIT_MARKER, CheckpointManager
from titan.checkpoint.hf import hf_config, hf_state_dict, save_hf_weights, write_byte_tokenizer, write_tokenizer_config
from titan.checkpoint.manifest import CorruptCheckpointError
from titan.config import ConfigError, ModelConfig, MoEConfig
from titan.data.corpus import SHARD_META
from titan.data.tokenizer import Tokenizer, load_tokenizer
from titan.fileio import inside, staged
from titan.models import build_model


@dataclass
class ExportConfig:
    checkpoint: str = "???"  # <run.dir>/checkpoints/step-<N>
    out: str = "???"  # the folder to write
    max_shard_gb: float = 5.0  # largest safetensors file; bigger models are sharded with an index
    overwrite: bool = False  # replace a non-empty `out` (whole)


def tokenizer_spec(saved: dict) -> tuple[str, str | None]:
    """The tokenizer the checkpoint's run trained with (for token shards: the one that wrote them)."""
    data = saved["data"]
    if data["source"] == "tokens":
        meta = json.loads((Path(data["path"]) / SHARD_META).read_text())
        return meta["tokenizer"], data.get("eot_token")
    return data["tokenizer"], data.get("eot_token")


def saved_model_config(model: dict) -> ModelConfig:
    """The model config a checkpoint's train state recorded (as a plain dict, `moe` nested)."""
    return ModelConfig(**{**model, "moe": MoEConfig(**model.get("moe", {}))})


def load_model_state(step_dir: Path, model_cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The checkpoint's full model state dict (parameters and persistent buffers) in float32 on the CPU."""
    model = build_model(model_cfg)
    model.to_empty(device="cpu")
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(step_dir))
    return {k: v.detach().to(torch.float32) for k, v in state["model"].items()}


def check_paths(step_dir: Path, out: Path, overwrite: bool) -> None:
    """A committed checkpoint, and an `out` that is new, empty or (with `overwrite`) replaceable."""
    if not (step_dir / COMMIT_MARKER).is_file():
        raise ConfigError("checkpoint", f"{step_dir} is not a committed checkpoint folder.",
                          "point it at <run.dir>/checkpoints/step-<N>.")
    if out.exists() and not out.is_dir():
        raise ConfigError("out", f"{out} is a file.", "pick a folder path for out.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError("out", f"{out} already exists and is not empty.", "pick a new folder or pass overwrite=true.")
    if inside(step_dir, out):
        raise ConfigError("out", f"{out} holds the checkpoint {step_dir}, which replacing {out} would delete.",
                          "pick an out folder outside the run's checkpoints.")


def export(cfg: ExportConfig) -> Path:
    """Write the checkpoint's weights, config and tokenizer as an HF folder that replaces `cfg.out` whole."""
    step_dir, out = Path(cfg.checkpoint).expanduser().resolve(), Path(cfg.out).expanduser().resolve()
    check_paths(step_dir, out, cfg.overwrite)
    try:
        CheckpointManager.verify(step_dir)
    except CorruptCheckpointError as exc:
        raise ConfigError("checkpoint", f"{exc}.", "export an intact (e.g. the previous) checkpoint.") from exc
    saved = CheckpointManager.read_train_state(step_dir)["config"]
    model_cfg = saved_model_config(saved["model"])
    spec, eot_token = tokenizer_spec(saved)
    tokenizer = load_tokenizer(spec, eot_token)
    config = hf_config(model_cfg, tokenizer.eot_id)  # refuses, before reading weights, what no class computes
    tensors = hf_state_dict(load_model_state(step_dir, model_cfg), model_cfg)
    with staged(out) as folder:
        write_tokenizer(folder, spec, eot_token, tokenizer, model_cfg.max_seq_len)
        (folder / "config.json").write_text(json.dumps(config, indent=1))
        save_hf_weights(tensors, folder, int(cfg.max_shard_gb * 1e9))
    return out


def write_tokenizer(folder: Path, spec: str, eot_token: str | None, tokenizer: Tokenizer, max_seq_len: int) -> None:
    """The tokenizer files: our byte-level one as a `tokenizers` model, or a copy of the HF tokenizer.json."""
    if spec == "byte":
        write_byte_tokenizer(folder, max_seq_len)
        return
    source = Path(spec) / "tokenizer.json" if Path(spec).is_dir() else Path(spec)
    shutil.copyfile(source, folder / "tokenizer.json")
    write_tokenizer_config(folder, tokenizer.decode([tokenizer.eot_id]) or eot_token, max_seq_len)


def parse(argv: list[str]) -> ExportConfig:
    """`key=value` arguments typed by ExportConfig (plain OmegaConf: `checkpoint` is also the name
    of a config group of the pretrain recipe, which Hydra would take this key for)."""
    request = help_request(argv)
    if request is not None:
        usage = "python -m recipes.export checkpoint=<step dir> out=<dir> [key=value ...] [--help]"
        try:
            text = render_help(usage, OmegaConf.structured(ExportConfig), {}, request.section)
        except UnknownSection as exc:
            fail(str(exc))
        print(f"{__doc__.strip()}\n\n{text}")
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
