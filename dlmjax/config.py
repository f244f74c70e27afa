"""Model configuration: one frozen dataclass for every supported family.

`ModelConfig` is hashable, so it can be a static argument of jitted functions. It is
built from a Hugging Face `config.json` by `from_hf_config`, which reads the key names
its family's record names (dlmjax/families.py), and turned back into one by
`to_hf_config` (the original dict is kept and only the fields we own are rewritten, so
unknown keys survive a round trip).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from dlmjax import families
from dlmjax.errors import DlmjaxError


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: str  # a name in dlmjax.families.FAMILIES: "llada" | "dream" | "fast_dllm_v2" | "qwen2"
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
    # LLaDA2's mixture of experts and attention variants (families with `moe`; inert elsewhere).
    num_experts: int = 0  # routed experts of each MoE layer (0: every layer is a dense MLP)
    num_experts_per_tok: int = 0  # top-k
    moe_intermediate_size: int = 0  # width of each routed expert (and of each shared expert)
    num_shared_experts: int = 0  # always-on experts, one MLP of num_shared_experts x that width
    n_group: int = 1  # group-limited routing: experts in n_group contiguous groups,
    topk_group: int = 1  # of which the topk_group best (sum of each group's top-2 scores) may be picked
    routed_scaling_factor: float = 1.0  # multiplies the normalised routed weights
    first_k_dense_replace: int = 0  # layers [0, first_k_dense_replace) keep a dense MLP
    partial_rotary_factor: float = 1.0  # RoPE on the first int(head_dim x factor) channels of each head
    qk_norm: bool = False  # per-head RMSNorm of queries and keys (over head_dim)

    @property
    def rotary_dim(self) -> int:
        """Channels of each head that RoPE rotates (all but in LLaDA2, which rotates half)."""
        return int(self.head_dim * self.partial_rotary_factor)

    def is_moe_layer(self, layer: int) -> bool:
        return self.num_experts > 0 and layer >= self.first_k_dense_replace

    @property
    def family_spec(self) -> families.Family:
        """The family's record: tensor names, logit shift, position rule, config keys, ..."""
        return families.get(self.family)

    @property
    def is_autoregressive(self) -> bool:
        """A causal next-token model (the baseline): decoded token by token, never with masks."""
        return self.family_spec.autoregressive

    @property
    def shifted_logits(self) -> bool:
        """Qwen's next-token head (Qwen2; Dream and Fast-dLLM v2 keep it): position i is predicted by output i-1."""
        return self.family_spec.shifted_logits

    @property
    def positions_from_mask(self) -> bool:
        """Dream (and Qwen2) number real tokens from 0 under left padding; LLaDA keeps absolute positions."""
        return self.family_spec.positions_from_mask

    def validate(self) -> "ModelConfig":
        family = self.family_spec  # an unknown family (a manifest from another version) fails first
        if self.num_heads % self.num_kv_heads:
            raise DlmjaxError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}; "
                "fix the config so that query heads split evenly over key/value heads"
            )
        if self.num_experts:
            self._validate_moe()
        if not 0 < self.rotary_dim <= self.head_dim or self.rotary_dim % 2:
            raise DlmjaxError(
                f"partial_rotary_factor {self.partial_rotary_factor} gives {self.rotary_dim} rotary channels of head_dim "
                f"{self.head_dim}; it must give an even number in (0, head_dim]"
            )
        if self.mask_token_id is None:
            if not self.is_autoregressive:
                raise DlmjaxError(
                    f"this {family.name} config has no mask_token_id; set mask_token_id in config.json to the id of the mask token"
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

    def _validate_moe(self) -> None:
        e, g, k = self.num_experts, self.n_group, self.num_experts_per_tok
        problem = None
        if g < 1 or e % g:
            problem = f"num_experts {e} does not split into n_group {g} groups"
        elif e // g < 2:
            problem = f"groups of {e // g} expert(s): a group's score is the sum of its top 2, so each group needs at least 2"
        elif not 1 <= self.topk_group <= g:
            problem = f"topk_group {self.topk_group} is not in [1, n_group {g}]"
        elif not 1 <= k <= self.topk_group * (e // g):
            problem = (f"num_experts_per_tok {k} is not in [1, {self.topk_group * (e // g)}] "
                       f"(the experts of topk_group {self.topk_group} groups of {e // g})")
        elif self.moe_intermediate_size < 1:
            problem = f"moe_intermediate_size {self.moe_intermediate_size} is not positive"
        elif not 0 <= self.first_k_dense_replace <= self.num_layers:
            problem = f"first_k_dense_replace {self.first_k_dense_replace} is not in [0, num_layers {self.num_layers}]"
        if problem:
            raise DlmjaxError(f"inconsistent MoE config: {problem}; use the config.json that came with the checkpoint")


def _get(cfg: Mapping[str, Any], *keys: str | None, default: Any = dataclasses.MISSING) -> Any:
    for key in keys:
        if key is not None and cfg.get(key) is not None:
            return cfg[key]
    if default is dataclasses.MISSING:
        raise DlmjaxError(f"config.json lacks '{keys[0]}'; use the config.json that came with the checkpoint")
    return default


def _rope_theta(cfg: Mapping[str, Any], key: str, default: float) -> float:
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if cfg.get("rope_scaling") and cfg["rope_scaling"].get("rope_type", cfg["rope_scaling"].get("type")) not in (
        None,
        "default",
    ):
        raise DlmjaxError(
            f"rope_scaling {cfg['rope_scaling']} is not supported; use a checkpoint without RoPE scaling"
        )
    return float(cfg.get(key) or params.get("rope_theta") or default)


def _dtype_name(hf_config: Mapping[str, Any]) -> str:
    name = str(hf_config.get("torch_dtype") or hf_config.get("dtype") or "float32").replace("torch.", "")
    if name not in ("float32", "bfloat16", "float16"):
        raise DlmjaxError(f"torch_dtype '{name}' is not supported; use float32, bfloat16 or float16 weights")
    return name


def _special_ids(family: families.Family, hf_config: Mapping[str, Any]) -> dict[str, int | None]:
    ids = dataclasses.asdict(family.special_ids)
    for key in ids:
        value = hf_config.get(key)
        if isinstance(value, (list, tuple)):  # e.g. eos_token_id [eos, end-of-turn]
            if key == "eos_token_id" and len(value) > 1 and hf_config.get("eot_token_id") is None:
                ids["eot_token_id"] = int(value[1])
            value = value[0] if value else None
        if value is not None:
            ids[key] = int(value)
    if family.special_ids.mask_token_id is None and ids["mask_token_id"] is not None and ids["mask_token_id"] < 0:
        ids["mask_token_id"] = None  # a family without a mask token may write -1 for "none"
    if ids["pad_token_id"] is None:
        ids["pad_token_id"] = ids["eos_token_id"]
    return ids


def from_hf_config(hf_config: Mapping[str, Any]) -> ModelConfig:
    """Read a Hugging Face config.json dict of a supported family."""
    family = families.for_model_type(hf_config.get("model_type"))
    ids = _special_ids(family, hf_config)
    for rejected in family.rejected:
        if any(hf_config.get(key) for key in rejected.keys):
            raise DlmjaxError(rejected.message)
    keys = family.config_keys
    hidden = int(_get(hf_config, keys.hidden_size))
    heads = int(_get(hf_config, keys.num_heads))
    cfg = ModelConfig(
        family=family.name,
        vocab_size=int(_get(hf_config, *keys.vocab_size)),
        hidden_size=hidden,
        num_layers=int(_get(hf_config, keys.num_layers)),
        num_heads=heads,
        num_kv_heads=int(_get(hf_config, keys.num_kv_heads, default=heads)),
        head_dim=int(_get(hf_config, keys.head_dim, default=hidden // heads)),
        intermediate_size=int(_get(hf_config, keys.intermediate_size)),
        rms_norm_eps=float(_get(hf_config, keys.rms_norm_eps, default=family.rms_norm_eps)),
        rope_theta=_rope_theta(hf_config, keys.rope_theta, family.rope_theta),
        max_position_embeddings=int(
            _get(hf_config, keys.max_position_embeddings, default=family.max_position_embeddings)
        ),
        qkv_bias=bool(_get(hf_config, keys.qkv_bias, default=family.qkv_bias)),
        tie_word_embeddings=bool(_get(hf_config, keys.tie_word_embeddings, default=family.tie_word_embeddings)),
        bd_size=None if family.bd_size is None else int(_get(hf_config, keys.bd_size, default=family.bd_size)),
        dtype=_dtype_name(hf_config),
        **ids,
        **(_moe_fields(hf_config) if keys.moe else {}),
    )
    return cfg.validate()


# ModelConfig's MoE and attention-variant fields and their config.json keys (LLaDA2's names).
MOE_KEYS = {
    "num_experts": "num_experts", "num_experts_per_tok": "num_experts_per_tok",
    "moe_intermediate_size": "moe_intermediate_size", "num_shared_experts": "num_shared_experts",
    "n_group": "n_group", "topk_group": "topk_group", "routed_scaling_factor": "routed_scaling_factor",
    "first_k_dense_replace": "first_k_dense_replace", "partial_rotary_factor": "partial_rotary_factor",
    "qk_norm": "use_qk_norm",
}


def _moe_fields(hf_config: Mapping[str, Any]) -> dict[str, Any]:
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.name in MOE_KEYS}
    defaults["qk_norm"] = True  # LLaDA2's configuration default (C20:19)
    out = {}
    for field, key in MOE_KEYS.items():
        value = _get(hf_config, key, default=defaults[field])
        out[field] = type(defaults[field])(value)
    return out


def _id_when_absent(family: families.Family, key: str, hf_config: Mapping[str, Any], cfg: ModelConfig) -> Any:
    """The id from_hf_config reads when config.json lacks `key` (MISSING: always write it).

    Mask, EOS and pad ids are always written, as the upstream configs carry them; the end-of-turn
    id (seldom in config.json) and padding that is the EOS (Qwen2) only when they read back otherwise.
    """
    if key == "pad_token_id" and family.special_ids.pad_token_id is None:
        return cfg.eos_token_id
    if key == "eot_token_id":
        eos = hf_config.get("eos_token_id")
        return int(eos[1]) if isinstance(eos, (list, tuple)) and len(eos) > 1 else family.special_ids.eot_token_id
    return dataclasses.MISSING  # mask, eos and pad are always written


def to_hf_config(cfg: ModelConfig, original: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The config.json to export: the original dict with our fields written back."""
    family = cfg.family_spec
    keys = family.config_keys
    out = dict(original or {})
    out["model_type"] = family.model_types[0]
    out.setdefault("architectures", list(family.architectures))  # transformers picks the model class from it
    for field, key in [
        ("hidden_size", keys.hidden_size),
        ("num_heads", keys.num_heads),
        ("num_kv_heads", keys.num_kv_heads),
        ("num_layers", keys.num_layers),
        ("intermediate_size", keys.intermediate_size),
        ("vocab_size", keys.vocab_size[0]),
        ("rms_norm_eps", keys.rms_norm_eps),
        ("rope_theta", keys.rope_theta),
        ("max_position_embeddings", keys.max_position_embeddings),
        ("tie_word_embeddings", keys.tie_word_embeddings),
    ]:
        out[key] = getattr(cfg, field)
    for key in keys.vocab_size[1:]:
        out.setdefault(key, cfg.vocab_size)
    if cfg.bd_size is not None:
        out[keys.bd_size] = cfg.bd_size
    if keys.moe:
        out.update({key: getattr(cfg, field) for field, key in MOE_KEYS.items()})
    for key in ("mask_token_id", "pad_token_id", "eos_token_id", "eot_token_id"):
        value = getattr(cfg, key)
        if isinstance(out.get(key), list) and out[key] and out[key][0] == value:
            continue  # a list whose first entry is ours reads back the same
        if key not in out and value == _id_when_absent(family, key, out, cfg):
            continue  # reads back the same without the key
        if value is not None:
            out[key] = value
    out["torch_dtype"] = cfg.dtype
    return out
