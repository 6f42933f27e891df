"""Mixture-of-experts models as Hugging Face folders: the transformers class that computes what our
MoE does, its config keys, and our stacked expert weights as its per-expert hub tensors.

Sigmoid routing is Glm4Moe's (DeepSeek-V3's router: a selection-only `e_score_correction_bias`,
`norm_topk_prob`, `routed_scaling_factor`, shared experts, `first_k_dense_replace` dense blocks),
with Llama attention (no q/k norm, no bias, full rotary). Softmax routing is Mixtral's (top-k
renormalized, no shared experts, every block sparse). What neither computes is refused.

Names here are the part after ``layers.<i>.`` (ours) and ``model.layers.<i>.`` (theirs); the
attention, norms and dense blocks map as in the Llama export.
"""

from __future__ import annotations

import re
from dataclasses import asdict

import torch

from titan.config import ConfigError, ModelConfig, MoEConfig

GLM4_MOE, MIXTRAL = "glm4_moe", "mixtral"
MOE_TYPES = (GLM4_MOE, MIXTRAL)
ARCHITECTURES = {GLM4_MOE: "Glm4MoeForCausalLM", MIXTRAL: "MixtralForCausalLM"}
MLP = {GLM4_MOE: "mlp", MIXTRAL: "block_sparse_moe"}
EXPERT_NAMES = {GLM4_MOE: {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"},
                MIXTRAL: {"w1": "w1", "w3": "w3", "w2": "w2"}}
SINGLE_NAMES = {
    GLM4_MOE: {"moe.router.gate.weight": "gate.weight", "moe.router.expert_bias": "gate.e_score_correction_bias",
               "moe.shared.w1.weight": "shared_experts.gate_proj.weight",
               "moe.shared.w3.weight": "shared_experts.up_proj.weight",
               "moe.shared.w2.weight": "shared_experts.down_proj.weight"},
    MIXTRAL: {"moe.router.gate.weight": "gate.weight"},
}
GATE, BIAS = "moe.router.gate.weight", "moe.router.expert_bias"
OURS = re.compile(r"layers\.(\d+)\.(moe\..+)")
THEIRS = re.compile(r"model\.layers\.(\d+)\.(\w+)\.(.+)")
EXPERT = re.compile(r"experts\.(\d+)\.(\w+)\.weight")


def hf_model_type(moe: MoEConfig) -> str:
    """The transformers model type whose MoE computes exactly ours, or a ConfigError naming the key
    that none can represent."""
    if moe.every != 1:
        raise ConfigError("model.moe.every", f"an MoE layer every {moe.every} blocks has no Hugging Face class: "
                          "Glm4Moe and Mixtral make every block after the first dense ones sparse.",
                          "export a model trained with model.moe.every=1.")
    if moe.score == "sigmoid":
        if moe.n_experts < 2:
            raise ConfigError("model.moe.n_experts", "Glm4Moe's router needs at least 2 experts.",
                              "export a model trained with model.moe.n_experts >= 2.")
        return GLM4_MOE
    mixtral = {"n_shared_experts": (0, "shared experts"), "first_dense": (0, "dense blocks"),
               "normalize_weights": (True, "unnormalized routing weights"), "route_scale": (1.0, "a routing scale")}
    for key, (value, what) in mixtral.items():
        if getattr(moe, key) != value:
            raise ConfigError(f"model.moe.{key}", f"softmax routing exports as Mixtral, which has no {what} "
                              f"(model.moe.{key}={getattr(moe, key)!r}), and no other Hugging Face class computes "
                              "this model.", f"export a model trained with model.moe.{key}={value}, or with "
                              "model.moe.score=sigmoid (exported as Glm4Moe).")
    return MIXTRAL


def moe_hf_config(cfg: ModelConfig) -> dict:
    """The MoE class's own config.json keys (the shared Llama-like ones come from the caller)."""
    moe, kind = cfg.moe, hf_model_type(cfg.moe)
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    keys = {"architectures": [ARCHITECTURES[kind]], "model_type": kind, "num_experts_per_tok": moe.top_k,
            "rope_theta": cfg.rope_theta}
    if kind == MIXTRAL:
        return {**keys, "intermediate_size": moe.hidden_dim, "num_local_experts": moe.n_experts,
                "sliding_window": None, "router_jitter_noise": 0.0, "rope_parameters": rope}
    # rope_theta and partial_rotary_factor also top level: transformers 4.x reads them there.
    return {**keys, "intermediate_size": cfg.ffn_hidden_dim, "moe_intermediate_size": moe.hidden_dim,
            "n_routed_experts": moe.n_experts, "n_shared_experts": moe.n_shared_experts,
            "first_k_dense_replace": moe.first_dense, "norm_topk_prob": moe.normalize_weights,
            "routed_scaling_factor": moe.route_scale, "n_group": 1, "topk_group": 1, "use_qk_norm": False,
            "attention_bias": False, "num_nextn_predict_layers": 0, "partial_rotary_factor": 1.0,
            "rope_parameters": {**rope, "partial_rotary_factor": 1.0}}


def moe_to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our ``layers.<i>.moe.*`` entries as HF tensors: one per expert; for Glm4Moe without shared
    experts the empty ones its class holds. Mixtral has no selection bias: non-zero expert biases
    are refused."""
    kind = hf_model_type(cfg.moe)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        match = OURS.fullmatch(name)
        if match is None:
            continue
        index, rest = match.groups()
        prefix = f"model.layers.{index}.{MLP[kind]}."
        if rest.startswith("moe.experts."):
            part = EXPERT_NAMES[kind][rest.rsplit(".", 1)[1]]
            out.update({f"{prefix}experts.{e}.{part}.weight": w.clone() for e, w in enumerate(tensor)})
        elif kind == MIXTRAL and rest == BIAS:
            _check_zero_bias(name, tensor)
        else:
            out[prefix + SINGLE_NAMES[kind][rest]] = tensor
        if kind == GLM4_MOE and rest == GATE and not cfg.moe.n_shared_experts:
            dim = tensor.shape[1]
            out.update({prefix + "shared_experts.gate_proj.weight": tensor.new_empty(0, dim),
                        prefix + "shared_experts.up_proj.weight": tensor.new_empty(0, dim),
                        prefix + "shared_experts.down_proj.weight": tensor.new_empty(dim, 0)})
    return out


def _check_zero_bias(name: str, bias: torch.Tensor) -> None:
    if bias.any():
        raise ConfigError("model.moe.bias_update_rate", f"the checkpoint's expert biases ({name}) are non-zero, and "
                          "Mixtral's softmax router has no selection bias to hold them.", "train with "
                          "model.moe.bias_update_rate=0 for a Mixtral export, or with model.moe.score=sigmoid "
                          "(exported as Glm4Moe).")


def moe_from_hf(tensors: dict[str, torch.Tensor], model_type: str) -> dict[str, torch.Tensor]:
    """Our names for the MoE tensors of an HF folder, popped from `tensors` (the rest is left to the
    dense mapping): per-expert weights stacked, Mixtral's missing expert bias as zeros, Glm4Moe's
    empty shared experts dropped."""
    parts = {v: k for k, v in EXPERT_NAMES[model_type].items()}
    singles = {v: k for k, v in SINGLE_NAMES[model_type].items()}
    experts: dict[str, dict[int, torch.Tensor]] = {}
    state: dict[str, torch.Tensor] = {}
    for name in list(tensors):
        match = THEIRS.fullmatch(name)
        if match is None or match[2] != MLP[model_type]:
            continue
        index, _, rest = match.groups()
        expert = EXPERT.fullmatch(rest)
        if expert is not None:
            ours = f"layers.{index}.moe.experts.{parts[expert[2]]}"
            experts.setdefault(ours, {})[int(expert[1])] = tensors.pop(name)
        elif rest in singles:
            tensor = tensors.pop(name)
            if tensor.numel():
                state[f"layers.{index}.{singles[rest]}"] = tensor
    state.update({ours: torch.stack([per[e] for e in range(len(per))]) for ours, per in experts.items()})
    if model_type == MIXTRAL:
        state.update({name.replace(GATE, BIAS): torch.zeros(gate.shape[0]) for name, gate in list(state.items())
                      if name.endswith(GATE)})
    return state


def moe_model_keys(config: dict) -> dict:
    """Our model keys an HF config.json implies beyond the Llama ones: `moe` (n_experts 0 for a
    dense type); Mixtral's `intermediate_size` is the experts' width, so no `ffn_hidden_dim`."""
    kind = config.get("model_type")
    if kind == MIXTRAL:
        return {"ffn_hidden_dim": None, "moe": {
            "n_experts": config.get("num_local_experts", 8), "top_k": config.get("num_experts_per_tok", 2),
            "hidden_dim": config["intermediate_size"], "n_shared_experts": 0, "every": 1, "first_dense": 0,
            "score": "softmax", "normalize_weights": True, "route_scale": 1.0}}
    if kind == GLM4_MOE:
        return {"moe": {
            "n_experts": config.get("n_routed_experts", 128), "top_k": config.get("num_experts_per_tok", 8),
            "hidden_dim": config.get("moe_intermediate_size", 1408), "n_shared_experts": config.get("n_shared_experts", 1),
            "every": 1, "first_dense": config.get("first_k_dense_replace", 1), "score": "sigmoid",
            "normalize_weights": config.get("norm_topk_prob", True),
            "route_scale": config.get("routed_scaling_factor", 1.0)}}
    return {"moe": {"n_experts": 0}}


def moe_shape_diff(config: dict, cfg: ModelConfig) -> list[str]:
    """What differs between an HF config.json and our model in the MoE keys and in the features
    its class has and ours lacks, as "key: value there vs value here"."""
    ours, theirs = asdict(cfg.moe), moe_model_keys(config)["moe"]
    if not (theirs["n_experts"] and ours["n_experts"]):  # one side dense: the expert count says it all
        theirs = {"n_experts": theirs["n_experts"]}
    diff = [f"moe.{k}: {v!r} there vs {ours[k]!r} here" for k, v in theirs.items() if v != ours[k]]
    kind = config.get("model_type")
    if kind not in MOE_TYPES:
        return diff
    rope = config.get("rope_parameters") or {}
    required = {"head_dim": (config.get("head_dim") or cfg.dim // cfg.n_heads, cfg.dim // cfg.n_heads),
                "rope_type": (rope.get("rope_type", "default"), "default")}
    if kind == GLM4_MOE:
        n_group = config.get("n_group", 1)
        required.update({
            "use_qk_norm": (config.get("use_qk_norm", False), False),
            "attention_bias": (config.get("attention_bias", False), False),
            "partial_rotary_factor": (rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 0.5)), 1.0),
            # group-limited routing only when fewer groups are kept than there are
            "n_group": (n_group if config.get("topk_group", 1) < n_group else 1, 1)})
    else:
        required["sliding_window"] = (config.get("sliding_window"), None)
    return diff + [f"{k}: {there!r} there vs {here!r} here" for k, (there, here) in required.items() if there != here]
