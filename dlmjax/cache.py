"""The KV cache: an explicit pytree that the model takes and returns.

It is never module state, so it can ride in a `lax.while_loop` carry and be donated to
a jitted call. Keys are stored after RoPE, so a cached key never needs re-rotation.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dlmjax.config import ModelConfig
from dlmjax.sharding import Layout, constrain

AXES = ("batch", "kv_heads", "length", "head_dim")  # logical axes of every k and v


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: tuple[jax.Array, ...]  # per layer [B, Hkv, S, D], post-RoPE
    v: tuple[jax.Array, ...]  # per layer [B, Hkv, S, D]
    written: jax.Array  # [S] bool: slots that hold keys (a slot never written is never attended to)
    lengths: jax.Array  # int32 scalar: one past the highest slot written

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, length: int, dtype) -> "KVCache":
        """An empty cache of `length` slots (callers bucket `length`, so shapes stay static)."""
        shape = (batch, cfg.num_kv_heads, length, cfg.head_dim)
        return cls(
            k=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
            v=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
            written=jnp.zeros((length,), bool),
            lengths=jnp.int32(0),
        )

    def constrain(self, layout: Layout | None) -> "KVCache":
        """The cache pinned to its sharding over `layout`'s mesh (itself without a layout)."""
        if layout is None:
            return self
        return dataclasses.replace(
            self,
            k=tuple(constrain(k, AXES, layout) for k in self.k),
            v=tuple(constrain(v, AXES, layout) for v in self.v),
            written=constrain(self.written, ("length",), layout),
            lengths=constrain(self.lengths, (), layout),
        )

    @property
    def length(self) -> int:
        return self.k[0].shape[2]

    def mark_written(self, index, count: int, keep: jax.Array | None = None) -> "KVCache":
        """Record that slots [index, index + count) (less the kept ones) now hold keys. `index` is a
        scalar, or [B] (a window per row): then a slot counts as written once any row wrote it."""
        if jnp.ndim(index) == 1:
            slots = jnp.arange(self.length)[None, :]
            hit = (slots >= index[:, None]) & (slots < index[:, None] + count)
            if keep is not None:  # [B, count]: a kept slot is not written by that row
                local = jnp.clip(slots - index[:, None], 0, count - 1)
                hit = hit & ~jnp.take_along_axis(jnp.broadcast_to(keep, (index.shape[0], count)), local, axis=1)
            return dataclasses.replace(self, written=self.written | jnp.any(hit, axis=0),
                                       lengths=jnp.maximum(self.lengths, jnp.max(index) + count).astype(jnp.int32))
        fresh = jnp.ones((count,), bool) if keep is None else ~keep
        old = jax.lax.dynamic_slice_in_dim(self.written, index, count)
        written = jax.lax.dynamic_update_slice_in_dim(self.written, old | fresh, index, axis=0)
        return dataclasses.replace(self, written=written, lengths=jnp.maximum(self.lengths, index + count).astype(jnp.int32))

    def write(self, layer: int, k: jax.Array, v: jax.Array, index, keep: jax.Array | None = None) -> "KVCache":
        """Write k, v [B, Hkv, T, D] of one layer at slots [index, index+T).

        `index` is a scalar, or [B]: each row writes its own window (Fast-dLLM v2's blocks start
        at each row's position 0). `keep` [T] or [B, T] bool (optional) marks window slots whose
        cached K/V must survive (the prefix cache recomputes queries it does not write back; the
        sub-block DualCache reuses the block's K/V)."""
        k, v = k.astype(self.k[layer].dtype), v.astype(self.v[layer].dtype)
        t = k.shape[2]
        per_row = jnp.ndim(index) == 1
        if per_row:
            read = jax.vmap(lambda c, i: jax.lax.dynamic_slice_in_dim(c, i, t, axis=1))
            put = jax.vmap(lambda c, u, i: jax.lax.dynamic_update_slice_in_dim(c, u, i, axis=1))
        else:
            def read(c, i):
                return jax.lax.dynamic_slice_in_dim(c, i, t, axis=2)

            def put(c, u, i):
                return jax.lax.dynamic_update_slice_in_dim(c, u, i, axis=2)
        if keep is not None:
            kept = (keep[:, None, :, None] if keep.ndim == 2 else keep[None, None, :, None])
            k = jnp.where(kept, read(self.k[layer], index), k)
            v = jnp.where(kept, read(self.v[layer], index), v)
        new_k, new_v = put(self.k[layer], k, index), put(self.v[layer], v, index)
        return dataclasses.replace(
            self, k=self.k[:layer] + (new_k,) + self.k[layer + 1 :], v=self.v[:layer] + (new_v,) + self.v[layer + 1 :]
        )
