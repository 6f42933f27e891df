"""Hugging Face folders in and out: `config.json`, `model.safetensors` (sharded with an index
when large) and tokenizer files. A dense model is a Llama; a mixture of experts a Glm4Moe or
Mixtral (see :mod:`titan.checkpoint.hf_moe`). Our rotary embeddings already use HF's rotate-half
layout, so the weights map one to one by name, with no permutation (experts split per expert)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from parallel.tensors import copy_full_into, local_device
from titan.checkpoint.hf_moe import MOE_TYPES, moe_from_hf, moe_hf_config, moe_model_keys, moe_shape_diff, moe_to_hf
from titan.config import ConfigError, ModelConfig

LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
EOT_TOKEN = "<|endoftext|>"
INDEX = "model.safetensors.index.json"
SHAPE_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_hidden_dim", "tie_embeddings")


def to_hf_name(name: str) -> str:
    if name in TOP_NAMES:
        return TOP_NAMES[name]
    _, index, rest = name.split(".", 2)  # layers.<i>.<rest>
    return f"model.layers.{index}.{LAYER_NAMES[rest]}"


def from_hf_name(name: str) -> str:
    for ours, theirs in TOP_NAMES.items():
        if name == theirs:
            return ours
    _, _, index, rest = name.split(".", 3)  # model.layers.<i>.<rest>
    inverse = {v: k for k, v in LAYER_NAMES.items()}
    return f"layers.{index}.{inverse[rest]}"


def hf_config(cfg: ModelConfig, eot_id: int) -> dict:
    """config.json: a Llama's, or the MoE class's that computes this mixture of experts (a
    ConfigError names the key when none does)."""
    common = {
        "hidden_act": "silu", "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.dim // cfg.n_heads,
        "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std, "bos_token_id": eot_id,
        "eos_token_id": eot_id, "torch_dtype": "float32",
    }
    if cfg.moe.n_experts:
        return {**moe_hf_config(cfg), **common}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **common,
            "intermediate_size": cfg.ffn_hidden_dim, "rope_theta": cfg.rope_theta, "attention_bias": False,
            "mlp_bias": False}


def model_config_from_hf(config: dict, name: str) -> dict:
    """Our model keys from an HF config.json (None: a key the folder does not have)."""
    return {"name": name, "dim": config["hidden_size"], "n_layers": config["num_hidden_layers"],
            "n_heads": config["num_attention_heads"],
            "n_kv_heads": config.get("num_key_value_heads", config["num_attention_heads"]),
            "vocab_size": config["vocab_size"], "ffn_hidden_dim": config["intermediate_size"],
            "norm_eps": config.get("rms_norm_eps", 1e-5), "rope_theta": config.get("rope_theta", 10000.0),
            "max_seq_len": config.get("max_position_embeddings", 2048),
            "tie_embeddings": config.get("tie_word_embeddings", False), **moe_model_keys(config)}


def hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our full state dict under HF names (MoE layers per expert); a tied output is left out."""
    tensors = {to_hf_name(k): v for k, v in state.items()
               if ".moe." not in k and not (cfg.tie_embeddings and k == "output.weight")}
    return {**tensors, **moe_to_hf(state, cfg)} if cfg.moe.n_experts else tensors


def save_hf_weights(tensors: dict[str, torch.Tensor], out: Path, max_shard_bytes: int) -> None:
    """Write HF-named tensors as safetensors, sharded with an index past `max_shard_bytes`."""
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))


def load_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Our names -> full tensors from an HF folder (single file or sharded with an index)."""
    index = folder / INDEX
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(load_file(str(folder / file)))
    model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    state = moe_from_hf(tensors, model_type) if model_type in MOE_TYPES else {}
    return {**{from_hf_name(k): v for k, v in tensors.items()}, **state}


def write_byte_tokenizer(out: Path, max_len: int) -> None:
    """Our byte-level tokenizer as a `tokenizers` ByteLevel BPE without merges: byte b -> id b,
    end-of-text -> 256, so `AutoTokenizer` gives the ids we trained on."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    byte_chars = _bytes_to_unicode()
    vocab = {byte_chars[b]: b for b in range(256)}
    assert set(vocab) == set(alphabet)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([EOT_TOKEN])
    tokenizer.save(str(out / "tokenizer.json"))
    write_tokenizer_config(out, EOT_TOKEN, max_len)


def write_tokenizer_config(out: Path, eot_token: str, max_len: int) -> None:
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eot_token, "bos_token": eot_token,
        "model_max_length": max_len, "clean_up_tokenization_spaces": False}, indent=1))
    (out / "special_tokens_map.json").write_text(json.dumps({"eos_token": eot_token, "bos_token": eot_token}))


def _bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 byte -> printable character table that ByteLevel pre-tokenization uses."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def check_init_from(cfg: ModelConfig) -> None:
    """`model.init_from` must be an HF folder (Llama; Glm4Moe or Mixtral for MoE) of this model's shape."""
    folder = Path(cfg.init_from)
    if not (folder / "config.json").is_file():
        raise ConfigError("model.init_from", f"{folder} holds no config.json.", "point it at a Hugging Face Llama folder.")
    config = json.loads((folder / "config.json").read_text())
    theirs = model_config_from_hf(config, cfg.name)
    diff = [f"{k}: {theirs[k]!r} there vs {getattr(cfg, k)!r} here" for k in SHAPE_KEYS
            if theirs[k] is not None and theirs[k] != getattr(cfg, k)]
    diff += moe_shape_diff(config, cfg)
    if diff:
        raise ConfigError("model.init_from", f"{folder} has another shape ({'; '.join(diff)}).",
                          "set the model.* keys to its shape (see its config.json).")


@torch.no_grad()
def load_pretrained(model: torch.nn.Module, folder: Path) -> None:
    """Overwrite every parameter (plain or sharded) with the folder's weights, by global name, and
    the persistent buffers the folder holds (the expert biases)."""
    state = load_hf_weights(folder)
    for name, param in model.named_parameters():
        source = state.get(name, state.get("tok_embeddings.weight") if name == "output.weight" else None)
        copy_full_into(param, source.to(device=local_device(param), dtype=param.dtype))
    for name, buffer in model.named_buffers():
        if name in state:
            buffer.copy_(state[name])
