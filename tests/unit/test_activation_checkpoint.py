"""Activation checkpointing modes on a real block: same gradients, and what backward recomputes
(`op` recomputes no matmul, `full` recomputes every one)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from parallel.parallelize import apply_activation_checkpointing
from titan.config import ModelConfig
from titan.models.llama import Llama

MATMULS = {torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm}


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.matmuls = self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.matmuls += func.overloadpacket in MATMULS
        self.ops += 1
        return func(*args, **(kwargs or {}))


def backward_ops(mode: str) -> tuple[CountOps, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = Llama(ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, ffn_hidden_dim=48,
                              max_seq_len=16))
    apply_activation_checkpointing(model.layers, mode, 1)
    tokens = torch.randint(0, 64, (2, 16))
    loss = model(tokens).float().logsumexp(-1).mean()
    with CountOps() as counter:
        loss.backward()
    return counter, {n: p.grad for n, p in model.named_parameters()}


def test_op_mode_recomputes_the_cheap_ops_but_no_matmul():
    plain, reference = backward_ops("none")
    op, grads_op = backward_ops("op")
    full, grads_full = backward_ops("full")
    assert op.matmuls == plain.matmuls < full.matmuls  # full re-runs each block's forward matmuls in backward
    assert plain.ops < op.ops < full.ops  # op re-runs the norms, activations and rotary embeddings
    for name, grad in reference.items():
        torch.testing.assert_close(grads_op[name], grad, rtol=0, atol=0)
        torch.testing.assert_close(grads_full[name], grad, rtol=0, atol=0)


def test_unknown_mode_names_the_key():
    model = Llama(ModelConfig(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=16, ffn_hidden_dim=16,
                              max_seq_len=8))
    with pytest.raises(Exception, match="training.activation_checkpoint"):
        apply_activation_checkpointing(model.layers, "some", 1)
