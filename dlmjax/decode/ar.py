"""Autoregressive decoding with a KV cache, for the causal baseline (family "qwen2").

One jitted program: a prefill of the left-padded prompt batch writes the cache (P + G slots),
then one `lax.while_loop` feeds each row's last token at its slot, writes its K/V and picks
the next token. A row stops at its first stop token (EOS or end-of-turn); the loop ends when
every row stopped or G tokens were produced, on the device. As in `transformers`' generate,
a stopped row's remaining tokens are the pad id.

Token j of a row (0-based) sits at canvas slot P + j and RoPE position n + j, where n is the
row's number of real prompt tokens (positions count real tokens from 0 under left padding).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from dlmjax.attention import mask_spec
from dlmjax.cache import KVCache
from dlmjax.model import position_ids
from dlmjax.sharding import Layout, constrain


@dataclasses.dataclass(frozen=True)
class ARMethod:
    """The static structure of an AR decode (changing it compiles a new program)."""

    gen_length: int  # G: the most tokens a row produces


@dataclasses.dataclass(frozen=True)
class ARTokens:
    """Special ids (static): a row stops at the first of `stops`; `pad` fills the rest."""

    stops: tuple[int, ...]
    pad: int


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ARKnobs:
    """Traced per-call numbers, named as in transformers' generate."""

    temperature: jax.Array  # 0 = greedy
    top_k: jax.Array  # int32; >= vocab size = off
    top_p: jax.Array  # 1 = off

    @classmethod
    def make(cls, temperature=0.0, top_k=None, top_p=None, vocab_size: int = 2**30) -> "ARKnobs":
        top_k = vocab_size if top_k is None else min(int(top_k), vocab_size)
        return cls(jnp.float32(temperature), jnp.int32(top_k), jnp.float32(1.0 if top_p is None else top_p))


def filter_logits(logits: jax.Array, knobs: ARKnobs) -> jax.Array:
    """transformers' sampling warpers in their order: temperature, top-k, top-p.

    logits [B, V] float32. Top-k keeps every logit >= the k-th largest (ties survive); top-p
    keeps the smallest set of most likely tokens whose probability reaches top_p (the token
    that crosses it included, at least one token)."""
    logits = logits / knobs.temperature
    v = logits.shape[-1]

    def truncate(lg):
        ordered = -jnp.sort(-lg, axis=-1)  # descending
        kth = jax.lax.dynamic_slice_in_dim(ordered, jnp.clip(knobs.top_k, 1, v) - 1, 1, axis=-1)
        lg = jnp.where(lg < kth, -jnp.inf, lg)
        ordered = jnp.where(ordered < kth, -jnp.inf, ordered)
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked above
        # the smallest logit still kept: everything ranked at or above it has mass-before < top_p
        keep = (before < knobs.top_p) | (jnp.arange(v) == 0)
        floor = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
        return jnp.where(lg < floor, -jnp.inf, lg)

    return jax.lax.cond((knobs.top_k < v) | (knobs.top_p < 1.0), truncate, lambda lg: lg, logits)


def next_token(logits: jax.Array, knobs: ARKnobs, key: jax.Array) -> jax.Array:
    """[B, V] float32 -> [B] int32: argmax at temperature 0, else a sample of the filtered logits."""
    def sample(lg):
        return jax.random.categorical(key, filter_logits(lg, knobs), axis=-1)

    token = jax.lax.cond(knobs.temperature > 0, sample, lambda lg: jnp.argmax(lg, axis=-1), logits)
    return token.astype(jnp.int32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ARState:
    tokens: jax.Array  # [B, G] produced so far, pad after each row's stop
    step: jax.Array  # int32: tokens produced by the batch = model calls so far
    done: jax.Array  # [B] the row produced a stop token
    lengths: jax.Array  # [B] tokens each row produced (its stop token included)
    cache: KVCache

    def constrain(self, layout: Layout | None) -> "ARState":
        """Pinned to its sharding over `layout`'s mesh, so the loop carry keeps one layout (rows over
        the batch axes, the cache's heads over tensor)."""
        if layout is None:
            return self
        rows = ("batch",)
        return dataclasses.replace(
            self, tokens=constrain(self.tokens, ("batch", "length"), layout), step=constrain(self.step, (), layout),
            done=constrain(self.done, rows, layout), lengths=constrain(self.lengths, rows, layout),
            cache=self.cache.constrain(layout),
        )


AR_BLOCK = 16  # with streaming every="block", an AR decode calls back every this many tokens


def _decode_ar(graphdef, state, prompt, prompt_mask, knobs: ARKnobs, key, stream_id=None, *, method: ARMethod,
               tokens: ARTokens, layout: Layout | None = None, kernel: str = "auto", emit_spec=None):
    """Returns tokens [B, G], nfe (scalar: model calls, the prefill included) and lengths [B].
    `kernel` (static) is the cached-attention implementation ("auto", "xla", "pallas"); `emit_spec`
    (static, `dlmjax.decode.stream.Emit`) streams: a host callback every AR_BLOCK tokens
    (every="block"; or when a row stops) or every token (every="step")."""
    model = nnx.merge(graphdef, state)
    cfg = model.config
    b, p = prompt.shape
    g = method.gen_length
    slots = p + g
    key_valid = jnp.concatenate([prompt_mask, jnp.ones((b, g), prompt_mask.dtype)], axis=1)
    real = jnp.sum(prompt_mask, axis=1).astype(jnp.int32)  # [B] real prompt tokens
    stops = jnp.asarray(tokens.stops if tokens.stops else (-1,), jnp.int32)

    def is_stop(token):
        return jnp.any(token[:, None] == stops[None, :], axis=-1)

    def emit(s: ARState, logits, j) -> ARState:
        """Take token j of every row from its logits [B, V]."""
        token = next_token(logits, knobs, jax.random.fold_in(key, j))
        token = jnp.where(s.done, tokens.pad, token)
        return dataclasses.replace(
            s, tokens=jax.lax.dynamic_update_slice_in_dim(s.tokens, token[:, None], j, axis=1),
            step=jnp.asarray(j + 1, jnp.int32),
            lengths=s.lengths + (~s.done).astype(jnp.int32), done=s.done | is_stop(token),
        )

    cache = KVCache.zeros(cfg, b, slots, model.embed[...].dtype)
    prefill_mask = mask_spec("causal", key_valid, query_index=jnp.arange(p), key_index=jnp.arange(slots))
    logits, cache = model(
        prompt, position_ids(cfg, prompt_mask), prefill_mask, cache=cache.constrain(layout), cache_index=0, logits_from=p - 1,
        layout=layout, kernel=kernel,
    )
    init = ARState(
        tokens=jnp.full((b, g), tokens.pad, jnp.int32), step=jnp.int32(0), done=jnp.zeros((b,), bool),
        lengths=jnp.zeros((b,), jnp.int32), cache=cache,
    )
    init = emit(init, logits[:, -1], 0).constrain(layout)

    def cond(s: ARState):
        return (s.step < g) & jnp.any(~s.done)

    def body(s: ARState) -> ARState:
        s = s.constrain(layout)
        j = s.step  # feed token j - 1 at slot p + j - 1 to get token j
        last = jax.lax.dynamic_slice_in_dim(s.tokens, j - 1, 1, axis=1)
        mask = mask_spec("causal", key_valid, query_index=(p + j - 1)[None], key_index=jnp.arange(slots))
        logits, cache = model(last, (real + j - 1)[:, None], mask, cache=s.cache, cache_index=p + j - 1, layout=layout,
                              kernel=kernel)
        out = emit(dataclasses.replace(s, cache=cache), logits[:, -1], j).constrain(layout)
        if streaming is not None:
            from dlmjax.decode.stream import send_ar

            send_ar(streaming, stream_id, out, s.done, AR_BLOCK)
        return out

    streaming = emit_spec
    final = jax.lax.while_loop(cond, body, init)
    return final.tokens, final.step, final.lengths


decode_ar = jax.jit(_decode_ar, static_argnames=("graphdef", "method", "tokens", "layout", "kernel", "emit_spec"))
