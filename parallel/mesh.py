"""Parallel degrees, validated up front, and the process-group setup they need."""

from __future__ import annotations

import gc
import os
import socket
import sys
import zlib
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, NoReturn

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from parallel import flight_recorder
from parallel.errors import LayoutError


@dataclass
class ParallelDims:
    """Degrees of each parallel dimension; `dp_shard=-1` takes whatever ranks are left."""

    dp_replicate: int
    dp_shard: int
    tp: int
    pp: int
    world_size: int
    cp: int = 1
    ep: int = 1  # expert parallel: borrows its ranks from dp_shard x cp

    def __post_init__(self) -> None:
        for key in ("dp_replicate", "tp", "pp", "cp", "ep"):
            if getattr(self, key) < 1:
                raise LayoutError(f"parallel.{key}", f"must be >= 1, got {getattr(self, key)}.",
                                  f"set parallel.{key}=1 or more.")
        fixed = self.dp_replicate * self.cp * self.tp * self.pp
        if self.dp_shard == -1:
            if self.world_size % fixed:
                raise LayoutError("parallel.dp_shard",
                                  f"world size {self.world_size} is not a multiple of dp_replicate x cp x tp x pp "
                                  f"= {fixed}.", "launch a multiple of that many ranks or change the degrees.")
            self.dp_shard = self.world_size // fixed
        if self.dp_shard < 1:
            raise LayoutError("parallel.dp_shard", f"must be -1 or >= 1, got {self.dp_shard}.",
                              "set parallel.dp_shard=-1 to use the ranks left.")
        product = fixed * self.dp_shard
        if product != self.world_size:
            raise LayoutError("parallel.dp_shard",
                              f"dp_replicate x dp_shard x cp x tp x pp = {self.dp_replicate} x {self.dp_shard} x "
                              f"{self.cp} x {self.tp} x {self.pp} = {product}, but the world size is {self.world_size}.",
                              "make the product equal the number of ranks (dp_shard=-1 fills it in).")
        if (self.dp_shard * self.cp) % self.ep:
            raise LayoutError("parallel.ep", f"ep={self.ep} does not divide dp_shard x cp = {self.dp_shard} x {self.cp} "
                              f"= {self.dp_shard * self.cp}: expert parallelism borrows its ranks from the sharded "
                              "data-parallel and context-parallel ranks.",
                              "choose parallel.ep dividing dp_shard x cp (launch more ranks, or lower parallel.ep).")

    @property
    def dp_size(self) -> int:
        """Data-parallel degree: ranks that take different sequences of a global batch."""
        return self.dp_replicate * self.dp_shard

    @property
    def expert_shard(self) -> int:
        """Ranks that shard each expert's weights (FSDP): what is left of dp_shard x cp after ep."""
        return self.dp_shard * self.cp // self.ep

    @property
    def fsdp_size(self) -> int:
        """Ranks that share (and shard) one copy of the weights' gradients: data parallel x context parallel."""
        return self.dp_size * self.cp


@dataclass
class DistEnv:
    """This process's place in the job, read from torchrun's environment."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device
    node_rank: int = 0

    @property
    def is_writer(self) -> bool:
        return self.rank == 0


def read_env() -> DistEnv:
    """Rank and device from torchrun's variables (a plain `python` run is rank 0 of 1)."""
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    return DistEnv(rank, local_rank, world_size, local_world_size, device, int(os.environ.get("GROUP_RANK", "0")))


def init_process_group(env: DistEnv, timeout_s: float = 300.0) -> None:
    """NCCL on GPUs, gloo on CPU; a timeout so a dead peer ends the job instead of hanging it."""
    if env.world_size == 1 or dist.is_initialized():
        return
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
    backend = "nccl" if env.device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=timeout_s)
    store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
    # After an elastic restart the agent's store still holds the dead attempt's addresses: give
    # each attempt its own key space so the new workers never dial a dead peer.
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend, store=dist.PrefixStore(f"titan/attempt_{attempt}", store), rank=rank,
                            world_size=world_size, timeout=timeout,
                            device_id=env.device if backend == "nccl" else None)
    flight_recorder.install()  # the last collectives of each rank, for the hang dump


MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


def hierarchical_dims(env: DistEnv, tp: int, pp: int, cp: int = 1) -> tuple[int, int]:
    """(dp_replicate, dp_shard) from the node topology: replicate across nodes, shard inside one.
    Needs equal nodes whose ranks are consecutive (torchrun numbers them so)."""
    if env.world_size % env.local_world_size or env.rank // env.local_world_size != env.node_rank:
        raise LayoutError("parallel.hierarchical", f"rank {env.rank} (local rank {env.local_rank} of "
                          f"{env.local_world_size} on node {env.node_rank}) is not in a block of equal nodes.",
                          "launch the same number of ranks on every node (--nproc-per-node), or set the "
                          "degrees yourself with parallel.hierarchical=false.")
    if tp * cp > env.local_world_size or env.local_world_size % (tp * cp):
        raise LayoutError("parallel.tp", f"tp x cp = {tp} x {cp} does not fit in a node of {env.local_world_size} "
                          "ranks; with parallel.hierarchical=true tensor and context parallelism stay inside a node.",
                          f"choose parallel.tp x parallel.cp dividing {env.local_world_size}.")
    dp_shard = env.local_world_size // (tp * cp)
    rest = env.world_size // env.local_world_size
    if rest % pp:
        raise LayoutError("parallel.pp", f"pp={pp} does not divide the {rest} node groups.",
                          "choose parallel.pp dividing the number of nodes.")
    return rest // pp, dp_shard


def build_mesh(dims: ParallelDims, device_type: str) -> tuple[DeviceMesh, DeviceMesh]:
    """One mesh `(pp, dp_replicate, dp_shard, cp, tp)`, tp innermost (consecutive ranks, same node),
    and its flattened `dp` dimension (ranks taking different sequences). With cp > 1 it also flattens
    `dp_shard_cp` (what FSDP shards over) and `dp_cp` (what the loss is summed over)."""
    mesh = init_device_mesh(device_type, (dims.pp, dims.dp_replicate, dims.dp_shard, dims.cp, dims.tp),
                            mesh_dim_names=MESH_DIMS)
    dp_mesh = mesh["dp_replicate", "dp_shard"]._flatten("dp")
    if dims.cp > 1:
        mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
        mesh["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp")
    flight_recorder.name_mesh(mesh, dp_mesh)
    return mesh, dp_mesh


EXPERT_MESH_DIMS = ("pp", "dp_replicate", "expert_shard", "ep", "tp")


def build_expert_mesh(mesh: DeviceMesh, dims: ParallelDims) -> DeviceMesh:
    """The same ranks seen as `(pp, dp_replicate, expert_shard, ep, tp)`: dp_shard x cp (flattened in
    that order) split into what shards the experts' weights and what splits the experts (innermost,
    so an expert-parallel group is consecutive ranks where it can be). Its own process groups; the
    ep groups never reuse the default group, so `comm_gb/ep` counts the token all-to-alls apart."""
    ranks = mesh.mesh.reshape(dims.pp, dims.dp_replicate, dims.expert_shard, dims.ep, dims.tp)
    backends = tuple((dist.get_backend(), None) if name == "ep" else (None, None) for name in EXPERT_MESH_DIMS)
    expert_mesh = DeviceMesh(mesh.device_type, ranks, mesh_dim_names=EXPERT_MESH_DIMS, backend_override=backends)
    expert_mesh["expert_shard", "ep"]._flatten("expert_shard_ep")  # one reduction for the experts' grad norm
    flight_recorder.name_mesh(mesh, None, expert_mesh)
    return expert_mesh


def expert_dp_mesh(expert_mesh: DeviceMesh, dims: ParallelDims) -> DeviceMesh:
    """What FSDP shards (and HSDP replicates) the experts' weights over."""
    return expert_mesh["dp_replicate", "expert_shard"] if dims.dp_replicate > 1 else expert_mesh["expert_shard"]


def describe_mesh(mesh: DeviceMesh, env: DistEnv, expert_mesh: DeviceMesh | None = None) -> dict:
    """This rank's place in the mesh: its index along each dimension and the global ranks of the
    group it belongs to along each dimension (and its expert-parallel groups when ep > 1)."""
    record = {"rank": env.rank, "node": env.node_rank, "local_rank": env.local_rank, "host": socket.gethostname(),
              "shape": dict(zip(MESH_DIMS, mesh.mesh.shape)), "coordinate": dict(zip(MESH_DIMS, mesh.get_coordinate())),
              "groups": _groups(mesh, MESH_DIMS)}
    if expert_mesh is not None:
        record["expert_groups"] = {name: ranks for name, ranks in _groups(expert_mesh, EXPERT_MESH_DIMS).items()
                                   if name in ("expert_shard", "ep")}
    return record


def _groups(mesh: DeviceMesh, names: tuple[str, ...]) -> dict[str, list[int]]:
    """Dimension -> the global ranks of this rank's group along it."""
    coordinate = mesh.get_coordinate()
    groups = {}
    for position, name in enumerate(names):
        index = [*coordinate]
        index[position] = slice(None)
        groups[name] = mesh.mesh[tuple(index)].tolist()
    return groups


def dp_mesh_for_fsdp(mesh: DeviceMesh, dims: ParallelDims) -> DeviceMesh:
    """1-D `dp_shard` (x cp) mesh for FSDP, 2-D `(dp_replicate, dp_shard (x cp))` for HSDP/DDP: context
    parallel ranks hold the same weights, so FSDP shards over them too."""
    shard = "dp_shard_cp" if dims.cp > 1 else "dp_shard"
    return mesh["dp_replicate", shard] if dims.dp_replicate > 1 else mesh[shard]


def loss_group(mesh: DeviceMesh, dp_mesh: DeviceMesh, dims: ParallelDims) -> dist.ProcessGroup:
    """The group a step's loss parts are summed over: data-parallel ranks, and context-parallel ranks
    (each holds part of every sequence)."""
    return mesh["dp_cp"].get_group() if dims.cp > 1 else dp_mesh.get_group()


def shutdown(wait_for_peers: bool = True) -> None:
    """Tear the process groups down, after waiting for every rank unless the job is failing (a rank
    that tears down while a peer still talks to it can abort the peer)."""
    if dist.is_initialized():
        if wait_for_peers:
            dist.barrier()
        dist.destroy_process_group()


def report_once(text: str) -> None:
    """Print `text` on stderr from whichever rank of the job reports it first.

    Ranks often detect the same error (a config error, a corrupt checkpoint) at slightly different
    times, and torchrun stops the slower ones as soon as one exits: printing only on rank 0 can lose
    the message. Each rank instead counts the text in torchrun's own store, which outlives the
    workers; the first to count it prints. Outside torchrun every rank prints.
    """
    if _first_to_report(text):
        print(text, file=sys.stderr, flush=True)


def _first_to_report(text: str) -> bool:
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return True
    key = f"titan/report/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{zlib.crc32(text.encode())}"
    try:
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=timedelta(seconds=5))
        return store.add(key, 1) == 1
    except (KeyError, ValueError, RuntimeError):  # no store to ask: better twice than never
        return True


PEER_FAILURE_EXIT = 3
# gloo's words for a peer that is gone or hung; "pair closure" follows a timeout inside an asynchronous
# collective (e.g. FSDP's prefetched all-gathers), reported by the next wait on that connection.
PEER_FAILURE_SIGNS = ("Timed out", "timed out", "Connection reset", "Connection closed", "Broken pipe",
                      "Application timeout caused pair closure")


def is_peer_failure(exc: BaseException) -> bool:
    """A collective failed because another rank is gone or hung (not a bug on this rank)."""
    return isinstance(exc, dist.DistError) or any(sign in str(exc) for sign in PEER_FAILURE_SIGNS)


def run_main(main: Callable[[list[str]], None], argv: list[str]) -> NoReturn:
    """Run a distributed entry point and leave cleanly.

    After a normal end the process groups are torn down once every rank is done (a config error
    raised as SystemExit tears down without waiting). A distributed process then exits without
    interpreter finalization: gloo objects still referenced by meshes and DTensors would otherwise
    be destroyed during finalization, which can abort the process after its work is done.
    """
    distributed = False
    try:
        main(argv)
        code = 0
    except (dist.DistError, RuntimeError) as exc:
        if not (dist.is_initialized() and is_peer_failure(exc)):
            raise
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        dumped = flight_recorder.write_dump("a collective failed: a peer rank died or stopped responding",
                                            [f"error: {detail}"], exc)
        where = (f"This rank's stacks and last collectives: {dumped} (each rank that could wrote its "
                 f"rank-<N>.txt there). " if dumped else "")
        print(f"error: a peer rank died or stopped responding (a collective failed or waited longer than "
              f"parallel.timeout_s), so this rank stops. Under torchrun --max-restarts the job restarts and "
              f"resumes from the last checkpoint by itself; otherwise rerun the same command. {where}"
              f"Detail: {detail}", file=sys.stderr, flush=True)
        distributed, code = True, PEER_FAILURE_EXIT
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        distributed = dist.is_initialized()
        shutdown(wait_for_peers=False)
    else:
        gc.collect()
        distributed = dist.is_initialized()
        shutdown()
    if distributed:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
