"""Checkpoint I/O against raw file I/O, reshaped loads, and the training stall of async saves.

    python -m benchmarks.checkpoint [--ranks 2] [--rounds 7] [--saves 3] [--reshape tp2,ddp2] [--keep 2]
                                    [--save-variants torch-crc-on]
                                    [--phases save,load,reshape,stall] [--seq-len 16] [--threads 1]
                                    [--work-dir DIR] [--model-args "..."] [--json FILE]

One torchrun job (`benchmarks/checkpoint_worker.py`, FSDP over ``--ranks`` ranks, gloo, fp32)
builds the model and AdamW exactly as `recipes/pretrain.py` does, trains a step so the optimizer
state exists, and drives `titan.checkpoint.CheckpointManager`. The default model (80.0M
parameters: 0.96 GB of parameters + AdamW moments) makes checkpoint I/O dominate. Every ratio is
measured in this run; the sides of a comparison take turns, in an order that rotates each round,
and each ratio is the median over rounds (the disk of a VM has slow spells):

1. save: raw write time / `CheckpointManager.save` time (= save bytes/s over raw bytes/s) for the
   same bytes and the same writers: each rank writes its local tensors, padded to the exact size of
   its `.distcp` file, into a new file of its own, fsyncs it (DCP's FileSystemWriter fsyncs each
   file) and deletes the files older than the last ``--keep``, as the manager prunes (the manager
   prunes on a background thread after save() returns, so the ratio without the raw side's
   deletion is shown too). Each side starts after a sync and a page-cache drop. Goal >= 0.7.
   ``--save-variants torch-crc-on`` adds a side, same rounds, that keeps torch.save's CRC-32 of each
   record (the framework's writer turns it off).
   load: raw read time / the resume path's load time (`titan.checkpoint.resume.load_newest_intact`:
   sizes checked, then `CheckpointManager.load`, which checksums the shards on a thread while DCP
   reads them), each rank reading its own `.distcp` file into a preallocated buffer; the page cache
   is dropped before each side (root only: otherwise both read from a warm cache, and the report
   says so). Goal >= 0.7. The load without its checksum, and the checksum alone on a warm cache,
   are shown too.
2. reshape: load time per byte read into another layout (default: TP 2, and DDP 2 = every rank a
   full replica) / the same into the layout that wrote the checkpoint, cold cache: time over the
   bytes each rank reads, since a replicated layout reads every byte on every rank. Goal <= 1.5.
   The plain time ratio and each layout's read speed per rank are shown too.
3. stall: time the training thread spends in checkpoint calls per save, async_save / sync, with the
   recipe's loop (`poll()` every step, `save()` every K steps; async commits happen in `poll()` or
   the final `wait()`, and all count; the async commit runs on a background thread). Goal <= 0.2.
   The `save()` call alone is shown too.

Each timed span is bracketed by barriers (the slowest rank's time). A profile of where the time
goes (get_state_dict, DCP planning / write_data / read_data, fsync, checksums, collectives,
staging copies, pruning) is printed for each part, and so is the CPU other processes used during
each phase (a shared machine makes the CPU-bound parts read high).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL_ARGS = ("model=debug model.dim=1024 model.n_layers=4 model.n_heads=16 model.n_kv_heads=8 "
              "model.ffn_hidden_dim=2816 model.vocab_size=16000")
GB = 1e9


def recipe_overrides(args: argparse.Namespace) -> list[str]:
    return [*args.model_args.split(), f"training.seq_len={args.seq_len}", f"training.global_batch_size={args.ranks}",
            "training.micro_batch_size=1", "training.steps=100000", "eval.interval=0", "logging.progress_bar=false",
            f"training.num_threads={args.threads}", "lr.warmup_steps=1"]


def run_worker(args: argparse.Namespace, out: Path, work: Path) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.ranks}",
           "-m", "benchmarks.checkpoint_worker", "--out", str(out), "--work", str(work),
           "--rounds", str(args.rounds), "--saves", str(args.saves), "--interval", str(args.interval),
           "--reshape", args.reshape, "--phases", args.phases, "--keep", str(args.keep), "--save-variants", args.save_variants,
           *recipe_overrides(args)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "WANDB_MODE": "disabled"}
    print("$ " + " ".join(cmd[1:]), flush=True)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: list[str] = []
    for line in proc.stdout:
        tail = (tail + [line])[-80:]
        if line.startswith("  "):  # the worker's progress lines
            print(line, end="", flush=True)
    if proc.wait() != 0:
        raise SystemExit(f"worker failed ({proc.returncode}):\n{''.join(tail)}")
    return json.loads((out / "results.json").read_text())


def profile_lines(profile: dict[str, float], scale: float = 1.0, skip: tuple[str, ...] = ()) -> list[str]:
    """Nested keys ("a/b/c") as an indented tree, seconds (times `scale`)."""
    lines = []
    for key in sorted(profile):
        if any(key.startswith(s) for s in skip):
            continue
        depth = key.count("/")
        lines.append(f"      {'  ' * depth}{key.rsplit('/', 1)[-1]:<28s}{profile[key] * scale:8.3f} s")
    return lines


def fmt_list(values: list[float]) -> str:
    return " ".join(f"{v:.2f}" for v in values)


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def report_save(r: dict, goal: float) -> tuple[float, bool]:
    s = r["save"]
    distcp = sum(s["distcp_bytes_per_rank"])
    save_mean, raw_mean = statistics.mean(s["save_s"]), statistics.mean(s["raw_write_s"])
    pairs = [w / v for v, w in zip(s["save_s"], s["raw_write_s"])]
    ratio = statistics.median(pairs)  # robust to a round the disk stalled in
    print(f"\n1a. save ({r['layout']}): {distcp / GB:.3f} GB of .distcp files "
          f"({', '.join(f'{b / 1e6:.1f}' for b in s['distcp_bytes_per_rank'])} MB per rank; "
          f"whole folder {s['folder_bytes'] / GB:.3f} GB), {len(s['save_s'])} rounds")
    print(f"    CheckpointManager.save  {fmt_list(s['save_s'])} s  mean {save_mean:.2f} s  {distcp / save_mean / GB:.3f} GB/s")
    print(f"    raw write + fsync       {fmt_list(s['raw_write_s'])} s  mean {raw_mean:.2f} s  {distcp / raw_mean / GB:.3f} GB/s")
    print(f"    save throughput / raw: median of rounds {ratio:.3f} (rounds {fmt_list(pairs)}; of means "
          f"{raw_mean / save_mean:.3f}); goal >= {goal}: {verdict(ratio >= goal)}")
    no_delete = statistics.median((w - d) / v for v, w, d in zip(s["save_s"], s["raw_write_s"], s["raw_delete_s"]))
    print(f"    raw side's deletion of its old files: {fmt_list(s['raw_delete_s'])} s; without it in the baseline "
          f"(the manager prunes after save() returns) the ratio would be {no_delete:.3f}")
    for name, times in s["variants_s"].items():
        v_pairs = [w / v for v, w in zip(times, s["raw_write_s"])]
        print(f"    variant {name:<16s} {fmt_list(times)} s  mean {statistics.mean(times):.2f} s  "
              f"/ raw: median of rounds {statistics.median(v_pairs):.3f}; save / this, median of rounds: "
              f"{statistics.median(a / b for a, b in zip(s['save_s'], times)):.3f}")
    print("    where one save's time goes (mean over rounds, slowest rank per item):")
    print("\n".join(profile_lines(s["save_profile"])))
    for name, prof in s["variant_profiles"].items():
        print(f"    ... with {name}:")
        print("\n".join(profile_lines(prof)))
    return ratio, ratio >= goal


def report_load(r: dict, goal: float) -> tuple[float, bool]:
    s, ld = r["save"], r["load"]
    distcp = sum(s["distcp_bytes_per_rank"])
    resume, noverify, raw = (statistics.mean(ld[k]) for k in ("resume_s", "load_noverify_s", "raw_read_s"))
    pairs = [w / v for v, w in zip(ld["resume_s"], ld["raw_read_s"])]
    ratio = statistics.median(pairs)
    cache = "page cache dropped before each side" if ld["cold_cache"] else \
        "WARM page cache for both (could not drop it: not root)"
    print(f"\n1b. load ({r['layout']} -> same layout, {cache}), {len(ld['resume_s'])} rounds")
    print(f"    resume load (checked)    {fmt_list(ld['resume_s'])} s  mean {resume:.2f} s  "
          f"{distcp / resume / GB:.3f} GB/s  (load_newest_intact: sizes, then load with the shards checksummed)")
    print(f"    load without checksum    {fmt_list(ld['load_noverify_s'])} s  mean {noverify:.2f} s  "
          f"{distcp / noverify / GB:.3f} GB/s  (reference: CheckpointManager.load(verify=False))")
    print(f"    raw read                 {fmt_list(ld['raw_read_s'])} s  mean {raw:.2f} s  {distcp / raw / GB:.3f} GB/s"
          "  (into preallocated buffers: the baseline)")
    fresh = statistics.mean(ld["raw_read_fresh_s"])
    print(f"    raw read, new memory     {fmt_list(ld['raw_read_fresh_s'])} s  mean {fresh:.2f} s  "
          f"{distcp / fresh / GB:.3f} GB/s  (f.read(): pays first-touch page faults, as torch.load's storages do)")
    nv = statistics.median(w / v for v, w in zip(ld["load_noverify_s"], ld["raw_read_s"]))
    print(f"    load throughput / raw: median of rounds {ratio:.3f} (rounds {fmt_list(pairs)}; of means "
          f"{raw / resume:.3f}; without the checksum {nv:.3f}); goal >= {goal}: {verdict(ratio >= goal)}")
    print("    where one resume load goes (mean over rounds, slowest rank per item; bg: = checksum thread):")
    print("\n".join(profile_lines(ld["load_profile"])))
    verify_warm = statistics.mean(ld["verify_warm_s"])
    print(f"    CheckpointManager.verify on a warm cache (checksum of every file, each rank a share, no disk): "
          f"{verify_warm:.2f} s ({distcp / verify_warm / GB:.2f} GB/s over both ranks)")
    return ratio, ratio >= goal


def report_reshape(r: dict, goal: float) -> list[tuple]:
    """Reshaped loads against the same layout's, per byte each rank reads (the goal) and in plain time."""
    rs = r["reshape"]
    same = r["layout"]
    base = statistics.median(rs["load_s"][same])
    base_bytes = statistics.mean(rs["read_bytes_per_rank"][same])
    cache = "cold cache" if rs["cold_cache"] else "WARM cache (could not drop it)"
    print(f"\n2. reshaped load: checkpoint of {same} loaded into each layout ({cache}), "
          f"{len(rs['load_s'][same])} rounds, CheckpointManager.load")
    print(f"    {'layout':<8s} {'load s (rounds)':<30s} {'median':>6s} {'/ same':>7s} {'read MB/rank':>13s} "
          f"{'GB/s per rank':>13s} {'s per byte / same':>17s} {'max |diff|':>10s}")
    out = []
    for name, times in rs["load_s"].items():
        mid = statistics.median(times)
        ratio = mid / base
        read = statistics.mean(rs["read_bytes_per_rank"][name])
        per_byte = ratio / (read / base_bytes)
        shown = "/".join(f"{b / 1e6:.0f}" for b in rs["read_bytes_per_rank"][name])
        print(f"    {name:<8s} {fmt_list(times):<30s} {mid:6.2f} {ratio:7.3f} {shown:>13s} {read / mid / GB:13.3f} "
              f"{per_byte:17.3f} {rs['max_abs_diff'][name]:10.2e}")
        if name != same:
            out.append((f"reshaped load {same}->{name}, s/byte / same", "<=", goal, per_byte, per_byte <= goal))
    print(f"    goal, per byte read <= {goal}: " + "; ".join(f"{n.split()[2].rstrip(',')} {v:.3f} {verdict(ok)}"
                                                         for n, _, _, v, ok in out))
    print("    (a replicated layout holds, so reads, every byte on every rank: the goal is per byte read)")
    for name, prof in rs["profile"].items():
        print(f"    profile, {name}:")
        print("\n".join(profile_lines(prof)))
    return out


def stall_numbers(mode: dict, saves: int) -> dict[str, float]:
    recs = mode["records"]
    save_calls = [x["save"] for x in recs if x["saved"]]
    polls = sum(x["poll"] for x in recs)
    stall = (sum(save_calls) + polls + mode["final_wait"]) / saves
    return {"save_call": statistics.mean(save_calls), "poll_per_save": polls / saves,
            "final_wait": mode["final_wait"], "stall": stall,
            "train_median": statistics.median(x["train"] for x in recs), "wall": mode["wall"],
            "steps": len(recs)}


def report_stall(r: dict, goal: float) -> list[tuple]:
    st = r["stall"]
    saves, interval = st["saves"], st["interval"]
    sync, asyn = stall_numbers(st["sync"], saves), stall_numbers(st["async"], saves)
    ratio = asyn["stall"] / sync["stall"]
    print(f"\n3. training stall per save: {saves} saves every {interval} steps ({sync['steps']} steps per mode), "
          "recipe loop (poll each step, save every K)")
    print(f"    {'mode':<6s} {'save() call':>11s} {'poll()/save':>11s} {'final wait':>10s} {'stall/save':>10s} "
          f"{'step median':>11s} {'wall':>6s}")
    for name, n in (("sync", sync), ("async", asyn)):
        print(f"    {name:<6s} {n['save_call']:11.3f} {n['poll_per_save']:11.3f} {n['final_wait']:10.3f} "
              f"{n['stall']:10.3f} {n['train_median']:11.3f} {n['wall']:6.1f}")
    base = sync["train_median"]
    extra = {name: (n["wall"] - n["steps"] * base) / saves for name, n in (("sync", sync), ("async", asyn))}
    call = asyn["save_call"] / sync["save_call"]
    print(f"    stall async / sync: {ratio:.3f} (all checkpoint calls on the training thread); save() call alone: "
          f"{call:.3f}; goal <= {goal}: {verdict(ratio <= goal)} / {verdict(call <= goal)}")
    print(f"    wall time beyond {sync['steps']} sync-median steps, per save: sync {extra['sync']:.2f} s, "
          f"async {extra['async']:.2f} s (includes background writes slowing the steps on shared cores)")
    steps = [f"{x['step']}:{x['train']:.2f}+{x['poll'] + x['save']:.2f}" for x in st["async"]["records"]]
    print(f"    async per step (train + checkpoint calls, s): {' '.join(steps)}")
    for name in ("sync", "async"):
        print(f"    profile, {name} (whole loop, slowest rank per item; bg: = background thread):")
        print("\n".join(profile_lines(st[name]["profile"])))
    return [("stall async / sync, all calls", "<=", goal, ratio, ratio <= goal),
            ("stall async / sync, save() call", "<=", goal, call, call <= goal)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, default=2, help="FSDP ranks that save (torchrun, gloo)")
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds per comparison")
    parser.add_argument("--saves", type=int, default=3, help="saves per mode in the stall comparison")
    parser.add_argument("--interval", type=int, default=0,
                        help="steps between saves in the stall comparison (0: long enough for a write to finish)")
    parser.add_argument("--reshape", default="tp2,ddp2", help="layouts to load into (tpN, ddpN, fsdpN), comma-separated")
    parser.add_argument("--phases", default="save,load,reshape,stall", help="comma-separated subset (save always runs)")
    parser.add_argument("--keep", type=int, default=2, help="checkpoints kept (checkpoint.keep; the raw writes keep as many)")
    parser.add_argument("--save-variants", default="",
                        help="extra save sides, same rounds: torch-crc-on (torch.save keeps its CRC-32 of each "
                             "record, which the framework's writer turns off)")
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="where checkpoints are written (default: a temporary folder under $TMPDIR); put it "
                             "on the disk your runs use")
    parser.add_argument("--model-args", default=MODEL_ARGS, help="recipe overrides that set the model shape")
    parser.add_argument("--save-goal", type=float, default=0.7)
    parser.add_argument("--load-goal", type=float, default=0.7)
    parser.add_argument("--reshape-goal", type=float, default=1.5)
    parser.add_argument("--stall-goal", type=float, default=0.2)
    parser.add_argument("--json", type=Path, default=None, help="also write the raw measurements here")
    args = parser.parse_args(argv)

    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="titan-ckpt-", dir=args.work_dir) as tmp:
        r = run_worker(args, Path(tmp) / "out", Path(tmp) / "work")
    if args.json:
        args.json.write_text(json.dumps(r, indent=1))
    print(f"\ncheckpoint: {r['params'] / 1e6:.1f}M params, fp32 + AdamW, {r['world_size']} ranks ({r['layout']}), "
          f"train step {r['train_step_s']:.2f} s, {os.cpu_count()} CPUs, work dir on "
          f"{args.work_dir or tempfile.gettempdir()}")
    others = r["other_cpu"]
    print("other processes on the machine, average cores busy per phase: "
          + ", ".join(f"{k} {v:.2f}" for k, v in others.items()))
    if max(others.values()) > 0.25:
        print("WARNING: other processes shared the CPUs in some phases; CPU-bound costs (serialization, checksums, "
              "copies) read high there; rerun on a quiet machine for clean numbers.")
    results = []
    results.append(("save throughput / raw write", ">=", args.save_goal, *report_save(r, args.save_goal)))
    if "load" in r:
        results.append(("load throughput / raw read", ">=", args.load_goal, *report_load(r, args.load_goal)))
    if "reshape" in r:
        results += report_reshape(r, args.reshape_goal)
    if "stall" in r:
        results += report_stall(r, args.stall_goal)
    print("\nsummary")
    for name, op, goal, value, ok in results:
        print(f"    {name:<42s} {value:7.3f}   goal {op} {goal:<4}  {verdict(ok)}")
    print(f"total wall time {time.perf_counter() - began:.0f}s")


if __name__ == "__main__":
    main()
