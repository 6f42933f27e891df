#!/bin/bash
# GPU speed in one command (issue 16): 125m and 1b at seq 2048 in bf16 on one GPU, eager vs compiled
# vs compiled + float8, AdamW vs Muon; tokens/s, MFU (989 TFLOP/s dense bf16 on H100/H200) and peak
# memory per run, medians over the steps after the first 4. Fits in about 8 minutes of GPU time.
#   bash benchmarks/gpu_bench.sh            (from the repository root; $OUT receives the metrics)
# The GPU machine has no network: put the wheels of hydra-core, omegaconf, antlr4-python3-runtime,
# torchdata and torchao in .whl/ first (python3 -m pip download --no-deps -d .whl hydra-core omegaconf
# antlr4-python3-runtime==4.9.3 torchdata torchao==0.18.0).
set -u
source "$(dirname "$0")/gpu_env.sh" "hydra, torchdata, torchao"
BASE="training.dtype=bfloat16 training.seq_len=2048 logging.log_interval=1 eval.interval=0 checkpoint.enabled=false logging.progress_bar=false"
M125="model=125m training.global_batch_size=16 training.micro_batch_size=16 training.steps=16"
M1B="model=1b training.global_batch_size=8 training.micro_batch_size=8 training.steps=12"
run() {  # name, seconds, overrides...
  local name=$1 limit=$2; shift 2
  echo "== $name"
  timeout "$limit" python3 -m recipes.pretrain $BASE "$@" run.dir=/tmp/gpu_bench/$name 2>&1 | grep -E "MFU peak|float8|compile|^step|Error|error" | tail -4
  cp /tmp/gpu_bench/$name/metrics.jsonl "$OUT/$name.jsonl" 2>/dev/null
}
rm -rf /tmp/gpu_bench
run 125m_eager 90 $M125 training.compile=false
run 125m_compiled 120 $M125 training.compile=true
run 125m_compiled_float8 150 $M125 training.compile=true training.float8=true
run 125m_compiled_muon 120 $M125 training.compile=true optim=muon
run 1b_compiled 150 $M1B training.compile=true
run 1b_compiled_float8 180 $M1B training.compile=true training.float8=true
run 1b_compiled_muon 150 $M1B training.compile=true optim=muon
python3 - <<'PY'
import json, pathlib, statistics
goals = {"125m_compiled": 0.35, "1b_compiled": 0.40, "1b_compiled_float8": 0.50}
print(f"{'run':24s} {'tokens/s':>10s} {'MFU':>7s} {'mem GB':>7s} {'step ms':>8s}  goal")
for path in sorted(pathlib.Path("/tmp/gpu_bench").glob("*/metrics.jsonl")):
    rows = [json.loads(l) for l in path.read_text().splitlines()][4:]
    if not rows:
        print(f"{path.parent.name:24s} no timed steps"); continue
    tps, mfu = statistics.median(r["tokens_per_s"] for r in rows), statistics.median(r["mfu"] for r in rows)
    step = statistics.median(r["tokens"] / r["step"] / r["tokens_per_s"] for r in rows)
    goal = goals.get(path.parent.name)
    verdict = "" if goal is None else f">= {goal:.0%}: {'met' if mfu >= goal else 'NOT met'}"
    print(f"{path.parent.name:24s} {tps:10,.0f} {mfu:7.1%} {max(r['mem_gb'] for r in rows):7.1f} {step*1e3:8.0f}  {verdict}")
PY
nvidia-smi --query-gpu=name,memory.total --format=csv
