"""The KV cache: an explicit pytree that the model takes and returns.

It is never module state, so it can ride in a `lax.while_loop` carry and be donated to
a jitted call. Keys are stored after RoPE, so a cached key never needs re-rotation.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dlmjax.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: tuple[jax.Array, ...]  # per layer [B, Hkv, S, D], post-RoPE
    v: tuple[jax.Array, ...]  # per layer [B, Hkv, S, D]

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, length: int, dtype) -> "KVCache":
        shape = (batch, cfg.num_kv_heads, length, cfg.head_dim)
        return cls(
            k=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
            v=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
        )

    @property
    def length(self) -> int:
        return self.k[0].shape[2]

    def write(self, layer: int, k: jax.Array, v: jax.Array, index) -> "KVCache":
        """Write k, v [B, Hkv, T, D] of one layer at slots [index, index+T)."""
        new_k = jax.lax.dynamic_update_slice_in_dim(self.k[layer], k.astype(self.k[layer].dtype), index, axis=2)
        new_v = jax.lax.dynamic_update_slice_in_dim(self.v[layer], v.astype(self.v[layer].dtype), index, axis=2)
        return KVCache(
            k=self.k[:layer] + (new_k,) + self.k[layer + 1 :],
            v=self.v[:layer] + (new_v,) + self.v[layer + 1 :],
        )
