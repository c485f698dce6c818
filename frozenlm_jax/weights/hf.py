"""HF model directories (config.json + safetensors [+ tokenizer.json]) and Hub ids, read without torch."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import tokenizers
from safetensors import SafetensorError, safe_open

from frozenlm_jax.weights.params import CheckpointError
from frozenlm_jax.tokenizer import Tokenizer
from frozenlm_jax.models.lm import LMConfig, RopeScaling

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gpt2")
HUB_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
             "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"]


class SafetensorsSource:
    """Tensors of `model.safetensors` or of the shards listed in `model.safetensors.index.json`."""

    def __init__(self, directory: Path, family: str):
        directory = Path(directory)
        index = directory / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (directory / "model.safetensors").exists():
            files = ["model.safetensors"]
        else:
            raise CheckpointError(
                f"{directory} has no model.safetensors or model.safetensors.index.json; "
                "save the model with save_pretrained(..., safe_serialization=True)")
        self._handles, self._where = {}, {}
        for file in files:
            path = directory / file
            if not path.exists():
                raise CheckpointError(f"shard {file} listed in {index.name} is missing from {directory}")
            try:
                handle = safe_open(str(path), framework="np")
                names = list(handle.keys())
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{path} is truncated or corrupt ({e}); download it again") from e
            self._handles[file] = (path, handle)
            for name in names:
                self._where[_canonical_name(name, family)] = (file, name)

    def names(self) -> set[str]:
        return set(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        file, raw = self._where[name]
        return tuple(self._handles[file][1].get_slice(raw).get_shape())

    def get(self, name: str) -> np.ndarray:
        file, raw = self._where[name]
        path, handle = self._handles[file]
        try:
            return handle.get_tensor(raw)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"tensor {raw!r} in {path} cannot be read ({e}); the file is corrupt") from e


def _canonical_name(name: str, family: str) -> str:
    """GPT-2 checkpoints come with or without the `transformer.` prefix; the tables use it."""
    if family == "gpt2" and not name.startswith(("transformer.", "lm_head.")):
        return "transformer." + name
    return name


def _rope_settings(cfg: dict) -> tuple[float, RopeScaling | None]:
    """RoPE theta and scaling from either transformers v5 (`rope_parameters`) or v4 (`rope_theta`,
    `rope_scaling`) config keys."""
    params = dict(cfg.get("rope_parameters") or {})
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    scaling = params if params.get("rope_type", "default") != "default" else (cfg.get("rope_scaling") or {})
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type not in ("linear", "llama3"):
        raise CheckpointError(f"unsupported rope scaling {rope_type!r}; supported: default, linear, llama3")
    keys = ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    return theta, RopeScaling(rope_type, float(scaling["factor"]), **{k: scaling[k] for k in keys if k in scaling})


def _sliding_window(cfg: dict, model_type: str) -> int | None:
    """The attention window of every layer, or None for full attention. Qwen2/Qwen3 slide only with
    `use_sliding_window`, on the layers `layer_types` names (default: those from `max_window_layers` on)."""
    if model_type == "mistral":
        return cfg.get("sliding_window")
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window") else None
    if model_type not in ("qwen2", "qwen3") or window is None:
        return None
    layers, first = cfg["num_hidden_layers"], cfg.get("max_window_layers", 28)
    types = cfg.get("layer_types") or ["sliding_attention" if i >= first else "full_attention" for i in range(layers)]
    sliding = [i for i, kind in enumerate(types) if kind == "sliding_attention"]
    if not sliding:
        return None
    if len(sliding) < layers:
        raise CheckpointError(
            f"config.json sets use_sliding_window=true with a window of {window} on layers {sliding} only "
            f"(max_window_layers={first}, of num_hidden_layers={layers}); a window on some layers but not others "
            "is not supported. For inputs of at most sliding_window tokens the window changes nothing: set "
            '"use_sliding_window": false in config.json to load it for those.')
    return window


def config_from_hf(cfg: dict, **overrides) -> LMConfig:
    """An LMConfig from a transformers config.json dict."""
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if model_type == "gpt2":
        if cfg.get("scale_attn_by_inverse_layer_idx") or not cfg.get("scale_attn_weights", True):
            raise CheckpointError("GPT-2 configs with scale_attn_by_inverse_layer_idx or without "
                                  "scale_attn_weights are not supported")
        d = cfg["n_embd"]
        fields = dict(
            family="gpt2", vocab_size=cfg["vocab_size"], hidden_size=d, num_layers=cfg["n_layer"],
            num_heads=cfg["n_head"], num_kv_heads=cfg["n_head"], head_dim=d // cfg["n_head"],
            intermediate_size=cfg.get("n_inner") or 4 * d, max_position_embeddings=cfg["n_positions"],
            norm_eps=cfg.get("layer_norm_epsilon", 1e-5), activation=cfg.get("activation_function", "gelu_new"),
            tie_word_embeddings=cfg.get("tie_word_embeddings", True))
    else:
        theta, scaling = _rope_settings(cfg)
        heads = cfg["num_attention_heads"]
        fields = dict(
            family="llama", vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
            num_layers=cfg["num_hidden_layers"], num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            intermediate_size=cfg["intermediate_size"],
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            norm_eps=cfg.get("rms_norm_eps", 1e-6), activation=cfg.get("hidden_act", "silu"),
            rope_theta=theta, rope_scaling=scaling,
            sliding_window=_sliding_window(cfg, model_type),
            # Qwen2 has biases on q, k and v (not o) whatever the config says; Qwen3 normalises q and k heads.
            attention_bias=model_type != "qwen2" and bool(cfg.get("attention_bias", False)),
            qkv_bias=model_type == "qwen2", qk_norm=model_type == "qwen3", mlp_bias=bool(cfg.get("mlp_bias", False)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)))
    try:
        return LMConfig(**{**fields, **overrides})
    except ValueError as e:
        raise CheckpointError(f"config.json describes a model this library cannot build: {e}") from e


def _first_id(value):
    return value[0] if isinstance(value, list) else value


def tokenizer_from_hf_dir(directory: Path, cfg: dict) -> Tokenizer | None:
    """The directory's tokenizer.json with special ids from config.json, or None without one."""
    path = Path(directory) / "tokenizer.json"
    if not path.exists():
        return None
    backend = tokenizers.Tokenizer.from_file(str(path))
    eos = _first_id(cfg.get("eos_token_id"))
    pad = _first_id(cfg.get("pad_token_id"))
    return Tokenizer(backend, bos_id=_first_id(cfg.get("bos_token_id")), eos_id=eos,
                     pad_id=eos if pad is None else pad)


def read_hf_config(directory: Path) -> dict:
    path = Path(directory) / "config.json"
    if not path.exists():
        raise CheckpointError(f"{directory} has no config.json; an HF model directory needs config.json "
                              "and model.safetensors (or a sharded model.safetensors.index.json)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from e


def fetch_from_hub(repo_id: str) -> Path:
    """Download config, tokenizer and safetensors of `repo_id` into the HF cache; return the snapshot dir.

    Offline (HF_HUB_OFFLINE=1, or no network) only the local cache is used.
    """
    import huggingface_hub

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        return Path(huggingface_hub.snapshot_download(
            repo_id, allow_patterns=HUB_FILES, local_files_only=offline))
    except Exception as e:  # noqa: BLE001 - connection, HTTP and cache errors all mean 'not available'
        mode = "offline mode (HF_HUB_OFFLINE) with no cached copy" if offline else "no network or no such repo"
        raise CheckpointError(
            f"cannot fetch {repo_id!r} from the Hugging Face Hub: {mode} ({type(e).__name__}). Pass a local "
            "HF directory (config.json + model.safetensors) or a .gguf file path instead.") from e
