"""Structured config schema (Hydra/OmegaConf dataclasses) and up-front validation.

Every field is a user-facing key (`model.dim`, `training.steps`, ...). Types are checked by
OmegaConf when YAML and command-line overrides are merged onto these dataclasses; the semantic
checks in :func:`validate` run before anything is built or written and raise :class:`ConfigError`,
which the recipes turn into a one-paragraph message and exit code 2.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


class ConfigError(ValueError):
    """A bad config value: names the key and says how to fix it."""

    def __init__(self, key: str, problem: str, fix: str):
        self.key = key
        super().__init__(f"config error at `{key}`: {problem} Fix: {fix}")


@dataclass
class MoEConfig:
    """Mixture of experts: every `every`-th block after the first `first_dense` routes each token to
    `top_k` of `n_experts` SwiGLU experts (dropless, token choice). `n_experts=0` is a dense model."""

    n_experts: int = 0  # routed experts per MoE layer; 0 = dense model (no MoE layers)
    top_k: int = 2  # experts each token is sent to
    hidden_dim: int = 128  # hidden width of each expert's SwiGLU
    n_shared_experts: int = 0  # experts every token goes through as well (one SwiGLU of n x hidden_dim)
    every: int = 1  # an MoE layer every N blocks (the others dense)
    first_dense: int = 0  # the first N blocks stay dense (as DeepSeek does)
    score: str = "sigmoid"  # router scores: sigmoid (DeepSeek-V3) | softmax (Mixtral, OLMoE)
    normalize_weights: bool = True  # rescale the top-k scores of a token to sum to 1
    route_scale: float = 1.0  # multiplies the routed output (DeepSeek-V3's routed_scaling_factor)
    bias_update_rate: float = 0.005  # auxiliary-loss-free balancing: per-expert bias step after each step; 0 = off
    aux_loss_coef: float = 0.0  # sequence-level load-balancing loss coefficient (per MoE layer)
    z_loss_coef: float = 0.0  # router z-loss coefficient (per MoE layer)
    experts_impl: str = "auto"  # grouped (torch._grouped_mm) | looped (one matmul per expert) | auto


@dataclass
class ModelConfig:
    """Llama-style decoder shape."""

    name: str = "debug"  # the shape's name (part of run.name)
    dim: int = 64  # width of the residual stream (hidden size)
    n_layers: int = 2  # transformer blocks
    n_heads: int = 4  # attention (query) heads; dim / n_heads must be even
    n_kv_heads: int = 2  # key/value heads (grouped-query attention); must divide n_heads
    vocab_size: int = 512  # embedding rows; at least the tokenizer's vocabulary
    ffn_hidden_dim: int = 192  # hidden width of the SwiGLU feed-forward
    norm_eps: float = 1e-5  # RMSNorm epsilon
    rope_theta: float = 10000.0  # RoPE base frequency
    max_seq_len: int = 2048  # longest sequence the RoPE tables cover; >= training.seq_len
    tie_embeddings: bool = False  # share the token embedding with the output projection
    init_std: float = 0.02  # std of the normal weight init (output projections scaled by 1/sqrt(2 n_layers))
    init_from: Optional[str] = None  # a Hugging Face folder (Llama, or Glm4Moe / Mixtral for MoE) to start from
    moe: MoEConfig = field(default_factory=MoEConfig)  # mixture-of-experts layers (off by default)


@dataclass
class SourceConfig:
    """One source of a data mixture (data=mix): a folder of prepared token shards and its weight."""

    name: str = MISSING  # names the source's metrics (loss/<name>, eval_loss/<name>) and its data cursor
    path: str = MISSING  # out folder of `python -m recipes.prepare_data`
    weight: float = 1.0  # relative share of each global batch (weights need not sum to 1)
    max_epochs: Optional[float] = None  # passes over the source after which it stops being drawn; None: repeat


@dataclass
class DataConfig:
    """Where the text comes from and how it is tokenized."""

    name: str = "pydoc"  # the data config's name (part of run.name)
    source: str = "pydoc"  # pydoc | text | jsonl (.gz, .zst too) | parquet | hf (a datasets save_to_disk folder) | tokens | mix
    path: Optional[str] = None  # file, folder or glob (text/jsonl); folder of shards (tokens)
    text_field: str = "text"  # JSONL field / Parquet or Arrow column holding a document
    tokenizer: str = "byte"  # "byte" or a path to a Hugging Face tokenizer.json
    eot_token: Optional[str] = None  # end-of-text token of a HF tokenizer; guessed when unset
    eval_fraction: float = 0.05  # tail of the token stream held out for eval
    num_workers: int = 0  # data loader worker processes; 0 loads in the training process
    verify_checksums: bool = False  # data=tokens: also check each shard's checksum (XXH3-64; CRC-32 in older folders) (reads every shard; sizes always are)
    document_mask: bool = False  # packed documents do not attend to each other (block-causal attention at end-of-text tokens)
    reset_positions: bool = False  # with document_mask: rotary positions restart at 0 in every document
    skip_ranges: List[List[int]] = field(default_factory=list)  # [[start, end], ...]: global sequence positions never trained on (end excluded)
    sources: List[SourceConfig] = field(default_factory=list)  # data=mix: the sources and their weights


@dataclass
class HealthConfig:
    """What a long run does about bad steps, slow ranks and hangs."""

    policy: str = "skip"  # skip: bad steps are skipped, rolled back after max_consecutive_skips | fail: stop (exit 5)
    spike_sigmas: float = 6.0  # a loss or grad norm this many standard deviations above the recent steps is a spike; 0 = off
    spike_window: int = 128  # recent applied steps the spike test compares with
    spike_min_steps: int = 64  # no spike test before the window holds this many steps (early steps vary a lot)
    max_consecutive_skips: int = 3  # skipped steps in a row that roll the run back to its newest checkpoint
    straggler_factor: float = 1.5  # a rank whose step compute time is this many times the median ...
    straggler_patience: int = 3  # ... on this many logged steps in a row is named as a straggler
    hang_factor: float = 10.0  # dump every thread's stack when a step runs this many times the median step time; 0 = off


@dataclass
class TrainingConfig:
    steps: int = 200  # optimizer steps of the whole run
    seed: int = 1234  # seed of the initial weights and the data order
    global_batch_size: int = 16  # sequences per optimizer step, whatever the layout
    micro_batch_size: int = 8  # sequences per forward/backward on one rank
    seq_len: int = 256  # tokens per training sequence
    dtype: str = "float32"  # float32 | bfloat16
    deterministic: bool = False  # torch.use_deterministic_algorithms (slower, bit-reproducible kernels)
    grad_clip: float = 1.0  # max global grad norm; <= 0 disables clipping
    peak_tflops: Optional[float] = None  # per rank, for MFU; unset: the GPU datasheet or the CPU cores (clock x FMA units x lanes), stated in the log
    num_threads: Optional[int] = None  # torch intra-op threads per rank (CPU); unset = cores / local ranks
    activation_checkpoint: str = "none"  # none | full | selective (every activation_checkpoint_every-th block) | op (every block recomputes all but its matmuls and attention)
    activation_checkpoint_every: int = 2  # selective: checkpoint every N-th block
    compile: Any = "auto"  # torch.compile each block: true | false | auto (on for CUDA, off on CPU)
    float8: bool = False  # block linears in float8 (torchao, dynamic scaling; FSDP all-gathers in float8); needs .[float8]
    health: HealthConfig = field(default_factory=HealthConfig)  # spikes and NaNs, stragglers, hangs


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | muon (Muon for the blocks' matrices, AdamW for the rest)
    lr: float = 3e-3  # peak learning rate (after warmup); with muon: of the AdamW parameters
    weight_decay: float = 0.1  # decoupled weight decay
    beta1: float = 0.9  # Adam first-moment decay
    beta2: float = 0.95  # Adam second-moment decay
    eps: float = 1e-8  # Adam denominator epsilon
    implementation: str = "auto"  # auto | foreach | fused | for_loop (auto: fused, on CUDA and CPU)
    muon_lr: float = 0.02  # muon: peak learning rate of the blocks' matrices
    momentum: float = 0.95  # muon: momentum of the matrices' gradients
    nesterov: bool = True  # muon: Nesterov momentum
    ns_steps: int = 5  # muon: Newton-Schulz steps that orthogonalize the update
    muon_scale: str = "spectral"  # muon: spectral (lr x sqrt(max(1, fan_out/fan_in)), transfers across widths) | adamw_rms (update RMS of AdamW's, reuse its lr)


@dataclass
class LRConfig:
    schedule: str = "cosine"  # cosine | wsd | constant
    warmup_steps: int = 20  # steps of linear warmup up to optim.lr
    min_lr_ratio: float = 0.1  # floor of the decay as a fraction of optim.lr
    decay_fraction: float = 0.2  # wsd: share of the steps spent decaying


@dataclass
class EvalConfig:
    interval: int = 50  # 0 disables eval
    steps: int = 4  # global batches of held-out data per eval


@dataclass
class ParallelConfig:
    dp_replicate: int = 1  # data-parallel replicas: HSDP with dp_shard > 1, DDP with dp_shard = 1
    dp_shard: int = -1  # -1: whatever ranks are left
    tp: int = 1  # tensor-parallel degree (heads, vocabulary and hidden sizes must divide)
    cp: int = 1  # context parallel: ranks that split every sequence (each holds 2 of its 2 x cp chunks)
    pp: int = 1  # pipeline-parallel stages
    ep: int = 1  # expert parallel: ranks that split the experts, borrowed from dp_shard x cp (must divide it)
    pp_schedule: str = "1f1b"  # gpipe | 1f1b | interleaved_1f1b | interleaved_zb | zbv | dualpipev
    pp_virtual_stages: int = 1  # model chunks per pipeline rank (interleaved and V schedules)
    pp_microbatches: Optional[int] = None  # default: local batch / training.micro_batch_size
    pp_layers_per_stage: Optional[List[int]] = None  # explicit split; default balances estimated FLOPs
    sequence_parallel: bool = False  # with tp > 1: shard norms and residuals along the sequence too
    reshard_after_forward: Any = True  # true | false | int (secondary partition size)
    fsdp_prefetch: int = 1  # FSDP units whose all-gather is issued ahead of use, in forward and backward (0: FSDP's own)
    hierarchical: bool = False  # dp_replicate = nodes, dp_shard = ranks per node / tp
    loss_parallel: bool = True  # with tp > 1: cross-entropy on vocabulary-sharded logits
    cpu_offload: bool = False  # keep sharded parameters and optimizer state in CPU memory
    timeout_s: float = 300.0  # collective timeout: a dead or hung peer ends the job after this


@dataclass
class CheckpointConfig:
    interval: int = 0  # save every N steps; 0 = only at the end
    keep: int = 2  # committed checkpoints kept; older ones are pruned
    resume: str = "auto"  # auto | none | <step dir>
    async_save: Any = "auto"  # write in the background while training goes on: true | false | auto (on for CUDA, off on CPU)
    on_corrupt: str = "fail"  # fail | previous (fall back to the previous commit)
    new_data_seed: bool = False  # on resume, draw the rest of the data order from training.seed even if it changed
    enabled: bool = True  # false: save no checkpoints


@dataclass
class WandbConfig:
    enabled: bool = False  # log metrics to Weights & Biases (needs a key or mode=offline)
    project: str = "titan"  # W&B project
    name: Optional[str] = None  # W&B run name; unset = run.name
    entity: Optional[str] = None  # W&B team or user; unset = your default
    mode: str = "online"  # online | offline


@dataclass
class LoggingConfig:
    log_interval: int = 10  # log metrics every N steps (and on eval and the last step)
    progress_bar: bool = True  # console progress bar between logged steps
    sequence_ids: bool = False  # write <run.dir>/sequence_ids.jsonl: the ids of each step's global batch
    wandb: WandbConfig = field(default_factory=WandbConfig)  # Weights & Biases sink


@dataclass
class ProfileConfig:
    steps: List[int] = field(default_factory=list)  # [first, last]: trace these steps with torch.profiler into <run.dir>/profile/; empty = off


@dataclass
class DebugConfig:
    """Fault injection, to try the health policies (off by default)."""

    nan_steps: List[int] = field(default_factory=list)  # steps whose loss and gradients are made NaN (every rank)
    spike_steps: List[int] = field(default_factory=list)  # steps whose loss and gradients are multiplied by spike_factor
    spike_factor: float = 1000.0  # the size of an injected spike
    slow_rank: int = -1  # a rank whose steps compute slow_factor times as long; -1 = none
    slow_factor: float = 3.0  # how much slower slow_rank computes
    hang_rank: int = -1  # a rank that stops answering at hang_step (sleeps forever); -1 = none
    hang_step: int = 1  # the step at which hang_rank stops answering


@dataclass
class ClusterConfig:
    """A cluster for the planner (`cluster=<name>`: configs/cluster/<name>.yaml; add your own). Rates
    are per device (a GPU, or a rank on CPU); bandwidths count the bytes one rank sends, as
    `comm_gb/<dim>` does."""

    name: str = "cpu"  # the profile's name
    device: str = "cpu"  # cpu | cuda: which kernels and optimizer path the run takes
    nodes: int = 1  # nodes the job gets
    devices_per_node: int = 2  # GPUs per node (CPU: ranks per node)
    device_memory_gb: float = 12.0  # memory per device (CPU: the node's RAM / ranks)
    usable_memory_fraction: float = 0.9  # share of it a layout may plan to fill (allocator fragmentation, NCCL buffers)
    runtime_memory_gb: float = 0.0  # per-rank memory outside tensors that mem_gb reports (CPU: process RSS; GPU: 0)
    peak_tflops_bf16: float = 0.1  # datasheet dense peak per device: the MFU denominator
    peak_tflops_fp32: float = 0.1  # the same for float32 runs (TF32 on GPUs)
    matmul_tflops_bf16: float = 0.003  # what large matmuls reach per device
    matmul_tflops_fp32: float = 0.08  # the same for float32 matmuls
    attention_efficiency: float = 0.5  # share of the matmul rate attention (SDPA, causal) reaches on the model's nominal attention FLOPs
    memory_gbps: float = 10.0  # what eager elementwise kernels reach (fresh outputs): activations and the optimizer step
    kernel_overhead_us: float = 10.0  # fixed cost of one op (launch / eager dispatch)
    dtensor_op_overhead_us: float = 0.0  # extra fixed cost of an op on a DTensor (tensor parallel)
    intra_node_gbps: float = 1.0  # per rank, inside a node (NVLink; CPU: gloo over loopback)
    inter_node_gbps: float = 1.0  # per rank, between nodes (a GPU's share of the NICs)
    intra_node_latency_us: float = 50.0  # per collective
    inter_node_latency_us: float = 100.0  # per collective between nodes
    comm_overlap: float = 1.0  # share of FSDP/DP/PP traffic that hides behind compute when there is compute to hide it


@dataclass
class RunConfig:
    name: str = "run"  # the run's name (console, W&B)
    dir: str = "runs/run"  # the run's folder: config, metrics, checkpoints; one for all ranks


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)  # the Llama-style decoder's shape
    data: DataConfig = field(default_factory=DataConfig)  # the corpus and its tokenizer
    training: TrainingConfig = field(default_factory=TrainingConfig)  # steps, batch sizes, precision, memory savers
    optim: OptimConfig = field(default_factory=OptimConfig)  # the optimizer
    lr: LRConfig = field(default_factory=LRConfig)  # the learning-rate schedule
    eval: EvalConfig = field(default_factory=EvalConfig)  # held-out loss during training
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # the layout: FSDP, HSDP, TP, PP degrees
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)  # saving, keeping and resuming
    logging: LoggingConfig = field(default_factory=LoggingConfig)  # console, metrics.jsonl and W&B
    profile: ProfileConfig = field(default_factory=ProfileConfig)  # torch.profiler traces of chosen steps
    debug: DebugConfig = field(default_factory=DebugConfig)  # fault injection for trying the health policies
    cluster: Optional[ClusterConfig] = None  # cluster=<name>: log the planner's prediction at step 1 (plan_mem_gb, plan_tokens_per_s)
    run: RunConfig = field(default_factory=RunConfig)  # the run's name and folder


def register_schemas() -> None:
    """Register the schema so `configs/pretrain.yaml` is typed and closed to unknown keys."""
    ConfigStore.instance().store(name="pretrain_schema", node=PretrainConfig)


def _positive(key: str, value: int | float) -> None:
    if value <= 0:
        raise ConfigError(key, f"must be positive, got {value}.", f"set {key}=<a positive number>.")


def _one_of(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(key, f"unknown value {value!r}.", f"use one of {', '.join(choices)}.")


AUTO_ON_CUDA = ("training.compile", "checkpoint.async_save")  # "auto": on for CUDA devices, off elsewhere


def on_device(value: bool | str, device: str) -> bool:
    """A true/false/auto setting on `device`: auto is on for CUDA, off elsewhere."""
    return device == "cuda" if value == "auto" else bool(value)


def resolve_auto(cfg: PretrainConfig, device: str) -> list[str]:
    """Turn every `auto` of `AUTO_ON_CUDA` into true or false for `device` (after `validate`); returns
    what each `auto` became, as `key=value`."""
    resolved = []
    for key in AUTO_ON_CUDA:
        section, name = key.split(".")
        part = getattr(cfg, section)
        if getattr(part, name) == "auto":
            setattr(part, name, on_device("auto", device))
            resolved.append(f"{key}={str(getattr(part, name)).lower()}")
    return resolved


def validate(cfg: PretrainConfig, world_size: int, dp_size: int) -> None:
    """Check values that types cannot; `dp_size` is the data-parallel degree of the layout."""
    m, t = cfg.model, cfg.training
    for key, value in [
        ("model.dim", m.dim), ("model.n_layers", m.n_layers), ("model.n_heads", m.n_heads),
        ("model.n_kv_heads", m.n_kv_heads), ("model.vocab_size", m.vocab_size),
        ("model.ffn_hidden_dim", m.ffn_hidden_dim), ("model.max_seq_len", m.max_seq_len),
        ("training.steps", t.steps), ("training.global_batch_size", t.global_batch_size),
        ("training.micro_batch_size", t.micro_batch_size), ("training.seq_len", t.seq_len),
        ("optim.lr", cfg.optim.lr), ("logging.log_interval", cfg.logging.log_interval),
        ("checkpoint.keep", cfg.checkpoint.keep),
    ]:
        _positive(key, value)
    if m.dim % m.n_heads:
        raise ConfigError("model.n_heads", f"{m.n_heads} heads do not divide model.dim={m.dim}.",
                          "choose n_heads so that dim % n_heads == 0.")
    if (m.dim // m.n_heads) % 2:
        raise ConfigError("model.n_heads", f"head dim {m.dim // m.n_heads} is odd; RoPE needs it even.",
                          "choose n_heads so that dim / n_heads is even.")
    if m.n_heads % m.n_kv_heads:
        raise ConfigError("model.n_kv_heads", f"{m.n_kv_heads} kv heads do not divide n_heads={m.n_heads}.",
                          "choose n_kv_heads dividing n_heads.")
    if t.seq_len > m.max_seq_len:
        raise ConfigError("training.seq_len", f"{t.seq_len} exceeds model.max_seq_len={m.max_seq_len}.",
                          "lower training.seq_len or raise model.max_seq_len.")
    _one_of("training.dtype", t.dtype, ("float32", "bfloat16"))
    for key in AUTO_ON_CUDA:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if not (isinstance(value, bool) or value == "auto"):
            raise ConfigError(key, f"must be true, false or auto, got {value!r}.",
                              f"set {key}=auto (on for CUDA, off on CPU), true or false.")
    _one_of("lr.schedule", cfg.lr.schedule, ("cosine", "wsd", "constant"))
    _one_of("optim.name", cfg.optim.name, ("adamw", "muon"))
    _one_of("optim.muon_scale", cfg.optim.muon_scale, ("spectral", "adamw_rms"))
    if cfg.optim.name == "muon":
        _positive("optim.muon_lr", cfg.optim.muon_lr)
        _positive("optim.ns_steps", cfg.optim.ns_steps)
        if not 0.0 <= cfg.optim.momentum < 1.0:
            raise ConfigError("optim.momentum", f"must be within [0, 1), got {cfg.optim.momentum}.",
                              "set optim.momentum=0.95.")
    _one_of("optim.implementation", cfg.optim.implementation, ("auto", "foreach", "fused", "for_loop"))
    _one_of("data.source", cfg.data.source, ("pydoc", "text", "jsonl", "parquet", "hf", "tokens", "mix"))
    validate_sources(cfg.data)
    _one_of("checkpoint.on_corrupt", cfg.checkpoint.on_corrupt, ("fail", "previous"))
    _one_of("logging.wandb.mode", cfg.logging.wandb.mode, ("online", "offline", "disabled"))
    for key, value in [("lr.min_lr_ratio", cfg.lr.min_lr_ratio), ("lr.decay_fraction", cfg.lr.decay_fraction)]:
        if not 0.0 <= value <= 1.0:
            raise ConfigError(key, f"must be within [0, 1], got {value}.", f"set {key} to a fraction.")
    for key, value in [("checkpoint.interval", cfg.checkpoint.interval), ("eval.interval", cfg.eval.interval),
                       ("data.num_workers", cfg.data.num_workers)]:
        if value < 0:
            raise ConfigError(key, f"must be >= 0, got {value}.", f"set {key}=0 or more (0 = off / in-process).")
    if cfg.parallel.fsdp_prefetch < 0:
        raise ConfigError("parallel.fsdp_prefetch", f"must be a count of FSDP units, got {cfg.parallel.fsdp_prefetch}.",
                          "use 1 (the default: the next unit's all-gather runs during this unit's compute), 2 or more "
                          "to gather further ahead (one more gathered unit held each), or 0 for FSDP's own order.")
    if cfg.eval.interval and cfg.eval.steps < 1:
        raise ConfigError("eval.steps", f"must be >= 1 when eval runs, got {cfg.eval.steps}.",
                          "set eval.steps=1 or more, or eval.interval=0 to turn eval off.")
    if cfg.lr.warmup_steps < 0:
        raise ConfigError("lr.warmup_steps", "must be >= 0.", "set lr.warmup_steps=0 or more.")
    if cfg.data.reset_positions and not cfg.data.document_mask:
        raise ConfigError("data.reset_positions", "restarting positions per document without document masking "
                          "would let tokens of different documents share positions in one attention.",
                          "set data.document_mask=true as well, or data.reset_positions=false.")
    if not 0.0 < cfg.data.eval_fraction < 1.0:
        raise ConfigError("data.eval_fraction", f"must be in (0, 1), got {cfg.data.eval_fraction}.",
                          "set data.eval_fraction=0.05 or similar.")
    per_rank, rest = divmod(t.global_batch_size, dp_size)
    if rest:
        raise ConfigError("training.global_batch_size",
                          f"{t.global_batch_size} sequences do not split over {dp_size} data-parallel ranks.",
                          f"use a multiple of {dp_size}.")
    if per_rank % t.micro_batch_size:
        raise ConfigError("training.micro_batch_size",
                          f"{t.micro_batch_size} does not divide the {per_rank} sequences each of the "
                          f"{dp_size} data-parallel ranks gets per step (global_batch_size={t.global_batch_size}).",
                          "choose micro_batch_size dividing global_batch_size / data-parallel size.")
    if world_size < 1:
        raise ConfigError("world_size", f"invalid world size {world_size}.", "launch with torchrun.")
    validate_moe(cfg)
    validate_health(cfg)


def validate_sources(d: DataConfig) -> None:
    """`data.sources`: given exactly for data=mix, named uniquely, weights that make a mixture."""
    if d.source != "mix":
        if d.sources:
            raise ConfigError("data.sources", f"is set but data.source is {d.source!r}.",
                              "use data=mix to draw from several sources, or drop data.sources.")
        return
    example = "data.sources='[{name: web, path: prepared/web, weight: 0.7}, {name: code, path: prepared/code, weight: 0.3}]'"
    if not d.sources:
        raise ConfigError("data.sources", "data=mix needs at least one source; none given.", f"set {example}.")
    names = [s.name for s in d.sources]
    for i, s in enumerate(d.sources):
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", s.name) or names.count(s.name) > 1:
            raise ConfigError(f"data.sources[{i}].name", f"{s.name!r} is {'repeated' if names.count(s.name) > 1 else 'not a plain name'}"
                              " (it names the source's metrics and cursor).",
                              "give every source its own name of letters, digits, '_', '-' or '.'.")
        if not math.isfinite(s.weight) or s.weight < 0:
            raise ConfigError(f"data.sources[{i}].weight", f"{s.weight} is not a non-negative number.",
                              "set a weight >= 0 (weights are relative: 0.7 and 0.3, or 7 and 3).")
        if s.max_epochs is not None and not s.max_epochs > 0:
            raise ConfigError(f"data.sources[{i}].max_epochs", f"{s.max_epochs} is not positive.",
                              "set a positive number of passes, or null to repeat the source without end.")
    if sum(s.weight for s in d.sources) <= 0:
        raise ConfigError("data.sources", "every weight is 0: the mixture would draw nothing.",
                          "give at least one source a positive weight.")


def validate_health(cfg: PretrainConfig) -> None:
    """`training.health.*` and `data.skip_ranges`."""
    h = cfg.training.health
    _one_of("training.health.policy", h.policy, ("skip", "fail"))
    for key in ("spike_window", "max_consecutive_skips", "straggler_patience"):
        _positive(f"training.health.{key}", getattr(h, key))
    for key in ("spike_sigmas", "spike_min_steps", "hang_factor"):
        if getattr(h, key) < 0:
            raise ConfigError(f"training.health.{key}", f"must be >= 0, got {getattr(h, key)}.",
                              f"set training.health.{key}=0 (off) or more.")
    if h.straggler_factor <= 1:
        raise ConfigError("training.health.straggler_factor", f"must be > 1, got {h.straggler_factor}.",
                          "set it to e.g. 1.5 (a rank 50% slower than the others' median).")
    for pair in cfg.data.skip_ranges:
        if len(pair) != 2 or not 0 <= pair[0] < pair[1]:
            raise ConfigError("data.skip_ranges", f"{list(pair)} is not a range [start, end] with 0 <= start < end.",
                              "give global sequence positions as [[start, end], ...] (end excluded).")


def validate_moe(cfg: PretrainConfig) -> None:
    """MoE keys: consistent with each other, and set only on a mixture-of-experts model."""
    moe, defaults = cfg.model.moe, MoEConfig()
    if moe.n_experts == 0:
        changed = [k for k in MoEConfig.__dataclass_fields__ if getattr(moe, k) != getattr(defaults, k)]
        if changed:
            raise ConfigError(f"model.moe.{changed[0]}", "is set, but the model is dense (model.moe.n_experts=0).",
                              "pick an MoE model (e.g. model=moe_small) or set model.moe.n_experts, or drop the key.")
        if cfg.parallel.ep > 1:
            raise ConfigError("parallel.ep", f"expert parallelism (ep={cfg.parallel.ep}) needs a mixture-of-experts "
                              "model, and this one is dense.", "set parallel.ep=1, or pick model=moe_small.")
        return
    for key in ("n_experts", "top_k", "hidden_dim", "every"):
        _positive(f"model.moe.{key}", getattr(moe, key))
    for key in ("n_shared_experts", "first_dense"):
        if getattr(moe, key) < 0:
            raise ConfigError(f"model.moe.{key}", f"must be >= 0, got {getattr(moe, key)}.", f"set model.moe.{key}=0 or more.")
    if moe.top_k > moe.n_experts:
        raise ConfigError("model.moe.top_k", f"{moe.top_k} experts per token is more than the {moe.n_experts} there are.",
                          "choose model.moe.top_k <= model.moe.n_experts.")
    if moe.first_dense >= cfg.model.n_layers:
        raise ConfigError("model.moe.first_dense", f"{moe.first_dense} dense blocks leave no MoE layer among the "
                          f"{cfg.model.n_layers} blocks.", "lower model.moe.first_dense (or set n_experts=0 for dense).")
    _one_of("model.moe.score", moe.score, ("sigmoid", "softmax"))
    _one_of("model.moe.experts_impl", moe.experts_impl, ("auto", "grouped", "looped"))
    for key in ("bias_update_rate", "aux_loss_coef", "z_loss_coef", "route_scale"):
        if getattr(moe, key) < 0:
            raise ConfigError(f"model.moe.{key}", f"must be >= 0, got {getattr(moe, key)}.", f"set model.moe.{key}=0 or more.")
    if moe.n_experts % cfg.parallel.ep:
        raise ConfigError("parallel.ep", f"ep={cfg.parallel.ep} does not divide model.moe.n_experts={moe.n_experts}.",
                          "choose parallel.ep dividing the number of experts.")
