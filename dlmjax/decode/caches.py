"""KV-cache policies: what a decode step feeds the model and which cache slots it rewrites.

Each policy is a part (`dlmjax.decode.parts`) with no knobs; its class is the structure, and its
`forward(ctx, s, v, noise)` is the step's one forward: it returns the loop's state with the
predictions of the positions it computed (dlmjax.decode.forward) and the cache it wrote. Where
the queries go comes from the block schedule's geometry (`Schedule.exact_window` for the exact
caches, `Schedule.sub_window` for a sub-block DualCache, the view's block and step for
Fast-dLLM's approximate caches). The exact rules are in SPEC.md (Fast-dLLM KV caches; the exact
block cache). Users pick one by name (`cache="dual"`).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from dlmjax.attention import attention_mask
from dlmjax.cache import KVCache
from dlmjax.decode import forward
from dlmjax.decode.parts import Part, part


@dataclasses.dataclass(frozen=True)
class Window:
    """Where an exact cache's queries go (a schedule's answer, `Schedule.exact_window`): the
    window ends at generation index `end` (a scalar, or [B]: per row) and is `widths[which]`
    canvas tokens wide (`widths` static, `which` traced: one compiled forward per width; the
    full canvas is a forward of every slot). Every K/V before the window is final. `writes`
    [B, G] limits which generation positions take the window's predictions (None: all)."""

    end: jax.Array
    widths: tuple[int, ...]
    which: jax.Array
    writes: jax.Array | None = None


class Cache(Part):
    stores: ClassVar[bool] = True  # the decode carries a KV cache
    exact: ClassVar[bool] = False  # cached steps give exactly the uncached logits (block-causal attention)

    def init(self, ctx, batch: int) -> KVCache | None:
        """The cache before the first step (with what the policy writes up front)."""
        return KVCache.zeros(ctx.model.config, batch, ctx.prompt_length + ctx.method.canvas_length, ctx.model.embed[...].dtype)

    def prefill(self, ctx, prompt, cache, nfe):
        """(cache, nfe) once the prompt [B, P] is written, for policies that write it before the loop."""
        return cache, nfe

    def forward(self, ctx, s, v, noise):
        raise NotImplementedError


@part
class NoCache(Cache):
    """Every step is a full forward of the canvas."""

    name: ClassVar[str] = "none"
    stores: ClassVar[bool] = False

    def init(self, ctx, batch: int):
        return None

    def forward(self, ctx, s, v, noise):
        logits, _ = forward.full_forward(ctx, s.x, None)
        return forward.predictions(ctx, s, logits, 0, v, noise, skip_first=False)


def _refresh(ctx, s, v, noise):
    """A full forward that rewrites every slot (Fast-dLLM: a block's first step)."""
    logits, cache = forward.full_forward(ctx, s.x, s.cache)
    return forward.predictions(ctx, dataclasses.replace(s, cache=cache), logits, 0, v, noise, skip_first=False)


@part
class Prefix(Cache):
    """Fast-dLLM's prefix cache: a block's first step refreshes every slot; later steps recompute
    the generation region and keep the slots before the block (approximate)."""

    name: ClassVar[str] = "prefix"

    def forward(self, ctx, s, v, noise):
        p, m = ctx.prompt_length, ctx.method

        def cached_step(s):
            g = m.gen_length
            logits, cache = forward.window(ctx, s.x, s.cache, p, g, jnp.arange(g) < v.block * m.block_length)
            return forward.predictions(ctx, dataclasses.replace(s, cache=cache), forward.clean(ctx, logits), 0, v, noise,
                                       skip_first=ctx.shifted)

        return jax.lax.cond(v.i == 0, lambda s: _refresh(ctx, s, v, noise), cached_step, s)


def _exact_window(ctx, s, win: Window, noise, v, keep=None, writes=None):
    """The forward of an exact window (one compiled branch per width) and its predictions."""
    p, g = ctx.prompt_length, ctx.method.canvas_length
    length = p + g
    shifted = int(ctx.shifted)

    def branch(width):
        def run(s):
            # rows before the generation region (less the one a shifted family reads) need no head
            skip = max(0, width - g - shifted)
            start = jnp.clip(p + win.end - width, 0, length - width)
            row_keep = None if keep is None else keep(start, width)
            logits, cache = forward.window(ctx, s.x, s.cache, start, width, row_keep, logits_from=skip)
            index = jnp.broadcast_to((start - p + skip)[..., None] + jnp.arange(width - skip), (s.x.shape[0], width - skip))
            valid = jnp.ones_like(index, bool)
            if shifted:
                valid = valid & (jnp.arange(width - skip) > 0)  # the first row has no left neighbour
            if writes is not None or win.writes is not None:
                allowed = win.writes if writes is None else writes
                valid = valid & jnp.take_along_axis(allowed, jnp.clip(index, 0, g - 1), axis=1)
            s = dataclasses.replace(s, cache=cache)
            return forward.scattered_predictions(ctx, s, forward.clean(ctx, logits), index, valid, v, noise)

        return run

    return jax.lax.switch(win.which, [branch(w) for w in win.widths], s)


@part
class Dual(Cache):
    """DualCache, approximate. Fast-dLLM (semi-AR blocks): a block's first step refreshes every
    slot; later steps recompute only the block. Fast-dLLM v2 (sub-blocks; `Schedule.sub_window`):
    the block cache as `Block`, but a step whose sub-block has its first token decoded, after the
    block's first forward, recomputes only the sub-block and reads the rest of the block from the
    K/V of the block's last full forward."""

    name: ClassVar[str] = "dual"

    def forward(self, ctx, s, v, noise):
        m = ctx.method
        if m.blocks.has_sub_blocks:
            return self._sub_blocks(ctx, s, v, noise)
        p, k = ctx.prompt_length, m.block_length

        def cached_step(s):
            logits, cache = forward.window(ctx, s.x, s.cache, p + v.block * k, k)
            return forward.predictions(ctx, dataclasses.replace(s, cache=cache), forward.clean(ctx, logits), v.block * k, v,
                                       noise, skip_first=ctx.shifted)

        return jax.lax.cond(v.i == 0, lambda s: _refresh(ctx, s, v, noise), cached_step, s)

    def _sub_blocks(self, ctx, s, v, noise):
        m = ctx.method
        masked = s.x[:, ctx.prompt_length:] == ctx.tokens.mask
        win = m.blocks.exact_window(s.sched, masked, s.done, ctx.shifted, ctx.prompt_length)
        sub = m.blocks.sub_window(s.sched, masked, s.done)  # (reuse [B], start [B], width): generation indices
        reuse, sub_start, sub_width = sub

        def in_sub(index):  # [B, N] generation indices -> inside the row's sub-block
            return (index >= sub_start[:, None]) & (index < sub_start[:, None] + sub_width)

        # rows that reuse the block's K/V predict (and write K/V for) their sub-block only
        writes = jnp.where(reuse[:, None], in_sub(jnp.arange(masked.shape[1])[None, :]), True)

        def keep(start, width):  # [B, width]: the slots a reusing row leaves as the block's last full forward wrote them
            return reuse[:, None] & ~in_sub(start[..., None] + jnp.arange(width) - ctx.prompt_length)

        def narrow(s):  # every running row reuses: run the sub-blocks alone
            one = Window(end=sub_start + sub_width, widths=(sub_width,), which=jnp.int32(0))
            return _exact_window(ctx, s, one, noise, v, writes=writes)

        def wide(s):  # some row needs its block's full forward: every row runs the block, reusing rows keep the rest
            return _exact_window(ctx, s, win, noise, v, keep=keep, writes=writes)

        return jax.lax.cond(jnp.all(reuse | ~v.active) & (win.which == 0), narrow, wide, s)


@part
class Block(Cache):
    """The exact block cache: under block-causal attention a finished block's K/V are final and are
    written once; a step's queries start where the cache stops being final (`Schedule.exact_window`)."""

    name: ClassVar[str] = "block"
    exact: ClassVar[bool] = True

    def prefill(self, ctx, prompt, cache, nfe):
        m = ctx.method
        if not m.blocks.prefills_prompt:
            return cache, nfe
        # the prompt is final from the start: write its K/V once (one forward for every row)
        p = ctx.prompt_length
        attn = attention_mask(m.attention, ctx.full_mask, query_index=jnp.arange(p), block_size=m.block_length, prompt_length=p)
        _, cache = ctx.model(prompt, ctx.positions[:, :p], attn, cache=cache, cache_index=0, logits_from=p,
                             layout=ctx.layout, kernel=ctx.kernel)
        return cache, nfe + 1

    def forward(self, ctx, s, v, noise):
        masked = s.x[:, ctx.prompt_length:] == ctx.tokens.mask
        win = ctx.method.blocks.exact_window(s.sched, masked, s.done, ctx.shifted, ctx.prompt_length)
        return _exact_window(ctx, s, win, noise, v)


CACHES: dict[str, type[Cache]] = {cls.name: cls for cls in (NoCache, Prefix, Dual, Block)}
