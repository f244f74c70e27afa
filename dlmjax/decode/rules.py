"""Which tokens to commit in a step: the commit rules of the seed papers.

Each rule maps a step's confidences to a boolean commit mask [B, G]. They are pure, work
on whole batches at once, and break ties by position (lower first), as `torch.topk` on
distinct values and `argmax` do. Adding a rule means adding one function here and one name
to `RULES`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

RULES = ("quota", "threshold", "factor", "entropy", "dream")  # "dream": engine._dream_step
NEG_INF = -jnp.inf


def ranks(score: jax.Array) -> jax.Array:
    """Rank of every position by descending score (0 = best), ties to the lower position."""
    order = jnp.argsort(-score, axis=-1, stable=True)
    return jnp.argsort(order, axis=-1)


def best(score: jax.Array, candidates: jax.Array) -> jax.Array:
    """One-hot of the best candidate of each row that has any (first on ties)."""
    top = jax.nn.one_hot(jnp.argmax(score, axis=-1), score.shape[-1], dtype=bool)
    return top & candidates


def quota_commit(score, candidates, quota):
    """LLaDA: the `quota` [B] best candidates by score."""
    return candidates & (ranks(score) < quota[:, None])


def threshold_commit(confidence, candidates, threshold):
    """Fast-dLLM: every candidate with confidence >= tau, plus always the most confident one."""
    score = jnp.where(candidates, confidence, NEG_INF)
    return (candidates & (confidence >= threshold)) | best(score, candidates)


def factor_commit(confidence, candidates, factor):
    """Fast-dLLM's factor rule: the longest prefix of the descending confidences with
    c_(n) >= 1 - factor / (n + 1) at every rank n (1-based); at least one token.

    Upstream also accepts all n when the scan fails exactly at the last rank; we follow
    the rule as stated instead (dlmjax/decode/SPEC.md)."""
    score = jnp.where(candidates, confidence, NEG_INF)
    ordered = -jnp.sort(-score, axis=-1)
    n = jnp.arange(1, score.shape[-1] + 1, dtype=jnp.float32)
    passes = ordered >= 1.0 - factor / (n + 1.0)
    accepted = jnp.maximum(jnp.sum(jnp.cumprod(passes, axis=-1), axis=-1), 1)
    return candidates & (ranks(score) < accepted[:, None])


def entropy_commit(entropy, candidates, threshold):
    """dParallel: every candidate with entropy <= tau (nats), plus always the lowest-entropy one."""
    score = jnp.where(candidates, -entropy, NEG_INF)
    return (candidates & (entropy <= threshold)) | best(score, candidates)
