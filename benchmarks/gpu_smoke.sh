#!/bin/bash
# GPU smoke check: bf16 training (eager; compiled with async checkpoints), the planner's h200_ib
# prediction against eager 125m and 1b (recipes.plan --check), checkpoint resume,
# the launcher, the HF export loaded by transformers. One GPU (H100/H200), single process.
# Run from the repository root: `bash benchmarks/gpu_smoke.sh`. On a machine without hydra-core,
# omegaconf, antlr4-python3-runtime and torchdata (no network), put their wheels in .whl/ first.
# Per-step lines go to stdout; $OUT (when set) receives both metrics.jsonl files.
set -u
source "$(dirname "$0")/gpu_env.sh" "hydra, torchdata"
COMMON="model=125m training.dtype=bfloat16 training.seq_len=1024 training.global_batch_size=32 training.micro_batch_size=16 logging.log_interval=5 eval.interval=10 eval.steps=2 logging.progress_bar=false checkpoint.interval=20"
PLAN="cluster=h200_ib cluster.devices_per_node=1"  # the planner's prediction at step 1, checked below
echo "== eager 30 steps"; timeout 170 python3 -m recipes.pretrain $COMMON $PLAN training.steps=30 run.dir=/tmp/r1 2>&1 | tail -9
echo "== planner check 125m"; timeout 60 python3 -m recipes.plan --check /tmp/r1 2>&1 | tail -8
echo "== 1b eager 12 steps + planner check"; timeout 200 python3 -m recipes.pretrain model=1b training.dtype=bfloat16 training.seq_len=2048 training.global_batch_size=4 training.micro_batch_size=4 training.steps=12 logging.log_interval=1 eval.interval=0 checkpoint.enabled=false logging.progress_bar=false $PLAN run.dir=/tmp/r4 2>&1 | tail -3
timeout 60 python3 -m recipes.plan --check /tmp/r4 2>&1 | tail -8
echo "== resume to 40"; timeout 100 python3 -m recipes.pretrain $COMMON training.steps=40 run.dir=/tmp/r1 2>&1 | tail -4
echo "== compiled 30 steps, async save"; timeout 200 python3 -m recipes.pretrain $COMMON training.steps=30 training.compile=true checkpoint.async_save=true run.dir=/tmp/r2 2>&1 | tail -7
echo "== compiled resume to 40"; timeout 150 python3 -m recipes.pretrain $COMMON training.steps=40 training.compile=true checkpoint.async_save=true run.dir=/tmp/r2 2>&1 | tail -4
echo "== launch"; timeout 90 python3 -m launch --nproc-per-node 1 --run-dir /tmp/r3 model=small training.steps=5 training.dtype=bfloat16 logging.progress_bar=false 2>&1 | tail -4
echo "== export"; timeout 90 python3 -m recipes.export checkpoint=/tmp/r1/checkpoints/step-40 out=/tmp/hf 2>&1 | tail -3
timeout 90 python3 - <<'PY'
import torch
from transformers import AutoModelForCausalLM
hf = AutoModelForCausalLM.from_pretrained("/tmp/hf", torch_dtype=torch.float32).cuda().eval()
ids = torch.randint(0, 257, (2, 64), device="cuda")
with torch.no_grad():
    print("hf logits", hf(ids).logits.float().abs().mean().item())
PY
cp /tmp/r1/metrics.jsonl $OUT/eager.jsonl; cp /tmp/r2/metrics.jsonl $OUT/compiled.jsonl 2>/dev/null
nvidia-smi --query-gpu=name,memory.total --format=csv
