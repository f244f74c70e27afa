"""When to stop early: SchED's progress-aware schedules and Prophet's staged rule.

The signal is the mean, over the whole generated span, of the top-1 minus top-2 logit
margin. A row exits when the signal reaches tau(p), p = step / T (T = the nominal
`steps`), and then every remaining mask takes the step's argmax.

SchED's exact formulas are not public; these are the natural readings of "smooth,
non-increasing from tau_high to tau_low" (dllm-algorithms.md 7.1), kept here in one place:

    linear   tau(p) = tau_high + (tau_low - tau_high) p
    cosine   tau(p) = tau_low + (tau_high - tau_low) (1 + cos(pi p)) / 2
    exp      tau(p) = tau_low + (tau_high - tau_low) exp(-k p)
    prophet  tau(p) = 7.5 for p < 1/3, 5.0 for p < 2/3, else 2.5   (Prophet's staged baseline)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

EXITS = ("linear", "cosine", "exp", "prophet")


def threshold_at(schedule: str, progress, tau_high, tau_low, k):
    p = jnp.clip(progress, 0.0, 1.0)
    if schedule == "linear":
        return tau_high + (tau_low - tau_high) * p
    if schedule == "cosine":
        return tau_low + 0.5 * (tau_high - tau_low) * (1.0 + jnp.cos(jnp.pi * p))
    if schedule == "exp":
        return tau_low + (tau_high - tau_low) * jnp.exp(-k * p)
    if schedule == "prophet":
        return jnp.where(p < 1.0 / 3.0, 7.5, jnp.where(p < 2.0 / 3.0, 5.0, 2.5))
    raise ValueError(f"unknown exit schedule {schedule!r}")


def margins(logits: jax.Array) -> jax.Array:
    """Top-1 minus top-2 logit per position: [B, G, V] -> [B, G] (0 on a tie).

    Two max reductions instead of `lax.top_k`, which sorts and is slow on CPU."""
    best = jnp.argmax(logits, axis=-1)
    top1 = jnp.take_along_axis(logits, best[..., None], axis=-1)[..., 0]
    others = jnp.where(jax.nn.one_hot(best, logits.shape[-1], dtype=bool), -jnp.inf, logits)
    return top1 - jnp.max(others, axis=-1)
