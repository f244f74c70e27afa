"""When to stop early: SchED's progress-aware schedules and Prophet's staged rule, one class each.

The signal is the mean, over the whole generated span, of the top-1 minus top-2 logit
margin. A row exits when the signal reaches tau(p), p = step / T (T = the nominal
`steps`), and then every remaining mask takes the step's argmax.

SchED's exact formulas are not public; these are the natural readings of "smooth,
non-increasing from tau_high to tau_low" (dllm-algorithms.md 7.1), kept here in one place:

    linear   tau(p) = tau_high + (tau_low - tau_high) p
    cosine   tau(p) = tau_low + (tau_high - tau_low) (1 + cos(pi p)) / 2
    exp      tau(p) = tau_low + (tau_high - tau_low) exp(-k p)
    prophet  tau(p) = 7.5 for p < 1/3, 5.0 for p < 2/3, else 2.5   (Prophet's staged baseline)

Users pick one by name (`schedule="exp"`); a new exit rule is one class here, registered in
`EXITS` under its names.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from dlmjax.decode.parts import Part, part, traced
from dlmjax.errors import DlmjaxError

SCHED_SCHEDULES = ("linear", "cosine", "exp")


class Exit(Part):
    needs: ClassVar[frozenset[str]] = frozenset({"margin"})

    def threshold_at(self, progress) -> jax.Array:
        """tau at progress p in [0, 1] (clipped)."""
        raise NotImplementedError


@part
class SchED(Exit):
    """SchED: exit once the mean margin reaches a threshold that falls from tau_high to tau_low."""

    name: ClassVar[str] = "sched"
    # set by the `schedule=` name (EXITS), not a knob of its own
    schedule: str = dataclasses.field(default="exp", metadata=dict(static=True))
    tau_high: float = traced(7.5, "SchED: the exit threshold at the start (mean top1 - top2 logit margin)")
    tau_low: float = traced(2.5, "SchED: the exit threshold at the end")
    exit_k: float = traced(4.0, "SchED: rate of the exponential schedule")

    def check(self) -> None:
        if self.schedule not in SCHED_SCHEDULES:
            raise DlmjaxError(f"unknown schedule '{self.schedule}'; use one of {', '.join(EXITS)}")

    def threshold_at(self, progress) -> jax.Array:
        p = jnp.clip(progress, 0.0, 1.0)
        tau_high, tau_low, k = self.tau_high, self.tau_low, self.exit_k
        if self.schedule == "linear":
            return tau_high + (tau_low - tau_high) * p
        if self.schedule == "cosine":
            return tau_low + 0.5 * (tau_high - tau_low) * (1.0 + jnp.cos(jnp.pi * p))
        return tau_low + (tau_high - tau_low) * jnp.exp(-k * p)


@part
class Prophet(Exit):
    """Prophet's staged baseline: 7.5 / 5.0 / 2.5 by thirds of the steps (no knobs)."""

    name: ClassVar[str] = "prophet"

    def threshold_at(self, progress) -> jax.Array:
        p = jnp.clip(progress, 0.0, 1.0)
        return jnp.where(p < 1.0 / 3.0, 7.5, jnp.where(p < 2.0 / 3.0, 5.0, 2.5))


# schedule name -> the exit rule it builds
EXITS: dict[str, tuple[type[Exit], dict]] = {
    **{name: (SchED, dict(schedule=name)) for name in SCHED_SCHEDULES},
    "prophet": (Prophet, {}),
}


def margins(logits: jax.Array) -> jax.Array:
    """Top-1 minus top-2 logit per position: [B, G, V] -> [B, G] (0 on a tie).

    Two max reductions instead of `lax.top_k`, which sorts and is slow on CPU."""
    best = jnp.argmax(logits, axis=-1)
    top1 = jnp.take_along_axis(logits, best[..., None], axis=-1)[..., 0]
    others = jnp.where(jax.nn.one_hot(best, logits.shape[-1], dtype=bool), -jnp.inf, logits)
    return top1 - jnp.max(others, axis=-1)
