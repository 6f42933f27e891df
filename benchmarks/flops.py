"""Check `titan.models.llama.flops_per_token` against torch's FLOP counter.

    python -m benchmarks.flops [--batch 2] [--threads 2]

For each shape, one forward + backward of ``titan.models.llama.Llama`` (loss = cross-entropy on the
logits, as the trainer computes it) runs under ``torch.utils.flop_counter.FlopCounterMode``; the
count is compared with ``flops_per_token(cfg, seq_len) * batch * seq_len``, the number the recipe
uses for TFLOP/s and MFU.

On CPU the counter has no formula for the fused attention kernel
(``aten._scaled_dot_product_flash_attention_for_cpu``), so attention would be missing from the count.
For the count, ``F.scaled_dot_product_attention`` as seen by ``titan.models.llama`` is replaced by
explicit matmuls (q @ k^T * scale, causal mask, softmax, @ v; GQA by ``repeat_interleave`` of k/v
along the head dim). The counter then sees the attention matmuls as a full square, which is also
how the formula counts them. The count with the native kernel is printed too, to show the gap.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import titan.models.llama as llama
from titan.models import build_model, flops_per_token, init_weights

from benchmarks.throughput import model_config

# (model, seq_len): the recipe's debug and small shapes at the default seq_len, one longer seq_len
# where attention is a larger share, and the tied-embedding 125m shape.
SHAPES = (("debug", 256), ("small", 256), ("small", 1024), ("125m", 512))
GOAL = 0.02


def explicit_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Scaled dot-product attention as plain matmuls, so that FlopCounterMode can see it."""
    if attn_mask is not None or dropout_p:
        raise NotImplementedError("the benchmark's attention handles the model's causal call only")
    if k.shape[-3] != q.shape[-3]:
        repeat = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(repeat, dim=-3), v.repeat_interleave(repeat, dim=-3)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale
    if is_causal:
        s_q, s_k = q.shape[-2], k.shape[-2]
        causal = torch.ones(s_q, s_k, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    return scores.softmax(dim=-1) @ v


@contextlib.contextmanager
def patched_attention():
    """Route titan.models.llama's F.scaled_dot_product_attention through `explicit_attention`.

    `llama.F` is the shared torch.nn.functional module, so the patch is global while it lasts."""
    original = llama.F.scaled_dot_product_attention
    llama.F.scaled_dot_product_attention = explicit_attention
    try:
        yield
    finally:
        llama.F.scaled_dot_product_attention = original


def build(name: str, seq_len: int):
    cfg = model_config(name, seq_len)
    model = build_model(cfg)
    model.to_empty(device=torch.device("cpu"))
    init_weights(model, cfg, 1234)
    return cfg, model


def forward_backward(model, tokens: torch.Tensor) -> torch.Tensor:
    """The trainer's micro-batch: inputs/targets shifted by one, summed cross-entropy, backward."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    logits = model(inputs)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum")
    loss.backward()
    return logits.detach()


def counted_flops(model, tokens: torch.Tensor) -> tuple[int, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    counter = FlopCounterMode(display=False)
    with counter:
        logits = forward_backward(model, tokens)
    return counter.get_total_flops(), logits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    print(f"flops: batch={args.batch}, torch {torch.__version__}; goal |reported/counted - 1| <= {GOAL:.0%}")
    header = (f"{'model':6s} {'seq':>5s} {'tokens':>7s} {'reported GFLOP':>15s} {'counted GFLOP':>14s} "
              f"{'reported/counted':>17s} {'native-SDPA count':>18s} {'attn max|diff|':>15s}  goal")
    print(header)
    all_met = True
    for name, seq_len in SHAPES:
        cfg, model = build(name, seq_len)
        tokens = torch.randint(0, min(cfg.vocab_size, 257), (args.batch, seq_len + 1),
                               generator=torch.Generator().manual_seed(0))
        n_tokens = args.batch * seq_len
        reported = flops_per_token(cfg, seq_len) * n_tokens
        native, native_logits = counted_flops(model, tokens)
        with patched_attention():
            counted, patched_logits = counted_flops(model, tokens)
        diff = (native_logits - patched_logits).abs().max().item()  # the patch computes the same thing
        ratio = reported / counted
        met = abs(ratio - 1.0) <= GOAL
        all_met &= met
        print(f"{name:6s} {seq_len:5d} {n_tokens:7d} {reported / 1e9:15.3f} {counted / 1e9:14.3f} {ratio:17.6f} "
              f"{native / 1e9:18.3f} {diff:15.2e}  {'met' if met else 'NOT met'}{' (exact)' if reported == counted else ''}")
    print("all shapes within goal" if all_met else "some shapes outside the goal")
    return 0 if all_met else 1


if __name__ == "__main__":
    sys.exit(main())
