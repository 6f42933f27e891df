"""The planner: per-rank memory and per-step time of a layout on a cluster, predicted from the model's
own plan, the FSDP units `parallel.data_parallel.apply_fsdp` makes, the pipeline schedules' own
action orders and the communication closed forms in `parallel.costs` (which `benchmarks/` checks
against measured runs). `python -m recipes.plan` is its command line."""
