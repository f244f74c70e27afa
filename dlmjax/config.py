"""Model configuration: one frozen dataclass for every supported family.

`ModelConfig` is hashable, so it can be a static argument of jitted functions. It is
built from a Hugging Face `config.json` by `from_hf_config`, which knows each family's
key names, and turned back into one by `to_hf_config` (the original dict is kept and
only the fields we own are rewritten, so unknown keys survive a round trip).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from dlmjax.errors import DlmjaxError

# model_type (lower-cased) -> family. The family fixes the tensor names, the logit
# shift and the position rule; the numbers come from the config.
FAMILIES = {
    "llada": "llada",
    "dream": "dream",
    "fast_dllm_qwen": "fast_dllm_v2",
    "qwen2": "qwen2",  # the autoregressive baseline (Qwen2ForCausalLM)
}
AUTOREGRESSIVE = ("qwen2",)
_MODEL_TYPES = {"dream": "Dream", "fast_dllm_v2": "Fast_dLLM_Qwen", "qwen2": "qwen2"}

# Special ids the configs do not always carry (dllm-algorithms.md, section 9).
_DEFAULT_IDS = {
    "llada": dict(mask_token_id=126336, eos_token_id=126081, pad_token_id=126081, eot_token_id=126348),
    "dream": dict(mask_token_id=151666, eos_token_id=151643, pad_token_id=151643, eot_token_id=151645),
    "fast_dllm_v2": dict(mask_token_id=151665, eos_token_id=151643, pad_token_id=151643, eot_token_id=151645),
    # Qwen2 has no mask token; padding defaults to the config's EOS (Qwen2.5's configs carry no pad id).
    "qwen2": dict(mask_token_id=None, eos_token_id=151643, pad_token_id=None, eot_token_id=151645),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: str  # "llada" | "dream" | "fast_dllm_v2" | "qwen2" (autoregressive)
    vocab_size: int  # rows of the embedding and columns of the logits
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    qkv_bias: bool
    tie_word_embeddings: bool
    mask_token_id: int | None  # None only for autoregressive families
    pad_token_id: int | None
    eos_token_id: int | None
    eot_token_id: int | None = None
    bd_size: int | None = None  # Fast-dLLM v2 block-diffusion block size
    dtype: str = "float32"  # dtype the checkpoint stores its weights in

    @property
    def is_autoregressive(self) -> bool:
        """A causal next-token model (the baseline): decoded token by token, never with masks."""
        return self.family in AUTOREGRESSIVE

    @property
    def shifted_logits(self) -> bool:
        """Qwen's next-token head (Qwen2; Dream and Fast-dLLM v2 keep it): position i is predicted by output i-1."""
        return self.family in ("dream", "fast_dllm_v2", "qwen2")

    @property
    def positions_from_mask(self) -> bool:
        """Dream (and Qwen2) number real tokens from 0 under left padding; LLaDA keeps absolute positions."""
        return self.family in ("dream", "fast_dllm_v2", "qwen2")

    def validate(self) -> "ModelConfig":
        if self.num_heads % self.num_kv_heads:
            raise DlmjaxError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}; "
                "fix the config so that query heads split evenly over key/value heads"
            )
        if self.mask_token_id is None:
            if not self.is_autoregressive:
                raise DlmjaxError(
                    f"this {self.family} config has no mask_token_id; set mask_token_id in config.json to the id of the mask token"
                )
            return self
        if self.pad_token_id is not None and self.mask_token_id == self.pad_token_id:
            raise DlmjaxError(
                f"mask_token_id equals pad_token_id ({self.mask_token_id}), so padding would be decoded as masks; "
                "set a distinct pad_token_id (or mask_token_id) in config.json"
            )
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise DlmjaxError(
                f"mask_token_id {self.mask_token_id} is outside the vocabulary of {self.vocab_size}; "
                "set mask_token_id in config.json to the id of the mask token"
            )
        return self


def _get(cfg: Mapping[str, Any], *keys: str, default: Any = dataclasses.MISSING) -> Any:
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    if default is dataclasses.MISSING:
        raise DlmjaxError(f"config.json lacks '{keys[0]}'; use the config.json that came with the checkpoint")
    return default


def _rope_theta(cfg: Mapping[str, Any], default: float) -> float:
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if cfg.get("rope_scaling") and cfg["rope_scaling"].get("rope_type", cfg["rope_scaling"].get("type")) not in (
        None,
        "default",
    ):
        raise DlmjaxError(
            f"rope_scaling {cfg['rope_scaling']} is not supported; use a checkpoint without RoPE scaling"
        )
    return float(cfg.get("rope_theta") or params.get("rope_theta") or default)


def family_of(hf_config: Mapping[str, Any]) -> str:
    model_type = str(hf_config.get("model_type", "")).lower()
    if model_type not in FAMILIES:
        raise DlmjaxError(
            f"model_type '{hf_config.get('model_type')}' is not supported; dlmjax loads "
            "LLaDA ('llada'), Dream ('Dream'), Fast-dLLM v2 ('Fast_dLLM_Qwen') and Qwen2 ('qwen2') checkpoints"
        )
    return FAMILIES[model_type]


def _dtype_name(hf_config: Mapping[str, Any]) -> str:
    name = str(hf_config.get("torch_dtype") or hf_config.get("dtype") or "float32").replace("torch.", "")
    if name not in ("float32", "bfloat16", "float16"):
        raise DlmjaxError(f"torch_dtype '{name}' is not supported; use float32, bfloat16 or float16 weights")
    return name


def from_hf_config(hf_config: Mapping[str, Any]) -> ModelConfig:
    """Read a Hugging Face config.json dict of a supported family."""
    family = family_of(hf_config)
    ids = dict(_DEFAULT_IDS[family])
    for key in ids:
        value = hf_config.get(key)
        if isinstance(value, (list, tuple)):  # e.g. eos_token_id [eos, end-of-turn]
            if key == "eos_token_id" and len(value) > 1 and hf_config.get("eot_token_id") is None:
                ids["eot_token_id"] = int(value[1])
            value = value[0] if value else None
        if value is not None:
            ids[key] = int(value)
    if family in AUTOREGRESSIVE:
        if ids["mask_token_id"] is not None and ids["mask_token_id"] < 0:
            ids["mask_token_id"] = None  # -1: "no mask token"
        if ids["pad_token_id"] is None:
            ids["pad_token_id"] = ids["eos_token_id"]
        if hf_config.get("use_sliding_window"):
            raise DlmjaxError("this Qwen2 config uses sliding-window attention, which dlmjax does not implement; "
                              "set use_sliding_window to false (Qwen2/2.5 checkpoints ship it off)")
    if family == "llada":
        hidden = int(_get(hf_config, "d_model"))
        heads = int(_get(hf_config, "n_heads"))
        if hf_config.get("include_bias") or hf_config.get("alibi") or hf_config.get("attention_layer_norm"):
            raise DlmjaxError(
                "this LLaDA config uses biases, ALiBi or QK-norm, which LLaDA-8B does not; "
                "dlmjax supports the released LLaDA architecture only"
            )
        cfg = ModelConfig(
            family=family,
            vocab_size=int(_get(hf_config, "embedding_size", "vocab_size")),
            hidden_size=hidden,
            num_layers=int(_get(hf_config, "n_layers")),
            num_heads=heads,
            num_kv_heads=int(_get(hf_config, "n_kv_heads", default=heads)),
            head_dim=hidden // heads,
            intermediate_size=int(_get(hf_config, "mlp_hidden_size")),
            rms_norm_eps=float(_get(hf_config, "rms_norm_eps", default=1e-5)),
            rope_theta=_rope_theta(hf_config, 10000.0),
            max_position_embeddings=int(_get(hf_config, "max_sequence_length", default=4096)),
            qkv_bias=bool(hf_config.get("include_qkv_bias", False)),
            tie_word_embeddings=bool(hf_config.get("weight_tying", False)),
            dtype=_dtype_name(hf_config),
            **ids,
        )
    else:
        hidden = int(_get(hf_config, "hidden_size"))
        heads = int(_get(hf_config, "num_attention_heads"))
        cfg = ModelConfig(
            family=family,
            vocab_size=int(_get(hf_config, "vocab_size")),
            hidden_size=hidden,
            num_layers=int(_get(hf_config, "num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=int(_get(hf_config, "num_key_value_heads", default=heads)),
            head_dim=int(_get(hf_config, "head_dim", default=hidden // heads)),
            intermediate_size=int(_get(hf_config, "intermediate_size")),
            rms_norm_eps=float(_get(hf_config, "rms_norm_eps", default=1e-6)),
            rope_theta=_rope_theta(hf_config, 1e4 if family == "qwen2" else 1e6),  # Qwen2Config's default
            max_position_embeddings=int(_get(hf_config, "max_position_embeddings", default=32768)),
            qkv_bias=True,
            tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
            bd_size=int(_get(hf_config, "bd_size", default=32)) if family == "fast_dllm_v2" else None,
            dtype=_dtype_name(hf_config),
            **ids,
        )
    return cfg.validate()


def to_hf_config(cfg: ModelConfig, original: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The config.json to export: the original dict with our fields written back."""
    out = dict(original or {})
    if cfg.family == "llada":
        out.update(
            model_type="llada",
            d_model=cfg.hidden_size,
            n_heads=cfg.num_heads,
            n_kv_heads=cfg.num_kv_heads,
            n_layers=cfg.num_layers,
            mlp_hidden_size=cfg.intermediate_size,
            embedding_size=cfg.vocab_size,
            rms_norm_eps=cfg.rms_norm_eps,
            rope_theta=cfg.rope_theta,
            max_sequence_length=cfg.max_position_embeddings,
            weight_tying=cfg.tie_word_embeddings,
        )
        out.setdefault("vocab_size", cfg.vocab_size)
    else:
        out.update(
            model_type=_MODEL_TYPES[cfg.family],
            hidden_size=cfg.hidden_size,
            num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_kv_heads,
            num_hidden_layers=cfg.num_layers,
            intermediate_size=cfg.intermediate_size,
            vocab_size=cfg.vocab_size,
            rms_norm_eps=cfg.rms_norm_eps,
            rope_theta=cfg.rope_theta,
            max_position_embeddings=cfg.max_position_embeddings,
            tie_word_embeddings=cfg.tie_word_embeddings,
        )
        if cfg.bd_size is not None:
            out["bd_size"] = cfg.bd_size
    for key in ("mask_token_id", "pad_token_id", "eos_token_id"):
        value = getattr(cfg, key)
        if isinstance(out.get(key), list) and out[key] and out[key][0] == value:
            continue  # a list whose first entry is ours reads back the same
        if key == "pad_token_id" and key not in out and cfg.is_autoregressive and value == cfg.eos_token_id:
            continue  # reads back as the EOS default
        if value is not None:
            out[key] = value
    out["torch_dtype"] = cfg.dtype
    return out
