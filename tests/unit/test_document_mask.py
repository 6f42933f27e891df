"""Document masking and the context-parallel split, without processes: document ids and positions
from end-of-text tokens, no query attending across a document boundary, and the layout checks."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from parallel.context_parallel import check_cp_degree, shard_sequence
from parallel.errors import LayoutError
from parallel.mesh import ParallelDims
from titan.build import check_layout
from titan.config import ConfigError, ModelConfig, PretrainConfig, validate
from titan.data.packing import document_ids, positions_in_documents
from titan.models import build_model
from titan.models.init import init_weights

EOT = 9


def test_document_ids_and_positions_restart_after_each_end_of_text():
    tokens = torch.tensor([[1, 2, EOT, 3, EOT, EOT, 4, 5]])
    documents = document_ids(tokens, EOT)
    assert documents.tolist() == [[0, 0, 0, 1, 1, 2, 3, 3]]
    assert positions_in_documents(documents).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]


def test_no_query_attends_across_a_document_boundary():
    cfg = ModelConfig(vocab_size=16)
    model = build_model(cfg)
    model.to_empty(device="cpu")
    init_weights(model, cfg, seed=3)
    model.reset_buffers()
    tokens = torch.tensor([[1, 2, 3, EOT, 4, 5, 6, 7]])
    altered = tokens.clone()
    altered[0, :3] = torch.tensor([8, 7, 6])  # only the first document changes
    documents = document_ids(tokens, EOT)
    positions = torch.arange(8).expand(1, 8)
    with torch.no_grad():
        masked = [model(t, positions, documents) for t in (tokens, altered)]
        causal = [model(t) for t in (tokens, altered)]
    assert torch.equal(masked[0][0, 4:], masked[1][0, 4:])  # the second document never saw the first
    assert not torch.allclose(masked[0][0, :4], masked[1][0, :4])
    assert not torch.allclose(causal[0][0, 4:], causal[1][0, 4:])  # without the mask it does
    torch.testing.assert_close(model(tokens, positions, None), causal[0], rtol=1e-6, atol=1e-6)


def test_each_cp_rank_holds_chunks_i_and_2cp_minus_1_minus_i():
    sequence = torch.arange(16).unsqueeze(0)
    assert shard_sequence(sequence, 0, 2).tolist() == [[0, 1, 2, 3, 12, 13, 14, 15]]
    assert shard_sequence(sequence, 1, 2).tolist() == [[4, 5, 6, 7, 8, 9, 10, 11]]
    assert sorted(torch.cat([shard_sequence(sequence, r, 4) for r in range(4)], 1)[0].tolist()) == list(range(16))


def test_bad_context_parallel_layouts_name_the_key():
    plan = build_model(ModelConfig()).plan()
    with pytest.raises(LayoutError) as info:
        check_cp_degree(plan, cp=4, seq_len=60)
    assert info.value.key == "training.seq_len" and "divisible by 8" in str(info.value)
    no_attention = dataclasses.replace(plan, block=dataclasses.replace(plan.block, attention=None))
    with pytest.raises(LayoutError, match="declares no attention core"):
        check_cp_degree(no_attention, cp=2, seq_len=64)
    with pytest.raises(LayoutError) as info:
        ParallelDims(1, -1, 1, 1, 6, cp=4)
    assert info.value.key == "parallel.dp_shard" and "cp" in str(info.value)
    assert ParallelDims(2, -1, 2, 1, 16, cp=2).dp_shard == 2
    cfg = PretrainConfig()
    cfg.model = ModelConfig()
    cfg.training.seq_len = 62
    with pytest.raises(LayoutError) as info:
        check_layout(cfg, ParallelDims(1, 1, 1, 1, 2, cp=2), torch.device("cpu"))
    assert info.value.key == "training.seq_len"


def test_reset_positions_needs_document_mask():
    cfg = PretrainConfig()
    cfg.data.reset_positions = True
    with pytest.raises(ConfigError) as info:
        validate(cfg, 1, 1)
    assert info.value.key == "data.reset_positions"
    cfg.data.document_mask = True
    validate(cfg, 1, 1)
