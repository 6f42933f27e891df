"""Communication bytes per step and mesh dimension, as the trainer logs them, against closed forms.

    python -m benchmarks.comm [--model small] [--seq-len 128] [--global-batch 8] [--micro-batch 2]
                              [--steps 2] [--layouts fsdp2,fsdp4,...] [--tolerance 0.05]

Each layout runs ``torchrun -m recipes.pretrain`` (gloo, fp32, one thread per rank) with
``logging.log_interval=1``; the numbers are the ``comm_gb/<dim>`` fields of ``metrics.jsonl``
(``parallel/comm_stats.py``: bytes one rank sends per step with ring algorithms; all-gather
``(n-1) x shard``, reduce-scatter ``(n-1)/n x input``, all-reduce ``2 (n-1)/n x input``).

Closed forms, per rank and optimizer step, with ``m`` micro-batches per rank and step, FSDP units as
``benchmarks/fsdp_units.py`` lists them (embedding, each block, head = final norm + output, root;
``R`` = the units gathered again in backward: the embedding and every block but the last), ``sh_k(u)``
= bytes of unit ``u``'s padded shard over ``k`` ranks (``sum ceil(d0 / k) x numel / d0 x 4``):

- FSDP over n (ZeRO-3): ``m (n-1) [sum_u sh_n(u)  (forward all-gather)
  + sum_{u in R} sh_n(u)  (backward all-gather)  + sum_u sh_n(u)  (reduce-scatter)]``.
- ZeRO-2-like (``reshard_after_forward=false``): the same without the backward all-gather.
- hpZ (``reshard_after_forward=k``): forward all-gather and reduce-scatter over n as FSDP; the
  backward all-gather runs inside groups of k: ``m (k-1) sum_{u in R} sh_k(u)``.
  FSDP2 builds those groups itself, so `comm_stats` logs them as ``comm_gb/other``.
- HSDP r x s: ``dp_shard`` = FSDP over s; ``dp_replicate`` = all-reduce of each reduce-scattered
  gradient shard: ``m 2 (r-1)/r sum_u sh_s(u)``.
- TP t with sequence parallelism (Megatron-SP), ``X = micro_batch x seq_len x dim x 4`` bytes of one
  full activation: per block, all-gather before attention and MLP and reduce-scatter after each, in
  forward, and the reverse pair in backward: ``8 (t-1)/t X``; embedding (reduce-scatter forward,
  all-gather backward) and output projection (all-gather forward, reduce-scatter backward):
  ``4 (t-1)/t X``. So ``m (t-1)/t X (8 L + 4)``. The loss-parallel and norm-gradient reductions
  (a few vectors of ``batch x seq`` or ``dim`` floats) are left out, under 0.2% here.
- TP t without sequence parallelism (extra row): Megatron's all-reduce after attention and after the
  MLP in forward, and before each in backward, plus the embedding's forward and the output's backward
  all-reduce: ``m 2 (t-1)/t X (4 L + 2)`` (the same bytes as with sequence parallelism).
- CP c (``parallel.cp``; ``m`` counts micro-batches per data-parallel rank, cp excluded from dp),
  local sequence ``s = seq_len / c``, ``b`` = micro batch, ``kv_dim = n_kv_heads x head_dim``:
  every block all-gathers K and V over the cp group in forward, ``2 (c-1) b s kv_dim 4``, and
  reduce-scatters their gradients in backward, the same bytes; with ``data.document_mask=true`` the
  key positions (int64) and document ids (int32) are all-gathered once per micro-batch and shared
  by the layers, ``(c-1) b s (8 + 4)`` (plain causal CP needs no key positions: each local query
  chunk attends to its key prefix). So ``cp = m [4 L (c-1) b s kv_dim 4 + doc (c-1) b s 12]``.
  FSDP shards over ``dp_shard x c`` ranks (flattened mesh ``dp_shard_cp``): the FSDP form above
  with ``n = dp_shard x c``. `comm_stats` names a group by the innermost dimension with the same
  ranks, so with ``dp_shard = 1`` the FSDP bytes are logged under ``cp`` beside the attention's.
  The loss all-reduce over ``dp_cp`` and the grad-norm all-reduce are scalars (a few bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.fsdp_units import Units, model_units

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Layout:
    ranks: int
    overrides: tuple[str, ...]
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    cp: int = 1
    documents: bool = False  # data.document_mask=true
    reshard: bool | int = True
    sequence_parallel: bool = False
    note: str = ""


LAYOUTS: dict[str, Layout] = {
    "fsdp2": Layout(2, (), dp_shard=2),
    "fsdp4": Layout(4, (), dp_shard=4),
    "hsdp2x2": Layout(4, ("parallel.dp_replicate=2", "parallel.dp_shard=2"), dp_replicate=2, dp_shard=2),
    "zero2": Layout(4, ("parallel.reshard_after_forward=false",), dp_shard=4, reshard=False),
    "hpz": Layout(4, ("parallel.reshard_after_forward=2",), dp_shard=4, reshard=2),
    "tp2_sp": Layout(2, ("parallel.tp=2", "parallel.sequence_parallel=true"), tp=2, sequence_parallel=True),
    "tp2": Layout(2, ("parallel.tp=2", "parallel.sequence_parallel=false"), tp=2, note="extra"),
    "cp2": Layout(2, ("parallel.cp=2",), cp=2),
    "cp2_fsdp2": Layout(4, ("parallel.cp=2", "parallel.dp_shard=2"), dp_shard=2, cp=2),
    "cp2_docs": Layout(2, ("parallel.cp=2", "data.document_mask=true"), cp=2, documents=True),
}


def fsdp_bytes(units: Units, n: int, reshard: bool | int, micro: int, dim: str = "dp_shard") -> dict[str, float]:
    """`dim` (and `other` for hpZ) bytes of FSDP over n ranks."""
    every, regathered = units.shard_bytes(n), units.shard_bytes(n, regathered_only=True)
    out = {dim: micro * (n - 1) * (2 * every + (regathered if reshard is True else 0))}
    if not isinstance(reshard, bool):
        out["other"] = micro * (reshard - 1) * units.shard_bytes(reshard, regathered_only=True)
    return out


def cp_attention_bytes(model, cp: int, micro_batch: int, seq_len: int, documents: bool) -> float:
    """Bytes one rank moves over the cp group for one micro-batch's attention (module docstring)."""
    local = micro_batch * seq_len // cp
    kv_dim = model.n_kv_heads * (model.dim // model.n_heads)
    keys_and_values = 4 * model.n_layers * (cp - 1) * local * kv_dim * 4
    return keys_and_values + ((cp - 1) * local * (8 + 4) if documents else 0)


def expected(layout: Layout, model, units: Units, args: argparse.Namespace) -> dict[str, float]:
    """Closed-form bytes per step and mesh dimension (see the module docstring)."""
    dp = layout.dp_replicate * layout.dp_shard
    micro = args.global_batch // dp // args.micro_batch
    if layout.tp > 1:
        t, x = layout.tp, args.micro_batch * args.seq_len * model.dim * 4
        if layout.sequence_parallel:
            return {"tp": micro * (t - 1) / t * x * (8 * model.n_layers + 4)}
        return {"tp": micro * 2 * (t - 1) / t * x * (4 * model.n_layers + 2)}
    shards = layout.dp_shard * layout.cp
    fsdp_dim = "dp_shard" if layout.cp == 1 else ("cp" if layout.dp_shard == 1 else "dp_shard_cp")
    out = fsdp_bytes(units, shards, layout.reshard, micro, fsdp_dim)
    if layout.cp > 1:
        attention = cp_attention_bytes(model, layout.cp, args.micro_batch, args.seq_len, layout.documents)
        out["cp"] = out.get("cp", 0.0) + micro * attention
    if layout.dp_replicate > 1:
        r = layout.dp_replicate
        every = units.shard_bytes(shards)
        out["dp_replicate"] = micro * 2 * (r - 1) / r * every
    return out


def run_layout(name: str, layout: Layout, args: argparse.Namespace, tmp: Path) -> list[dict]:
    run_dir = tmp / name
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={layout.ranks}",
           "-m", "recipes.pretrain", f"model={args.model}", f"training.steps={args.steps}",
           f"training.seq_len={args.seq_len}", f"training.global_batch_size={args.global_batch}",
           f"training.micro_batch_size={args.micro_batch}", "training.num_threads=1", "logging.log_interval=1",
           "eval.interval=0", "checkpoint.enabled=false", "logging.progress_bar=false", f"run.dir={run_dir}",
           *layout.overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed ({proc.returncode}):\n{' '.join(cmd)}\n{proc.stderr[-4000:]}")
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma list of {', '.join(LAYOUTS)}")
    parser.add_argument("--tolerance", type=float, default=0.05, help="goal: |measured / formula - 1| <= this")
    args = parser.parse_args(argv)
    names = [n for n in args.layouts.split(",") if n]
    unknown = [n for n in names if n not in LAYOUTS]
    if unknown:
        parser.error(f"unknown layouts {unknown}; choose from {list(LAYOUTS)}")

    cfg, units = model_units([f"model={args.model}"])
    model = cfg.model
    print(f"comm: model={args.model} (dim {model.dim}, {model.n_layers} layers, vocab {model.vocab_size}), "
          f"seq_len={args.seq_len}, global batch {args.global_batch}, micro batch {args.micro_batch}, "
          f"{args.steps} steps, fp32, gloo; bytes per rank and step (MB = 1e6 bytes)", flush=True)
    print(f"{'layout':9s} {'ranks':>5s} {'dim':13s} {'measured MB':>12s} {'formula MB':>11s} {'ratio':>7s}  goal")
    began, verdicts = time.perf_counter(), []
    with tempfile.TemporaryDirectory(prefix="titan-comm-") as tmp:
        for name in names:
            layout = LAYOUTS[name]
            rows = run_layout(name, layout, args, Path(tmp))
            want = expected(layout, model, units, args)
            keys = sorted({k.split("/", 1)[1] for r in rows for k in r if k.startswith("comm_gb/")} | set(want))
            for key in keys:
                got = [r.get(f"comm_gb/{key}", 0.0) * 1e9 for r in rows]
                if max(got) - min(got) > 1e-6 * max(max(got), 1.0):
                    print(f"  note: {name} {key} differs between steps: {got}")
                measured, formula = got[-1], want.get(key, 0.0)
                if not formula:  # e.g. the loss all-reduce on the flattened `dp` group: a few bytes
                    print(f"{name:9s} {layout.ranks:5d} {key:13s} {measured / 1e6:12.4f} {'-':>11s} {'-':>7s}  "
                          f"{'scalars only' if measured < 1e3 else 'UNEXPECTED'}", flush=True)
                    continue
                ratio = measured / formula
                ok = abs(ratio - 1) <= args.tolerance
                if layout.note != "extra":
                    verdicts.append(ok)
                print(f"{name:9s} {layout.ranks:5d} {key:13s} {measured / 1e6:12.4f} {formula / 1e6:11.4f} "
                      f"{ratio:7.4f}  {'met' if ok else 'NOT met'}{' (extra row)' if layout.note else ''}", flush=True)
    print(f"goal |measured / formula - 1| <= {args.tolerance:.0%}: {sum(verdicts)}/{len(verdicts)} rows met"
          f"{'' if all(verdicts) else ' (NOT met on all rows)'}")
    print(f"total wall time {time.perf_counter() - began:.0f}s")


if __name__ == "__main__":
    main()
