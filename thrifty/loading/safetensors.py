"""Hugging Face model directories (config.json + *.safetensors) -> ModelConfig and weights."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import safetensors
import torch

from thrifty.config import ModelConfig, RopeScaling
from thrifty.errors import ModelLoadError, UnsupportedModelError

_ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "gemma3": "gemma3",
                  "gemma3_text": "gemma3"}

# The transformers config-class defaults thrifty relies on, for keys a config.json may omit
# (multimodal Gemma 3 configs leave most of text_config at its defaults).
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False,
              "max_position_embeddings": 2048, "hidden_act": "silu"},
    "mistral": {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False,
                "max_position_embeddings": 131072, "hidden_act": "silu", "sliding_window": 4096},
    "qwen2": {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False,
              "max_position_embeddings": 32768, "hidden_act": "silu", "sliding_window": 4096,
              "use_sliding_window": False, "max_window_layers": 28},
    "gemma3": {"vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
               "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
               "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 131072,
               "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0, "rope_local_base_freq": 10000.0,
               "query_pre_attn_scalar": 256, "sliding_window": 4096, "sliding_window_pattern": 6,
               "tie_word_embeddings": True},
}
# Multimodal Gemma 3 checkpoints: the text model's tensors under these prefixes, the rest skipped.
_RENAMES = (("language_model.model.", "model."), ("model.language_model.", "model."),
            ("language_model.lm_head.", "lm_head."))
_SKIPPED_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                     "model.multi_modal_projector.")


def read_hf_config(directory: Path) -> ModelConfig:
    """ModelConfig from a Hugging Face config.json (transformers 4.x or 5.x style)."""
    path = directory / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot read {path} ({error}); the model directory is incomplete") from error
    model_type = raw.get("model_type")
    if quantization := raw.get("quantization_config"):
        raise UnsupportedModelError(
            f"{path}: the checkpoint is quantized ({quantization.get('quant_method', 'unknown method')}); "
            f"thrifty reads float safetensors or GGUF files. Use the original weights or a GGUF conversion.")
    if model_type == "gemma3":  # the multimodal wrapper; thrifty runs its text model
        outer, raw = raw, raw.get("text_config") or {}
        raw.setdefault("tie_word_embeddings", outer.get("tie_word_embeddings", True))
    arch = _ARCHITECTURES.get(model_type or "")
    if arch is None:
        raise UnsupportedModelError(
            f"{path} describes a {model_type!r} model; thrifty runs model types {', '.join(_ARCHITECTURES)}")
    cfg = {**_DEFAULTS[arch], **{k: v for k, v in raw.items() if v is not None}}
    try:
        return _model_config(arch, cfg)
    except KeyError as error:
        raise ModelLoadError(f"{path} lacks {error.args[0]!r}, which thrifty needs to build the model") from error


def iter_safetensors_weights(directory: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (Hugging Face name, tensor) from every safetensors shard of the directory."""
    for file in safetensors_files(directory):
        with safetensors.safe_open(file, framework="pt") as shard:
            for key in shard.keys():
                name = _text_model_name(key)
                if name is not None:
                    yield name, shard.get_tensor(key)


def safetensors_files(directory: Path) -> list[Path]:
    """The weight files: the ones the shard index names, or every *.safetensors file."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError) as error:
            raise ModelLoadError(f"cannot read the shard index {index} ({error}); download it again") from error
        files = [directory / name for name in names]
        if missing := [f.name for f in files if not f.is_file()]:
            raise ModelLoadError(f"{directory} lacks weight shards {', '.join(missing)} named in {index.name}; "
                                 f"the download is incomplete")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(
            f"{directory} has a config.json but no *.safetensors weights; thrifty reads safetensors or GGUF "
            f"(convert PyTorch .bin checkpoints with transformers' `save_pretrained(safe_serialization=True)`)")
    return files


def _model_config(arch: str, cfg: dict[str, Any]) -> ModelConfig:
    heads = int(cfg["num_attention_heads"])
    rope = _rope_parameters(cfg)
    config = ModelConfig(
        architecture=arch,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
        max_position_embeddings=int(cfg["max_position_embeddings"]),
        rms_norm_eps=float(cfg["rms_norm_eps"]),
        rope_theta=float(rope.get("full_attention", rope).get("rope_theta", cfg["rope_theta"])),
        rope_scaling=_rope_scaling(rope.get("full_attention", rope)),
        tie_word_embeddings=bool(cfg["tie_word_embeddings"]),
        attention_bias=arch == "qwen2" or bool(cfg.get("attention_bias", False)),
        hidden_act=cfg.get("hidden_activation") or cfg["hidden_act"],
    )
    if cfg.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedModelError("the model applies RoPE to only part of each head, which thrifty does not support")
    if arch == "mistral" and cfg.get("sliding_window"):
        config.sliding_window = int(cfg["sliding_window"])
        config.layer_types = ["sliding_attention"] * config.num_layers
    elif arch == "qwen2" and cfg.get("use_sliding_window") and cfg.get("sliding_window"):
        config.sliding_window = int(cfg["sliding_window"])
        config.layer_types = cfg.get("layer_types") or [
            "sliding_attention" if i >= cfg["max_window_layers"] else "full_attention"
            for i in range(config.num_layers)]
    elif arch == "gemma3":
        pattern = int(cfg["sliding_window_pattern"])
        config.sliding_window = int(cfg["sliding_window"])
        config.layer_types = cfg.get("layer_types") or [
            "full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(config.num_layers)]
        local = rope.get("sliding_attention", {})
        if _rope_scaling(local) is not None:
            raise UnsupportedModelError("the model scales RoPE on its sliding layers, which thrifty does not support")
        config.rope_local_base_freq = float(local.get("rope_theta", cfg["rope_local_base_freq"]))
        config.query_pre_attn_scalar = float(cfg["query_pre_attn_scalar"])
        config.final_logit_softcapping = cfg.get("final_logit_softcapping")
        config.attn_logit_softcapping = cfg.get("attn_logit_softcapping")
    return config


def _rope_parameters(cfg: dict[str, Any]) -> dict[str, Any]:
    """RoPE settings as one dict (or one per layer type): transformers 5 `rope_parameters`,
    else 4.x `rope_scaling` plus `rope_theta`."""
    if cfg.get("rope_parameters"):
        return cfg["rope_parameters"]
    return {**(cfg.get("rope_scaling") or {}), "rope_theta": cfg["rope_theta"]}


def _rope_scaling(params: dict[str, Any]) -> RopeScaling | None:
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return None
    if kind not in ("linear", "dynamic", "llama3", "yarn"):
        raise UnsupportedModelError(f"RoPE scaling {kind!r} is not supported; thrifty supports "
                                    f"linear, dynamic, llama3 and yarn")
    if params.get("attention_factor") is not None or params.get("mscale") is not None:
        raise UnsupportedModelError("yarn RoPE with an explicit attention_factor or mscale is not supported")
    defaults = RopeScaling()
    original = params.get("original_max_position_embeddings")
    return RopeScaling(
        kind=kind,
        factor=float(params.get("factor", 1.0)),
        original_max_position=int(original) if original is not None else None,
        low_freq_factor=float(params.get("low_freq_factor", defaults.low_freq_factor)),
        high_freq_factor=float(params.get("high_freq_factor", defaults.high_freq_factor)),
        beta_fast=float(params.get("beta_fast") or defaults.beta_fast),
        beta_slow=float(params.get("beta_slow") or defaults.beta_slow),
    )


def _text_model_name(key: str) -> str | None:
    """The Hugging Face text-model name of a checkpoint key, or None for tensors thrifty does not use."""
    if key.startswith(_SKIPPED_PREFIXES) or key.endswith("rotary_emb.inv_freq"):
        return None  # vision tower, or a RoPE table older checkpoints saved
    for old, new in _RENAMES:
        if key.startswith(old):
            return new + key[len(old):]
    return key
