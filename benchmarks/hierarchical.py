"""Flat FSDP vs hierarchical data parallelism across two simulated hosts with a capped link.

    python -m benchmarks.hierarchical [--rate-mbit 500] [--steps 6] [--short-steps 2]
                                      [--layouts flat,hpz,hsdp] [--model-args "..."]

Two hosts (network namespaces joined by a veth link, each host's uplink capped with `tc tbf`,
`launch/simcluster.py`), two ranks each, one `python -m launch` agent per host (gloo, fp32, one
thread per rank). Each layout trains the same model twice, `--short-steps` and `--steps` steps; the
difference of the hosts' link byte counters over the difference of steps is the inter-host traffic
of one step (start-up, rendezvous and the first steps cancel out). Step time is the median over the
long run's steps after the first, from `metrics.jsonl`.

Layouts (4 ranks: hosts {0, 1} and {2, 3}):
- flat: FSDP over all 4 ranks (`--no-hierarchical`, dp_shard=4);
- hpz: flat FSDP with the secondary partition inside a host (`parallel.reshard_after_forward=2`,
  ZeRO++ hpZ): the backward all-gather stays on the host;
- hsdp: `parallel.hierarchical=true` (the launcher's default across nodes): replicate across hosts,
  shard within (2 x 2).

Closed form, bytes one host sends to the other per step (one micro-batch per rank), with `sh_k(u)`
the padded fp32 shard of FSDP unit `u` over k ranks, units as the planner lists them (`titan/planner/parts.py`)
(embedding, blocks, head, root; `R` = those gathered again in backward: the embedding and every
block but the last). A ring over ranks 0-1-2-3 crosses the link once in each direction, so each
host sends what one ring edge carries:
- all-gather over n: `(n-1) sh_n` per unit;
- reduce-scatter over n: gloo runs it as an all-reduce of the full gradient (checked on this link: a
  reduce-scatter of S bytes over 4 ranks sends 1.5 S per host, the same as an all-reduce), so
  `2 (n-1) sh_n` per unit (a ring reduce-scatter, as NCCL's, would be `(n-1) sh_n`);
- flat = forward all-gather of every unit + backward all-gather of the units in R + reduce-scatter
  of every unit;
- hpz = flat without the backward all-gather (it runs inside the host);
- hsdp = the all-reduce of each gradient shard between the two hosts, by both local ranks:
  `2 x 2 (r-1)/r sh_2` per unit with r = 2 (all-gathers and reduce-scatters stay inside a host).
TCP/IP headers (jumbo frames, MTU 9000) and acknowledgements add about 1% to what is measured.

Bounds (with a capped link): each layout also runs on an uncapped cluster (`compute`: the step with
the link out of the way), and `link` = the measured bytes per host per step over the cap. A step that
exposes all of its cross-host traffic takes about compute + link; one that hides it behind backward,
max(compute, link). The step time is printed against both.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.planner import plan_of
from launch.simcluster import SimCluster, unavailable
from titan.planner.facts import model_facts
from titan.planner.parts import rank_parts, shard_elements

REPO = Path(__file__).resolve().parents[1]
MODEL_ARGS = ("model=debug model.dim=512 model.n_layers=4 model.n_heads=8 model.n_kv_heads=4 "
              "model.ffn_hidden_dim=1536 model.vocab_size=512")
LAYOUTS = {
    "flat": ["--no-hierarchical", "parallel.dp_shard=-1"],
    "hpz": ["--no-hierarchical", "parallel.dp_shard=-1", "parallel.reshard_after_forward=2"],
    "hsdp": ["--hierarchical"],
}


def fsdp_shard_bytes(args: argparse.Namespace, n: int) -> tuple[int, int]:
    """(every unit's, the backward-regathered units') padded fp32 shard bytes over n ranks, from the
    planner's FSDP units (`titan.planner.parts`)."""
    plan = plan_of([*args.model_args.split(), f"parallel.dp_shard={n}", f"training.global_batch_size={n}",
                    "training.micro_batch_size=1"], n)
    parts = rank_parts(model_facts(plan.layout.cfg.model), plan.layout, 0)
    return 4 * shard_elements(parts.units, 1, 1, n), 4 * shard_elements(parts.regathered(), 1, 1, n)


def inter_host_bytes(layout: str, args: argparse.Namespace, ranks_per_host: int = 2, hosts: int = 2) -> float:
    """Closed-form bytes one host sends to the other per step (see the module docstring)."""
    n = ranks_per_host * hosts
    every, regathered = fsdp_shard_bytes(args, n)
    reduce_scatter = 2 * (n - 1) * every
    if layout == "flat":
        return (n - 1) * (every + regathered) + reduce_scatter
    if layout == "hpz":
        return (n - 1) * every + reduce_scatter
    return ranks_per_host * 2 * (hosts - 1) / hosts * fsdp_shard_bytes(args, ranks_per_host)[0]


def run_job(cluster: SimCluster, layout: str, steps: int, args: argparse.Namespace, run_dir: Path) -> tuple[list[int], list[dict]]:
    """One training job on both hosts; returns the bytes each host sent and the metrics rows."""
    endpoint = f"{cluster.hosts[0].addr}:29450"
    recipe = [*args.model_args.split(), f"training.steps={steps}", f"training.seq_len={args.seq_len}",
              f"training.global_batch_size={args.global_batch}", "training.micro_batch_size=1",
              "training.num_threads=1", "logging.log_interval=1", "eval.interval=0", "checkpoint.enabled=false",
              "logging.progress_bar=false", "lr.warmup_steps=0", "parallel.timeout_s=600"]
    before = cluster.tx_bytes()
    procs = []
    for host in cluster.hosts:
        argv = [sys.executable, "-m", "launch", "--nnodes", "2", "--nproc-per-node", "2", "--node-rank",
                str(host.index), "--rdzv-endpoint", endpoint, "--iface", host.iface, "--run-dir", str(run_dir),
                *LAYOUTS[layout], *recipe]
        log = (run_dir.parent / f"{run_dir.name}-host{host.index}.log").open("w")
        procs.append(subprocess.Popen(host.command(argv), cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                      env={**os.environ, "WANDB_MODE": "disabled"}, start_new_session=True))
    try:
        for proc in procs:
            if proc.wait(timeout=1800):
                raise SystemExit(f"{layout} ({steps} steps) failed: see {run_dir.parent}/{run_dir.name}-host*.log")
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    sent = [after - start for after, start in zip(cluster.tx_bytes(), before)]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return sent, rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate-mbit", type=float, default=500.0, help="uplink cap of each host (0: none)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--short-steps", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--layouts", default="flat,hpz,hsdp")
    parser.add_argument("--model-args", default=MODEL_ARGS)
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args(argv)
    reason = unavailable()
    if reason:
        print(f"skipped: this benchmark needs a simulated cluster, and {reason}.")
        return
    params = model_facts(plan_of([*args.model_args.split(), "training.micro_batch_size=1"], 1).layout.cfg.model).params()
    print(f"model: {params / 1e6:.1f}M parameters ({params * 4 / 1e6:.1f} MB fp32); 2 hosts x 2 ranks; "
          f"uplink {f'{args.rate_mbit:g} Mbit/s' if args.rate_mbit else 'uncapped'} per host; global batch {args.global_batch} x seq {args.seq_len}", flush=True)
    layouts = args.layouts.split(",")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        measure(layouts, args, Path(tmp), results)
        if args.rate_mbit:
            bounds(layouts, args, Path(tmp), results)
    if "flat" in results:
        for layout in layouts:
            if layout != "flat":
                print(f"speed-up of {layout} over flat FSDP: {results['flat']['step_s'] / results[layout]['step_s']:.2f}x; "
                      f"bytes {results['flat']['formula'] / results[layout]['formula']:.2f}x fewer (formula)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def median_step_s(rows: list[dict], args: argparse.Namespace) -> float:
    """The median step time after the first step."""
    return statistics.median(args.global_batch * args.seq_len / row["tokens_per_s"] for row in rows[1:])


def bounds(layouts: list[str], args: argparse.Namespace, tmp: Path, results: dict) -> None:
    """Each layout's step time against compute + link and max(compute, link): compute is its step on
    an uncapped cluster, link its measured bytes per host over the cap."""
    with SimCluster(2, rate_mbit=None, name="tfree") as free:
        for layout in layouts:
            _, rows = run_job(free, layout, args.steps, args, tmp / f"{layout}-free")
            r = results[layout]
            r["compute_s"] = median_step_s(rows, args)
            r["link_s"] = statistics.mean(r["bytes_per_host"]) * 8 / (args.rate_mbit * 1e6)
            serial, overlapped = r["compute_s"] + r["link_s"], max(r["compute_s"], r["link_s"])
            print(f"{layout:5s}: step {r['step_s']:.3f} s; compute (uncapped link) {r['compute_s']:.3f} s, "
                  f"link {r['link_s']:.3f} s; step / (compute + link) {r['step_s'] / serial:.3f}, "
                  f"step / max(compute, link) {r['step_s'] / overlapped:.3f}", flush=True)


def measure(layouts: list[str], args: argparse.Namespace, tmp: Path, results: dict) -> None:
    """Bytes per host per step and step time of each layout on the capped cluster."""
    with SimCluster(2, rate_mbit=args.rate_mbit or None, name="tbench") as cluster:
        for layout in layouts:
            short, _ = run_job(cluster, layout, args.short_steps, args, tmp / f"{layout}-short")
            long, rows = run_job(cluster, layout, args.steps, args, tmp / f"{layout}-long")
            per_step = [(b - a) / (args.steps - args.short_steps) for a, b in zip(short, long)]
            step_s = median_step_s(rows, args)
            formula = inter_host_bytes(layout, args)
            results[layout] = {"bytes_per_host": per_step, "formula": formula, "step_s": step_s,
                               "ratio": statistics.mean(per_step) / formula, "loss": rows[-1]["loss"]}
            print(f"{layout:5s}: {statistics.mean(per_step) / 1e6:8.2f} MB/step per host (hosts "
                  f"{per_step[0] / 1e6:.2f}, {per_step[1] / 1e6:.2f}); formula {formula / 1e6:8.2f} MB; "
                  f"measured/formula {results[layout]['ratio']:.3f}; step {step_s:.3f} s; "
                  f"final loss {rows[-1]['loss']:.5f}", flush=True)


if __name__ == "__main__":
    main()
