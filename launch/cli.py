"""`python -m launch [run|slurm|k8s] [options] [recipe overrides]`.

  run (default)  print the torchrun line for this node and run it (`--dry-run`: print only)
  slurm          write an sbatch script for the same job
  k8s            write a Kubeflow PyTorchJob manifest for the same job

Example, two nodes of 8 GPUs (run on each node, node ranks 0 and 1):
  python -m launch --nnodes 2 --nproc-per-node 8 --node-rank 0 --rdzv-endpoint node0:29500 \\
      --iface eth0 --run-dir /shared/runs/exp1 model=1b training.steps=1000
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from launch.schedulers import K8sOptions, SlurmOptions, k8s_manifest, slurm_script
from launch.spec import LaunchError, LaunchSpec, override_value, check
from launch.torchrun import command_line, run

CONFIG_ERROR_EXIT = 2
ACTIONS = ("run", "slurm", "k8s")


def _env_int(*names: str) -> int | None:
    """The first of the scheduler variables that is set, as an int."""
    for name in names:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m launch [run|slurm|k8s]", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    job = parser.add_argument_group("job")
    job.add_argument("--nnodes", default=os.environ.get("SLURM_NNODES", "1"),
                     help="nodes, or MIN:MAX for an elastic job (default: $SLURM_NNODES or 1)")
    job.add_argument("--nproc-per-node", type=int, default=1, help="ranks per node (GPUs per node)")
    job.add_argument("--node-rank", type=int, default=_env_int("SLURM_NODEID", "NODE_RANK"),
                     help="this node's rank; node 0 hosts the rendezvous (default: $SLURM_NODEID or $NODE_RANK)")
    job.add_argument("--rdzv-endpoint", help="host[:port] of node 0, the same on every node")
    job.add_argument("--rdzv-id", help="rendezvous id shared by all nodes (default: derived from the run dir)")
    job.add_argument("--max-restarts", type=int, default=0, help="restart the workers this often after a failure")
    job.add_argument("--iface", help="network interface between nodes (sets GLOO/NCCL_SOCKET_IFNAME and the address)")
    job.add_argument("--local-addr", help="this node's address for the rendezvous (default: --iface's address)")
    job.add_argument("--run-dir", help="the run folder, one for all nodes (becomes run.dir=...)")
    job.add_argument("--threads-per-rank", type=int, help="intra-op threads per rank (default: cores / ranks)")
    job.add_argument("--join-timeout", type=int, default=600, help="seconds to wait for all nodes to join")
    job.add_argument("--last-call-timeout", type=int, default=30,
                     help="elastic jobs: seconds to wait for more nodes once the minimum has joined, at the start "
                          "and at each restart (default: 30, torchrun's)")
    job.add_argument("--hierarchical", action=argparse.BooleanOptionalAction, default=None,
                     help="replicate across nodes, shard within (default: on for more than one node)")
    job.add_argument("--recipe", default="pretrain", help="recipes.<name> or a module path (default: pretrain)")
    job.add_argument("--dry-run", action="store_true", help="print the torchrun line and stop")
    scheduler = parser.add_argument_group("slurm / k8s")
    scheduler.add_argument("--out", help="file to write, - for stdout (default: <run dir>/launch.sbatch or launch.yaml)")
    scheduler.add_argument("--job-name", default="titan", help="SLURM job name / PyTorchJob name")
    scheduler.add_argument("--gpus-per-node", type=int, default=0, help="GPUs to request per node (default: 0)")
    scheduler.add_argument("--cpus-per-node", type=int, help="CPU cores to request per node (default: the scheduler's)")
    scheduler.add_argument("--partition", help="SLURM partition (default: the cluster's)")
    scheduler.add_argument("--account", help="SLURM account to charge (default: yours)")
    scheduler.add_argument("--time", help="SLURM time limit, e.g. 24:00:00")
    scheduler.add_argument("--image", default="titan-pretrain:latest", help="container image (k8s)")
    scheduler.add_argument("--namespace", help="Kubernetes namespace")
    scheduler.add_argument("--run-volume-claim", help="PersistentVolumeClaim holding the run dir (k8s)")
    parser.add_argument("overrides", nargs="*",
                        help="the recipe's Hydra overrides, passed to every rank as they are: key=value, "
                             "+key=value (a new key), group=option, e.g. model=1b training.steps=1000; "
                             "--run-dir adds run.dir=..., and more than one node adds parallel.hierarchical=true "
                             "unless the overrides set the layout. Keys: python -m recipes.pretrain --help")
    return parser


def _spec(args: argparse.Namespace) -> LaunchSpec:
    return LaunchSpec(recipe=args.recipe, overrides=args.overrides, nnodes=str(args.nnodes),
                      nproc_per_node=args.nproc_per_node, node_rank=args.node_rank, rdzv_endpoint=args.rdzv_endpoint,
                      rdzv_id=args.rdzv_id, max_restarts=args.max_restarts, iface=args.iface,
                      local_addr=args.local_addr, run_dir=args.run_dir or override_value(args.overrides, "run.dir"),
                      threads_per_rank=args.threads_per_rank, join_timeout_s=args.join_timeout,
                      last_call_timeout_s=args.last_call_timeout,
                      hierarchical=args.hierarchical)


def _write(text: str, out: str | None, spec: LaunchSpec, default_name: str) -> None:
    path = Path(out) if out and out != "-" else (Path(spec.run_dir) / default_name if spec.run_dir and not out else None)
    if path is None:
        sys.stdout.write(text)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote {path}")


def main(argv: list[str]) -> int:
    action = argv[0] if argv and argv[0] in ACTIONS else "run"
    args = _parser().parse_intermixed_args(argv[1:] if argv and argv[0] in ACTIONS else argv)
    try:
        spec = _spec(args)
        check(spec, on_scheduler=action != "run")
        if action == "slurm":
            options = SlurmOptions(job_name=args.job_name, partition=args.partition, account=args.account,
                                   time=args.time, gpus_per_node=args.gpus_per_node, cpus_per_node=args.cpus_per_node)
            _write(slurm_script(spec, options), args.out, spec, "launch.sbatch")
            return 0
        if action == "k8s":
            options = K8sOptions(name=args.job_name, image=args.image, namespace=args.namespace,
                                 gpus_per_node=args.gpus_per_node, cpus_per_node=args.cpus_per_node,
                                 run_volume_claim=args.run_volume_claim)
            _write(k8s_manifest(spec, options), args.out, spec, "launch.yaml")
            return 0
        print(command_line(spec), flush=True)
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return CONFIG_ERROR_EXIT
    if args.dry_run:
        return 0
    return run(spec)
