"""The forward passes a cache policy composes (dlmjax.decode.caches), and how their logits become
the step's predictions.

`full_forward` runs the whole canvas; `window` runs a run of queries against the KV cache (one
start for the batch, or one per row); `predictions` writes a contiguous window's x0, confidence and
statistics into the [B, G] arrays the loop carries, and `scattered_predictions` does the same for
windows whose generation indices differ per row. `ctx` is the engine's `Context`, `s` its `State`,
`v` the schedule's `View` (dlmjax/decode/engine.py).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dlmjax.decode.exits import margins
from dlmjax.decode.sampling import gumbel_argmax
from dlmjax.model import shift_right


def clean(ctx, logits):
    """The mask token is never a prediction: trained models give it ~zero probability, and
    committing it would leave the position masked (upstream can loop on it)."""
    logits = logits.at[..., ctx.tokens.mask].set(-jnp.inf)
    if ctx.method.logits_eos_inf:
        logits = logits.at[..., ctx.tokens.eos].set(-jnp.inf)
    return logits


def full_forward(ctx, x, cache):
    """Logits [B, G, V] of the whole generation region (and, with a cache, a refresh of every slot)."""
    p, m = ctx.prompt_length, ctx.method
    if m.guidance is not None:
        b = x.shape[0]
        unconditional = x.at[:, :p].set(ctx.tokens.mask)
        both, _ = ctx.model(
            jnp.concatenate([x, unconditional]), jnp.concatenate([ctx.positions, ctx.positions]),
            jnp.concatenate([ctx.attn, ctx.attn]), logits_from=ctx.head_from, layout=ctx.layout, kernel=ctx.kernel,
        )
        cond, uncond = both[:b], both[b:]
        logits = uncond + (m.guidance.cfg_scale + 1.0) * (cond - uncond)
    else:
        logits, cache = ctx.model(x, ctx.positions, ctx.attn, cache=cache, cache_index=0, logits_from=ctx.head_from,
                                  layout=ctx.layout, kernel=ctx.kernel)
    if ctx.shifted:
        logits = shift_right(logits)
    return clean(ctx, logits[:, p - ctx.head_from:]), cache


def window(ctx, x, cache, start, width: int, keep=None, logits_from: int = 0):
    """Queries [start, start + width) against the cache: their logits from row `logits_from` on
    (shifted for Dream-style families: a row reads the output before it, the first row its own)
    and the cache with the window's K/V written. `start` is a scalar, or [B] (each row its own
    window); `keep` [width] or [B, width] keeps those slots' cached K/V."""
    m = ctx.method
    if jnp.ndim(start) == 0:
        ids = jax.lax.dynamic_slice_in_dim(x, start, width, axis=1)
        positions = jax.lax.dynamic_slice_in_dim(ctx.positions, start, width, axis=1)
        query_index = start + jnp.arange(width)
    else:
        query_index = start[:, None] + jnp.arange(width)[None, :]
        ids = jnp.take_along_axis(x, query_index, axis=1)
        positions = jnp.take_along_axis(ctx.positions, query_index, axis=1)
    attn = m.blocks.window_mask(m.attention, ctx.positions, ctx.full_mask, ctx.prompt_length, query_index)
    logits, cache = ctx.model(ids, positions, attn, cache=cache, cache_index=start, cache_keep=keep,
                              logits_from=logits_from, layout=ctx.layout, kernel=ctx.kernel)
    if ctx.shifted:
        logits = shift_right(logits)
    return logits, cache


def _statistics(ctx, logits, x0):
    """x0, confidence and the statistics the method needs, of logits [B, W, V]."""
    m, tokens = ctx.method, ctx.tokens
    probs = jax.nn.softmax(logits, axis=-1)
    confidence = jnp.take_along_axis(probs, x0[..., None], axis=-1)[..., 0]
    if m.confidence_eos_eot_inf:
        special = x0 == tokens.eos
        if tokens.eot is not None:
            special = special | (x0 == tokens.eot)
        confidence = jnp.where(special, -jnp.inf, confidence)
    fresh = dict(x0=x0, confidence=confidence)
    needs = m.needs
    if "entropy" in needs:
        fresh["entropy"] = -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), axis=-1)
    if "margin" in needs:
        fresh["margin"] = margins(logits)
    if "rank" in needs:
        fresh["rank"] = m.rule.rank(probs)
    return fresh


def predictions(ctx, s, logits, offset, v, noise, skip_first: bool):
    """Write the window's x0, confidence and the statistics the method needs into the carried
    [B, G] arrays; the window's first row is generation index `offset`. Sampling noise covers
    the view's block (SemiAR) or the whole region."""
    m = ctx.method
    width = logits.shape[1]
    x0 = gumbel_argmax(logits, m.temperature, noise, offset, v.noise_start, v.noise_length)
    use = jnp.arange(width) > 0 if skip_first else jnp.ones((width,), bool)
    out = {}
    for name, value in _statistics(ctx, logits, x0).items():
        old = jax.lax.dynamic_slice_in_dim(getattr(s, name), offset, width, axis=1)
        out[name] = jax.lax.dynamic_update_slice_in_dim(getattr(s, name), jnp.where(use, value, old), offset, axis=1)
    return dataclasses.replace(s, **out)


def scattered_predictions(ctx, s, logits, index, valid, v, noise):
    """As `predictions`, for a window whose row b, column j predicts generation index index[b, j]
    (per-row windows; columns with `valid` false, or outside the region, write nothing). At T > 0
    a column inside the noise span [noise_start, noise_start + noise_length) adds its position's
    Gumbel noise."""
    m = ctx.method
    b, g = s.x0.shape
    rows = jnp.arange(b)[:, None]

    def noisy(logits):
        local = index - v.noise_start
        inside = (local >= 0) & (local < v.noise_length)
        gumbel = noise[rows, jnp.clip(local, 0, v.noise_length - 1)]  # [B, W, V]
        scaled = logits.astype(noise.dtype) + m.temperature.astype(noise.dtype) * gumbel
        return jnp.where(inside, jnp.argmax(scaled, axis=-1), jnp.argmax(logits, axis=-1)).astype(jnp.int32)

    x0 = jax.lax.cond(m.temperature > 0, noisy, lambda lg: jnp.argmax(lg, axis=-1).astype(jnp.int32), logits)
    target = jnp.where(valid & (index >= 0) & (index < g), index, g)  # g: dropped
    out = {name: getattr(s, name).at[rows, target].set(value, mode="drop")
           for name, value in _statistics(ctx, logits, x0).items()}
    return dataclasses.replace(s, **out)
