"""What a benchmark worker under torchrun sets up first, as `recipes/pretrain.py` does: the composed
config, its checks, threads, the process group, the data and the layout."""

from __future__ import annotations

import os

import torch
from omegaconf import OmegaConf

from parallel.mesh import DistEnv, ParallelDims, init_process_group, read_env
from recipes.cli import compose_config
from titan.build import Layout, build_layout, check_layout, resolve_dims
from titan.config import PretrainConfig, register_schemas, validate
from titan.data.loader import DataBundle, load_data


def setup_worker(overrides: list[str]) -> tuple[PretrainConfig, DistEnv, ParallelDims, DataBundle, Layout]:
    register_schemas()
    cfg: PretrainConfig = OmegaConf.to_object(compose_config("pretrain", overrides))
    env = read_env()
    dims = resolve_dims(cfg, env)
    validate(cfg, env.world_size, dims.dp_size)
    check_layout(cfg, dims, env.device)
    torch.set_num_threads(cfg.training.num_threads or max(1, (os.cpu_count() or 1) // env.local_world_size))
    init_process_group(env, cfg.parallel.timeout_s)
    data = load_data(cfg.data, cfg.training.seq_len)
    return cfg, env, dims, data, build_layout(dims, env)
