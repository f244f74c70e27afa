"""Random initialisation for training from scratch (loaded models start from checkpoints instead)."""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
from flax import nnx

from dlmjax.config import ModelConfig
from dlmjax.model import Transformer


def init_model(cfg: ModelConfig, seed: int = 0, *, std: float = 0.02, dtype=jnp.float32) -> Transformer:
    """A `Transformer` with GPT-2-style weights: N(0, std) everywhere, the residual-stream
    outputs (o_proj, down_proj) scaled by 1/sqrt(2 * layers), norms at one, biases at zero."""
    model = Transformer(cfg, dtype=dtype)
    graphdef, state = nnx.split(model)
    pure = nnx.to_pure_dict(state)
    key = jax.random.key(seed)
    out_std = std / (2 * cfg.num_layers) ** 0.5

    def init(path, value):
        names = [str(p.key if hasattr(p, "key") else p) for p in path]
        if names[-1] == "bias" or any(name.endswith("norm") for name in names):
            return value  # zeros for biases, ones for norm weights
        scale = out_std if len(names) > 1 and names[-2] in ("o_proj", "down_proj") else std
        leaf_key = jax.random.fold_in(key, zlib.crc32("/".join(names).encode()) % (2**31))
        return (scale * jax.random.normal(leaf_key, value.shape, jnp.float32)).astype(value.dtype)

    pure = jax.tree_util.tree_map_with_path(init, pure)
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)
