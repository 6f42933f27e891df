"""One rank of `benchmarks.context_parallel` (a) and (c): build the recipe's model for `parallel.cp`,
run one micro-batch's forward and backward through the real runner and loss, and write what autograd
saved and what the collectives moved to `<out>/rank<r>.json`.

    python -m torch.distributed.run --standalone --nproc-per-node CP -m benchmarks.context_parallel_worker \
        --out DIR [recipe overrides ...]

Activation memory = the bytes of the distinct storages (deduplicated by ``data_ptr``) that autograd
saves for backward during the forward (``torch.autograd.graph.saved_tensors_hooks``: every pack call
until the first unpack, which is backward starting), excluding storages of the model's parameters
(sharded and FSDP's unsharded ones; an unsharded parameter is a view of its all-gather output, so
that buffer is excluded with it) and of its buffers (the rotary tables), each checked when the
tensor is saved. A saved view counts its whole storage. Everything else counts: the input and
output of every op that keeps them, the gathered keys and values, the attention masks, the
logits and log-softmax of the loss.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from benchmarks.worker_setup import setup_worker
from parallel.mesh import shutdown
from titan.build import build_parallel_model
from titan.data.loader import train_loader


def storage_ptr(t: torch.Tensor) -> int:
    return (t.to_local() if isinstance(t, DTensor) else t).untyped_storage().data_ptr()


class SavedTensors:
    """Distinct storages autograd saves in one forward, split into activations and model state."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.recording = True
        self.activations: dict[int, tuple[int, tuple[int, ...], str]] = {}  # ptr -> (bytes, shape, dtype)
        self.state: dict[int, int] = {}  # parameter / buffer storages: ptr -> bytes

    def _state_ptrs(self) -> set[int]:
        """Storages of the parameters registered now (FSDP swaps in the unsharded ones) and buffers."""
        tensors = [*self.model.parameters(), *self.model.buffers()]
        return {storage_ptr(t) for t in tensors}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        if self.recording:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr in self._state_ptrs():
                self.state[ptr] = storage.nbytes()
            elif ptr not in self.activations:
                self.activations[ptr] = (storage.nbytes(), tuple(t.shape), str(t.dtype).removeprefix("torch."))
        return t

    def unpack(self, t: torch.Tensor) -> torch.Tensor:
        self.recording = False
        return t

    def summary(self) -> dict:
        groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for nbytes, shape, dtype in self.activations.values():
            group = groups[f"{dtype} {tuple(shape)}"]
            group[0] += 1
            group[1] += nbytes
        return {"activation_bytes": sum(v[0] for v in self.activations.values()),
                "storages": len(self.activations), "state_bytes": sum(self.state.values()),
                "groups": sorted(([k, *v] for k, v in groups.items()), key=lambda g: -g[2])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for rank<r>.json")
    args, overrides = parser.parse_known_args()

    cfg, env, dims, data, layout = setup_worker(overrides)
    model, par = build_parallel_model(cfg, layout, env.device, data.eot_id)
    batch = next(iter(train_loader(data, cfg.data, cfg.training, layout.dp_rank, dims.dp_size)))

    saved = SavedTensors(model)
    counter = par.comm_counter() if par.comm_counter is not None else None
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack), counter or nullcontext():
        par.runner.train([batch])
    result = {"rank": env.rank, "cp": dims.cp, **saved.summary(),
              "comm_bytes": {dim: gb * 1e9 for dim, gb in counter.by_dim_gb().items()} if counter else {}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{env.rank}.json").write_text(json.dumps(result, indent=1))
    if env.world_size > 1:
        shutdown()


if __name__ == "__main__":
    main()
