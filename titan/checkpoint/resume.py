"""Which checkpoint a run resumes from, and whether it may."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from titan.checkpoint.manager import COMMIT_MARKER, CheckpointManager, committed_steps
from titan.checkpoint.manifest import CorruptCheckpointError
from titan.config import CheckpointConfig, ConfigError, ModelConfig

SHAPE_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_hidden_dim", "tie_embeddings")


def resume_candidates(cfg: CheckpointConfig, run_dir: Path, manager: CheckpointManager) -> list[Path]:
    """Checkpoints to try, newest first (before any process group exists: config errors only)."""
    if cfg.resume == "auto":
        return manager.committed()[::-1]
    if cfg.resume == "none":
        if manager.latest() is not None:
            raise ConfigError("checkpoint.resume", f"{run_dir} already holds checkpoints of another run.",
                              "resume it with checkpoint.resume=auto, or pick a new run.dir.")
        return []
    path = Path(cfg.resume).expanduser().resolve()
    if not (path / COMMIT_MARKER).is_file():
        raise ConfigError("checkpoint.resume", f"{path} is not a committed checkpoint folder.",
                          "point it at a checkpoints/step-<N> folder, or use auto / none.")
    steps = committed_steps(path.parent)
    older = steps[:steps.index(path)][::-1] if path in steps else []
    return [path, *older]


def load_newest_intact(candidates: list[Path], on_corrupt: str, model_cfg: ModelConfig, model: torch.nn.Module,
                       optimizer: torch.optim.Optimizer, log) -> tuple[Path, dict[str, Any]] | None:
    """Load the first candidate whose files match its manifest into `model` and `optimizer` (collective);
    return it and its train state. Sizes are checked first, the shards' checksums while they load. A
    corrupt checkpoint is an error, or with on_corrupt=previous, replaced by the next older commit (whose
    load overwrites every tensor the corrupt one may have left)."""
    for path in candidates:
        try:
            CheckpointManager.check_intact(path)
            check_compatible(CheckpointManager.read_train_state(path)["config"], model_cfg, path)
            return path, CheckpointManager.load(path, model, optimizer)
        except CorruptCheckpointError as exc:
            if on_corrupt != "previous":
                raise ConfigError("checkpoint.resume", f"{exc}.",
                                  "set checkpoint.on_corrupt=previous to fall back to the previous commit, "
                                  "or checkpoint.resume=<an older step dir>.") from exc
            log(f"warning: {exc}; falling back to the previous commit")
    if candidates:
        raise ConfigError("checkpoint.resume", "no intact checkpoint is left to resume from.",
                          "start fresh with checkpoint.resume=none in a new run.dir.")
    return None


def check_compatible(saved_config: dict[str, Any], model: ModelConfig, path: Path) -> None:
    """Refuse a checkpoint of another model shape (layouts may differ; shapes may not)."""
    saved = saved_config.get("model", {})
    diff = [f"model.{k}: checkpoint {saved.get(k)!r} vs now {getattr(model, k)!r}" for k in SHAPE_KEYS
            if saved.get(k) != getattr(model, k)]
    if diff:
        raise ConfigError("model", f"checkpoint {path} was written by another model shape ({'; '.join(diff)}).",
                          "use the model settings it was trained with, or start a new run.dir.")
