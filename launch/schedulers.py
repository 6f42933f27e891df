"""Scheduler files made from a launch description: a SLURM sbatch script (one task per node,
`srun torchrun` with c10d rendezvous at the allocation's first node) and a Kubeflow PyTorchJob
manifest with an elastic policy (the operator supplies the rendezvous endpoint)."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, replace

import yaml

from launch.spec import DEFAULT_PORT, LaunchSpec
from launch.torchrun import torchrun_args

HEAD_PLACEHOLDER, JOB_ID_PLACEHOLDER = "@@HEAD_NODE@@", "@@SLURM_JOB_ID@@"


@dataclass
class SlurmOptions:
    job_name: str = "titan"
    partition: str | None = None
    account: str | None = None
    time: str | None = None  # e.g. 24:00:00
    gpus_per_node: int = 0
    cpus_per_node: int | None = None
    port: int = DEFAULT_PORT


@dataclass
class K8sOptions:
    name: str = "titan"
    image: str = "titan-pretrain:latest"
    namespace: str | None = None
    gpus_per_node: int = 0
    cpus_per_node: int | None = None
    run_volume_claim: str | None = None  # a ReadWriteMany claim mounted at the run dir's parent


def slurm_script(spec: LaunchSpec, options: SlurmOptions) -> str:
    """An sbatch script: each node's task runs the same torchrun; c10d elects node ranks, the
    allocation's first node hosts the rendezvous, the job id names it."""
    on_cluster = replace(spec, rdzv_endpoint=f"{HEAD_PLACEHOLDER}:{options.port}", rdzv_id=JOB_ID_PLACEHOLDER,
                         node_rank=None, local_addr=None, iface=None)
    line = shlex.join(["torchrun", *torchrun_args(on_cluster)])
    line = line.replace(HEAD_PLACEHOLDER, "${head_node}").replace(JOB_ID_PLACEHOLDER, "${SLURM_JOB_ID}")
    nodes = spec.nnodes.replace(":", "-")
    header = [f"--job-name={options.job_name}", f"--nodes={nodes}", "--ntasks-per-node=1"]
    if spec.run_dir:
        header.append(f"--output={spec.run_dir}/slurm-%j.out")
    for key, value in (("partition", options.partition), ("account", options.account), ("time", options.time),
                       ("cpus-per-task", options.cpus_per_node)):
        if value:
            header.append(f"--{key}={value}")
    if options.gpus_per_node:
        header.append(f"--gpus-per-node={options.gpus_per_node}")
    threads = (str(spec.threads_per_rank) if spec.threads_per_rank else
               f"$(( SLURM_CPUS_ON_NODE >= {spec.nproc_per_node} ? SLURM_CPUS_ON_NODE / {spec.nproc_per_node} : 1 ))")
    lines = ["#!/bin/bash", *(f"#SBATCH {item}" for item in header), "", "set -euo pipefail",
             'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)  # reads all: no SIGPIPE under pipefail',
             f"export OMP_NUM_THREADS={threads}"]
    if spec.iface:
        lines += [f"export GLOO_SOCKET_IFNAME={shlex.quote(spec.iface)}",
                  f"export NCCL_SOCKET_IFNAME={shlex.quote(spec.iface)}"]
    if spec.run_dir:
        lines.append(f"mkdir -p {shlex.quote(spec.run_dir)}")
    # Elastic jobs keep going when a node fails; fixed-size ones stop every node at the first failure.
    kill = 0 if spec.min_nodes < spec.max_nodes else 1
    lines.append(f"srun --nodes={nodes} --ntasks-per-node=1 --kill-on-bad-exit={kill} {line}")
    return "\n".join(lines) + "\n"


def k8s_manifest(spec: LaunchSpec, options: K8sOptions) -> str:
    """A PyTorchJob (kubeflow.org/v1) whose workers run torchrun; the elastic policy carries the
    node range and restart budget, the operator the rendezvous endpoint (PET_* variables)."""
    on_cluster = replace(spec, rdzv_endpoint=None, node_rank=None, local_addr=None, iface=None)
    command = ["torchrun", f"--nproc-per-node={spec.nproc_per_node}", "-m", on_cluster.module,
               *on_cluster.recipe_args()]
    env = [{"name": "PET_RDZV_ID", "value": spec.rdzv_id or options.name}]
    if spec.threads_per_rank or options.cpus_per_node:  # otherwise each rank splits its pod's cores itself
        env.append({"name": "OMP_NUM_THREADS", "value": str(spec.threads(options.cpus_per_node))})
    if spec.iface:
        env += [{"name": "GLOO_SOCKET_IFNAME", "value": spec.iface}, {"name": "NCCL_SOCKET_IFNAME", "value": spec.iface}]
    container: dict = {"name": "pytorch", "image": options.image, "command": command, "env": env}
    limits = {}
    if options.gpus_per_node:
        limits["nvidia.com/gpu"] = options.gpus_per_node
    if options.cpus_per_node:
        limits["cpu"] = options.cpus_per_node
    if limits:
        container["resources"] = {"limits": limits}
    pod: dict = {"containers": [container]}
    if options.run_volume_claim and spec.run_dir:
        mount = spec.run_dir.rstrip("/").rsplit("/", 1)[0] or "/"
        container["volumeMounts"] = [{"name": "runs", "mountPath": mount}]
        pod["volumes"] = [{"name": "runs", "persistentVolumeClaim": {"claimName": options.run_volume_claim}}]
    metadata = {"name": options.name, **({"namespace": options.namespace} if options.namespace else {})}
    job = {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": metadata,
        "spec": {
            "elasticPolicy": {"rdzvBackend": "c10d", "minReplicas": spec.min_nodes, "maxReplicas": spec.max_nodes,
                              "maxRestarts": spec.max_restarts},
            "nprocPerNode": str(spec.nproc_per_node),
            "pytorchReplicaSpecs": {
                "Worker": {"replicas": spec.max_nodes, "restartPolicy": "OnFailure", "template": {"spec": pod}},
            },
        },
    }
    return yaml.safe_dump(job, sort_keys=False)
