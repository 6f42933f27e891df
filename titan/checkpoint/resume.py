"""Which checkpoint a run resumes from, and whether it may."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


def pick_verified(candidates: list[Path], on_corrupt: str, log) -> Path | None:
    """The first candidate whose files match its manifest (collective). A corrupt one is an error,
    or with on_corrupt=previous, skipped for the next older commit."""
    for path in candidates:
        try:
            CheckpointManager.verify(path)
            return path
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
