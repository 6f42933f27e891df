"""Flight recorder: the last collectives of this rank, and the hang dump that shows them.

`install()` (called once the process group exists) wraps the Python entry points every collective
of a run goes through: the ``torch.distributed`` collectives (FSDP2 calls ``all_gather_single``,
``reduce_scatter_single`` and ``all_reduce``; our code ``all_reduce``, ``all_gather_into_tensor``,
``all_to_all_single``, ``barrier``...), the functional collectives DTensor and context parallelism
call (``_functional_collectives.all_gather_single``, ``all_reduce``, ``reduce_scatter_single``,
``all_to_all_single_autograd``...), DTensor's ``shard_dim_alltoall`` and the pipeline schedules'
point-to-point batches. Each call appends one entry (sequence number, time, name, process group,
tensor sizes, training step) to a ring of the last `CAPACITY`; no dispatch mode, nothing per tensor
op, so a step pays a few microseconds per collective. A call made inside another recorded call (the
deprecated `all_gather_into_tensor` calling `all_gather_single`) is recorded once, as the outer one;
under `torch.compile` tracing the wrappers step aside. Not seen: collectives issued from C++ only
(the backward of the functional collectives' autograd variants).

`write_dump()` appends to `<run.dir>/hang/rank-<N>.txt` (after `set_dump_dir`): a title, every
thread's Python stack, and the recorded collectives with their mesh dimension (`name_mesh` names the
process groups), the newest last, marked when they never returned (an asynchronous one: when its
Work, still held by the caller, has not completed). `parallel.mesh.run_main` writes
one when a peer dies or stops answering; the hang watchdog (`titan.watchdog`) when a step overruns.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import itertools
import os
import socket
import sys
import threading
import time
import traceback
import weakref
from collections import deque
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

CAPACITY = 256  # collectives kept per rank

# module -> entry points recorded there (missing ones are skipped: the list spans torch versions)
TARGETS = {
    "torch.distributed.distributed_c10d": (
        "all_reduce", "all_gather_single", "all_gather_into_tensor", "_all_gather_base", "all_gather",
        "all_gather_coalesced", "reduce_scatter_single", "reduce_scatter_tensor", "_reduce_scatter_base",
        "reduce_scatter", "all_to_all_single", "all_to_all", "broadcast", "reduce", "gather", "scatter", "barrier",
        "monitored_barrier", "send", "recv", "batch_isend_irecv", "all_gather_object", "broadcast_object_list",
        "gather_object", "scatter_object_list", "all_reduce_coalesced"),
    "torch.distributed._functional_collectives": (
        "all_reduce", "all_gather_single", "all_gather_tensor", "all_gather_tensor_autograd",
        "all_gather_single_autograd", "reduce_scatter_single", "reduce_scatter_single_autograd",
        "reduce_scatter_tensor", "reduce_scatter_tensor_autograd", "all_to_all_single", "all_to_all_single_autograd",
        "broadcast", "all_reduce_coalesced", "all_gather_into_tensor_coalesced", "reduce_scatter_tensor_coalesced",
        "all_gather_single_coalesced", "reduce_scatter_single_coalesced", "all_gather_inplace", "permute_tensor"),
    "torch.distributed.tensor._collective_utils": ("shard_dim_alltoall",),
    "torch.distributed.pipelining.schedules": ("_batch_p2p",),
}
# Where other modules may hold their own reference to an entry point (`from ... import all_reduce`).
SCANNED = ("torch.distributed", "torch.nn.parallel", "parallel.", "titan.", "recipes.", "benchmarks.")

_ring: deque[list] = deque(maxlen=CAPACITY)
_seq = itertools.count(1)
_where: tuple[int, bool] = (0, False)  # (training step, inside it)
_local = threading.local()  # .busy: inside a recorded call
_names: dict[str, str] = {}  # process-group name -> mesh dimension
_patched: list[tuple[Any, str, Callable]] = []  # (module, attribute, original), to uninstall
_dump_dir: Path | None = None
_dump_lock = threading.Lock()
_compiling = torch.compiler.is_compiling

# entry: [seq, monotonic time, name, group, sizes, where, async, returned, work]
# (work: a weak reference to an asynchronous call's Work, to tell at dump time whether it completed)
SEQ, TIME, NAME, GROUP, SIZES, WHERE, ASYNC, RETURNED, WORK = range(9)


def set_step(step: int, inside: bool) -> None:
    """The training step the next collectives belong to (`inside`: between its begin and end)."""
    global _where
    _where = (step, inside)


def name_groups(names: dict[str, str]) -> None:
    """Process-group name -> mesh dimension, for the dump; names already given are kept."""
    for group, dim in names.items():
        _names.setdefault(group, dim)


def name_mesh(mesh, dp_mesh=None, expert_mesh=None) -> None:
    """Name the process groups of a mesh after its dimensions (as `comm_gb/<dim>` does)."""
    from parallel.comm_stats import mesh_group_names

    name_groups(mesh_group_names(mesh, dp_mesh, expert_mesh))


def set_dump_dir(run_dir: str | os.PathLike) -> None:
    """Hang dumps go to `<run_dir>/hang/rank-<N>.txt` (the folder is made on the first dump)."""
    global _dump_dir
    _dump_dir = Path(run_dir)


def _rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def dump_path() -> Path | None:
    """This rank's hang file, or None before `set_dump_dir`."""
    return None if _dump_dir is None else _dump_dir / "hang" / f"rank-{_rank()}.txt"


# ---------------------------------------------------------------------------------------------- recording

def _tensor_sizes(args: tuple, kwargs: dict | None = None) -> list:
    """Shape and dtype of the tensors (and tensor lists) among the first arguments and the keywords."""
    sizes = []
    for arg in (*args[:3], *kwargs.values()) if kwargs else args[:3]:
        if isinstance(arg, torch.Tensor):
            sizes.append((tuple(arg.shape), arg.dtype))
        elif isinstance(arg, (list, tuple)) and arg and isinstance(arg[0], torch.Tensor):
            sizes.append((len(arg), tuple(arg[0].shape), arg[0].dtype))
    return sizes


def _by_parameter(fn: Callable) -> Callable[[tuple, dict], tuple[Any, list]]:
    """(group, sizes) of a call, the group found by its parameter name."""
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        params = []
    index = params.index("group") if "group" in params else None

    def describe(args: tuple, kwargs: dict) -> tuple[Any, list]:
        group = kwargs.get("group", args[index] if index is not None and len(args) > index else None)
        return group, _tensor_sizes(args, kwargs)
    return describe


def _p2p(args: tuple, kwargs: dict) -> tuple[Any, list] | None:
    ops = args[0] if args else kwargs.get("p2p_op_list", kwargs.get("p2p_ops", []))
    if not ops:
        return None
    sizes = [("send" if "send" in getattr(op.op, "__name__", "") else "recv", getattr(op, "peer", "?"),
              tuple(op.tensor.shape), op.tensor.dtype) for op in ops]
    return ops[0].group, sizes


def _mesh_dim(args: tuple, kwargs: dict) -> tuple[Any, list]:
    """shard_dim_alltoall(input, gather_dim, shard_dim, mesh, mesh_dim)."""
    mesh = args[3] if len(args) > 3 else kwargs.get("mesh")
    mesh_dim = args[4] if len(args) > 4 else kwargs.get("mesh_dim")
    return (mesh, mesh_dim), _tensor_sizes(args[:1])


def _wrap(fn: Callable, name: str, describe: Callable, always_async: bool) -> Callable:
    @functools.wraps(fn)
    def recorded(*args, **kwargs):
        if getattr(_local, "busy", False) or _compiling():
            return fn(*args, **kwargs)
        described = describe(args, kwargs)
        if described is None:  # nothing to send (an empty point-to-point batch)
            return fn(*args, **kwargs)
        group, sizes = described
        entry = [next(_seq), time.monotonic(), name, group, sizes, _where,
                 always_async or bool(kwargs.get("async_op")), False, None]
        _ring.append(entry)
        _local.busy = True
        try:
            out = fn(*args, **kwargs)
        finally:
            _local.busy = False
        entry[RETURNED] = True
        if isinstance(out, dist.Work):
            entry[WORK] = weakref.ref(out)
        return out
    recorded.__recorded__ = fn  # type: ignore[attr-defined]
    return recorded


def install() -> None:
    """Start recording (idempotent): wrap the entry points where they are defined and wherever a
    loaded module holds its own reference to them."""
    if _patched:
        return
    replacements: dict[int, Callable] = {}
    for module_name, names in TARGETS.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        short = {"torch.distributed._functional_collectives": "funcol.",
                 "torch.distributed.tensor._collective_utils": "dtensor.",
                 "torch.distributed.pipelining.schedules": "pipeline."}.get(module_name, "")
        for name in names:
            fn = getattr(module, name, None)
            if not callable(fn) or hasattr(fn, "__recorded__") or id(fn) in replacements:
                continue
            describe = (_p2p if name in ("batch_isend_irecv", "_batch_p2p") else
                        _mesh_dim if name == "shard_dim_alltoall" else _by_parameter(fn))
            label = "p2p" if name == "_batch_p2p" else short + name.lstrip("_")
            replacements[id(fn)] = _wrap(fn, label, describe, always_async=short in ("funcol.", "dtensor.", "pipeline.")
                                         or name == "batch_isend_irecv")
    for module_name, module in list(sys.modules.items()):
        if module is None or not (module_name.startswith(SCANNED) or module_name in ("parallel", "titan")):
            continue
        for attr, value in list(vars(module).items()):
            wrapper = replacements.get(id(value))
            if wrapper is not None:
                setattr(module, attr, wrapper)
                _patched.append((module, attr, value))


def uninstall() -> None:
    """Put the original entry points back (tests)."""
    while _patched:
        module, attr, original = _patched.pop()
        setattr(module, attr, original)


def recorded() -> list[list]:
    """The recorded entries, oldest first (a copy)."""
    return list(_ring)


def clear() -> None:
    _ring.clear()


# ---------------------------------------------------------------------------------------------- the dump

def _group_label(group: Any) -> str:
    """`dp_shard (ranks [0, 1])`; a group no mesh names reads `group <name> (ranks ...)`."""
    try:
        from torch.distributed import _functional_collectives as funcol
        from torch.distributed.distributed_c10d import _get_default_group, _resolve_process_group

        if group is None or group is dist.GroupMember.WORLD:
            pg = _get_default_group()
        elif isinstance(group, dist.ProcessGroup):
            pg = group
        elif isinstance(group, str):
            pg = _resolve_process_group(group)
        else:
            pg = _resolve_process_group(funcol._resolve_group_name(group))
        ranks = dist.get_process_group_ranks(pg)
        shown = str(ranks) if len(ranks) <= 8 else f"[{', '.join(map(str, ranks[:8]))}, ... {len(ranks)} ranks]"
        dim = _names.get(pg.group_name)
        return f"{dim} (ranks {shown})" if dim else f"group {pg.group_name} (ranks {shown})"
    except Exception as exc:  # a dump must never fail on a group it cannot name
        return f"group ? ({type(exc).__name__})"


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _size_text(size: tuple) -> str:
    if len(size) == 2:
        return f"{_dtype(size[1])}{list(size[0])}"
    if len(size) == 3:
        return f"{size[0]} x {_dtype(size[2])}{list(size[1])}"
    kind, peer, shape, dtype = size
    return f"{kind} {'to' if kind == 'send' else 'from'} {peer} {_dtype(dtype)}{list(shape)}"


def format_collectives(entries: list[list] | None = None, now: float | None = None) -> list[str]:
    """One line per recorded collective, oldest first."""
    entries = recorded() if entries is None else entries
    now = time.monotonic() if now is None else now
    lines = []
    for entry in entries:
        step, inside = entry[WHERE]
        where = f"step {step}" if inside else (f"after step {step}" if step else "before step 1")
        state = (_async_state(entry) if entry[ASYNC] else "returned") if entry[RETURNED] else "DID NOT RETURN"
        sizes = ", ".join(_size_text(s) for s in entry[SIZES]) or "-"
        lines.append(f"  #{entry[SEQ]:<6} {now - entry[TIME]:8.2f}s ago  {where:<14} {entry[NAME]:<28} "
                     f"{_group_label(entry[GROUP])}  {sizes}  {state}")
    return lines


def _async_state(entry: list) -> str:
    """An asynchronous call: its Work still held and not completed (what a hung rank waits for),
    ended (done or failed), or released by its caller (waited for, as FSDP and our code do)."""
    work = entry[WORK]() if entry[WORK] is not None else None
    if work is None:
        return "issued (async)"
    return "issued (async), ended" if work.is_completed() else "issued (async), NOT COMPLETED"


def format_stacks() -> list[str]:
    """Every thread's Python stack, most recent call last."""
    threads = {t.ident: t for t in threading.enumerate()}
    me = threading.get_ident()
    lines = []
    for ident, frame in sys._current_frames().items():
        thread = threads.get(ident)
        label = (f"{thread.name}{' (daemon)' if thread.daemon else ''}, native id {thread.native_id}"
                 if thread is not None else "unnamed")
        lines.append(f"--- thread {label}, id {ident}{' (writing this dump)' if ident == me else ''}")
        lines.extend(line.rstrip("\n") for line in traceback.format_stack(frame))
    return lines


def render(title: str, details: list[str] = (), exc: BaseException | None = None, full: bool = True) -> str:
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    lines = [f"===== {when}: rank {_rank()} (host {socket.gethostname()}, pid {os.getpid()}, attempt {attempt}): "
             f"{title}", *details]
    if exc is not None:
        lines += ["", "where it failed:", *(line.rstrip("\n") for line in traceback.format_exception(exc))]
    if not full:
        return "\n".join([*lines, "", ""])
    entries = recorded()
    lines += ["", f"last {len(entries)} collectives of this rank (oldest first; newest last):",
              *(format_collectives(entries) or ["  (none recorded)"])]
    lines += ["", "Python stacks of every thread:", *format_stacks(), "", ""]
    return "\n".join(lines)


def write_dump(title: str, details: list[str] = (), exc: BaseException | None = None,
               full: bool = True) -> Path | None:
    """Append a section to this rank's hang file (`full`: with the collectives and every thread's
    stack; else the title and details only); its path, or None when there is no dump folder or it
    could not be written (never raises: it runs on the way out of a failing job)."""
    path = dump_path()
    if path is None:
        return None
    try:
        text = render(title, list(details), exc, full)
        with _dump_lock:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a", encoding="utf-8") as f:
                f.write(text)
        return path
    except Exception as error:  # a full disk, an unreadable frame: say so and go on
        print(f"warning: could not write the hang dump {path}: {error}", file=sys.stderr, flush=True)
        return None
