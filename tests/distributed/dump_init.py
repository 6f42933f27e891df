"""Under torchrun: build the parallelized, initialized model for a layout and save its full state dict.

Usage: torchrun ... tests/distributed/dump_init.py <out.pt> [overrides]
"""

from __future__ import annotations

import sys

import torch
from omegaconf import OmegaConf
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from parallel.mesh import init_process_group, read_env, run_main
from recipes.cli import parse_args
from titan.build import build_layout, build_parallel_model, check_layout, resolve_dims
from titan.config import register_schemas


def main(out: str, overrides: list[str]) -> None:
    register_schemas()
    cfg = OmegaConf.to_object(parse_args("pretrain", overrides))
    env = read_env()
    init_process_group(env, timeout_s=120)
    dims = resolve_dims(cfg, env)
    check_layout(cfg, dims, env.device)
    layout = build_layout(dims, env)
    model, _ = build_parallel_model(cfg, layout, env.device)
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if env.rank == 0:
        torch.save(state, out)


if __name__ == "__main__":
    run_main(lambda argv: main(argv[0], argv[1:]), sys.argv[1:])
