"""Sampling: Gumbel-max noise drawn per position, and Dream's logits processing.

Position j of the generation region draws its noise from fold_in(key, j) (SPEC.md, Randomness),
so its noise is the same whatever window or block it is read in.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def filter_logits(logits, temperature, top_p, top_k: int | None):
    """Dream's sample_tokens processing: temperature, then nucleus, then top-k."""
    logits = jnp.where(temperature > 0, logits / jnp.maximum(temperature, 1e-30), logits)

    def nucleus(lg):
        order = jnp.argsort(-lg, axis=-1)
        ordered = jnp.take_along_axis(lg, order, axis=-1)
        cumulative = jnp.cumsum(jax.nn.softmax(ordered, axis=-1), axis=-1)
        drop = cumulative > top_p
        drop = jnp.concatenate([jnp.zeros_like(drop[..., :1]), drop[..., :-1]], axis=-1)  # keep the first past top_p
        drop_here = jnp.zeros_like(drop).at[
            jnp.arange(lg.shape[0])[:, None, None], jnp.arange(lg.shape[1])[None, :, None], order
        ].set(drop)
        return jnp.where(drop_here, -jnp.inf, lg)

    logits = jax.lax.cond(top_p < 1.0, nucleus, lambda lg: lg, logits)
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return logits


def position_gumbel(key, positions, batch: int, vocab: int, x64: bool):
    """Gumbel noise [B, n, V] for the generation positions `positions` [n]: position j draws its own
    [B, V] from fold_in(key, j), so its noise is the same whatever window or block it is read in and
    only the positions a step can commit are ever drawn (SPEC.md, Randomness)."""

    def one(j):
        position_key = jax.random.fold_in(key, j)
        if x64:  # LLaDA's float64 form: -log(-log u), u uniform in (tiny, 1)
            u = jax.random.uniform(position_key, (batch, vocab), jnp.float64, minval=jnp.finfo(jnp.float64).tiny)
            return -jnp.log(-jnp.log(u))
        return jax.random.gumbel(position_key, (batch, vocab), jnp.float32)

    return jax.vmap(one, out_axes=1)(positions)


def block_noise(key, temperature, block_start, block_length: int, batch: int, vocab: int, x64: bool):
    """Gumbel noise [B, K, V] for the block's positions at T > 0 (zeros at T = 0, never drawn).

    Drawn once per step, outside the forward's branches (refresh / cached window), so the noise
    code is compiled once per program however many forward shapes a cache policy has."""
    dtype = jnp.float64 if x64 else jnp.float32
    return jax.lax.cond(
        temperature > 0,
        lambda: position_gumbel(key, block_start + jnp.arange(block_length), batch, vocab, x64),
        lambda: jnp.zeros((batch, block_length, vocab), dtype),
    )


def gumbel_argmax(logits, temperature, noise, offset, block_start, block_length: int):
    """x0 [B, W] of a window of logits [B, W, V] whose first position is generation index `offset`:
    argmax everywhere, and at T > 0 argmax(logits + T g) over the block [block_start, block_start + K)
    with the block's noise g [B, K, V] (LLaDA's exp(l) / (-log u)^T). Positions outside the block
    cannot be committed by a rule this step, so they get no noise: drawing [B, G, V] every step was
    1 GB (fp32) for LLaDA-8B at B = 8."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def noisy(greedy):
        local = block_start - offset
        block_logits = jax.lax.dynamic_slice_in_dim(logits, local, block_length, axis=1)
        sampled = jnp.argmax(block_logits.astype(noise.dtype) + temperature.astype(noise.dtype) * noise, axis=-1)
        return jax.lax.dynamic_update_slice_in_dim(greedy, sampled.astype(jnp.int32), local, axis=1)

    return jax.lax.cond(temperature > 0, noisy, lambda greedy: greedy, greedy)
