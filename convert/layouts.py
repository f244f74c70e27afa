"""Hugging Face tensor names <-> dlmjax parameter paths, from the family's record.

Parameters keep PyTorch's [out, in] layout, so every entry is a plain rename: no
transpose, no reshape, and an export writes back the very bytes it read.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterator

from dlmjax.config import ModelConfig

Path = tuple  # a parameter path in nnx.to_pure_dict form, e.g. ("layers", 0, "q_proj", "weight")


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    hf_name: str
    path: Path
    shape: tuple[int, ...]
    group: str  # conversion unit: "embed" or "layer_000"...; peak memory is one group
    index: int | None = None  # a slice [index] of the parameter at `path` (one expert of a stacked [E, ...] weight)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_norm(self) -> bool:
        """An RMSNorm scale (our module names of norms end in "norm")."""
        return len(self.path) > 1 and self.path[-2].endswith("norm")


def block_names(cfg: ModelConfig) -> dict[str, str]:
    """Per-block module names: ours -> Hugging Face."""
    return cfg.family_spec.block_names()


def block_prefix(cfg: ModelConfig, layer: int) -> str:
    return cfg.family_spec.tensor_names.block_prefix.format(layer=layer)


def _block_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    d, f = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return {
        "qkv_proj": (q + 2 * kv, d),
        "q_proj": (q, d),
        "k_proj": (kv, d),
        "v_proj": (kv, d),
        "o_proj": (d, q),
        "gate_proj": (f, d),
        "up_proj": (f, d),
        "down_proj": (d, f),
    }


def projection_shape(cfg: ModelConfig, role: str) -> tuple[int, int]:
    """[out, in] of one projection role."""
    return _block_shapes(cfg)[role]


def group_name(layer: int | None) -> str:
    return "embed" if layer is None else f"layer_{layer:03d}"


def tensor_specs(cfg: ModelConfig) -> list[TensorSpec]:
    """Every tensor a checkpoint of `cfg` must hold, in export order."""
    d, v = cfg.hidden_size, cfg.vocab_size
    names = cfg.family_spec.tensor_names
    specs = [TensorSpec(names.embed, ("embed",), (v, d), "embed")]
    shapes = _block_shapes(cfg)
    for layer in range(cfg.num_layers):
        prefix, group = block_prefix(cfg, layer), group_name(layer)
        for ours, theirs in names.block:
            if ours in MLP_ROLES and cfg.is_moe_layer(layer):
                continue  # the experts take the dense MLP's place
            if ours in ("q_norm", "k_norm"):
                if cfg.qk_norm:
                    specs.append(TensorSpec(f"{prefix}{theirs}.weight", ("layers", layer, ours, "weight"), (cfg.head_dim,), group))
                continue
            if ours.endswith("norm"):
                specs.append(TensorSpec(f"{prefix}{theirs}.weight", ("layers", layer, ours, "weight"), (d,), group))
                continue
            specs.append(TensorSpec(f"{prefix}{theirs}.weight", ("layers", layer, ours, "weight"), shapes[ours], group))
            if cfg.qkv_bias and ours in ("q_proj", "k_proj", "v_proj"):
                specs.append(TensorSpec(f"{prefix}{theirs}.bias", ("layers", layer, ours, "bias"), shapes[ours][:1], group))
        if cfg.is_moe_layer(layer):
            specs += _moe_specs(cfg, layer)
    specs.append(TensorSpec(names.final_norm, ("final_norm", "weight"), (d,), "embed"))
    if not cfg.tie_word_embeddings:
        specs.append(TensorSpec(head_name(cfg), ("lm_head",), (v, d), "embed"))
    return specs


MLP_ROLES = ("gate_proj", "up_proj", "down_proj")


def _moe_specs(cfg: ModelConfig, layer: int) -> list[TensorSpec]:
    """A mixture-of-experts layer's tensors: the router, each expert's three projections (slices
    of our stacked [E, out, in] weights) and the shared expert."""
    names, prefix, group = cfg.family_spec.tensor_names, block_prefix(cfg, layer), group_name(layer)
    d, m, e = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
    out = [
        TensorSpec(f"{prefix}{names.router}.weight", ("layers", layer, "moe", "router", "weight"), (e, d), group),
        TensorSpec(f"{prefix}{names.router}.expert_bias", ("layers", layer, "moe", "router", "expert_bias"), (e,), group),
    ]
    shapes = {"gate_proj": (m, d), "up_proj": (m, d), "down_proj": (d, m)}
    for expert in range(e):
        module = names.expert.format(expert=expert)
        out += [TensorSpec(f"{prefix}{module}.{role}.weight", ("layers", layer, "moe", "experts", role), shape, group, expert)
                for role, shape in shapes.items()]
    if cfg.num_shared_experts:
        s = m * cfg.num_shared_experts
        shared = {"gate_proj": (s, d), "up_proj": (s, d), "down_proj": (d, s)}
        out += [TensorSpec(f"{prefix}{names.shared_expert}.{role}.weight", ("layers", layer, "moe", "shared", role, "weight"),
                           shape, group) for role, shape in shared.items()]
    return out


def parameter_shapes(cfg: ModelConfig, specs: list[TensorSpec] | None = None) -> dict[Path, tuple[int, ...]]:
    """Each parameter's shape: its tensor's, or [E, *slice] for a weight stacked from E slices."""
    out: dict[Path, tuple[int, ...]] = {}
    for spec in specs if specs is not None else tensor_specs(cfg):
        out[spec.path] = spec.shape if spec.index is None else (cfg.num_experts, *spec.shape)
    return out


def head_name(cfg: ModelConfig) -> str:
    """The LM head tensor (tied checkpoints may still carry it, as a copy of the embedding)."""
    return cfg.family_spec.tensor_names.lm_head


def hf_module_to_role(cfg: ModelConfig) -> dict[str, str]:
    """Last component of a Hugging Face module name -> our projection role (for LoRA targets)."""
    return {theirs.split(".")[-1]: ours for ours, theirs in block_names(cfg).items() if not ours.endswith("norm")}


def iter_groups(specs: list[TensorSpec]) -> Iterator[tuple[str, list[TensorSpec]]]:
    order: dict[str, list[TensorSpec]] = {}
    for spec in specs:
        order.setdefault(spec.group, []).append(spec)
    yield from order.items()
