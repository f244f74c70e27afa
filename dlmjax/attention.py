"""Attention pieces shared by every family: RoPE, the mask builder and the XLA attention.

All three are pure functions of arrays. Norm, RoPE and softmax run in float32 whatever
the parameter dtype; matmuls run in the parameter dtype and accumulate in float32.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

MaskMode = Literal["bidirectional", "block_causal", "prompt_block_causal", "causal"]
MASK_MODES = ("bidirectional", "block_causal", "prompt_block_causal", "causal")

# A finite "minus infinity": a row whose keys are all masked (a padded query in a
# block-causal mode) softmaxes to a uniform row instead of NaN.
_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos and sin [B, T, head_dim] in float32, rotate-half (NeoX) layout."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x [B, T, heads, head_dim] by the tables [B, T, rotary_dim], in float32. With tables
    narrower than the head (LLaDA2's partial RoPE) only the first rotary_dim channels turn, pairs
    (j, j + rotary_dim / 2) within them; the rest pass through."""
    rotary = cos.shape[-1]
    if rotary < x.shape[-1]:
        return jnp.concatenate([apply_rope(x[..., :rotary], cos, sin), x[..., rotary:]], axis=-1)
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


def block_ids(index: jax.Array, mode: MaskMode, block_size: int | None, prompt_length: int | jax.Array | None):
    """Block number of each canvas index for the block-causal modes.

    block_causal: blocks of `block_size` counted from index 0 (Fast-dLLM v2).
    prompt_block_causal: the prompt [0, prompt_length) is block 0 and generation blocks of
    `block_size` are counted from the prompt's end (D2F).
    """
    if mode == "block_causal":
        return index // block_size
    return jnp.where(index < prompt_length, 0, 1 + (index - prompt_length) // block_size)


def position_block_causal(positions: jax.Array, key_valid: jax.Array, block_size: int) -> jax.Array:
    """[B, T, T] bool: block-causal by RoPE position (blocks of `block_size` from each row's position
    0, so a left-padded row's blocks start at its first real token): query q sees key k iff k is a
    real token and block(k) <= block(q)."""
    blocks = positions // block_size
    return key_valid.astype(bool)[:, None, :] & (blocks[:, None, :] <= blocks[:, :, None])


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """A mask in factored form: query t may attend to key s iff key_valid[b, s] and
    q_block[t] >= k_block[s] (no block ids: bidirectional; causal: the canvas indices themselves,
    blocks of one token). The Pallas kernels take this form; `dense()` gives the [B, Tq, Tk]
    boolean mask."""

    key_valid: jax.Array  # [B, Tk] bool
    q_block: jax.Array | None  # [Tq] int32
    k_block: jax.Array | None  # [Tk] int32
    num_queries: int = dataclasses.field(metadata=dict(static=True), default=0)

    def dense(self) -> jax.Array:
        b, tk = self.key_valid.shape
        mask = self.key_valid[:, None, :]
        if self.q_block is None:
            return jnp.broadcast_to(mask, (b, self.num_queries, tk))
        return mask & (self.q_block[:, None] >= self.k_block[None, :])


def mask_spec(
    mode: MaskMode,
    key_valid: jax.Array,
    query_index: jax.Array | None = None,
    key_index: jax.Array | None = None,
    *,
    block_size: int | None = None,
    prompt_length: int | jax.Array | None = None,
) -> MaskSpec:
    """The factored mask of `attention_mask` (same arguments)."""
    if mode not in MASK_MODES:
        raise ValueError(f"unknown attention mask mode {mode!r}; use one of {MASK_MODES}")
    key_valid = key_valid.astype(bool)
    tk = key_valid.shape[-1]
    if key_index is None:
        key_index = jnp.arange(tk)
    if query_index is None:
        query_index = key_index
    if mode == "bidirectional":
        return MaskSpec(key_valid, None, None, num_queries=query_index.shape[-1])
    if mode == "causal":
        return MaskSpec(key_valid, query_index.astype(jnp.int32), key_index.astype(jnp.int32), num_queries=query_index.shape[-1])
    if block_size is None or block_size <= 0:
        raise ValueError(f"mode {mode!r} needs a positive block_size")
    if mode == "prompt_block_causal" and prompt_length is None:
        raise ValueError("mode 'prompt_block_causal' needs prompt_length")
    q_block = block_ids(query_index, mode, block_size, prompt_length).astype(jnp.int32)
    k_block = block_ids(key_index, mode, block_size, prompt_length).astype(jnp.int32)
    return MaskSpec(key_valid, q_block, k_block, num_queries=query_index.shape[-1])


def attention_mask(
    mode: MaskMode,
    key_valid: jax.Array,
    query_index: jax.Array | None = None,
    key_index: jax.Array | None = None,
    *,
    block_size: int | None = None,
    prompt_length: int | jax.Array | None = None,
) -> jax.Array:
    """Boolean mask [B, Tq, Tk], True where a query may attend to a key.

    key_valid [B, Tk] marks real (non-padding) keys. query_index [Tq] and key_index [Tk]
    are canvas indices (not RoPE positions); they default to 0..Tk-1, i.e. queries are
    the whole sequence. Padded queries still see the real keys of their block, so no row
    is empty in the bidirectional mode. "causal" (autoregressive models) lets a query see
    the keys at or before its index; it needs no block_size.
    """
    return mask_spec(
        mode, key_valid, query_index, key_index, block_size=block_size, prompt_length=prompt_length
    ).dense()


def restrict_keys(mask, allowed: jax.Array):
    """AND a [Tk] key condition into a dense mask or a MaskSpec."""
    if isinstance(mask, MaskSpec):
        return dataclasses.replace(mask, key_valid=mask.key_valid & allowed[None, :])
    return mask & allowed[None, None, :]


# Queries per call up to which the cached-block kernel applies (a decode block, not a full pass).
KERNEL_MAX_QUERIES = 128


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask, shard: tuple | None = None, kernel: str = "auto") -> jax.Array:
    """Softmax attention with grouped-query heads.

    q [B, Tq, H, D]; k, v [B, Hkv, Tk, D]; mask [B, Tq, Tk] bool or a MaskSpec. Returns
    [B, Tq, H, D] in q's dtype. Scores and softmax are float32. A MaskSpec with at most
    KERNEL_MAX_QUERIES queries (a cached decode step) goes to `dlmjax.kernels`, which picks
    the Pallas kernel of the platform or the XLA path: `kernel` is its `implementation`
    ("auto", "xla", "pallas", ...; under "auto" DLMJAX_ATTENTION=xla|pallas forces either);
    with `shard` = (mesh, batch axes, head axis) the kernel runs per shard under shard_map.
    Everything else takes the XLA path below.
    """
    if isinstance(mask, MaskSpec):
        if q.shape[1] <= KERNEL_MAX_QUERIES:
            from dlmjax.kernels import cached_block_attention, sharded_cached_block_attention

            masks = dict(key_valid=mask.key_valid, q_block=mask.q_block, k_block=mask.k_block)
            qt = q.transpose(0, 2, 1, 3)
            if shard is not None:
                mesh, batch_axis, head_axis = shard
                out = sharded_cached_block_attention(qt, k, v, mesh=mesh, batch_axis=batch_axis, head_axis=head_axis,
                                                     implementation=kernel, **masks)
            else:
                out = cached_block_attention(qt, k, v, implementation=kernel, **masks)
            return out.transpose(0, 2, 1, 3)
        mask = mask.dense()
    b, tq, h, d = q.shape
    hkv = k.shape[1]
    qg = q.reshape(b, tq, hkv, h // hkv, d)
    scores = jnp.einsum("bqhgd,bhkd->bhgqk", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / d**0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhgqk,bhkd->bqhgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, tq, h, d).astype(q.dtype)
