"""Which checkpoint a run resumes from, and whether it may."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from titan.checkpoint.manager import COMMIT_MARKER, CheckpointManager, committed_steps
from titan.checkpoint.manifest import CorruptCheckpointError
from titan.config import CheckpointConfig, ConfigError, OptimConfig
from titan.optim import apply_settings

SHAPE_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_hidden_dim", "tie_embeddings",
              "moe.n_experts", "moe.hidden_dim", "moe.n_shared_experts", "moe.every", "moe.first_dense")
# What a resume may not change: the model's shape, what the token ids mean, how the corpus is cut
# into windows (the data cursor counts windows), and the data order's seed (unless asked for).
FIXED_KEYS = (*(f"model.{k}" for k in SHAPE_KEYS), "data.source", "data.tokenizer", "data.eot_token",
              "training.seq_len", "optim.name")  # optim.name: AdamW and Muon keep different state
SEED_KEY = "training.seed"


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


def load_newest_intact(candidates: list[Path], on_corrupt: str, config: dict[str, Any], model: torch.nn.Module,
                       optimizer: torch.optim.Optimizer, log, new_data_seed: bool = False
                       ) -> tuple[Path, dict[str, Any]] | None:
    """Load the first candidate whose files match its manifest into `model` and `optimizer` (collective);
    return it and its train state. `config` is this run's config as plain containers: a checkpoint whose
    fixed keys differ is refused. Sizes are checked first, the shards' checksums while they load. A
    corrupt checkpoint is an error, or with on_corrupt=previous, replaced by the next older commit (whose
    load overwrites every tensor the corrupt one may have left)."""
    for path in candidates:
        try:
            CheckpointManager.check_intact(path)
            check_resumable(CheckpointManager.read_train_state(path)["config"], config, path, new_data_seed)
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


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, checkpoint's value, this run's value) for every key whose value differs, sorted by key."""
    old, new = flatten(saved), flatten(now)
    return [(k, old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]


def describe_changes(changes: list[tuple[str, Any, Any]]) -> str:
    return "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in changes)


def check_resumable(saved: dict[str, Any], now: dict[str, Any], path: Path, new_data_seed: bool = False) -> None:
    """Refuse a checkpoint whose fixed keys differ from this run's (layouts and hyper-parameters may change)."""
    fixed = [c for c in config_changes(saved, now) if c[0] in FIXED_KEYS or (c[0] == SEED_KEY and not new_data_seed)]
    if not fixed:
        return
    keys = {key for key, _, _ in fixed}
    fix = "use the values it was trained with (see its train_state.json), or start a new run.dir"
    if keys == {SEED_KEY}:
        fix = (f"keep {SEED_KEY}={fixed[0][1]!r}, or set checkpoint.new_data_seed=true to draw the data order "
               "of the rest of the run from the new seed")
    raise ConfigError(fixed[0][0], f"checkpoint {path} was written with other values of keys a resume cannot "
                      f"change ({describe_changes(fixed)}).", f"{fix}.")


def restore_train_state(saved: dict[str, Any], optimizer: torch.optim.Optimizer, optim_cfg: OptimConfig,
                        loader: Any, health: Any) -> tuple[int, int, int]:
    """Apply a loaded checkpoint's progress: this run's optimizer settings (not the checkpoint's), the
    data cursor and skipped ranges, the RNG and the health window. Returns (step, tokens, skipped)."""
    apply_settings(optimizer, optim_cfg)
    loader.load_state_dict(saved["data"])
    torch.set_rng_state(torch.tensor(saved["rng"], dtype=torch.uint8))
    health.load_state_dict(saved.get("health", {}))
    return saved["step"], saved["tokens"], saved.get("skipped", 0)
