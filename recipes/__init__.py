"""Hydra entry points: `python -m recipes.pretrain`, `recipes.prepare_data`, ..."""
