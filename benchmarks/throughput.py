"""Training throughput of the recipe against a minimal PyTorch loop and Hugging Face Llama.

    python -m benchmarks.throughput [--model small] [--seq-len 256] [--global-batch 16]
                                    [--micro-batch 8] [--steps 30] [--warmup 5] [--rounds 3] [--threads 2]

Three contenders train the same model shape on the same batch shape with the same thread count,
each in its own fresh process:

A) ``recipe``: ``python -m recipes.pretrain`` itself; tokens/s is read from ``metrics.jsonl``
   (``logging.log_interval=1``), i.e. exactly what the recipe reports to its users.
B) ``minimal``: the smallest honest loop around the same ``titan.models.llama.Llama`` (built and
   initialized as the recipe does): AdamW with the same groups and hyper-parameters (torch's fused
   kernel, as the recipe's ``optim.implementation=auto``), cross-entropy, gradient
   accumulation, gradient clipping, one ``loss.item()`` per step.
C) ``hf``: ``transformers.LlamaForCausalLM`` with the equivalent ``LlamaConfig`` (same sizes, rope
   theta and norm eps; sdpa attention, float32, embeddings tied only where the titan config ties
   them, i.e. untied for debug and small) in the same loop as B.

B and C train on fixed random token ids (< 257, the byte tokenizer's range); the recipe reads its
default data (pydoc, byte tokens). Token values do not change the work done.

They run in alternating rounds (A, B, C, A, B, C, ...) so that slow drifts of the machine hit all
three alike. Every subprocess gets ``OMP_NUM_THREADS=<threads>`` (and MKL_NUM_THREADS) in its
environment and calls ``torch.set_num_threads(<threads>)`` (the recipe through
``training.num_threads``).

Shared machines. With as many threads as cores, any other busy process makes some steps several
times slower. The driver therefore watches each run: it timestamps every per-step record as it
is written and samples ``/proc/stat`` and the child's own CPU time, which gives for each step the
number of cores *other* processes used meanwhile. Steps where that exceeds ``--busy-threshold``
are "disturbed". A run's number is the median tokens/s of its undisturbed steps after
``--warmup`` (on a quiet machine: of all of them); a run with fewer than half its timed steps
undisturbed is repeated (``--retries``). The plain median over all timed steps is printed too.
The reported ratios are the medians over rounds of the per-round ratios.
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONTENDERS = ("recipe", "minimal", "hf")
GOALS = {"minimal": 0.95, "hf": 1.0}
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------------------------------
# Workers (B and C), each run as `python -m benchmarks.throughput --worker <name> --out <file>`.


def model_config(name: str, seq_len: int):
    """The recipe's ModelConfig for `configs/model/<name>.yaml` (schema defaults + YAML)."""
    from omegaconf import OmegaConf

    from titan.config import ModelConfig

    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(REPO / "configs" / "model" / f"{name}.yaml"))
    cfg: ModelConfig = OmegaConf.to_object(merged)
    if cfg.max_seq_len < seq_len:
        raise SystemExit(f"--seq-len {seq_len} exceeds model.max_seq_len {cfg.max_seq_len} of {name}")
    return cfg


def fixed_batches(vocab: int, num: int, micro_batch: int, seq_len: int, seed: int = 0):
    """`num` micro-batches of `seq_len + 1` random token ids (ids < 257, the byte tokenizer's range)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, min(vocab, 257), (micro_batch, seq_len + 1), generator=gen) for _ in range(num)]


def adamw(model, lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8):
    """AdamW with the recipe's defaults: decay on matrices, none on vectors; the fused kernel (the
    recipe's `auto`, and what Hugging Face's Trainer defaults to), so all three step alike."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)


def train_loop(model, logits_of, args, vocab: int, out) -> None:
    """Plain training loop; writes one JSON line per step with its tokens/s (wall time of the step)."""
    import torch
    import torch.nn.functional as F

    optimizer = adamw(model)
    accum = args.global_batch // args.micro_batch
    tokens_per_step = args.global_batch * args.seq_len
    batches = fixed_batches(vocab, 16 * accum, args.micro_batch, args.seq_len)
    model.train()
    for step in range(1, args.steps + 1):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        total = torch.zeros(())
        for micro in range(accum):
            tokens = batches[((step - 1) * accum + micro) % len(batches)]
            inputs, targets = tokens[:, :-1], tokens[:, 1:]
            logits = logits_of(inputs)
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum") / tokens_per_step
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        loss_value = total.item()  # the one host read a real loop does (to log the loss)
        out.write(json.dumps({"step": step, "loss": loss_value,
                              "tokens_per_s": tokens_per_step / (time.perf_counter() - start)}) + "\n")
        out.flush()


def worker_minimal(args, out) -> None:
    import torch

    from titan.models import build_model, init_weights

    cfg = model_config(args.model, args.seq_len)
    model = build_model(cfg)  # as the recipe does: meta device, materialize, seeded init
    model.to_empty(device=torch.device("cpu"))
    init_weights(model, cfg, 1234)
    train_loop(model, model, args, cfg.vocab_size, out)


def hf_config(cfg):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_hidden_dim,
                       num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                       num_key_value_heads=cfg.n_kv_heads, max_position_embeddings=cfg.max_seq_len,
                       rms_norm_eps=cfg.norm_eps, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
                       tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, mlp_bias=False,
                       initializer_range=cfg.init_std, use_cache=False, attn_implementation="sdpa",
                       dtype="float32")


def worker_hf(args, out) -> None:
    import torch
    from transformers import LlamaForCausalLM

    cfg = model_config(args.model, args.seq_len)
    torch.manual_seed(1234)
    model = LlamaForCausalLM(hf_config(cfg)).to(torch.float32)
    assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
    train_loop(model, lambda inputs: model(input_ids=inputs, use_cache=False).logits, args, cfg.vocab_size, out)


def run_worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    with open(args.out, "w", encoding="utf-8") as out:
        {"minimal": worker_minimal, "hf": worker_hf}[args.worker](args, out)


# --------------------------------------------------------------------------------------------------
# Driver.


def machine_busy_seconds() -> float:
    """CPU seconds all processes on the machine have used since boot (/proc/stat); NaN if unknown."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    except (OSError, ValueError):
        return float("nan")
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process, all its threads; NaN once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime: fields 14 and 15 of stat


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), WANDB_MODE="disabled",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def command(name: str, args, out: Path) -> tuple[list[str], Path]:
    """The contender's command line and the JSON-lines file it writes one record per step to."""
    if name == "recipe":
        cmd = [sys.executable, "-m", "recipes.pretrain", f"model={args.model}", f"training.steps={args.steps}",
               f"training.seq_len={args.seq_len}", f"training.global_batch_size={args.global_batch}",
               f"training.micro_batch_size={args.micro_batch}", f"training.num_threads={args.threads}",
               "logging.log_interval=1", "eval.interval=0", "checkpoint.enabled=false",
               "logging.progress_bar=false", f"run.dir={out}", *args.recipe_override]
        return cmd, out / "metrics.jsonl"
    cmd = [sys.executable, "-m", "benchmarks.throughput", "--worker", name, "--out", str(out),
           "--model", args.model, "--seq-len", str(args.seq_len), "--global-batch", str(args.global_batch),
           "--micro-batch", str(args.micro_batch), "--steps", str(args.steps), "--threads", str(args.threads)]
    return cmd, out


@dataclass
class Run:
    rates: list[float]  # tokens/s of every step, as the contender measured it
    others: list[float]  # cores other processes used during each step (inf: unknown, 0: not measurable)
    wall_s: float

    def timed(self, warmup: int) -> list[tuple[float, float]]:
        return list(zip(self.rates, self.others))[warmup:]

    def clean(self, warmup: int, threshold: float) -> list[float]:
        return [r for r, o in self.timed(warmup) if o <= threshold]


def sample_at(samples: list[tuple[float, float, float]], t: float) -> tuple[float, float, float]:
    """The last sample taken at or before time t (the first one if none)."""
    return samples[max(0, bisect.bisect_right(samples, t, key=lambda s: s[0]) - 1)]


def watch(name: str, args, tmp: Path, poll_s: float = 0.02) -> Run:
    """Run one contender in a fresh process, timestamping its per-step records as they appear."""
    out = tmp / f"{name}-{time.monotonic_ns()}"
    cmd, records_path = command(name, args, out)
    log = open(tmp / f"{out.name}.log", "w+", encoding="utf-8")
    reaped0 = children_cpu_seconds()
    began = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(args.threads), stdout=log, stderr=subprocess.STDOUT)
    samples = [(began, machine_busy_seconds(), 0.0)]  # (time, machine busy s, child cpu s)
    arrivals: list[tuple[float, dict]] = []  # (time seen, record)
    offset, pending = 0, ""
    while True:
        finished = proc.poll() is not None
        now = time.perf_counter()
        # Once the child is reaped, /proc no longer has it, but its totals are in our rusage.
        own = children_cpu_seconds() - reaped0 if finished else process_cpu_seconds(proc.pid)
        samples.append((now, machine_busy_seconds(), own))
        if records_path.exists():
            with open(records_path, encoding="utf-8") as f:
                f.seek(offset)
                chunk = f.read()
                offset = f.tell()
            pending += chunk
            *lines, pending = pending.split("\n")
            arrivals += [(now, json.loads(line)) for line in lines if line.strip()]
        if finished:
            break
        time.sleep(poll_s)
    wall = time.perf_counter() - began
    if proc.returncode != 0:
        log.seek(0)
        raise SystemExit(f"{name} failed ({proc.returncode}):\n{' '.join(cmd)}\n{log.read()[-4000:]}")
    log.close()

    rates, others = [], []
    previous_end = began
    for seen, record in sorted(arrivals, key=lambda a: a[1]["step"]):
        end = sample_at(samples, seen)
        # A window of at least 0.5 s, so that /proc/stat's 10 ms ticks stay small against it.
        start = sample_at(samples, min(previous_end, seen - 0.5))
        span = end[0] - start[0]
        other = ((end[1] - start[1]) - (end[2] - start[2])) / span if span > 0 else math.nan
        if math.isnan(samples[0][1]):
            other = 0.0  # no /proc/stat (not Linux): nothing to filter by
        rates.append(float(record["tokens_per_s"]))
        others.append(math.inf if math.isnan(other) else max(0.0, other))  # unknown counts as disturbed
        previous_end = seen
    if len(rates) != args.steps:
        raise SystemExit(f"{name} wrote {len(rates)} step records, expected {args.steps}")
    return Run(rates, others, wall)


def wait_for_quiet(max_wait: float, threshold: float, sample_s: float = 1.0) -> float:
    """Wait (at most `max_wait` s) until the machine's other load stays under `threshold` cores for
    `sample_s`; returns the seconds waited. It cannot stop a burst that starts later."""
    began = time.perf_counter()
    while True:
        busy = machine_busy_seconds()
        time.sleep(sample_s)
        load = (machine_busy_seconds() - busy) / sample_s
        waited = time.perf_counter() - began
        if not load > threshold or waited >= max_wait:  # `not >`: NaN (no /proc/stat) does not wait
            return waited


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="small", choices=["debug", "small", "125m"])
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run, warmup included")
    parser.add_argument("--warmup", type=int, default=5, help="leading steps excluded from the median")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--busy-threshold", type=float, default=0.25,
                        help="a step during which other processes used more cores than this is disturbed")
    parser.add_argument("--retries", type=int, default=2,
                        help="repeat a run whose undisturbed timed steps are fewer than half, at most this often")
    parser.add_argument("--quiet-wait", type=float, default=30.0,
                        help="before each run, wait up to this many seconds for other processes to go idle")
    parser.add_argument("--recipe-override", action="append", default=[], metavar="KEY=VALUE",
                        help="extra Hydra override for the recipe run (repeatable), e.g. optim.implementation=fused")
    parser.add_argument("--only", default=",".join(CONTENDERS), help="comma list of contenders to run")
    parser.add_argument("--worker", choices=["minimal", "hf"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return run_worker(args)
    if args.global_batch % args.micro_batch:
        parser.error("--global-batch must be a multiple of --micro-batch")
    if args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup")
    contenders = [c for c in CONTENDERS if c in args.only.split(",")]

    import torch

    print(f"throughput: model={args.model} seq_len={args.seq_len} global_batch={args.global_batch} "
          f"micro_batch={args.micro_batch} steps={args.steps} (warmup {args.warmup}) rounds={args.rounds} "
          f"threads={args.threads} | torch {torch.__version__}, {os.cpu_count()} CPUs"
          + (f" | recipe overrides: {' '.join(args.recipe_override)}" if args.recipe_override else ""), flush=True)
    print(f"{'round':>5s} {'contender':9s} {'tok/s':>8s} {'clean':>6s} {'all-steps median':>16s} "
          f"{'p90':>8s} {'min':>8s} {'wall s':>6s} {'others (median step)':>20s}", flush=True)
    value: dict[str, list[float]] = {c: [] for c in contenders}  # per round: median of undisturbed steps
    raw: dict[str, list[float]] = {c: [] for c in contenders}  # per round: median of all timed steps
    ok: dict[str, list[bool]] = {c: [] for c in contenders}  # per round: enough undisturbed steps
    began = time.perf_counter()
    timed_steps = args.steps - args.warmup
    with tempfile.TemporaryDirectory(prefix="titan-bench-") as tmp:
        for round_index in range(1, args.rounds + 1):
            for name in contenders:
                for attempt in range(args.retries + 1):
                    wait_for_quiet(args.quiet_wait, args.busy_threshold)
                    run = watch(name, args, Path(tmp))
                    clean = run.clean(args.warmup, args.busy_threshold)
                    if 2 * len(clean) >= timed_steps:
                        break
                    print(f"{round_index:5d} {name:9s} disturbed: {len(clean)}/{timed_steps} clean steps, "
                          f"{'retrying' if attempt < args.retries else 'keeping it'}", flush=True)
                timed = [r for r, _ in run.timed(args.warmup)]
                ok[name].append(2 * len(clean) >= timed_steps)
                value[name].append(statistics.median(clean) if clean else statistics.median(timed))
                raw[name].append(statistics.median(timed))
                others = statistics.median([o for _, o in run.timed(args.warmup)])
                print(f"{round_index:5d} {name:9s} {value[name][-1]:8,.0f} {len(clean):3d}/{timed_steps:<2d} "
                      f"{raw[name][-1]:16,.0f} {percentile(timed, 0.9):8,.0f} {min(timed):8,.0f} {run.wall_s:6.0f} "
                      f"{others:14.2f} cores", flush=True)

    print(f"\ntokens/s, median over {args.rounds} rounds (undisturbed steps | all steps):")
    for name in contenders:
        print(f"  {name:8s} {statistics.median(value[name]):8,.0f} | {statistics.median(raw[name]):8,.0f}   "
              f"per round: {', '.join(f'{v:,.0f}' for v in value[name])}")
    if "recipe" in value:
        for other, goal in GOALS.items():
            if other not in value:
                continue
            per_round = [a / b for a, b in zip(value["recipe"], value[other])]
            # Rounds where either run stayed disturbed after its retries do not count, if any other does.
            usable = [r for r, a, b in zip(per_round, ok["recipe"], ok[other]) if a and b]
            dropped = len(per_round) - len(usable)
            if usable:
                ratio = statistics.median(usable)
                verdict = "met" if ratio >= goal else "NOT met"
            else:
                ratio, verdict = statistics.median(per_round), "unknown (every round disturbed)"
            all_steps = statistics.median([a / b for a, b in zip(raw["recipe"], raw[other])])
            print(f"recipe/{other}: {ratio:.3f}  (per round {', '.join(f'{r:.3f}' for r in per_round)}"
                  f"{f'; {dropped} disturbed round(s) left out' if dropped else ''}; all-steps medians {all_steps:.3f})"
                  f"  goal >= {goal:.2f}: {verdict}")
    disturbed = sum(not flag for flags in ok.values() for flag in flags)
    if disturbed:
        print(f"warning: {disturbed} run(s) stayed disturbed by other processes after {args.retries} retries.")
    print(f"total wall time {time.perf_counter() - began:.0f}s")


if __name__ == "__main__":
    main()
