"""The torchrun line for a launch description, and running it in this process (this process is the
node's elastic agent), with the workers' own exit status passed on."""

from __future__ import annotations

import fcntl
import os
import shlex
import signal
import socket
import struct
import sys

from launch.spec import LaunchError, LaunchSpec

SIOCGIFADDR = 0x8915
SIGNAL_EXIT_BASE = 128


def interface_address(iface: str) -> str:
    """The IPv4 address of a network interface, or a LaunchError listing the ones there are."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            packed = fcntl.ioctl(sock.fileno(), SIOCGIFADDR, struct.pack("256s", iface[:15].encode()))
    except OSError:
        names = ", ".join(name for _, name in socket.if_nameindex())
        raise LaunchError("--iface", f"interface {iface!r} has no IPv4 address on this node.",
                          f"pass one of: {names}.") from None
    return socket.inet_ntoa(packed[20:24])


def worker_env(spec: LaunchSpec) -> dict[str, str]:
    """Variables every rank needs and multi-node runs tend to miss."""
    env = {"OMP_NUM_THREADS": str(spec.threads())}
    if spec.iface:
        env["GLOO_SOCKET_IFNAME"] = spec.iface
        env["NCCL_SOCKET_IFNAME"] = spec.iface
    return env


def torchrun_args(spec: LaunchSpec) -> list[str]:
    """torchrun's arguments (without the program name) for this node."""
    args = [f"--nnodes={spec.nnodes}", f"--nproc-per-node={spec.nproc_per_node}",
            f"--max-restarts={spec.max_restarts}"]
    if spec.max_nodes == 1 and not spec.rdzv_endpoint:
        args.append("--standalone")
    else:
        args += ["--rdzv-backend=c10d", f"--rdzv-endpoint={spec.endpoint}", f"--rdzv-id={spec.rendezvous_id}"]
        conf = [f"join_timeout={spec.join_timeout_s}", f"last_call_timeout={spec.last_call_timeout_s}"]
        if spec.node_rank is not None:
            conf.insert(0, f"is_host={str(spec.node_rank == 0).lower()}")
        args.append(f"--rdzv-conf={','.join(conf)}")
        local_addr = spec.local_addr or (interface_address(spec.iface) if spec.iface else None)
        if local_addr:
            args.append(f"--local-addr={local_addr}")
    return [*args, "-m", spec.module, *spec.recipe_args()]


def command_line(spec: LaunchSpec) -> str:
    """The exact command, as a user would type it."""
    env = " ".join(f"{key}={shlex.quote(value)}" for key, value in worker_env(spec).items())
    return f"{env} torchrun {shlex.join(torchrun_args(spec))}"


def run(spec: LaunchSpec) -> int:
    """Run torchrun's elastic agent here; the exit status is the first failed worker's (2 for a config
    error, 3 for a dead peer, 4 for a checkpoint that could not be written, 5 for a non-finite step,
    128 + signal when killed), 0 when every worker succeeded."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import parse_args
    from torch.distributed.run import run as torchrun

    os.environ.update(worker_env(spec))
    try:
        torchrun(parse_args(torchrun_args(spec)))
    except ChildFailedError as failed:
        rank, failure = failed.get_first_failure()
        code = failure.exitcode if failure.exitcode > 0 else SIGNAL_EXIT_BASE - failure.exitcode
        print(f"launch: the job failed: rank {rank} exited with code {failure.exitcode} first "
              f"(its own message is above); exiting with {code}.", file=sys.stderr, flush=True)
        return code
    except RendezvousError as exc:
        print(f"launch: the nodes could not meet at {spec.endpoint} (rendezvous {spec.rendezvous_id}): {exc}. "
              f"Check that every node runs the same --rdzv-endpoint and --run-dir, that node 0 is up, and "
              f"that --iface names the network between the nodes.", file=sys.stderr, flush=True)
        return 1
    except SignalException as stopped:  # Ctrl-C or SIGTERM here: the agent passed it on to the workers
        print(f"launch: stopped by {signal.Signals(stopped.sigval).name}; the workers were asked to save a "
              "checkpoint at their step end and stop (rerun the same command to resume).", file=sys.stderr, flush=True)
        return SIGNAL_EXIT_BASE + stopped.sigval
    return 0
