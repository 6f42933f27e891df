"""Pre-training recipe: `python -m recipes.pretrain [overrides]` or under `torchrun`.

Reads top to bottom as the data flows: config -> validation -> run dir -> data -> model on meta ->
parallelize -> initialize from the seed -> optimizer -> resume -> train -> save -> report.
"""

from __future__ import annotations

import os
import sys
from functools import partial
from pathlib import Path

import torch
from omegaconf import OmegaConf

from parallel.mesh import init_process_group, read_env, run_main
from parallel.flight_recorder import set_dump_dir
from parallel.tensors import all_finite
from recipes.cli import config_errors, parse_args
from titan.checkpoint import CheckpointManager
from titan.checkpoint.resume import (config_changes, describe_changes, load_newest_intact, restore_train_state,
                                     resume_candidates)
from titan.config import ConfigError, PretrainConfig, register_schemas, resolve_auto, validate
from titan.data.checks import check_data_windows, check_source
from titan.data.loader import DataBundle, eval_batches, load_data, train_loader
from titan.data.sequence_log import SequenceIdLog
from titan.metrics import (
    ConsoleSink,
    JsonlSink,
    MetricsLogger,
    ThroughputMeter,
    WandbSink,
    truncate_after_step,
    wandb_problem,
)
from titan.build import build_layout, build_parallel_model, check_layout, report_mesh, resolve_dims
from titan.models import flops_per_token
from titan.peak import device_peak
from titan.errors import NON_FINITE_FIX, NonFiniteStepError
from titan.events import EventLog
from titan.faults import FaultInjection, check_faults
from titan.float8 import describe_float8, keep_scales_fresh
from titan.profiling import StepProfiler, check_profile
from titan.watchdog import HangInjection, HangWatchdog, check_hang
from titan.health import HealthPolicy
from titan.rollback import Rollback
from titan.step_timing import StepTiming
from titan.expert_balance import ExpertBalance
from titan.optim import build_optimizer, build_scheduler
from titan.planner.check import PREDICTION_STEP, PlanPrediction
from titan.preemption import PreemptionWatch
from titan.run_dir import RunDirLock, check_writable
from titan.trainer import Trainer, TrainState

WANDB_ID_FILE = "wandb_run_id"


def check_data(cfg: PretrainConfig) -> None:
    """Fail before any work when the corpus or the tokenizer is not there."""
    d = cfg.data
    check_source(d)
    if d.tokenizer != "byte" and d.source != "tokens" and not Path(d.tokenizer).exists():
        raise ConfigError("data.tokenizer", f"{d.tokenizer!r} does not exist.",
                          "use `byte` or the path of a Hugging Face tokenizer.json.")


def main(argv: list[str]) -> None:
    register_schemas()
    raw = parse_args("pretrain", argv)
    cfg: PretrainConfig = OmegaConf.to_object(raw)
    env = read_env()
    stop = PreemptionWatch(env.device, announce=env.is_writer)  # until training starts, a signal stops at once
    run_dir = Path(cfg.run.dir).expanduser().resolve()
    set_dump_dir(run_dir)  # a hang or a dead peer: <run.dir>/hang/rank-<N>.txt
    with config_errors():
        dims = resolve_dims(cfg, env)
        validate(cfg, env.world_size, dims.dp_size)
        automatic = resolve_auto(cfg, env.device.type)
        check_layout(cfg, dims, env.device)
        check_faults(cfg.debug, cfg.training.steps, env.world_size)
        check_hang(cfg.debug, cfg.training.steps, env.world_size)
        check_profile(cfg.profile.steps, cfg.training.steps)
        check_data(cfg)
        if env.is_writer and cfg.logging.wandb.enabled:
            check_wandb(cfg)
        prediction = PlanPrediction(cfg, dims) if cfg.cluster is not None else None
        lock, candidates = claim_run_dir(cfg, env.is_writer, run_dir)
        data = load_checked_data(cfg)

    torch.set_num_threads(cfg.training.num_threads or max(1, (os.cpu_count() or 1) // env.local_world_size))
    if cfg.training.deterministic:
        torch.use_deterministic_algorithms(True)
    device = env.device
    init_process_group(env, cfg.parallel.timeout_s)
    log = partial(print, flush=True) if env.is_writer else (lambda *args, **kwargs: None)
    with config_errors():
        layout = build_layout(dims, env)
        report_mesh(layout, env, run_dir)
        model, par = build_parallel_model(cfg, layout, device, data.eot_id)
    manager = CheckpointManager(run_dir, cfg.checkpoint.keep, env.is_writer, cfg.checkpoint.async_save, log)
    optimizer = build_optimizer(model, cfg.optim)
    if cfg.training.float8:
        keep_scales_fresh(model, optimizer)
        log(describe_float8(model, device))
    loader = train_loader(data, cfg.data, cfg.training, layout.dp_rank, dims.dp_size, cfg.checkpoint.new_data_seed)

    state, wandb_id = TrainState(), None
    health = HealthPolicy(cfg.training.health)
    events = EventLog(run_dir, env.is_writer)
    config_now = OmegaConf.to_container(raw)
    with config_errors():  # a corrupt or incompatible checkpoint ends the run here, before any training
        resumed = load_newest_intact(candidates, cfg.checkpoint.on_corrupt, config_now, model, optimizer, log,
                                     cfg.checkpoint.new_data_seed)
    if resumed is None:
        events.write("start", 0, world_size=env.world_size)
    else:
        resume_from, saved = resumed
        state = TrainState(*restore_train_state(saved, optimizer, cfg.optim, loader, health))
        wandb_id = saved.get("wandb_run_id")
        log(f"resumed from {resume_from} at step {state.step}")
        events.write("resume", state.step, **{"from": str(resume_from), "world_size": env.world_size})
        changes = config_changes(saved["config"], config_now)
        if changes:
            log(f"settings that differ from the checkpoint's, in effect from step {state.step + 1}: "
                f"{describe_changes(changes)}")
        if state.step >= cfg.training.steps:
            log(f"run already complete at step {state.step} (training.steps={cfg.training.steps}); "
                f"raise training.steps to go on. Outputs: {run_dir}")
            return
    scheduler = build_scheduler(optimizer, cfg.lr, cfg.training.steps, state.step - state.skipped)

    metrics = MetricsLogger()
    if env.is_writer:
        metrics, wandb_id = writer_sinks(cfg, raw, run_dir, state, resumed=resumed is not None, wandb_id=wandb_id)
    dtype = torch.bfloat16 if cfg.training.dtype == "bfloat16" else torch.float32
    peak = device_peak(device, dtype, torch.get_num_threads(), cfg.training.peak_tflops)
    log(peak.describe())
    if automatic:
        log(f"auto settings on {device.type}: {', '.join(automatic)}")
    throughput = ThroughputMeter(flops_per_token(cfg.model, cfg.training.seq_len), env.world_size, peak.tflops)

    def save(s: TrainState) -> None:
        if not all_finite(training_tensors(model, optimizer), device):
            raise NonFiniteStepError(f"step {s.step}: the parameters or optimizer state hold NaN or infinite values, "
                                     f"so its checkpoint was not written. Fix: {NON_FINITE_FIX}.")
        train_state = {"step": s.step, "tokens": s.tokens, "skipped": s.skipped, "health": health.state_dict(),
                       "scheduler": trainer.scheduler.state_dict(),  # for the record: resumes rebuild it
                       "data": loader.state_dict(), "wandb_run_id": wandb_id,
                       "rng": torch.get_rng_state().tolist(), "config": config_now}
        manager.save(s.step, model, optimizer, train_state)

    def on_step_end(s: TrainState) -> bool:
        manager.poll()
        stopping = stop.requested()
        # No periodic save inside a run of bad steps: a rollback goes back to before it.
        periodic = cfg.checkpoint.interval and s.step % cfg.checkpoint.interval == 0 and not health.consecutive
        if cfg.checkpoint.enabled and (stopping or periodic):
            save(s)
        if stopping:
            how = "stopped (Ctrl-C)" if stop.exit_code else "preempted (SIGTERM)"
            log(f"{how}: " + (f"checkpoint of step {s.step} saved; the same command resumes it"
                              if cfg.checkpoint.enabled else f"at step {s.step}; checkpoints are off, nothing saved"))
        return stopping

    on_batches = SequenceIdLog(run_dir, par.dp_group, env.is_writer) if cfg.logging.sequence_ids else None
    balance = ExpertBalance(model, cfg.model, par.global_sum) if cfg.model.moe.n_experts else None
    faults = FaultInjection(cfg.debug, env.rank)
    watchdog, hang = HangWatchdog(cfg.training.health.hang_factor, env.rank), HangInjection(cfg.debug, env.rank)
    profiler = StepProfiler(cfg.profile.steps, run_dir, env.rank, device, log)
    timing = StepTiming(run_dir, cfg.training.health, device, env.is_writer, events, log)
    rollback = Rollback(cfg, manager, model, optimizer, loader, health, config_now, metrics, events, run_dir,
                        env.is_writer, log)
    trainer = Trainer(cfg, model, optimizer, scheduler, iter(loader),
                      lambda: eval_batches(data, cfg.training, layout.dp_rank, dims.dp_size, cfg.eval.steps), par,
                      device, metrics, throughput, state, health, rollback, on_step_end, on_batches,
                      balance.after_step if balance else (lambda applied: {}),
                      step_hooks=[watchdog, faults, timing, hang, profiler],
                      metric_sources=[timing, prediction] if prediction else [timing], faults=faults,
                      log_steps=(PREDICTION_STEP,) if prediction else ())
    stop.start_training()
    with config_errors():  # a non-finite step or a failed save: one paragraph, its own exit code
        try:
            state = trainer.fit()
            if cfg.checkpoint.enabled and manager.latest() != manager.folder / f"step-{state.step}" and not (
                    manager.pending and manager.pending.step == state.step):
                save(state)
            manager.close()
        except NonFiniteStepError:
            manager.close()  # a save of an earlier, finite step still in flight is finished and committed
            events.write("failed", trainer.state.step, reason="non-finite steps")
            raise
        finally:
            metrics.close()
    events.write("stopped" if stop.received is not None else "done", state.step, tokens=state.tokens, skipped=state.skipped)
    log(f"done: {state.step} steps, {state.tokens} tokens. Outputs in {run_dir}: config.yaml, metrics.jsonl"
        + (", checkpoints/" if cfg.checkpoint.enabled else "") + (", wandb/" if cfg.logging.wandb.enabled else ""))
    del lock  # held to here: released when this process ends
    if stop.exit_code:
        raise SystemExit(stop.exit_code)


def claim_run_dir(cfg: PretrainConfig, is_writer: bool, run_dir: Path) -> tuple[RunDirLock | None, list[Path]]:
    """Check the folder is writable, lock it (the writer) and list the checkpoints to resume from.
    The writer owns the folder before anything is written; the other ranks write only after the
    process group exists, which needs the writer."""
    listing = CheckpointManager(run_dir, cfg.checkpoint.keep, False)
    resume_candidates(cfg.checkpoint, run_dir, listing)  # a bad checkpoint.resume is refused before any write
    check_writable(run_dir)
    lock = RunDirLock(run_dir) if is_writer else None
    return lock, resume_candidates(cfg.checkpoint, run_dir, listing)  # listed again, now the folder is ours


def training_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Parameters and optimizer state: what a checkpoint holds besides small counters."""
    state = [v for per_param in optimizer.state.values() for v in per_param.values() if isinstance(v, torch.Tensor)]
    return [*model.parameters(), *state]


def check_wandb(cfg: PretrainConfig) -> None:
    """An online W&B run needs a key and a reachable server: refuse up front, before anything is written."""
    problem = wandb_problem(cfg.logging.wandb.mode)
    if problem:
        raise ConfigError("logging.wandb.mode", f"{problem}, so the W&B run could not start.",
                          "run `wandb login` (or set WANDB_API_KEY) on a machine that reaches the server; or set "
                          "logging.wandb.mode=offline and upload later with `wandb sync <run.dir>/wandb/offline-run-*`; "
                          "or turn W&B off with logging.wandb.enabled=false.")


def load_checked_data(cfg: PretrainConfig) -> DataBundle:
    """Tokenize or map the corpus; refuse one the model or the windows cannot use."""
    try:
        data = load_data(cfg.data, cfg.training.seq_len)
    except ConfigError:  # a bad file or line, named where it was read
        raise
    except (OSError, KeyError, ValueError) as exc:
        raise ConfigError("data", f"could not read the corpus: {exc}.", "check data.path and data.tokenizer.")
    if data.vocab_size > cfg.model.vocab_size:
        raise ConfigError("model.vocab_size", f"{cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"vocabulary ({data.vocab_size}).", f"set model.vocab_size={data.vocab_size} or more.")
    check_data_windows(data.train, data.eval, cfg.data.eval_fraction, bool(cfg.eval.interval))
    return data


def writer_sinks(cfg: PretrainConfig, raw, run_dir: Path, state: TrainState, resumed: bool,
                 wandb_id: str | None) -> tuple[MetricsLogger, str | None]:
    """config.yaml, metrics.jsonl, the console and W&B, on the writer rank only."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resumed or not (run_dir / "config.yaml").exists():
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(raw))
    if resumed:  # rows a crashed attempt wrote past the checkpoint are replaced by the rerun
        for name in ("metrics.jsonl", "sequence_ids.jsonl", "ranks.jsonl"):
            truncate_after_step(run_dir / name, state.step)
    sinks = [JsonlSink(run_dir / "metrics.jsonl", append=resumed),
             ConsoleSink(cfg.training.steps, state.step, cfg.logging.progress_bar)]
    if cfg.logging.wandb.enabled:
        w = cfg.logging.wandb
        id_file = run_dir / WANDB_ID_FILE
        wandb_id = wandb_id or (id_file.read_text().strip() if id_file.is_file() else None)
        sink = WandbSink(run_dir, w.project, w.name or cfg.run.name, w.entity, w.mode, OmegaConf.to_container(raw),
                         wandb_id)
        wandb_id = sink.run_id
        id_file.write_text(wandb_id)
        sinks.append(sink)
    return MetricsLogger(sinks), wandb_id


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
