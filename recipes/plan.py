"""Plan a run before launching it: `python -m recipes.plan [overrides] [cluster=<name>] [--search]
[--top N] [--check <run.dir>] [--json]`.

Takes the config `recipes.pretrain` takes plus `cluster=<name>` (configs/cluster/: cpu, h100_ib,
h200_ib, a100_ib, mi300x, or your own YAML; default cpu) and prints, per rank, the memory of
parameters, gradients, optimizer state, activations, transients and FSDP buffers and the peak; and
per step the compute time, the pipeline bubble, the bytes and time of each mesh dimension (exposed
or hidden behind compute), the optimizer step, tokens/s and MFU. The layout runs on every device of
the cluster (`cluster.nodes`, `cluster.devices_per_node`).

  --search        rank every layout the recipe accepts for this model, cluster and global batch by
                  predicted tokens/s, drop those that do not fit, print the best with their launch line
  --top N         how many layouts --search prints (default 10)
  --check DIR     predicted vs measured for a finished run (its config.yaml and metrics.jsonl)
  --json          the plan as JSON

An impossible layout gets the recipe's own error (exit 2); a layout that does not fit says by how
much and which change makes it fit (exit 2).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
from pathlib import Path

from omegaconf import OmegaConf

from recipes.cli import compose_config, config_errors, fail
from titan.config import PretrainConfig, register_schemas
from titan.metrics import read_jsonl
from titan.planner.plan import Plan, make_plan, world_size
from titan.planner.search import search

FLAGS = {"--search": False, "--json": False, "--top": True, "--check": True}
GB = 1e9


def parse(argv: list[str]) -> tuple[dict[str, str | bool], list[str]]:
    """(flags, config overrides)."""
    if "--help" in argv or "-h" in argv:
        print(__doc__.strip())
        raise SystemExit(0)
    flags: dict[str, str | bool] = {}
    overrides, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in FLAGS:
            if FLAGS[arg]:
                if i + 1 >= len(argv):
                    fail(f"{arg} needs a value. Fix: see `python -m recipes.plan --help`.")
                flags[arg], i = argv[i + 1], i + 1
            else:
                flags[arg] = True
        elif arg.startswith("-"):
            fail(f"unknown option {arg!r}. Fix: use --search, --top N, --check <run.dir> or --json, and config "
                 "overrides as key=value.")
        else:
            overrides.append(arg)
        i += 1
    return flags, overrides


def load_config(overrides: list[str]) -> PretrainConfig:
    """The recipe's config; `cluster=cpu` unless a cluster is chosen."""
    register_schemas()
    if not any(o.split("=", 1)[0].lstrip("+") == "cluster" for o in overrides):
        overrides = [*overrides, "cluster=cpu"]
    return OmegaConf.to_object(compose_config("pretrain", overrides))


def layout_line(cfg: PretrainConfig, dp_shard: int | None = None) -> str:
    """The layout in a line (`dp_shard`: the resolved degree when the config says -1)."""
    p, t = cfg.parallel, cfg.training
    parts = [f"dp_replicate {p.dp_replicate}", f"dp_shard {dp_shard or p.dp_shard}", f"tp {p.tp}" + (" +sp" if p.sequence_parallel and p.tp > 1 else ""),
             f"pp {p.pp}" + (f" {p.pp_schedule} v{p.pp_virtual_stages}" if p.pp > 1 else ""), f"cp {p.cp}", f"ep {p.ep}",
             f"micro batch {t.micro_batch_size}", f"AC {t.activation_checkpoint}"]
    return ", ".join(parts)


def overrides_of(cfg: PretrainConfig) -> list[str]:
    """The layout's config keys as command-line overrides."""
    p, t = cfg.parallel, cfg.training
    keys = [f"parallel.dp_replicate={p.dp_replicate}", f"parallel.dp_shard={p.dp_shard}", f"parallel.tp={p.tp}",
            f"parallel.pp={p.pp}", f"parallel.cp={p.cp}", f"parallel.ep={p.ep}",
            f"parallel.sequence_parallel={str(p.sequence_parallel).lower()}",
            f"training.micro_batch_size={t.micro_batch_size}", f"training.activation_checkpoint={t.activation_checkpoint}"]
    if p.pp > 1:
        keys += [f"parallel.pp_schedule={p.pp_schedule}", f"parallel.pp_virtual_stages={p.pp_virtual_stages}"]
    return keys


def launch_line(plan: Plan, base: list[str]) -> str:
    c = plan.cluster
    return " ".join(["python -m launch", f"--nnodes {c.nodes}", f"--nproc-per-node {c.devices_per_node}",
                     "--no-hierarchical", *base, *overrides_of(plan.layout.cfg)])


def report(plan: Plan) -> list[str]:
    cfg, c, time = plan.layout.cfg, plan.cluster, plan.time
    m, t = cfg.model, cfg.training
    from titan.planner.facts import model_facts

    lines = [f"plan: model {m.name} ({model_facts(m).params() / 1e9:.3g}B parameters), {t.dtype}, seq {t.seq_len}, "
             f"global batch {t.global_batch_size} on {c.name}: {c.nodes} node(s) x {c.devices_per_node} devices of "
             f"{c.device_memory_gb:g} GB ({plan.budget_gb:.1f} GB usable)",
             f"layout: {layout_line(cfg, plan.layout.dims.dp_shard)}; {plan.layout.microbatches} micro-batch(es) of {plan.layout.micro_batch} "
             "per step and rank", "", "memory per rank, GB" + "".join(f"{'pp rank ' + str(r.pp_rank):>14s}" for r in plan.memory)]
    for label, key in [("parameters", "params"), ("gradients", "grads"), ("optimizer state", "optimizer"),
                       ("activations", "activations"), ("transients", "transient"), ("FSDP buffers", "gathered"),
                       ("buffers", "buffers"), ("runtime", "runtime")]:
        lines.append(f"  {label:17s}" + "".join(f"{getattr(r, key) / GB:14.3f}" for r in plan.memory))
    lines.append(f"  {'peak':17s}" + "".join(f"{r.peak / GB:14.3f}" for r in plan.memory))
    lines.append(f"  {'peak during':17s}" + "".join(f"{r.phase:>14s}" for r in plan.memory))
    lines.append(f"  fits: {'yes' if plan.fits else 'NO'} ({plan.peak_gb:.2f} of {plan.budget_gb:.2f} GB)")
    lines += ["", "step time"]
    lines.append(f"  compute           {time.compute_s:10.4f} s  (busiest rank, incl. TP/CP/EP traffic)")
    lines.append(f"  pipeline bubble   {time.bubble_s:10.4f} s")
    for x in time.traffic:
        lines.append(f"  comm {x.dim:13s}{x.seconds:10.4f} s  {x.bytes / GB:10.4f} GB/step per rank, "
                     f"{'beside compute' if x.overlapped else 'on the critical path'}")
    lines.append(f"  comm exposed      {time.exposed_comm_s:10.4f} s  (hidden: {time.overlapped_comm_s:.4f} s)")
    lines.append(f"  optimizer         {time.optimizer_s:10.4f} s")
    lines.append(f"  step              {time.step_s:10.4f} s")
    world = plan.layout.dims.world_size
    lines.append(f"  tokens/s          {time.tokens_per_s:10.0f}    ({time.tokens_per_s / world:.0f} per device), "
                 f"MFU {time.mfu:.1%}")
    return lines


def not_fitting(plan: Plan, cfg: PretrainConfig) -> str:
    """How much too big the layout is, and the changes (tried one after another, each keeping the
    ones before) that make it fit."""
    over = plan.peak_gb - plan.budget_gb
    steps = [("training.activation_checkpoint", "full", lambda p, t: (p, dataclasses.replace(t, activation_checkpoint="full"))),
             ("training.micro_batch_size", "1", lambda p, t: (p, dataclasses.replace(t, micro_batch_size=1))),
             ("parallel.dp_replicate", "1", lambda p, t: (dataclasses.replace(p, dp_replicate=1, dp_shard=-1), t)),
             ("parallel.tp", None, lambda p, t: (dataclasses.replace(p, tp=2 * p.tp, dp_shard=-1, sequence_parallel=True), t)),
             ("parallel.pp", None, lambda p, t: (dataclasses.replace(p, pp=2 * p.pp, dp_shard=-1), t))]
    advice, changes, current = None, [], cfg
    for key, _, change in steps:
        parallel, training = change(current.parallel, current.training)
        variant = dataclasses.replace(current, parallel=parallel, training=training)
        value = str(getattr(parallel if key.startswith("parallel") else training, key.split(".")[1])).lower()
        if value == str(getattr(current.parallel if key.startswith("parallel") else current.training,
                                key.split(".")[1])).lower():
            continue
        try:
            candidate = make_plan(variant, plan.cluster)
        except ValueError:
            continue
        current = variant
        changes.append(f"{key}={value}")
        if candidate.fits:
            advice = f"set {' '.join(changes)} (peak {candidate.peak_gb:.2f} GB)"
            break
    advice = advice or "run `python -m recipes.plan ... --search` for a layout that fits, or add nodes (cluster.nodes)"
    return (f"config error at `parallel`: the layout needs {plan.peak_gb:.2f} GB on its largest rank, "
            f"{over:.2f} GB more than the {plan.budget_gb:.2f} GB usable of {plan.cluster.name}'s "
            f"{plan.cluster.device_memory_gb:g} GB devices. Fix: {advice}.")


def run_search(cfg: PretrainConfig, overrides: list[str], top: int) -> None:
    cluster = cfg.cluster
    result = search(cfg, cluster)
    print(f"search: {result.considered} layouts the recipe accepts for model {cfg.model.name} on {cluster.name} "
          f"({world_size(cluster)} devices), global batch {cfg.training.global_batch_size}; {result.too_big} do not fit")
    if not result.plans:
        fail(f"config error at `cluster`: no layout fits {cluster.name}'s {cluster.device_memory_gb:g} GB devices. "
             "Fix: add nodes (cluster.nodes), lower training.global_batch_size or training.seq_len, or pick a "
             "smaller model.")
    layout_keys = ("parallel.", "training.micro_batch_size", "training.activation_checkpoint", "cluster=")
    base = [o for o in overrides if not o.startswith(layout_keys)] + [f"cluster={cluster.name}"]
    print(f"{'#':>3s} {'tokens/s':>12s} {'per dev':>9s} {'MFU':>6s} {'peak GB':>8s} {'step s':>8s}  layout")
    for i, plan in enumerate(result.plans[:top], 1):
        print(f"{i:3d} {plan.time.tokens_per_s:12.0f} {plan.time.tokens_per_s / world_size(cluster):9.0f} "
              f"{plan.time.mfu:6.1%} {plan.peak_gb:8.2f} {plan.time.step_s:8.3f}  {layout_line(plan.layout.cfg)}")
        print(f"    {launch_line(plan, base)}")


def run_check(run_dir: Path, overrides: list[str]) -> None:
    """Predicted vs measured for a finished run."""
    config, metrics = run_dir / "config.yaml", run_dir / "metrics.jsonl"
    if not config.is_file() or not metrics.is_file():
        fail(f"{run_dir} holds no config.yaml and metrics.jsonl. Fix: pass the run.dir of a `recipes.pretrain` run.")
    register_schemas()
    saved = OmegaConf.load(config)
    cfg: PretrainConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(PretrainConfig), saved))
    chosen = [o for o in overrides if o.startswith("cluster")]
    if chosen or cfg.cluster is None:
        cluster = load_config(chosen).cluster
    else:
        cluster = cfg.cluster
    ranks = len(list((run_dir / "mesh").glob("rank-*.json"))) or 1
    with config_errors():
        plan = make_plan(cfg, cluster, ranks)
    rows = [r for r in read_jsonl(metrics) if "tokens_per_s" in r]
    if not rows:
        fail(f"{metrics} has no logged steps. Fix: let the run log at least one step.")
    steady = rows[2:] or rows
    measured = {"mem_gb": max(r.get("mem_gb", 0.0) for r in rows),
                "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady)}
    predicted = {"mem_gb": plan.memory[0].peak / GB, "tokens_per_s": plan.time.tokens_per_s}
    for x in plan.time.traffic:
        if x.dim != "pp":  # point-to-point sends are not counted in comm_gb
            predicted[f"comm_gb/{x.dim}"] = x.bytes / GB
    for key in sorted(k for k in rows[-1] if k.startswith("comm_gb/")):
        measured[key] = rows[-1][key]
    print(f"check: {run_dir} ({ranks} rank(s), {layout_line(cfg, plan.layout.dims.dp_shard)}) against cluster {cluster.name}; mem_gb is rank 0's")
    print(f"{'quantity':24s} {'predicted':>12s} {'measured':>12s} {'predicted/measured':>19s}")
    for key in dict.fromkeys([*predicted, *measured]):
        want, got = predicted.get(key), measured.get(key)
        ratio = f"{want / got:19.3f}" if want is not None and got else f"{'-':>19s}"
        print(f"{key:24s} {want if want is not None else float('nan'):12.4g} {got if got is not None else float('nan'):12.4g} {ratio}")


def main(argv: list[str]) -> None:
    flags, overrides = parse(argv)
    if "--check" in flags:
        run_check(Path(str(flags["--check"])).expanduser(), overrides)
        return
    cfg = load_config(overrides)
    if flags.get("--search"):
        top = str(flags.get("--top", "10"))
        if not top.isdigit() or int(top) < 1:
            fail(f"--top {top} is not a positive number. Fix: e.g. --top 10.")
        with config_errors():
            run_search(cfg, overrides, int(top))
        return
    with config_errors():
        plan = make_plan(cfg, cfg.cluster)
    if flags.get("--json"):
        print(json.dumps({"layout": layout_line(cfg, plan.layout.dims.dp_shard), "fits": plan.fits, "peak_gb": plan.peak_gb,
                          "memory": [dataclasses.asdict(r) | {"peak": r.peak} for r in plan.memory],
                          "time": dataclasses.asdict(plan.time)}, indent=1))
    else:
        print("\n".join(report(plan)))
    if not plan.fits:
        fail(not_fitting(plan, cfg))


if __name__ == "__main__":
    main(sys.argv[1:])
