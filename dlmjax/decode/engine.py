"""The decode engine: any method compiles into one jitted `lax.while_loop`.

Each iteration of the loop (`_iteration`) asks the method's block schedule for a `View` (which
rows run, which positions they may commit, cut into windows), runs one forward through the
cache policy (`_forward`), lets the commit rule decide per window (`_decide`), and writes the
commits, the NFE, EOS handling and the early exit (`_write`), all on the device. A method is a
`Method` pytree (dlmjax.decode.method): its part classes and static fields are the program's
structure, the numbers a user tunes per call (thresholds, temperature, schedule ends) are
traced leaves, so changing them does not recompile. The exact rules are in
dlmjax/decode/SPEC.md.
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
from dlmjax.decode.schedules import View, first_stop
from dlmjax.model import position_ids, shift_right
from dlmjax.sharding import Layout, constrain

STATISTICS = ("x0", "confidence", "entropy", "margin", "rank")


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
    rank: jax.Array  # [B, G] the rule's own score (`Rule.rank`)
    cache: KVCache | None
    sched: object  # the block schedule's state (a pytree of [B, ...] arrays and scalars)

    def constrain(self, layout: Layout | None) -> "State":
        """Every array pinned to its sharding over `layout`'s mesh: a while_loop carry must leave
        the body as it came in, and this keeps it split (rows over the batch axes, the cache's
        heads over tensor) through every step instead of whatever the partitioner infers."""
        if layout is None:
            return self
        rows, canvas = ("batch",), ("batch", "length")
        arrays = dict(x=canvas, nfe=rows, done=rows, trajectory=canvas, steps=(), **{name: canvas for name in STATISTICS})
        cache = None if self.cache is None else self.cache.constrain(layout)
        sched = jax.tree_util.tree_map(lambda a: constrain(a, ("batch", None)[: a.ndim], layout), self.sched)
        return dataclasses.replace(
            self, cache=cache, sched=sched,
            **{name: constrain(getattr(self, name), axes, layout) for name, axes in arrays.items()},
        )


@dataclasses.dataclass(frozen=True)
class Tokens:
    """Special ids the engine needs (static)."""

    mask: int
    eos: int | None
    eot: int | None
    stops: tuple[int, ...] = ()  # the ids that end an answer (stop_at_eos, D2F, Fast-dLLM v2)


@dataclasses.dataclass(frozen=True)
class Context:
    """What every part of an iteration reads: the model, the method, and the canvas's geometry."""

    model: nnx.Module
    method: Method
    tokens: Tokens
    layout: Layout | None
    kernel: str  # the cached-attention implementation (static)
    key: jax.Array
    prompt_length: int
    full_mask: jax.Array  # [B, P + G]
    positions: jax.Array  # [B, P + G]
    attn: object  # the canvas's attention mask

    @property
    def shifted(self) -> bool:
        return bool(self.model.config.shifted_logits)

    @property
    def head_from(self) -> int:
        # The head runs only where predictions are read: the generation region, and for shifted
        # logits the position before it.
        p = self.prompt_length
        return max(p - 1, 0) if self.shifted else p

    @property
    def passes(self) -> int:
        return 2 if self.method.guidance is not None else 1

    @property
    def refresh_commits_one(self) -> bool:
        # Fast-dLLM's Dream under an approximate cache: the refresh commits the block's first token only
        m = self.method
        return m.cache.stores and not m.cache.exact and self.shifted


# --- the forward, through the cache policy -----------------------------------------------------


def _clean(ctx: Context, logits):
    # The mask token is never a prediction: trained models give it ~zero probability, and
    # committing it would leave the position masked (upstream can loop on it).
    logits = logits.at[..., ctx.tokens.mask].set(-jnp.inf)
    if ctx.method.logits_eos_inf:
        logits = logits.at[..., ctx.tokens.eos].set(-jnp.inf)
    return logits


def _full_forward(ctx: Context, x, cache):
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
    return _clean(ctx, logits[:, p - ctx.head_from:]), cache


def _window(ctx: Context, x, cache, start, width, keep=None):
    """Queries [start, start + width) against the cache: their logits (shifted for Dream; the
    window's first has no left neighbour) and the cache with the window's K/V written."""
    m = ctx.method
    window = jax.lax.dynamic_slice_in_dim(x, start, width, axis=1)
    window_positions = jax.lax.dynamic_slice_in_dim(ctx.positions, start, width, axis=1)
    # factored, so that a cached step can run the Pallas cached-block kernel
    attn = mask_spec(m.attention, ctx.full_mask, query_index=start + jnp.arange(width), block_size=m.block_length,
                     prompt_length=ctx.prompt_length)
    logits, cache = ctx.model(window, window_positions, attn, cache=cache, cache_index=start, cache_keep=keep,
                              layout=ctx.layout, kernel=ctx.kernel)
    if ctx.shifted:
        logits = shift_right(logits)
    return logits, cache


def _forward(ctx: Context, s: State, v: View, noise) -> State:
    """One forward through the cache policy; the predictions of the positions it computed."""
    m, p = ctx.method, ctx.prompt_length
    g, k = m.gen_length, m.block_length
    length = p + g
    if not m.cache.stores:
        logits, _ = _full_forward(ctx, s.x, None)
        return _predictions(ctx, s, logits, 0, v, noise, skip_first=False)
    if m.cache.exact:
        # Queries [start, e) attend to the cached finished blocks and themselves. A block's first
        # step starts one block early (width 2K), rewriting the previous block's K/V from its final
        # tokens; later steps start one slot early for shifted logits.
        block_start = p + v.block * k

        def exact_step(width):
            def run(s):
                start = jnp.clip(block_start + k - width, 0, length - width)
                logits, cache = _window(ctx, s.x, s.cache, start, width)
                block_logits = _clean(ctx, jax.lax.dynamic_slice_in_dim(logits, block_start - start, k, axis=1))
                return _predictions(ctx, dataclasses.replace(s, cache=cache), block_logits, v.block * k, v, noise,
                                    skip_first=False)

            return run

        return jax.lax.cond(v.i == 0, exact_step(2 * k), exact_step(k + int(ctx.shifted)), s)

    def refresh(s):
        logits, cache = _full_forward(ctx, s.x, s.cache)
        return _predictions(ctx, dataclasses.replace(s, cache=cache), logits, 0, v, noise, skip_first=False)

    def cached_step(s):
        if isinstance(m.cache, Dual):  # only the block
            start, width, keep = p + v.block * k, k, None
        else:  # prefix: the whole region as queries; slots before the block keep the refresh's K/V
            start, width, keep = p, g, jnp.arange(g) < v.block * k
        logits, cache = _window(ctx, s.x, s.cache, start, width, keep)
        return _predictions(ctx, dataclasses.replace(s, cache=cache), _clean(ctx, logits), start - p, v, noise,
                            skip_first=ctx.shifted)

    return jax.lax.cond(v.i == 0, refresh, cached_step, s)


def _predictions(ctx: Context, s: State, logits, offset, v: View, noise, skip_first: bool) -> State:
    """Write the window's x0, confidence and the statistics the method needs into the carried
    [B, G] arrays. Sampling noise covers the view's block (SemiAR) or the whole region."""
    m, tokens = ctx.method, ctx.tokens
    width = logits.shape[1]
    x0 = gumbel_argmax(logits, m.temperature, noise, offset, v.noise_start, v.noise_length)
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
    use = jnp.arange(width) > 0 if skip_first else jnp.ones((width,), bool)
    out = {}
    for name, value in fresh.items():
        old = jax.lax.dynamic_slice_in_dim(getattr(s, name), offset, width, axis=1)
        out[name] = jax.lax.dynamic_update_slice_in_dim(getattr(s, name), jnp.where(use, value, old), offset, axis=1)
    return dataclasses.replace(s, **out)


# --- the commit rule, per window -------------------------------------------------------------------


def _decide(ctx: Context, s: State, v: View, sample_key, select_key):
    """(x0 [B, G], commit [B, G], the state with fresh predictions) of one step."""
    m, cfg = ctx.method, ctx.model.config
    rule = m.rule
    masked = s.x[:, ctx.prompt_length:] == ctx.tokens.mask
    candidates = masked & v.region
    b, g = masked.shape
    if "logits" in m.needs:  # Dream's samplers draw from the block's logits themselves
        logits, _ = _full_forward(ctx, s.x, None)
        k = m.block_length
        span = masked & (jnp.arange(g) >= v.block * k) & (jnp.arange(g) < (v.block + 1) * k)
        x0, commit = rule.decide(logits, candidates, span, v.block * k, k, v.i, m.steps_per_block, m.temperature,
                                 sample_key, select_key)
        s = dataclasses.replace(s, x0=x0)
        if "margin" in m.needs:
            s = dataclasses.replace(s, margin=margins(logits))
        return x0, commit, s

    noise = block_noise(sample_key, m.temperature, v.noise_start, v.noise_length, b, cfg.vocab_size, m.gumbel_x64)
    s = _forward(ctx, s, v, noise)
    quota = v.quota
    w = v.windows

    def per_window(a):  # [B, G] -> [B * W, G / W]: the rule handles each window as a row
        return None if a is None else a.reshape(b * w, g // w)

    step = rules.Step(
        candidates=per_window(candidates), confidence=per_window(s.confidence),
        entropy=per_window(s.entropy) if "entropy" in m.needs else None,
        quota=None if quota is None else jnp.repeat(quota, w), select_key=select_key,
        rank=per_window(s.rank) if "rank" in m.needs else None,
        force=None if v.force is None else v.force.reshape(b * w),
    )
    commit = rule.commit(step).reshape(b, g)
    if ctx.refresh_commits_one:  # Fast-dLLM's Dream: the refresh commits the block's first token only
        first = candidates & (jnp.arange(g) == v.block * m.block_length)
        commit = jnp.where(v.i == 0, first, commit)
    return s.x0, commit, s


# --- writing a step's commits --------------------------------------------------------------------


def _write(ctx: Context, s: State, v: View, x0, commit) -> State:
    """Commits, NFE, trajectory, the early exit and EOS handling; rows with nothing left are done."""
    m, tokens, p = ctx.method, ctx.tokens, ctx.prompt_length
    x_gen = s.x[:, p:]
    masked = x_gen == tokens.mask
    exited = jnp.zeros_like(s.done)
    if m.exit is not None:
        progress = s.nfe.astype(jnp.float32) / (ctx.passes * m.steps)
        tau = m.exit.threshold_at(progress)
        exited = v.active & (jnp.mean(s.margin, axis=-1) >= tau)
        commit = jnp.where(exited[:, None], masked, commit)

    nfe = s.nfe + ctx.passes * v.active.astype(jnp.int32)
    x_gen = jnp.where(commit, x0, x_gen)
    trajectory = jnp.where(commit, nfe[:, None], s.trajectory)
    done = s.done | exited
    if m.stop_at_eos and tokens.stops:
        settled = v.active & first_stop(x_gen, tokens)[0]
        fill = (x_gen == tokens.mask) & settled[:, None]
        x_gen = jnp.where(fill, tokens.eos if tokens.eos is not None else tokens.stops[0], x_gen)
        trajectory = jnp.where(fill, nfe[:, None], trajectory)
        done = done | settled
    sched, finished, keep = m.blocks.after(s.sched, masked, x_gen, tokens)
    if keep is not None:  # the schedule's own end (D2F, Fast-dLLM v2): the rest of the row reads as EOS
        finished = v.active & finished
        fill = finished[:, None] & ~keep
        trajectory = jnp.where(fill & (x_gen == tokens.mask), nfe[:, None], trajectory)
        x_gen = jnp.where(fill, tokens.eos if tokens.eos is not None else tokens.mask, x_gen)
        done = done | finished
    done = done | ~jnp.any(x_gen == tokens.mask, axis=-1)
    x = jnp.concatenate([s.x[:, :p], x_gen], axis=1)
    return dataclasses.replace(s, x=x, nfe=nfe, done=done, trajectory=trajectory, steps=s.steps + 1, sched=sched)


# --- the loop ----------------------------------------------------------------------------------------


def _iteration(ctx: Context, s: State) -> State:
    """One iteration of the loop: the schedule's view, one forward through the cache policy, the
    rule's commits per window, and the schedule's state after them."""
    m = ctx.method
    s = s.constrain(ctx.layout)
    masked = s.x[:, ctx.prompt_length:] == ctx.tokens.mask
    sched, v = m.blocks.begin(s.sched, masked, s.done, m.rule, ctx.refresh_commits_one)
    s = dataclasses.replace(s, sched=sched)
    sample_key, select_key = jax.random.split(jax.random.fold_in(ctx.key, s.steps))
    x0, commit, s = _decide(ctx, s, v, sample_key, select_key)
    s = _write(ctx, s, v, x0, commit)
    masked = s.x[:, ctx.prompt_length:] == ctx.tokens.mask
    s = dataclasses.replace(s, sched=m.blocks.settle(s.sched, masked, s.done, m.rule))
    return s.constrain(ctx.layout)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Batch:
    """What the engine decodes: left-padded prompt ids [B, P], their mask [B, P] (1 = real), and
    the model's special ids (static)."""

    prompt: jax.Array
    mask: jax.Array
    tokens: Tokens = dataclasses.field(metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Output:
    tokens: jax.Array  # [B, G] the generation region
    nfe: jax.Array  # [B] forward passes each row took part in
    trajectory: jax.Array  # [B, G] the row's step (1-based) that committed each position
    steps: jax.Array  # forward passes of the batch


def _run(graphdef, state, batch: Batch, method: Method, key, *, layout: Layout | None = None, kernel: str = "auto") -> Output:
    """Decode `batch` with `method`: arrays in, arrays out, one program. Static: the model's
    graphdef, the `layout` (None on one device) and the cached-attention implementation `kernel`
    ("auto", "xla", "pallas"); the method's structure is its pytree structure."""
    prompt, prompt_mask, tokens = batch.prompt, batch.mask, batch.tokens
    model = nnx.merge(graphdef, state)
    cfg = model.config
    b, p = prompt.shape
    g, k = method.gen_length, method.block_length
    full_mask = jnp.concatenate([prompt_mask, jnp.ones((b, g), prompt_mask.dtype)], axis=1)
    positions = position_ids(cfg, full_mask)
    attn = method.blocks.mask(method.attention, positions, full_mask, p)
    ctx = Context(model=model, method=method, tokens=tokens, layout=layout, kernel=kernel, key=key, prompt_length=p,
                  full_mask=full_mask, positions=positions, attn=attn)
    x = jnp.concatenate([prompt, jnp.full((b, g), tokens.mask, prompt.dtype)], axis=1)
    zeros = jnp.zeros((b, g), jnp.float32)
    cached = method.cache.stores
    init = State(
        x=x, nfe=jnp.zeros((b,), jnp.int32), done=jnp.zeros((b,), bool), trajectory=jnp.zeros((b, g), jnp.int32),
        steps=jnp.int32(0), x0=jnp.zeros((b, g), jnp.int32), confidence=zeros, entropy=zeros, margin=zeros, rank=zeros,
        cache=KVCache.zeros(cfg, b, p + g, model.embed[...].dtype) if cached else None,
        sched=method.blocks.init(jnp.ones((b, g), bool), jnp.sum(prompt_mask, axis=-1).astype(jnp.int32)),
    )
    if method.cache.exact:  # the prompt is final from the start: write its K/V once (one forward for every row)
        prompt_attn = attention_mask(method.attention, full_mask, query_index=jnp.arange(p), block_size=k, prompt_length=p)
        _, cache = model(prompt, ctx.positions[:, :p], prompt_attn, cache=init.cache, cache_index=0, logits_from=p,
                         layout=layout, kernel=kernel)
        init = dataclasses.replace(init, cache=cache, nfe=init.nfe + 1)

    def running(s: State):
        return method.blocks.running(s.sched) & jnp.any(~s.done) & (s.steps < method.blocks.max_steps)

    final = jax.lax.while_loop(running, lambda s: _iteration(ctx, s), init.constrain(layout))
    return Output(tokens=final.x[:, p:], nfe=final.nfe, trajectory=final.trajectory, steps=final.steps)


run = jax.jit(_run, static_argnames=("graphdef", "layout", "kernel"))
