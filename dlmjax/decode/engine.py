"""The decode engine: any method compiles into one jitted pair of nested `lax.while_loop`s.

Blocks run in the outer loop and denoising steps in the inner one; termination, commits,
early exits and EOS handling are all computed on the device. A method is a `Method` pytree
(dlmjax.decode.method): its part classes and static fields are the program's structure, the
numbers a user tunes per call (thresholds, temperature, schedule ends) are traced leaves, so
changing them does not recompile. The exact rules are in dlmjax/decode/SPEC.md.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from dlmjax.attention import attention_mask, mask_spec
from dlmjax.cache import KVCache
from dlmjax.decode import rules
from dlmjax.decode.caches import Dual
from dlmjax.decode.exits import margins
from dlmjax.decode.method import Method
from dlmjax.decode.sampling import block_noise, gumbel_argmax
from dlmjax.model import position_ids, shift_right
from dlmjax.sharding import Layout, constrain


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class State:
    x: jax.Array  # [B, P + G] canvas
    nfe: jax.Array  # [B] forward passes each row took part in
    done: jax.Array  # [B]
    trajectory: jax.Array  # [B, G] the row's step (1-based nfe) that committed each position
    steps: jax.Array  # scalar: forward passes of the whole batch
    # Latest predictions for every generation position (a cached step refreshes only its window).
    x0: jax.Array  # [B, G] int32
    confidence: jax.Array  # [B, G] probability of x0
    entropy: jax.Array  # [B, G]
    margin: jax.Array  # [B, G] top-1 minus top-2 logit
    cache: KVCache | None

    def constrain(self, layout: Layout | None) -> "State":
        """Every array pinned to its sharding over `layout`'s mesh: a while_loop carry must leave
        the body as it came in, and this keeps it split (rows over the batch axes, the cache's
        heads over tensor) through every step instead of whatever the partitioner infers."""
        if layout is None:
            return self
        rows, canvas = ("batch",), ("batch", "length")
        arrays = dict(x=canvas, nfe=rows, done=rows, trajectory=canvas, steps=(), x0=canvas, confidence=canvas,
                      entropy=canvas, margin=canvas)
        cache = None if self.cache is None else self.cache.constrain(layout)
        return dataclasses.replace(
            self, cache=cache, **{name: constrain(getattr(self, name), axes, layout) for name, axes in arrays.items()}
        )


@dataclasses.dataclass(frozen=True)
class Tokens:
    """Special ids the engine needs (static)."""

    mask: int
    eos: int | None
    eot: int | None


def _decode(graphdef, state, prompt, prompt_mask, method: Method, key, *, tokens: Tokens, shard=None,
            layout: Layout | None = None, kernel: str = ""):
    # `kernel` is DLMJAX_ATTENTION's value. The attention kernel is picked while tracing and jit's
    # trace cache does not see the environment, so it is a static argument: another value retraces.
    del kernel
    model = nnx.merge(graphdef, state)
    cfg = model.config
    b, p = prompt.shape
    g, k = method.gen_length, method.block_length
    length = p + g
    full_mask = jnp.concatenate([prompt_mask, jnp.ones((b, g), prompt_mask.dtype)], axis=1)
    positions = position_ids(cfg, full_mask)
    attn = attention_mask(method.attention, full_mask, block_size=k, prompt_length=p)
    gen_index = jnp.arange(g)
    passes = 2 if method.guidance is not None else 1
    cached = method.cache.stores
    exact = method.cache.exact  # block-causal: finished blocks' K/V are final, appended once
    rule = method.rule
    needs = method.needs  # the statistics the rule and the exit read
    fixed_steps = rule.fixed_steps  # quota and dream: exactly steps_per_block steps a block
    # The head runs only where predictions are read: the generation region, and for shifted
    # logits the position before it.
    head_from = max(p - 1, 0) if cfg.shifted_logits else p

    def clean(logits):
        # The mask token is never a prediction: trained models give it ~zero probability, and
        # committing it would leave the position masked (upstream can loop on it).
        logits = logits.at[..., tokens.mask].set(-jnp.inf)
        if method.logits_eos_inf:
            logits = logits.at[..., tokens.eos].set(-jnp.inf)
        return logits

    def full_forward(x, cache):
        """Logits [B, G, V] of the whole generation region (and, with a cache, a refresh of every slot)."""
        if method.guidance is not None:
            unconditional = x.at[:, :p].set(tokens.mask)
            both, _ = model(
                jnp.concatenate([x, unconditional]), jnp.concatenate([positions, positions]),
                jnp.concatenate([attn, attn]), logits_from=head_from, layout=layout,
            )
            cond, uncond = both[:b], both[b:]
            logits = uncond + (method.guidance.cfg_scale + 1.0) * (cond - uncond)
        else:
            logits, cache = model(x, positions, attn, cache=cache, cache_index=0, logits_from=head_from, layout=layout)
        if cfg.shifted_logits:
            logits = shift_right(logits)
        return clean(logits[:, p - head_from :]), cache

    def window_attention(start, width):
        # factored, so that a cached step can run the Pallas cached-block kernel
        return mask_spec(method.attention, full_mask, query_index=start + jnp.arange(width), block_size=k, prompt_length=p)

    def exact_window_forward(x, cache, block, width):
        """Exact cache: queries [start, e) attend to the cached finished blocks and themselves.

        A block's first step starts one block early (width 2K), rewriting the previous block's
        K/V from its final tokens; later steps start one slot early for shifted logits."""
        block_start = p + block * k
        start = jnp.clip(block_start + k - width, 0, length - width)
        window = jax.lax.dynamic_slice_in_dim(x, start, width, axis=1)
        window_positions = jax.lax.dynamic_slice_in_dim(positions, start, width, axis=1)
        logits, cache = model(
            window, window_positions, window_attention(start, width), cache=cache, cache_index=start, layout=layout
        )
        if cfg.shifted_logits:
            logits = shift_right(logits)
        block_logits = jax.lax.dynamic_slice_in_dim(logits, block_start - start, k, axis=1)
        return clean(block_logits), block * k, cache

    def window_forward(x, cache, block):
        """A cached step: logits of the window's generation positions, their offset, and the cache."""
        if isinstance(method.cache, Dual):
            start, width, keep = p + block * k, k, None
        else:  # prefix: the whole region as queries; slots before the block keep the refresh's K/V
            start, width, keep = p, g, gen_index < block * k
        window = jax.lax.dynamic_slice_in_dim(x, start, width, axis=1)
        window_positions = jax.lax.dynamic_slice_in_dim(positions, start, width, axis=1)
        logits, cache = model(
            window, window_positions, window_attention(start, width), cache=cache, cache_index=start, cache_keep=keep,
            layout=layout,
        )
        if cfg.shifted_logits:
            logits = shift_right(logits)  # the window's first prediction has no left neighbour: not used
        return clean(logits), start - p, cache

    def predictions(s: State, logits, offset, block, noise, skip_first: bool) -> State:
        """Write the window's x0, confidence, entropy and margin into the carried [B, G] arrays.
        Every window holds the whole block, the only positions sampled (the others take the argmax)."""
        width = logits.shape[1]
        x0 = gumbel_argmax(logits, method.temperature, noise, offset, block * k, k)
        probs = jax.nn.softmax(logits, axis=-1)
        confidence = jnp.take_along_axis(probs, x0[..., None], axis=-1)[..., 0]
        if method.confidence_eos_eot_inf:
            special = x0 == tokens.eos
            if tokens.eot is not None:
                special = special | (x0 == tokens.eot)
            confidence = jnp.where(special, -jnp.inf, confidence)
        fresh = dict(x0=x0, confidence=confidence)
        if "entropy" in needs:
            fresh["entropy"] = -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), axis=-1)
        if "margin" in needs:
            fresh["margin"] = margins(logits)
        use = jnp.arange(width) > 0 if skip_first else jnp.ones((width,), bool)
        out = {}
        for name, value in fresh.items():
            old = jax.lax.dynamic_slice_in_dim(getattr(s, name), offset, width, axis=1)
            out[name] = jax.lax.dynamic_update_slice_in_dim(getattr(s, name), jnp.where(use, value, old), offset, axis=1)
        return dataclasses.replace(s, **out)

    def block_span(block):
        return (gen_index >= block * k) & (gen_index < (block + 1) * k)

    def active_rows(s: State, block, i) -> jax.Array:
        if fixed_steps:
            return ~s.done & (i < method.steps_per_block)
        return ~s.done & jnp.any((s.x[:, p:] == tokens.mask) & block_span(block), axis=-1)

    def denoise_step(s: State, block, i, quota_base) -> State:
        active = active_rows(s, block, i)
        sample_key, select_key = jax.random.split(jax.random.fold_in(key, s.steps))
        x_gen = s.x[:, p:]
        masked = x_gen == tokens.mask
        candidates = masked & block_span(block) & active[:, None]

        if "logits" in needs:  # Dream's samplers draw from the block's logits themselves
            logits, _ = full_forward(s.x, None)
            x0, commit = rule.decide(
                logits, candidates, masked & block_span(block), block * k, k, i, method.steps_per_block, method.temperature,
                sample_key, select_key,
            )
            s = dataclasses.replace(s, x0=x0)
            if "margin" in needs:
                s = dataclasses.replace(s, margin=margins(logits))
        else:
            noise = block_noise(sample_key, method.temperature, block * k, k, b, cfg.vocab_size, method.gumbel_x64)
            if not cached:
                logits, _ = full_forward(s.x, None)
                s = predictions(s, logits, 0, block, noise, skip_first=False)
            elif exact:
                shift = 1 if cfg.shifted_logits else 0

                def step_with(width):
                    def run(s):
                        logits, offset, cache = exact_window_forward(s.x, s.cache, block, width)
                        s = dataclasses.replace(s, cache=cache)
                        return predictions(s, logits, offset, block, noise, skip_first=False)

                    return run

                s = jax.lax.cond(i == 0, step_with(2 * k), step_with(k + shift), s)
            else:
                def refresh(s):
                    logits, cache = full_forward(s.x, s.cache)
                    return predictions(dataclasses.replace(s, cache=cache), logits, 0, block, noise, skip_first=False)

                def cached_step(s):
                    logits, offset, cache = window_forward(s.x, s.cache, block)
                    s = dataclasses.replace(s, cache=cache)
                    return predictions(s, logits, offset, block, noise, skip_first=cfg.shifted_logits)

                s = jax.lax.cond(i == 0, refresh, cached_step, s)
            x0 = s.x0
            quota = None
            if isinstance(rule, rules.Quota):
                spb = method.steps_per_block
                if cached and not exact and cfg.shifted_logits:  # the refresh committed one token; the rest share spb - 1 steps
                    quota = quota_base // (spb - 1) + ((i - 1) < quota_base % (spb - 1)).astype(jnp.int32)
                else:
                    quota = quota_base // spb + (i < quota_base % spb).astype(jnp.int32)
            commit = rule.commit(rules.Step(candidates, s.confidence, s.entropy, quota, select_key))
            if cached and not exact and cfg.shifted_logits:  # Fast-dLLM's Dream: the refresh commits the block's first token only
                first = candidates & (gen_index == block * k)
                commit = jnp.where(i == 0, first, commit)

        exited = jnp.zeros((b,), bool)
        if method.exit is not None:
            progress = s.nfe.astype(jnp.float32) / (passes * method.steps)
            tau = method.exit.threshold_at(progress)
            exited = active & (jnp.mean(s.margin, axis=-1) >= tau)
            commit = jnp.where(exited[:, None], masked, commit)

        nfe = s.nfe + passes * active.astype(jnp.int32)
        x_gen = jnp.where(commit, x0, x_gen)
        trajectory = jnp.where(commit, nfe[:, None], s.trajectory)
        done = s.done | exited
        if method.stop_at_eos and tokens.eos is not None:
            is_eos = x_gen == tokens.eos
            first_eos = jnp.argmax(is_eos, axis=-1)
            still_masked = x_gen == tokens.mask
            settled = active & jnp.any(is_eos, axis=-1) & ~jnp.any(still_masked & (gen_index < first_eos[:, None]), axis=-1)
            fill = still_masked & settled[:, None]
            x_gen = jnp.where(fill, tokens.eos, x_gen)
            trajectory = jnp.where(fill, nfe[:, None], trajectory)
            done = done | settled
        done = done | ~jnp.any(x_gen == tokens.mask, axis=-1)
        x = jnp.concatenate([s.x[:, :p], x_gen], axis=1)
        return dataclasses.replace(s, x=x, nfe=nfe, done=done, trajectory=trajectory, steps=s.steps + 1)

    def run_block(block, s: State) -> State:
        def masks_in_block(s):
            return jnp.sum((s.x[:, p:] == tokens.mask) & block_span(block), axis=-1).astype(jnp.int32)

        cap = method.steps_per_block if fixed_steps else k

        def cond(carry):
            i, s, _ = carry
            return (i < cap) & jnp.any(active_rows(s, block, i))

        def body(carry):
            i, s, quota_base = carry
            s = s.constrain(layout)
            if cached and not exact and cfg.shifted_logits:  # quotas split what the refresh left
                quota_base = jnp.where(i == 1, masks_in_block(s), quota_base)
            quota_base = constrain(quota_base, ("batch",), layout)
            return i + 1, denoise_step(s, block, i, quota_base).constrain(layout), quota_base

        quota_base = constrain(masks_in_block(s), ("batch",), layout)
        _, s, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), s, quota_base))
        return s

    def outer_cond(carry):
        block, s = carry
        return (block < method.num_blocks) & jnp.any(~s.done)

    def outer_body(carry):
        block, s = carry
        return block + 1, run_block(block, s.constrain(layout)).constrain(layout)

    x = jnp.concatenate([prompt, jnp.full((b, g), tokens.mask, prompt.dtype)], axis=1)
    zeros = jnp.zeros((b, g), jnp.float32)
    init = State(
        x=x, nfe=jnp.zeros((b,), jnp.int32), done=jnp.zeros((b,), bool),
        trajectory=jnp.zeros((b, g), jnp.int32), steps=jnp.int32(0),
        x0=jnp.zeros((b, g), jnp.int32), confidence=zeros, entropy=zeros, margin=zeros,
        cache=KVCache.zeros(cfg, b, length, model.embed[...].dtype, shard) if cached else None,
    )
    if exact:  # the prompt is final from the start: write its K/V once (one forward for every row)
        prompt_attn = attention_mask(method.attention, full_mask, query_index=jnp.arange(p), block_size=k, prompt_length=p)
        _, cache = model(prompt, positions[:, :p], prompt_attn, cache=init.cache, cache_index=0, logits_from=p, layout=layout)
        init = dataclasses.replace(init, cache=cache, nfe=init.nfe + 1)
    _, final = jax.lax.while_loop(outer_cond, outer_body, (jnp.int32(0), init.constrain(layout)))
    return final.x[:, p:], final.nfe, final.trajectory, final.steps


decode = jax.jit(_decode, static_argnames=("graphdef", "tokens", "shard", "layout", "kernel"))
