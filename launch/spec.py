"""What to launch, in one description that the torchrun line, the sbatch script and the PyTorchJob
manifest are all made from; filled in from the command line and the scheduler's environment, and
checked before anything starts."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_PORT = 29500
RECIPE_PREFIX = "recipes."


class LaunchError(Exception):
    """A launch option that cannot work: names the option, the problem and the fix (exit code 2)."""

    def __init__(self, option: str, problem: str, fix: str):
        super().__init__(f"{option}: {problem} Fix: {fix}")
        self.option, self.problem, self.fix = option, problem, fix


@dataclass
class LaunchSpec:
    """One training job across `nnodes` nodes of `nproc_per_node` ranks each."""

    recipe: str = "pretrain"
    overrides: list[str] = field(default_factory=list)
    nnodes: str = "1"  # "N" or "MIN:MAX" (elastic)
    nproc_per_node: int = 1
    node_rank: int | None = None  # decides which node hosts the rendezvous store (node 0)
    rdzv_endpoint: str | None = None  # host[:port] of node 0
    rdzv_id: str | None = None  # shared by all nodes; derived from the run dir when unset
    max_restarts: int = 0
    iface: str | None = None  # network interface between nodes
    local_addr: str | None = None  # this node's address (default: the interface's)
    run_dir: str | None = None
    threads_per_rank: int | None = None
    join_timeout_s: int = 600
    last_call_timeout_s: int = 30  # elastic: wait this long for more nodes once the minimum joined
    hierarchical: bool | None = None  # None: true for more than one node unless the overrides set a layout

    @property
    def min_nodes(self) -> int:
        return _node_range(self.nnodes)[0]

    @property
    def max_nodes(self) -> int:
        return _node_range(self.nnodes)[1]

    @property
    def module(self) -> str:
        return self.recipe if "." in self.recipe else RECIPE_PREFIX + self.recipe

    @property
    def endpoint(self) -> str:
        host, _, port = (self.rdzv_endpoint or "").partition(":")
        return f"{host}:{port or DEFAULT_PORT}"

    @property
    def rendezvous_id(self) -> str:
        """The same on every node without coordination: the run dir names the job."""
        if self.rdzv_id:
            return self.rdzv_id
        digest = hashlib.sha1(str(Path(self.run_dir or "").resolve()).encode()).hexdigest()[:12]
        return f"titan-{digest}"

    def recipe_args(self) -> list[str]:
        """The recipe's Hydra overrides plus what the launch adds: the shared run dir and, across
        nodes, the hierarchical layout."""
        args = list(self.overrides)
        if self.run_dir is not None and override_value(args, "run.dir") is None:
            args.append(f"run.dir={self.run_dir}")
        if self.use_hierarchical():
            args.append("parallel.hierarchical=true")
        return args

    def use_hierarchical(self) -> bool:
        """Whether the launch adds `parallel.hierarchical=true`."""
        if override_value(self.overrides, "parallel.hierarchical") is not None:
            return False
        if self.hierarchical is not None:
            return self.hierarchical
        sets_layout = any(override_value(self.overrides, f"parallel.{key}") is not None
                          for key in ("dp_replicate", "dp_shard"))
        return self.max_nodes > 1 and not sets_layout

    def threads(self, cpu_count: int | None = None) -> int:
        """Intra-op threads per rank: the node's cores split between its ranks."""
        if self.threads_per_rank:
            return self.threads_per_rank
        return max(1, (cpu_count or os.cpu_count() or 1) // self.nproc_per_node)


def _node_range(nnodes: str) -> tuple[int, int]:
    low, _, high = nnodes.partition(":")
    return int(low), int(high or low)


def override_value(overrides: list[str], key: str) -> str | None:
    """The value a Hydra override list gives `key` (`key=v`, `+key=v`, `++key=v`), or None."""
    for item in overrides:
        name, sep, value = item.lstrip("+").partition("=")
        if sep and name == key:
            return value
    return None


def check(spec: LaunchSpec, on_scheduler: bool = False) -> None:
    """Refuse what cannot work, before any process starts (a scheduler supplies the endpoint)."""
    try:
        low, high = _node_range(spec.nnodes)
    except ValueError:
        raise LaunchError("--nnodes", f"{spec.nnodes!r} is not N or MIN:MAX.", "pass e.g. --nnodes 2 or --nnodes 1:4.")
    if not 1 <= low <= high:
        raise LaunchError("--nnodes", f"{spec.nnodes!r} needs 1 <= MIN <= MAX.", "pass e.g. --nnodes 1:4.")
    if spec.nproc_per_node < 1:
        raise LaunchError("--nproc-per-node", f"must be >= 1, got {spec.nproc_per_node}.",
                          "pass the number of ranks (GPUs) on each node.")
    if spec.max_restarts < 0:
        raise LaunchError("--max-restarts", f"must be >= 0, got {spec.max_restarts}.", "pass 0 to never restart.")
    if spec.node_rank is not None and not 0 <= spec.node_rank < high:
        raise LaunchError("--node-rank", f"{spec.node_rank} is outside 0..{high - 1} for --nnodes {spec.nnodes}.",
                          "number the nodes from 0; node 0 hosts the rendezvous.")
    given_dir = override_value(spec.overrides, "run.dir")
    if spec.run_dir is not None and given_dir is not None and given_dir != spec.run_dir:
        raise LaunchError("--run-dir", f"the overrides set run.dir={given_dir} but --run-dir is {spec.run_dir}.",
                          "give the run folder once, with --run-dir.")
    if high > 1:
        if spec.run_dir is None and given_dir is None:
            raise LaunchError("--run-dir", "a job across nodes needs one run folder that every node uses (on a "
                              "shared file system), and it also names the rendezvous.",
                              "pass --run-dir /shared/path/run-name (the same on every node).")
        if not spec.rdzv_endpoint and not on_scheduler:
            raise LaunchError("--rdzv-endpoint", "a job across nodes needs the address of the node that hosts "
                              "the rendezvous.", "pass --rdzv-endpoint <node 0 host>[:port] on every node.")
