"""The decode engine: any method compiles into one jitted pair of nested `lax.while_loop`s.

Blocks run in the outer loop and denoising steps in the inner one; termination, commits,
early exits and EOS handling are all computed on the device. A method is a static
`Method` (the structure: rule, exit schedule, shapes); the numbers a user tunes per call
(thresholds, temperature, schedule ends) are traced `Knobs`, so changing them does not
recompile. The exact rules are in dlmjax/decode/SPEC.md.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from dlmjax.attention import attention_mask
from dlmjax.decode import exits, rules
from dlmjax.model import position_ids, shift_right


@dataclasses.dataclass(frozen=True)
class Method:
    """The static structure of a decode: changing any field compiles a new program."""

    rule: str = "quota"  # one of rules.RULES
    remasking: str = "low_confidence"  # quota rule: "low_confidence" | "random"
    exit: str | None = None  # None or one of exits.EXITS
    gen_length: int = 128
    block_length: int = 128
    steps: int = 128
    stop_at_eos: bool = False
    logits_eos_inf: bool = False
    confidence_eos_eot_inf: bool = False
    alg: str = "maskgit_plus"  # rule "dream": origin | maskgit_plus | topk_margin | entropy
    top_k: int | None = None  # rule "dream": keep the k largest logits
    cfg: bool = False  # LLaDA's unsupervised classifier-free guidance (a second, prompt-masked pass)
    gumbel_x64: bool = False  # LLaDA's exact float64 Gumbel-max (traced with jax_enable_x64)

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Knobs:
    """Traced per-call numbers."""

    temperature: jax.Array
    threshold: jax.Array  # confidence bound (threshold rule) or entropy bound in nats (entropy rule)
    factor: jax.Array
    tau_high: jax.Array
    tau_low: jax.Array
    exit_k: jax.Array
    top_p: jax.Array  # rule "dream": nucleus filtering (1 = off)
    alg_temp: jax.Array  # rule "dream": 0 = top-n positions, > 0 = sampled without replacement
    eps: jax.Array  # rule "dream": last timestep of linspace(1, eps, steps + 1)
    cfg_scale: jax.Array

    @classmethod
    def make(cls, temperature=0.0, threshold=0.9, factor=1.0, tau_high=7.5, tau_low=2.5, exit_k=4.0, top_p=1.0,
             alg_temp=0.0, eps=1e-3, cfg_scale=0.0) -> "Knobs":
        f = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
        return cls(f(temperature), f(threshold), f(factor), f(tau_high), f(tau_low), f(exit_k), f(top_p), f(alg_temp),
                   f(eps), f(cfg_scale))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class State:
    x: jax.Array  # [B, P + G] canvas
    nfe: jax.Array  # [B] forward passes each row took part in
    done: jax.Array  # [B]
    trajectory: jax.Array  # [B, G] the row's step (1-based nfe) that committed each position
    steps: jax.Array  # scalar: forward passes of the whole batch


@dataclasses.dataclass(frozen=True)
class Tokens:
    """Special ids the engine needs (static)."""

    mask: int
    eos: int | None
    eot: int | None


def _filter_logits(logits, temperature, top_p, top_k: int | None):
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


def _gumbel_argmax(logits, temperature, key, x64: bool):
    """x0 = argmax(logits + T g), g ~ Gumbel (LLaDA's exp(l) / (-log u)^T trick); argmax at T = 0."""

    def noisy(_):
        if x64:
            u = jax.random.uniform(key, logits.shape, jnp.float64, minval=jnp.finfo(jnp.float64).tiny)
            g = -jnp.log(-jnp.log(u))
            return jnp.argmax(logits.astype(jnp.float64) + temperature.astype(jnp.float64) * g, axis=-1)
        return jnp.argmax(logits + temperature * jax.random.gumbel(key, logits.shape, jnp.float32), axis=-1)

    x0 = jax.lax.cond(temperature > 0, noisy, lambda _: jnp.argmax(logits, axis=-1), None)
    return x0.astype(jnp.int32)


def _dream_step(logits, candidates, masked_in_block, i, knobs: Knobs, method: Method, sample_key, select_key):
    """Dream's samplers on one block: returns (x0, commit)."""
    spb = method.steps_per_block
    filtered = _filter_logits(logits, knobs.temperature, knobs.top_p, method.top_k)
    probs = jax.nn.softmax(filtered, axis=-1)
    sampled = jnp.argmax(filtered + jax.random.gumbel(sample_key, logits.shape, jnp.float32), axis=-1)
    x0 = jnp.where(knobs.temperature > 0, sampled, jnp.argmax(probs, axis=-1)).astype(jnp.int32)
    ts = jnp.linspace(1.0, knobs.eps, spb + 1, dtype=jnp.float32)
    t, s = ts[i], ts[i + 1]
    last = i == spb - 1
    if method.alg == "origin":
        p_transfer = jnp.where(last, 1.0, 1.0 - s / t)
        u = jax.random.uniform(select_key, candidates.shape, jnp.float32)
        return x0, candidates & (u < p_transfer)
    if method.alg == "maskgit_plus":
        confidence = jnp.take_along_axis(probs, x0[..., None], axis=-1)[..., 0]
    elif method.alg == "topk_margin":
        top2 = jax.lax.top_k(probs, 2)[0]
        confidence = top2[..., 0] - top2[..., 1]
    else:
        confidence = jnp.sum(probs * jnp.log(probs + 1e-10), axis=-1)
    mean_masks = jnp.mean(jnp.sum(masked_in_block, axis=-1).astype(jnp.float32))
    n = jnp.floor(jnp.where(last, mean_masks, mean_masks * (1.0 - s / t))).astype(jnp.int32)
    noise = jax.random.gumbel(select_key, candidates.shape, jnp.float32)
    score = jnp.where(knobs.alg_temp > 0, confidence / jnp.maximum(knobs.alg_temp, 1e-30) + noise, confidence)
    score = jnp.where(candidates, score, rules.NEG_INF)
    return x0, rules.quota_commit(score, candidates, jnp.broadcast_to(n, candidates.shape[:1]))


def _decode(graphdef, state, prompt, prompt_mask, knobs: Knobs, key, *, method: Method, tokens: Tokens):
    model = nnx.merge(graphdef, state)
    cfg = model.config
    b, p = prompt.shape
    g, k = method.gen_length, method.block_length
    full_mask = jnp.concatenate([prompt_mask, jnp.ones((b, g), prompt_mask.dtype)], axis=1)
    positions = position_ids(cfg, full_mask)
    attn = attention_mask("bidirectional", full_mask)
    gen_index = jnp.arange(g)
    passes = 2 if method.cfg else 1

    # The head runs only where predictions are read: the generation region, and for shifted
    # logits the position before it.
    head_from = max(p - 1, 0) if cfg.shifted_logits else p

    def step_logits(x):
        if method.cfg:
            unconditional = x.at[:, :p].set(tokens.mask)
            both, _ = model(
                jnp.concatenate([x, unconditional]), jnp.concatenate([positions, positions]),
                jnp.concatenate([attn, attn]), logits_from=head_from,
            )
            cond, uncond = both[:b], both[b:]
            logits = uncond + (knobs.cfg_scale + 1.0) * (cond - uncond)
        else:
            logits, _ = model(x, positions, attn, logits_from=head_from)
        if cfg.shifted_logits:
            logits = shift_right(logits)
        # The mask token is never a prediction: trained models give it ~zero probability, and
        # committing it would leave the position masked (upstream can loop on it).
        logits = logits[:, p - head_from :].at[..., tokens.mask].set(-jnp.inf)
        if method.logits_eos_inf:
            logits = logits.at[..., tokens.eos].set(-jnp.inf)
        return logits

    def block_span(block):
        return (gen_index >= block * k) & (gen_index < (block + 1) * k)

    def active_rows(s: State, block, i) -> jax.Array:
        if method.rule in ("quota", "dream"):
            return ~s.done & (i < method.steps_per_block)
        return ~s.done & jnp.any((s.x[:, p:] == tokens.mask) & block_span(block), axis=-1)

    def denoise_step(s: State, block, i, quota_base) -> State:
        active = active_rows(s, block, i)
        sample_key, select_key = jax.random.split(jax.random.fold_in(key, s.steps))
        logits = step_logits(s.x)
        x_gen = s.x[:, p:]
        masked = x_gen == tokens.mask
        candidates = masked & block_span(block) & active[:, None]

        if method.rule == "dream":
            x0, commit = _dream_step(logits, candidates, masked & block_span(block), i, knobs, method, sample_key, select_key)
        else:
            x0 = _gumbel_argmax(logits, knobs.temperature, sample_key, method.gumbel_x64)
            probs = jax.nn.softmax(logits, axis=-1)
            confidence = jnp.take_along_axis(probs, x0[..., None], axis=-1)[..., 0]
            if method.confidence_eos_eot_inf:
                special = x0 == tokens.eos
                if tokens.eot is not None:
                    special = special | (x0 == tokens.eot)
                confidence = jnp.where(special, -jnp.inf, confidence)
            if method.rule == "quota":
                spb = method.steps_per_block
                quota = quota_base // spb + (i < quota_base % spb).astype(jnp.int32)
                if method.remasking == "random":
                    confidence = jax.random.uniform(select_key, confidence.shape, jnp.float32)
                commit = rules.quota_commit(jnp.where(candidates, confidence, rules.NEG_INF), candidates, quota)
            elif method.rule == "threshold":
                commit = rules.threshold_commit(confidence, candidates, knobs.threshold)
            elif method.rule == "factor":
                commit = rules.factor_commit(confidence, candidates, knobs.factor)
            else:
                entropy = -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), axis=-1)
                commit = rules.entropy_commit(entropy, candidates, knobs.threshold)

        exited = jnp.zeros((b,), bool)
        if method.exit is not None:
            progress = s.nfe.astype(jnp.float32) / (passes * method.steps)
            tau = exits.threshold_at(method.exit, progress, knobs.tau_high, knobs.tau_low, knobs.exit_k)
            exited = active & (exits.margin_signal(logits) >= tau)
            commit = jnp.where(exited[:, None], masked, commit)

        nfe = s.nfe + passes * active.astype(jnp.int32)
        x_gen = jnp.where(commit, x0, x_gen)
        trajectory = jnp.where(commit, nfe[:, None], s.trajectory)
        done = s.done | exited
        if method.stop_at_eos and tokens.eos is not None:
            is_eos = x_gen == tokens.eos
            first = jnp.argmax(is_eos, axis=-1)
            still_masked = x_gen == tokens.mask
            settled = active & jnp.any(is_eos, axis=-1) & ~jnp.any(still_masked & (gen_index < first[:, None]), axis=-1)
            fill = still_masked & settled[:, None]
            x_gen = jnp.where(fill, tokens.eos, x_gen)
            trajectory = jnp.where(fill, nfe[:, None], trajectory)
            done = done | settled
        done = done | ~jnp.any(x_gen == tokens.mask, axis=-1)
        x = jnp.concatenate([s.x[:, :p], x_gen], axis=1)
        return State(x=x, nfe=nfe, done=done, trajectory=trajectory, steps=s.steps + 1)

    def run_block(block, s: State) -> State:
        quota_base = jnp.sum((s.x[:, p:] == tokens.mask) & block_span(block), axis=-1).astype(jnp.int32)
        cap = method.steps_per_block if method.rule in ("quota", "dream") else k

        def cond(carry):
            i, s = carry
            return (i < cap) & jnp.any(active_rows(s, block, i))

        def body(carry):
            i, s = carry
            return i + 1, denoise_step(s, block, i, quota_base)

        _, s = jax.lax.while_loop(cond, body, (jnp.int32(0), s))
        return s

    def outer_cond(carry):
        block, s = carry
        return (block < method.num_blocks) & jnp.any(~s.done)

    def outer_body(carry):
        block, s = carry
        return block + 1, run_block(block, s)

    x = jnp.concatenate([prompt, jnp.full((b, g), tokens.mask, prompt.dtype)], axis=1)
    init = State(
        x=x, nfe=jnp.zeros((b,), jnp.int32), done=jnp.zeros((b,), bool),
        trajectory=jnp.zeros((b, g), jnp.int32), steps=jnp.int32(0),
    )
    _, final = jax.lax.while_loop(outer_cond, outer_body, (jnp.int32(0), init))
    return final.x[:, p:], final.nfe, final.trajectory, final.steps


decode = jax.jit(_decode, static_argnames=("graphdef", "method", "tokens"))
