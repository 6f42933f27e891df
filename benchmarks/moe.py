"""Mixture of experts: throughput against a dense model and grouped against looped experts,
expert-parallel bytes against the routing, load balance with and without the auxiliary-loss-free
bias, and peak memory per rank with and without expert parallelism, measured in one run.

    python -m benchmarks.moe [--sections a b c d] [--steps 5] [--warmup 1] [--rounds 3] [--threads 2]
                             [--busy-threshold 0.25] [--retries 3] [--busy-wait 10]
                             [--fine 32 8 64] [--kernel-shapes 8:2:256 32:8:64 64:8:32] [--kernel-reps 8]
                             [--ep-model moe_debug] [--ep-steps 2] [--tolerance 0.05] [--balance-steps 200]
                             [--rates 0.001 0] [--fallback-rates 0.01] [--balance-goal 1.2] [--memory-experts 32]

All fp32, gloo, `model=moe_small` unless said otherwise (4 blocks, the first dense; 8 experts of
hidden 256, top 2, plus 1 shared expert of hidden 256; dim 256).

(a) Tokens/s, in this process with ``--threads`` threads: one `titan.trainer.Trainer` per contender,
    built as `recipes.pretrain` builds it (config composition, `build_parallel_model`, the seeded
    init, AdamW, the schedule, the pydoc loader, `ExpertBalance` after each step), driven by
    ``Trainer.train_step`` (forward + backward of 2 micro-batches of 8 x 256, clipping, optimizer,
    bias update). Contenders: ``dense`` (`model=small`), ``moe_small`` with ``experts_impl=grouped``
    (`torch._grouped_mm`) and ``looped`` (one matmul per expert), and a finer shape with the same
    total and active parameters (``--fine E K H``: 32 experts of hidden 64, top 8) in both
    implementations (4 shared experts of hidden 64 there, so the shared width stays 256). They
    alternate in rounds (each contender: ``--warmup`` untimed steps, then ``--steps`` timed ones;
    a block during which other processes kept more than ``--busy-threshold`` cores busy, which with
    as many threads as cores slows steps several-fold, is redone up to ``--retries`` times after
    ``--busy-wait`` s); a round's number is the median step; ratios are medians of per-round ratios. Grouped and looped
    start from the same weights and data and compute the same values, so they route alike. No goal
    for MoE vs dense (the FLOPs per token are compared, from `titan.models.flops_per_token`); goal:
    grouped faster than looped. Then the experts module alone (`GroupedExperts`, forward + backward,
    rows spread evenly over the experts) for each of ``--kernel-shapes``, grouped against looped.
(b) Expert-parallel bytes per rank and step: ``torchrun -m benchmarks.moe_worker``, which runs
    `recipes.pretrain.main` itself (``--ep-model``, seq 128, global batch 8, micro batch 2,
    ``logging.log_interval=1``) on layouts ep2 (2 ranks), ep4 (4 ranks) and ep2 x dp_shard 4
    (4 ranks, the experts also FSDP-sharded over 2), and records the routing of every training
    forward on every rank and what the trainer's `CommCounter` counted for ``ep`` on every rank
    (only rank 0's reaches metrics.jsonl; it is checked equal). Per MoE layer and micro-batch a rank
    runs four all-to-alls of token rows on its ep group (`parallel/expert_parallel.py`): forward,
    its routed rows out (``k T`` rows, ``T`` its tokens) and the rows its experts computed back
    (``R``: the rows every rank of the group routed to this rank's experts); backward, the same two
    reversed, with the same sizes; plus one all-to-all of the per-expert counts (E int64) per
    forward. From the recorded routing (every rank's counts per call, paired by call order):
      routing formula = sum over calls of (ep-1)/ep x [8 E + 2 (k T + R) x dim x 4], the
        even all-to-all's convention ((n-1)/n x input bytes), for comparison;
      rows on the wire = sum over calls of (ep-1)/ep x 8 E + 2 (S + R') x dim x 4, with S the rows
        this rank routed to experts on other ranks and R' the rows it received from other ranks:
        what actually leaves the rank (uneven all-to-alls keep the rows for local experts at home),
        computed independently of the counter: goal, measured / this within ``--tolerance``;
      uniform = (ep-1)/ep x [8 E + 4 k T dim x 4] x calls: the expectation under uniform routing.
(c) Load balance: ``python -m recipes.pretrain model=moe_small`` (its defaults: seq 256, global
    batch 16, 200 steps; one process, ``--threads`` threads, ``logging.log_interval=1``) for each
    ``model.moe.bias_update_rate`` in ``--rates``; ``moe/load_max_mean`` (max over MoE layers of
    max / mean tokens per expert) averaged over the last 10 steps ("end"; also over the last 50,
    per layer, at a few steps, and the first step whose preceding 10-step mean is <= the goal). Goal
    <= ``--balance-goal`` at the default rate (the first of ``--rates``); when it misses, the
    ``--fallback-rates`` run too.
(d) Peak memory per rank, 2 ranks, FSDP over both, `parallel.ep=1` against `parallel.ep=2`
    (``moe_small`` with ``--memory-experts`` experts, so that experts dominate; seq 64, micro batch
    1, 3 steps): ``torchrun -m benchmarks.moe_worker --memory`` (MemTracker peak, the approach of
    `benchmarks/memory_worker.py`, whose helpers it uses). Theory (activations left out: 64
    tokens): ``4 L`` (parameters, gradients, Adam moments of this rank's shards: the same at ep1,
    where FSDP shards the stacked experts on dim 0 over 2, and ep2, where each rank holds E/2
    experts whole) plus the transient at an MoE block's backward: ep1 ``4 B`` (B = the whole MoE
    block, every expert gathered: its unsharded weights and full-size gradients, and the next
    block's prefetched all-gather output and copy-out); ep2 ``4 B' + 2 X`` (B' = the block without
    its experts, X = the E/2 local experts: their FSDP unit spans 1 rank, so FSDP copies the shard
    into an unsharded buffer and the full-size gradient into a reduce-scatter buffer).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MB = 1e6
COMMON = ["eval.interval=0", "checkpoint.enabled=false", "logging.progress_bar=false"]


def busy_cpu_seconds() -> float:
    """CPU seconds every process on the machine has used since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def compose(overrides: list[str]):
    from omegaconf import OmegaConf

    from recipes.cli import compose_config
    from titan.config import register_schemas

    register_schemas()
    return OmegaConf.to_object(compose_config("pretrain", overrides))


def subprocess_env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "WANDB_MODE": "disabled"}


def run(cmd: list[str], threads: int, what: str) -> float:
    """Run `cmd` in the repository; its wall time (exit on failure with the tail of stderr)."""
    began = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(threads), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed ({proc.returncode}):\n{' '.join(cmd)}\n{proc.stderr[-4000:]}")
    return time.perf_counter() - began


def torchrun(ranks: int, module: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", "-m", module]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------------
# (a) throughput, in this process


def contenders(args: argparse.Namespace) -> dict[str, list[str]]:
    e, k, h = args.fine
    base = compose(["model=moe_small"]).model.moe
    shared = base.hidden_dim * base.n_shared_experts // h  # keep the shared experts' width (and so the parameters)
    fine = ["model=moe_small", f"model.moe.n_experts={e}", f"model.moe.top_k={k}", f"model.moe.hidden_dim={h}",
            f"model.moe.n_shared_experts={shared}"]
    return {
        "dense": ["model=small"],
        "moe_grouped": ["model=moe_small", "model.moe.experts_impl=grouped"],
        "moe_looped": ["model=moe_small", "model.moe.experts_impl=looped"],
        f"fine{e}_grouped": [*fine, "model.moe.experts_impl=grouped"],
        f"fine{e}_looped": [*fine, "model.moe.experts_impl=looped"],
    }


class Contender:
    """One model trained by the recipe's Trainer, stepped on demand."""

    def __init__(self, overrides: list[str], args: argparse.Namespace, data_cache: dict):
        from parallel.mesh import read_env
        from titan.build import build_layout, build_parallel_model, check_layout, resolve_dims
        from titan.config import validate
        from titan.data.loader import load_data, train_loader
        from titan.expert_balance import ExpertBalance
        from titan.health import HealthPolicy
        from titan.metrics import MetricsLogger, ThroughputMeter
        from titan.optim import build_optimizer, build_scheduler
        from titan.trainer import Trainer, TrainState

        cfg = compose([*overrides, "training.steps=100000", f"training.seq_len={args.seq_len}",
                       f"training.num_threads={args.threads}", *COMMON])
        env = read_env()
        dims = resolve_dims(cfg, env)
        validate(cfg, env.world_size, dims.dp_size)
        check_layout(cfg, dims, env.device)
        key = (cfg.data.source, cfg.training.seq_len)
        if key not in data_cache:
            data_cache[key] = load_data(cfg.data, cfg.training.seq_len)
        data = data_cache[key]
        model, par = build_parallel_model(cfg, build_layout(dims, env), env.device, data.eot_id)
        optimizer = build_optimizer(model, cfg.optim)
        scheduler = build_scheduler(optimizer, cfg.lr, cfg.training.steps)
        loader = train_loader(data, cfg.data, cfg.training, 0, 1)
        balance = ExpertBalance(model, cfg.model, par.global_sum) if cfg.model.moe.n_experts else None
        # The recipe's step health policy judges each step; no rollback (only `fit` would ask for one).
        self.trainer = Trainer(cfg, model, optimizer, scheduler, iter(loader), lambda: iter(()), par, env.device,
                               MetricsLogger([]), ThroughputMeter(1, 1, 1.0), TrainState(),
                               HealthPolicy(cfg.training.health), None,
                               after_update=balance.after_step if balance else (lambda applied: {}))
        self.cfg, self.model = cfg, model
        self.tokens = cfg.training.global_batch_size * cfg.training.seq_len
        self.last: dict = {}

    def step(self) -> float:
        began = time.perf_counter()
        loss, _, skipped, extra = self.trainer.train_step()
        elapsed = time.perf_counter() - began
        self.last = {"loss": loss, "skipped": skipped, **extra}
        return elapsed

    def params(self) -> tuple[int, int]:
        """(total, active per token) parameters: the routed experts count top_k / n_experts."""
        moe = self.cfg.model.moe
        total = active = 0
        for name, p in self.model.named_parameters():
            total += p.numel()
            share = moe.top_k / moe.n_experts if ".moe.experts." in name else 1.0
            active += round(p.numel() * share)
        return total, active


def throughput(args: argparse.Namespace) -> dict:
    import torch

    from titan.models import flops_per_token

    torch.set_num_threads(args.threads)
    data_cache: dict = {}
    models = {name: Contender(overrides, args, data_cache) for name, overrides in contenders(args).items()}
    seq = args.seq_len
    print(f"\n(a) tokens/s in one process, {args.threads} threads, fp32, seq {seq}, global batch 16 (2 micro-batches "
          f"of 8), {args.rounds} rounds x ({args.warmup} untimed + {args.steps} timed steps) per contender")
    print(f"{'contender':16s} {'params':>10s} {'active':>10s} {'GFLOP/token':>11s} {'vs dense':>8s}")
    dense_flops = flops_per_token(models["dense"].cfg.model, seq)
    for name, c in models.items():
        total, active = c.params()
        fpt = flops_per_token(c.cfg.model, seq)
        print(f"{name:16s} {total:10,d} {active:10,d} {fpt / 1e9:11.6f} {fpt / dense_flops:8.4f}")
    print(f"{'round':>5s} {'contender':16s} {'median s':>8s} {'min s':>6s} {'tok/s':>7s} {'others busy':>11s} "
          f"{'load max/mean':>13s} {'tries':>5s}")
    medians: dict[str, list[float]] = {name: [] for name in models}
    for round_index in range(1, args.rounds + 1):
        for name, c in models.items():
            for tries in range(1, args.retries + 2):  # a block during which others kept cores busy is redone
                for _ in range(args.warmup):
                    c.step()
                busy0, own0, wall0 = busy_cpu_seconds(), time.process_time(), time.perf_counter()
                times = [c.step() for _ in range(args.steps)]
                wall = time.perf_counter() - wall0
                others = max(0.0, ((busy_cpu_seconds() - busy0) - (time.process_time() - own0)) / wall)
                if others <= args.busy_threshold:
                    break
                time.sleep(args.busy_wait)
            medians[name].append(statistics.median(times))
            load = c.last.get("moe/load_max_mean")
            print(f"{round_index:5d} {name:16s} {medians[name][-1]:8.3f} {min(times):6.3f} "
                  f"{c.tokens / medians[name][-1]:7,.0f} {others:6.2f} cores "
                  f"{'-' if load is None else f'{load:.2f}':>13s} {tries:5d}", flush=True)
    return {"medians": medians, "tokens": models["dense"].tokens, "fine": f"fine{args.fine[0]}",
            "kernel": experts_alone(args)}


def experts_alone(args: argparse.Namespace) -> list[tuple[str, float, float]]:
    """`GroupedExperts` alone, forward + backward (sum of squares) of 8 x 256 tokens x top_k rows spread
    evenly over the experts, grouped against looped, alternating, median of `--kernel-reps`; per
    shape (label, grouped s, looped s)."""
    import torch

    from titan.models.moe import GroupedExperts

    torch.set_num_threads(args.threads)
    out = []
    for e, k, h in args.kernel_shapes:
        gen = torch.Generator().manual_seed(0)
        experts = {impl: GroupedExperts(e, 256, h, impl) for impl in ("grouped", "looped")}
        for p in experts["grouped"].parameters():
            p.data.normal_(0, 0.02, generator=gen)
        experts["looped"].load_state_dict(experts["grouped"].state_dict())
        rows = 8 * 256 * k
        counts = torch.full((e,), rows // e, dtype=torch.int64)
        x = torch.randn(rows, 256, generator=gen, requires_grad=True)
        times: dict[str, list[float]] = {impl: [] for impl in experts}
        for rep in range(args.kernel_reps + 1):
            for impl, module in experts.items():
                began = time.perf_counter()
                module(x, counts).square().sum().backward()
                if rep:  # the first is warmup
                    times[impl].append(time.perf_counter() - began)
        out.append((f"E={e} top {k} hidden {h}", statistics.median(times["grouped"]),
                    statistics.median(times["looped"])))
    return out


def speed_ratio(medians: dict[str, list[float]], a: str, b: str) -> tuple[float, list[float]]:
    """tokens/s of a / tokens/s of b (= step time of b / step time of a): median of the per-round ratios."""
    per_round = [y / x for x, y in zip(medians[a], medians[b])]
    return statistics.median(per_round), per_round


def print_throughput(result: dict) -> bool:
    med, tokens, fine = result["medians"], result["tokens"], result["fine"]
    print("\n(a) results (tokens/s = median over rounds of each round's median step)")
    for name, times in med.items():
        print(f"    {name:16s} {tokens / statistics.median(times):8,.0f} tok/s")
    lines = [("moe_small (grouped) / dense small", "moe_grouped", "dense"),
             ("moe_small grouped / looped", "moe_grouped", "moe_looped"),
             (f"{fine} grouped / looped", f"{fine}_grouped", f"{fine}_looped"),
             (f"{fine} grouped / moe_small grouped", f"{fine}_grouped", "moe_grouped")]
    met = True
    for label, a, b in lines:
        ratio, rounds = speed_ratio(med, a, b)
        goal = ""
        if b.endswith("_looped"):
            goal = f"; goal > 1: {'met' if ratio > 1 else 'NOT met'}"
            met &= ratio > 1
        print(f"    tokens/s {label}: {ratio:.3f} (rounds {', '.join(f'{r:.3f}' for r in rounds)}){goal}")
    print("    experts module alone, rows spread evenly over the experts, forward + backward (8 x 256 tokens):")
    for label, grouped, looped in result["kernel"]:
        print(f"      {label:26s} grouped {grouped * 1e3:7.1f} ms, looped {looped * 1e3:7.1f} ms: "
              f"looped / grouped time {looped / grouped:.3f}")
    return met


# --------------------------------------------------------------------------------------------------
# (b) expert-parallel bytes


EP_LAYOUTS = {  # name -> (ranks, overrides); dp_shard fills the ranks, ep borrows from it
    "ep2": (2, ["parallel.ep=2"]),
    "ep4": (4, ["parallel.ep=4"]),
    "ep2_dp4": (4, ["parallel.ep=2"]),
}


def ep_overrides(args: argparse.Namespace) -> list[str]:
    return [f"model={args.ep_model}", "training.seq_len=128", "training.global_batch_size=8",
            "training.micro_batch_size=2", f"training.steps={args.ep_steps}", "training.num_threads=1",
            "logging.log_interval=1", *COMMON]


def ep_run(name: str, args: argparse.Namespace, tmp: Path) -> tuple[list[dict], list[dict]]:
    ranks, extra = EP_LAYOUTS[name]
    out, run_dir = tmp / f"{name}-out", tmp / f"{name}-run"
    cmd = [*torchrun(ranks, "benchmarks.moe_worker"), "--out", str(out), *ep_overrides(args), *extra,
           f"run.dir={run_dir}"]
    run(cmd, 1, f"worker {name}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)], read_metrics(run_dir)


def ep_expected(records: list[dict], ep: int, n_experts: int, top_k: int, dim: int, calls_per_step: int,
                tokens_per_call: int) -> dict[int, list[dict[str, float]]]:
    """Per rank and step: the routing formula, rows on the wire and the uniform expectation (docstring).
    ep groups are consecutive ranks (`parallel.mesh.build_expert_mesh` with tp = pp = 1); ep-local
    rank i holds experts [i E/ep, (i+1) E/ep) (dim-0 shards)."""
    per = n_experts // ep
    routing = [r["routing"] for r in records]
    out: dict[int, list[dict[str, float]]] = {}
    for rank in range(len(records)):
        group = range(rank - rank % ep, rank - rank % ep + ep)
        mine = range((rank % ep) * per, (rank % ep + 1) * per)
        steps = []
        for step in range(len(routing[rank]) // calls_per_step):
            formula = wire = 0.0
            for call in range(step * calls_per_step, (step + 1) * calls_per_step):
                counts = {s: routing[s][call] for s in group}
                routed = sum(counts[rank])
                kept = sum(counts[rank][e] for e in mine)
                received = sum(counts[s][e] for s in group for e in mine)
                formula += (ep - 1) / ep * (8 * n_experts + 2 * (routed + received) * dim * 4)
                wire += (ep - 1) / ep * 8 * n_experts + 2 * ((routed - kept) + (received - kept)) * dim * 4
            uniform = calls_per_step * (ep - 1) / ep * (8 * n_experts + 4 * top_k * tokens_per_call * dim * 4)
            steps.append({"formula": formula, "wire": wire, "uniform": uniform})
        out[rank] = steps
    return out


def ep_bytes(args: argparse.Namespace, tmp: Path) -> bool:
    from titan.models.moe import is_moe_layer

    cfg = compose(ep_overrides(args))
    m, t = cfg.model, cfg.training
    n_moe = sum(is_moe_layer(m.moe, i) for i in range(m.n_layers))
    tokens_per_call = t.micro_batch_size * t.seq_len
    print(f"\n(b) expert-parallel bytes per rank and step ({args.ep_model}: dim {m.dim}, {m.moe.n_experts} experts, "
          f"top {m.moe.top_k}, {n_moe} MoE layers; seq {t.seq_len}, global batch {t.global_batch_size}, micro batch "
          f"{t.micro_batch_size}, {args.ep_steps} steps), MB = 1e6 bytes; the ratios' range is over the steps")
    print(f"{'layout':8s} {'rank':>4s} {'counted MB':>10s} {'routing MB':>10s} {'counted/rtg':>13s}  {'goal':7s} "
          f"{'on wire MB':>10s} {'counted/wire':>13s} {'uniform MB':>10s} {'counted/uniform':>15s}")
    met = True
    for name, (ranks, extra) in EP_LAYOUTS.items():
        ep = int(extra[0].split("=")[1])
        dp = ranks  # dp_shard fills the world (tp = pp = cp = 1)
        calls = (t.global_batch_size // dp // t.micro_batch_size) * n_moe
        began = time.perf_counter()
        records, rows = ep_run(name, args, tmp)
        expected = ep_expected(records, ep, m.moe.n_experts, m.moe.top_k, m.dim, calls, tokens_per_call)
        for rec in records:
            counted = [c.get("comm_gb/ep", 0.0) * 1e9 for c in rec["counted"]]
            exp = expected[rec["rank"]]
            ratios = [c / e["formula"] for c, e in zip(counted, exp)]
            wire = [c / e["wire"] for c, e in zip(counted, exp)]
            uniform = [c / e["uniform"] for c, e in zip(counted, exp)]
            ok = len(counted) == len(exp) and all(abs(r - 1) <= args.tolerance for r in wire)
            met &= ok

            def span(values: list[float]) -> str:
                return f"{min(values):.4f}-{max(values):.4f}" if len(values) > 1 else f"{values[0]:.4f}"

            print(f"{name:8s} {rec['rank']:4d} {counted[-1] / MB:10.4f} {exp[-1]['formula'] / MB:10.4f} "
                  f"{span(ratios):>13s}  {'met' if ok else 'NOT met':7s} {exp[-1]['wire'] / MB:10.4f} "
                  f"{span(wire):>13s} {exp[-1]['uniform'] / MB:10.4f} {span(uniform):>15s}", flush=True)
        logged = [r.get("comm_gb/ep") for r in rows]
        same = logged == [c.get("comm_gb/ep") for c in records[0]["counted"]]
        met &= same
        dropped = sum(r.get("moe/tokens_dropped", 0) for r in rows)
        print(f"{'':8s} metrics.jsonl comm_gb/ep (rank 0) equals the worker's rank-0 count on every step: "
              f"{'yes' if same else 'NO'}; tokens dropped {dropped}; {time.perf_counter() - began:.0f}s", flush=True)
    return met


# --------------------------------------------------------------------------------------------------
# (c) load balance


def balance_run(rate: float, args: argparse.Namespace, tmp: Path) -> dict:
    run_dir = tmp / f"balance-{rate}"
    cmd = [sys.executable, "-m", "recipes.pretrain", "model=moe_small", f"model.moe.bias_update_rate={rate}",
           f"training.steps={args.balance_steps}", f"training.num_threads={args.threads}", "logging.log_interval=1",
           f"run.dir={run_dir}", *COMMON]
    wall = run(cmd, args.threads, f"balance rate={rate}")
    rows = read_metrics(run_dir)
    tail = rows[-args.balance_window:]
    layers = sorted(k for k in rows[-1] if k.startswith("moe/load_max_mean/layer_"))
    window = [statistics.mean(r["moe/load_max_mean"] for r in rows[i - args.balance_window:i])
              for i in range(args.balance_window, len(rows) + 1)]
    first = next((i + args.balance_window for i, v in enumerate(window) if v <= args.balance_goal), None)
    return {"rate": rate, "end": statistics.mean(r["moe/load_max_mean"] for r in tail),
            "layers": {k.rsplit("_", 1)[1]: statistics.mean(r[k] for r in tail) for k in layers},
            "loss": statistics.mean(r["loss"] for r in tail), "first": first, "wall": wall,
            "last50": statistics.mean(r["moe/load_max_mean"] for r in rows[-50:]),
            "at": {s: rows[s - 1]["moe/load_max_mean"] for s in (1, 50, 100, 150) if s <= len(rows)}}


def print_balance_row(r: dict, goal: float) -> None:
    layers = " ".join(f"{v:.2f}" for v in r["layers"].values())
    at = " ".join(f"{v:.2f}" for v in r["at"].values())
    print(f"{r['rate']:>7g} {r['end']:8.3f} {r['last50']:8.3f} {layers:>16s} {at:>22s} "
          f"{str(r['first'] or '-'):>12s} {r['loss']:8.4f} "
          f"{r['wall']:5.0f}s  {'met' if r['end'] <= goal else 'NOT met'}", flush=True)


def load_balance(args: argparse.Namespace, tmp: Path) -> bool:
    print(f"\n(c) load balance: moe_small, {args.balance_steps} steps, seq 256, global batch 16, one process x "
          f"{args.threads} threads; moe/load_max_mean averaged over the last {args.balance_window} steps "
          f"(goal <= {args.balance_goal} at the default rate {args.rates[0]:g})")
    print(f"{'rate':>7s} {'end':>8s} {'last 50':>8s} {'end per layer':>16s} {'at step 1/50/100/150':>22s} "
          f"{'first <= goal':>12s} "
          f"{'end loss':>8s} {'wall':>6s}  goal")
    results = []
    for rate in args.rates:
        results.append(balance_run(rate, args, tmp))
        print_balance_row(results[-1], args.balance_goal)
    met = results[0]["end"] <= args.balance_goal
    if not met:
        for rate in args.fallback_rates:
            results.append(balance_run(rate, args, tmp))
            print_balance_row(results[-1], args.balance_goal)
    meeting = [f"{r['rate']:g}" for r in results if r["end"] <= args.balance_goal]
    print(f"    rates that meet <= {args.balance_goal}: {', '.join(meeting) or 'none'}")
    return met


# --------------------------------------------------------------------------------------------------
# (d) peak memory, ep1 vs ep2


def memory_overrides(args: argparse.Namespace, ep: int) -> list[str]:
    return ["model=moe_small", f"model.moe.n_experts={args.memory_experts}", f"parallel.ep={ep}",
            "training.seq_len=64", "training.global_batch_size=2", "training.micro_batch_size=1",
            "training.steps=3", "training.num_threads=1", *COMMON]


def memory_theory(args: argparse.Namespace) -> dict[str, float]:
    """Bytes of the parts the theory counts (module docstring), for 2 ranks."""
    from titan.models import build_model
    from titan.models.moe import is_moe_layer

    cfg = compose(memory_overrides(args, 1))
    m = cfg.model
    shapes = {name: p.shape for name, p in build_model(m).named_parameters()}
    local = sum(math.ceil(s[0] / 2) * math.prod(s[1:]) * 4 for s in shapes.values())  # dim-0 chunks over 2
    first = next(i for i in range(m.n_layers) if is_moe_layer(m.moe, i))
    block = {n: s for n, s in shapes.items() if n.startswith(f"layers.{first}.")}
    full = sum(math.prod(s) * 4 for s in block.values())
    experts = sum(math.prod(s) * 4 for n, s in block.items() if ".moe.experts." in n)
    return {"L": local, "B": full, "B_dense": full - experts, "X": experts / 2,
            "ep1": 4 * local + 4 * full, "ep2": 4 * local + 4 * (full - experts) + 2 * (experts / 2)}


def memory(args: argparse.Namespace, tmp: Path) -> None:
    th = memory_theory(args)
    print(f"\n(d) peak memory per rank, 2 ranks, FSDP over 2, moe_small with {args.memory_experts} experts (seq 64, "
          f"micro batch 1, 3 steps), MemTracker (as benchmarks/memory_worker.py), MB = 1e6 bytes")
    print(f"    theory parts: L (local shard bytes) {th['L'] / MB:.2f}; B (MoE block, all experts) {th['B'] / MB:.2f}; "
          f"B' (without experts) {th['B_dense'] / MB:.2f}; X (E/2 experts) {th['X'] / MB:.2f}")
    print(f"{'ep':>3s} {'measured':>9s} {'param':>7s} {'grad':>6s} {'optim':>6s} {'act':>6s} {'temp':>6s} "
          f"{'local':>7s} {'theory':>7s} {'ratio':>6s} {'RSS peak':>9s} {'ranks':>15s}")
    peaks, rss = {}, {}
    for ep in (1, 2):
        out = tmp / f"mem-ep{ep}"
        run([*torchrun(2, "benchmarks.moe_worker"), "--memory", "--out", str(out), *memory_overrides(args, ep)], 1,
            f"memory ep={ep}")
        recs = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
        top = max(recs, key=lambda r: r["tracker_peak"]["Total"])
        p = top["tracker_peak"]
        peaks[ep], rss[ep] = p["Total"], max(r["rss_peak_delta_bytes"] for r in recs)
        local = max(r["local_bytes"] for r in recs)
        per_rank = " / ".join(f"{r['tracker_peak']['Total'] / MB:.1f}" for r in recs)
        print(f"{ep:3d} {p['Total'] / MB:9.2f} {p['Parameter'] / MB:7.2f} {p['Gradient'] / MB:6.2f} "
              f"{p['Optstate'] / MB:6.2f} {p['Activation'] / MB:6.2f} {p['Temp'] / MB:6.2f} {local / MB:7.2f} "
              f"{th[f'ep{ep}'] / MB:7.2f} {p['Total'] / th[f'ep{ep}']:6.3f} {rss[ep] / MB:9.1f} {per_rank:>15s}",
              flush=True)
    print(f"    ep2 / ep1 peak: measured {peaks[2] / peaks[1]:.3f}, theory {th['ep2'] / th['ep1']:.3f}; "
          f"RSS peak {rss[2] / rss[1]:.3f}; no goal")


# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sections", nargs="+", default=["a", "b", "c", "d"], choices=["a", "b", "c", "d"])
    parser.add_argument("--steps", type=int, default=5, help="(a): timed steps per contender and round")
    parser.add_argument("--warmup", type=int, default=1, help="(a): untimed steps before them")
    parser.add_argument("--rounds", type=int, default=3, help="(a): alternating rounds")
    parser.add_argument("--threads", type=int, default=2, help="(a), (c): torch threads")
    parser.add_argument("--busy-threshold", type=float, default=0.25,
                        help="(a): redo a timed block during which other processes kept more cores than this busy")
    parser.add_argument("--retries", type=int, default=3, help="(a): redos of a busy block")
    parser.add_argument("--busy-wait", type=float, default=10.0, help="(a): seconds to wait before a redo")
    parser.add_argument("--seq-len", type=int, default=256, help="(a): training.seq_len (the recipe's default)")
    parser.add_argument("--fine", type=int, nargs=3, default=[32, 8, 64], metavar=("E", "K", "H"),
                        help="(a): the finer shape: experts, top_k, hidden")
    parser.add_argument("--kernel-shapes", type=lambda v: tuple(int(x) for x in v.split(":")), nargs="+",
                        default=[(8, 2, 256), (32, 8, 64), (64, 8, 32)], metavar="E:K:H",
                        help="(a): shapes of the experts-alone comparison")
    parser.add_argument("--kernel-reps", type=int, default=8, help="(a): repetitions of the experts-alone comparison")
    parser.add_argument("--ep-model", default="moe_debug", help="(b): model config")
    parser.add_argument("--ep-steps", type=int, default=2, help="(b): logged steps per layout")
    parser.add_argument("--tolerance", type=float, default=0.05, help="(b): |counted / routing formula - 1| <= this")
    parser.add_argument("--balance-steps", type=int, default=200)
    parser.add_argument("--balance-window", type=int, default=10, help="(c): last steps averaged")
    parser.add_argument("--rates", type=float, nargs="+", default=[0.001, 0.0],
                        help="(c): bias_update_rate values; the first is the default the goal applies to")
    parser.add_argument("--fallback-rates", type=float, nargs="*", default=[0.01],
                        help="(c): run as well when the first rate misses the goal")
    parser.add_argument("--balance-goal", type=float, default=1.2)
    parser.add_argument("--memory-experts", type=int, default=32, help="(d): experts per MoE layer")
    args = parser.parse_args(argv)

    print(f"moe: sections {' '.join(args.sections)}, fp32, {os.cpu_count()} CPUs", flush=True)
    began, goals = time.perf_counter(), {}
    with tempfile.TemporaryDirectory(prefix="titan-moe-") as tmp:
        if "b" in args.sections:
            goals["(b) bytes"] = ep_bytes(args, Path(tmp))
        if "d" in args.sections:
            memory(args, Path(tmp))
        if "a" in args.sections:
            goals["(a) grouped faster"] = print_throughput(throughput(args))
        if "c" in args.sections:
            goals["(c) balance"] = load_balance(args, Path(tmp))
    print("\ngoals: " + "; ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in goals.items()))
    print(f"total wall time {time.perf_counter() - began:.0f}s")


if __name__ == "__main__":
    main()
