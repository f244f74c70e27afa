"""The decode engine: any method compiles into one jitted `lax.while_loop`.

Each iteration of the loop (`_iteration`) asks the method's block schedule for a `View` (which
rows run, which positions they may commit, cut into windows), runs one forward through the
cache policy (`Cache.forward`, dlmjax/decode/caches.py), lets the commit rule decide per window
(`_decide`), and writes the commits, the NFE, EOS handling and the early exit (`_write`), all
on the device. A method is a
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

from dlmjax.cache import KVCache
from dlmjax.decode import forward, rules
from dlmjax.decode.exits import margins
from dlmjax.decode.method import Method
from dlmjax.decode.sampling import block_noise
from dlmjax.decode.schedules import View, first_stop
from dlmjax.model import position_ids
from dlmjax.sharding import Layout, constrain

STATISTICS = ("x0", "confidence", "entropy", "margin", "rank")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class State:
    x: jax.Array  # [B, P + G] canvas
    nfe: jax.Array  # [B] forward passes each row took part in
    done: jax.Array  # [B]
    trajectory: jax.Array  # [B, G] the row's step (1-based nfe) that committed each position
    edits: jax.Array  # [B, G] times each position's decoded token was rewritten (token editing, LLaDA2.1)
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
        arrays = dict(x=canvas, nfe=rows, done=rows, trajectory=canvas, edits=canvas, steps=(),
                      **{name: canvas for name in STATISTICS})
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
    emit: object = None  # dlmjax.decode.stream.Emit (static) when the decode streams, else None
    stream_id: jax.Array | None = None  # the stream's id (traced), routed by emit.hub

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
        return m.cache.stores and not m.cache.exact and self.shifted and m.blocks.block_refresh


# --- the commit rule, per window -------------------------------------------------------------------


def _decide(ctx: Context, s: State, v: View, sample_key, select_key):
    """(x0 [B, G], commit [B, G], the state with fresh predictions) of one step."""
    m, cfg = ctx.method, ctx.model.config
    rule = m.rule
    masked = s.x[:, ctx.prompt_length:] == ctx.tokens.mask
    candidates = masked & v.region
    b, g = masked.shape
    if "logits" in m.needs:  # Dream's samplers draw from the block's logits themselves
        logits, _ = forward.full_forward(ctx, s.x, None)
        k = m.block_length
        span = masked & (jnp.arange(g) >= v.block * k) & (jnp.arange(g) < (v.block + 1) * k)
        x0, commit = rule.decide(logits, candidates, span, v.block * k, k, v.i, m.steps_per_block, m.temperature,
                                 sample_key, select_key)
        s = dataclasses.replace(s, x0=x0)
        if "margin" in m.needs:
            s = dataclasses.replace(s, margin=margins(logits))
        return x0, commit, s

    noise = block_noise(sample_key, m.temperature, v.noise_start, v.noise_length, b, cfg.vocab_size, m.gumbel_x64)
    s = m.cache.forward(ctx, s, v, noise)  # one forward through the cache policy
    quota = v.quota
    w = v.windows

    def per_window(a):  # [B, G] -> [B * W, G / W]: the rule handles each window as a row
        return None if a is None else a.reshape(b * w, g // w)

    editing = "edits" in m.needs  # a rule that may rewrite decoded tokens sees which, and where x0 differs
    step = rules.Step(
        editable=per_window(v.region & ~masked) if editing else None,
        changed=per_window(s.x0 != s.x[:, ctx.prompt_length:]) if editing else None,
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
    edits = s.edits + (commit & ~masked).astype(jnp.int32)
    x_gen = jnp.where(commit, x0, x_gen)
    trajectory = jnp.where(commit, nfe[:, None], s.trajectory)
    done = s.done | exited
    if m.stop_at_eos and tokens.stops:
        settled = v.active & first_stop(x_gen, tokens)[0]
        fill = (x_gen == tokens.mask) & settled[:, None]
        x_gen = jnp.where(fill, tokens.eos if tokens.eos is not None else tokens.stops[0], x_gen)
        trajectory = jnp.where(fill, nfe[:, None], trajectory)
        done = done | settled
    sched, finished, keep = m.blocks.after(s.sched, masked, x_gen, tokens, commit)
    if keep is not None:  # the schedule's own end (D2F, Fast-dLLM v2): the rest of the row reads as EOS
        finished = v.active & finished
        fill = finished[:, None] & ~keep
        trajectory = jnp.where(fill & (x_gen == tokens.mask), nfe[:, None], trajectory)
        x_gen = jnp.where(fill, tokens.eos if tokens.eos is not None else tokens.mask, x_gen)
        done = done | finished
    if not m.blocks.edits:  # (a schedule that edits ends its rows itself: a row free of masks may still edit)
        done = done | ~jnp.any(x_gen == tokens.mask, axis=-1)
    x = jnp.concatenate([s.x[:, :p], x_gen], axis=1)
    return dataclasses.replace(s, x=x, nfe=nfe, done=done, trajectory=trajectory, edits=edits, steps=s.steps + 1, sched=sched)


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
    masked_before, done_before = masked, s.done
    s = _write(ctx, s, v, x0, commit)
    if ctx.emit is not None:
        from dlmjax.decode.stream import send

        send(ctx.emit, ctx.stream_id, m.block_length, masked_before, done_before, s, ctx.prompt_length, ctx.tokens.mask,
             m.gen_length)
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
    edits: jax.Array  # [B, G] times each position's decoded token was rewritten
    steps: jax.Array  # forward passes of the batch


def _run(graphdef, state, batch: Batch, method: Method, key, stream_id=None, *, layout: Layout | None = None,
         kernel: str = "auto", emit=None) -> Output:
    """Decode `batch` with `method`: arrays in, arrays out, one program. Static: the model's
    graphdef, the `layout` (None on one device), the cached-attention implementation `kernel`
    ("auto", "xla", "pallas") and `emit` (streaming's callbacks, `dlmjax.decode.stream`; the
    stream's id `stream_id` is traced); the method's structure is its pytree structure."""
    prompt, prompt_mask, tokens = batch.prompt, batch.mask, batch.tokens
    model = nnx.merge(graphdef, state)
    cfg = model.config
    b, p = prompt.shape
    g = method.canvas_length
    full_mask = jnp.concatenate([prompt_mask, jnp.ones((b, g), prompt_mask.dtype)], axis=1)
    positions = position_ids(cfg, full_mask)
    attn = method.blocks.mask(method.attention, positions, full_mask, p)
    ctx = Context(model=model, method=method, tokens=tokens, layout=layout, kernel=kernel, key=key, prompt_length=p,
                  full_mask=full_mask, positions=positions, attn=attn, emit=emit, stream_id=stream_id)
    x = jnp.concatenate([prompt, jnp.full((b, g), tokens.mask, prompt.dtype)], axis=1)
    zeros = jnp.zeros((b, g), jnp.float32)
    cache, nfe = method.cache.prefill(ctx, prompt, method.cache.init(ctx, b), jnp.zeros((b,), jnp.int32))
    init = State(
        x=x, nfe=nfe, done=jnp.zeros((b,), bool), trajectory=jnp.zeros((b, g), jnp.int32), edits=jnp.zeros((b, g), jnp.int32),
        steps=jnp.int32(0), x0=jnp.zeros((b, g), jnp.int32), confidence=zeros, entropy=zeros, margin=zeros, rank=zeros,
        cache=cache, sched=method.blocks.init(jnp.ones((b, g), bool), jnp.sum(prompt_mask, axis=-1).astype(jnp.int32)),
    )

    def running(s: State):
        return method.blocks.running(s.sched) & jnp.any(~s.done) & (s.steps < method.blocks.max_steps)

    final = jax.lax.while_loop(running, lambda s: _iteration(ctx, s), init.constrain(layout))
    answer = method.gen_length  # the canvas may run past it (LLaDA2's last block)
    return Output(tokens=final.x[:, p:p + answer], nfe=final.nfe, trajectory=final.trajectory[:, :answer],
                  edits=final.edits[:, :answer], steps=final.steps)


run = jax.jit(_run, static_argnames=("graphdef", "layout", "kernel", "emit"))
