"""Which tokens to commit in a step: the commit rules of the seed papers, one class each.

A rule is a frozen pytree dataclass (`dlmjax.decode.parts`): its tuned numbers are traced
fields, its structure static ones. `commit(step)` maps a step's statistics to a boolean
commit mask [R, W]: one row per window the block schedule opened (a row of the batch for
SemiAR's single block, a (row, block) pair for D2F's pipeline), W its positions. It is pure,
works on whole batches, and breaks ties by position (lower first), as `torch.topk` on distinct
values and `argmax` do. `needs` names the statistics the engine must compute for it
("confidence", "entropy", "rank" for the rule's own `rank(probs)`; "logits" for a rule that
samples itself).

A new rule is one class here, registered in `RULES` under the name users pass as `rule=`; its
fields become `lm.generate` knobs and CLI flags by themselves.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from dlmjax.decode.exits import margins
from dlmjax.decode.parts import Part, check_choice, part, static, traced
from dlmjax.decode.sampling import filter_logits, position_gumbel
from dlmjax.errors import DlmjaxError

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
    """The `quota` [B] best candidates by score."""
    return candidates & (ranks(score) < quota[:, None])


def confident_or_best(confidence, candidates, threshold, count):
    """LLaDA2's commit: every candidate with confidence > threshold (strict) when there are at
    least `count` [B] of them, else the `count` most confident."""
    sure = candidates & (confidence > threshold)
    enough = jnp.sum(sure, axis=-1) >= count
    return jnp.where(enough[:, None], sure, quota_commit(jnp.where(candidates, confidence, NEG_INF), candidates, count))


@dataclasses.dataclass(frozen=True)
class Step:
    """What a rule sees in one denoising step (built by the engine; [B, G] over the generation region)."""

    candidates: jax.Array  # masked positions of the active window, in active rows
    confidence: jax.Array  # probability of the step's prediction x0
    entropy: jax.Array | None  # only when the rule needs it
    quota: jax.Array | None  # [B] tokens this step must commit (the quota rule's schedule)
    select_key: jax.Array  # randomness of the selection itself (random remasking)
    rank: jax.Array | None = None  # the rule's own score (`Rule.rank`), when it has one
    force: jax.Array | None = None  # [B] rows (windows) that must commit a candidate; None: the rule decides
    editable: jax.Array | None = None  # decoded positions of the window a rule may rewrite (rules that need "edits")
    changed: jax.Array | None = None  # where x0 differs from the decoded token (rules that need "edits")


class Rule(Part):
    needs: ClassVar[frozenset[str]] = frozenset({"confidence"})
    fixed_steps: ClassVar[bool] = False  # True: a block runs exactly steps_per_block steps (else until no mask is left)

    def commit(self, step: Step) -> jax.Array:
        raise NotImplementedError

    def rank(self, probs: jax.Array) -> jax.Array | None:
        """A score [..., W] the rule ranks candidates by, computed from the probabilities [..., W, V]
        in the forward step (None: the rule needs none)."""
        return None


@part
class Quota(Rule):
    """LLaDA: a fixed number of tokens per step (the block's masks spread evenly over its steps),
    the most confident ones, or random ones."""

    name: ClassVar[str] = "quota"
    fixed_steps: ClassVar[bool] = True
    remasking: str = static("low_confidence", "which tokens fill the quota: the most confident, or random ones",
                            choices=("low_confidence", "random"))

    def check(self) -> None:
        check_choice("quota rule", "remasking", self.remasking, ("low_confidence", "random"))

    def commit(self, step: Step) -> jax.Array:
        score = step.confidence
        if self.remasking == "random":
            score = jax.random.uniform(step.select_key, score.shape, jnp.float32)
        return quota_commit(jnp.where(step.candidates, score, NEG_INF), step.candidates, step.quota)


@part
class Threshold(Rule):
    """Fast-dLLM: every candidate with confidence >= tau, plus always the most confident one
    (Fast-dLLM v2: > tau, `strict`)."""

    name: ClassVar[str] = "threshold"
    threshold: float = traced(0.9, "commit every candidate whose confidence is >= this (and always the best one)")
    strict: bool = static(False, "threshold rule: commit only confidences > threshold (Fast-dLLM v2), not >=")

    def check(self) -> None:
        if not 0 < self.threshold <= 1:
            raise DlmjaxError(f"confidence threshold {self.threshold} is outside (0, 1]; pass a threshold such as 0.9")

    def commit(self, step: Step) -> jax.Array:
        confidence, candidates, threshold = step.confidence, step.candidates, self.threshold
        score = jnp.where(candidates, confidence, NEG_INF)
        sure = (confidence > threshold) if self.strict else (confidence >= threshold)
        return (candidates & sure) | best(score, candidates)


@part
class QuotaThreshold(Rule):
    """LLaDA2.0: every candidate with confidence > threshold (strict) when there are at least the
    step's quota of them, else the quota's most confident candidates (LLaDA2's blocks give the quota)."""

    name: ClassVar[str] = "quota_threshold"
    threshold: float = traced(0.95, "commit every candidate whose confidence is > this when they fill the step's quota "
                                    "(else the quota's most confident)")

    def check(self) -> None:
        if not 0 <= self.threshold <= 1:
            raise DlmjaxError(f"confidence threshold {self.threshold} is outside [0, 1]; pass a threshold such as 0.95")

    def commit(self, step: Step) -> jax.Array:
        return confident_or_best(step.confidence, step.candidates, self.threshold, step.quota)


@part
class Editing(Rule):
    """LLaDA2.1: masks with confidence > threshold (strict) when there are at least num_to_transfer
    of them, else the num_to_transfer most confident (mask to token); and every decoded position of
    the block whose prediction changed with confidence > editing_threshold (token to token)."""

    name: ClassVar[str] = "editing"
    needs: ClassVar[frozenset[str]] = frozenset({"confidence", "edits"})
    threshold: float = traced(0.7, "commit every candidate whose confidence is > this when there are num_to_transfer "
                                   "(else the most confident)")
    editing_threshold: float = traced(0.5, "LLaDA2.1: rewrite a decoded token whose new prediction has confidence > this")
    num_to_transfer: int = static(1, "LLaDA2.1: masks a step commits at least (the most confident)")

    def check(self) -> None:
        if not 0 <= self.threshold <= 1:
            raise DlmjaxError(f"confidence threshold {self.threshold} is outside [0, 1]; pass a threshold such as 0.7")
        if not 0 <= self.editing_threshold <= 1:
            raise DlmjaxError(f"editing_threshold {self.editing_threshold} is outside [0, 1]; pass e.g. 0.5 (quality) or 0 (speed)")
        if self.num_to_transfer < 1:
            raise DlmjaxError(f"num_to_transfer {self.num_to_transfer} must be at least 1 (LLaDA2.1: 1)")

    def commit(self, step: Step) -> jax.Array:
        count = jnp.full(step.candidates.shape[:1], self.num_to_transfer)
        fill = confident_or_best(step.confidence, step.candidates, self.threshold, count)
        return fill | (step.editable & step.changed & (step.confidence > self.editing_threshold))


@part
class Factor(Rule):
    """Fast-dLLM's factor rule: the longest prefix of the descending confidences with
    c_(n) >= 1 - factor / (n + 1) at every rank n (1-based); at least one token.

    Upstream also accepts all n when the scan fails exactly at the last rank; we follow
    the rule as stated instead (dlmjax/decode/SPEC.md)."""

    name: ClassVar[str] = "factor"
    factor: float = traced(1.0, "commit the n most confident while the n-th has confidence >= 1 - factor / (n + 1)")

    def check(self) -> None:
        if not self.factor > 0:
            raise DlmjaxError(f"factor {self.factor} must be positive; pass e.g. factor=1.0")

    def commit(self, step: Step) -> jax.Array:
        candidates, factor = step.candidates, self.factor
        score = jnp.where(candidates, step.confidence, NEG_INF)
        ordered = -jnp.sort(-score, axis=-1)
        n = jnp.arange(1, score.shape[-1] + 1, dtype=jnp.float32)
        passes = ordered >= 1.0 - factor / (n + 1.0)
        accepted = jnp.maximum(jnp.sum(jnp.cumprod(passes, axis=-1), axis=-1), 1)
        return candidates & (ranks(score) < accepted[:, None])


@part
class Entropy(Rule):
    """dParallel: every candidate with entropy <= tau (nats), plus always the lowest-entropy one."""

    name: ClassVar[str] = "entropy"
    needs: ClassVar[frozenset[str]] = frozenset({"entropy"})
    threshold: float = traced(0.5, "commit every candidate whose entropy (nats) is <= this (and always the lowest)")

    def check(self) -> None:
        if not self.threshold >= 0:
            raise DlmjaxError(f"entropy bound {self.threshold} is negative or missing; pass threshold >= 0 (nats), e.g. 0.5")

    def commit(self, step: Step) -> jax.Array:
        entropy, candidates, threshold = step.entropy, step.candidates, self.threshold
        score = jnp.where(candidates, -entropy, NEG_INF)
        return (candidates & (entropy <= threshold)) | best(score, candidates)


D2F_ALGS = ("maskgit_plus", "topk_margin", "entropy")


@part
class D2F(Rule):
    """D2F: every candidate whose probability is > tau_conf (strict); a window that must commit
    (a fully activated block) and passes none commits its best candidate by `alg`: the probability
    (maskgit_plus), the top-1 minus top-2 probability (topk_margin) or sum p log(p + 1e-10) (entropy)."""

    name: ClassVar[str] = "d2f"
    needs: ClassVar[frozenset[str]] = frozenset({"confidence", "rank"})
    tau_conf: float = traced(0.9, "D2F: commit every candidate whose probability is > this")
    alg: str = static("maskgit_plus", "D2F: what ranks the one token a fully activated block commits when none passes "
                      "tau_conf", choices=D2F_ALGS)

    def check(self) -> None:
        check_choice("D2F", "alg", self.alg, D2F_ALGS)
        if not 0 <= self.tau_conf <= 1:
            raise DlmjaxError(f"tau_conf {self.tau_conf} is outside [0, 1]; pass a probability such as 0.9")

    def rank(self, probs):
        if self.alg == "maskgit_plus":
            return jnp.max(probs, axis=-1)
        if self.alg == "topk_margin":
            return margins(probs)
        return jnp.sum(probs * jnp.log(probs + 1e-10), axis=-1)

    def commit(self, step: Step) -> jax.Array:
        candidates = step.candidates
        sure = candidates & (step.confidence > self.tau_conf)
        stuck = ~jnp.any(sure, axis=-1) if step.force is None else step.force & ~jnp.any(sure, axis=-1)
        return sure | (best(jnp.where(candidates, step.rank, NEG_INF), candidates) & stuck[:, None])


DREAM_ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")


@part
class Dream(Rule):
    """Dream's diffusion_generate samplers (SPEC.md, Dream rules): the rule filters and samples the
    block's logits itself, so it reads logits, not the carried confidences."""

    name: ClassVar[str] = "dream"
    needs: ClassVar[frozenset[str]] = frozenset({"logits"})
    fixed_steps: ClassVar[bool] = True
    alg: str = static("maskgit_plus", "Dream sampler: which positions a step commits", choices=DREAM_ALGS)
    top_k: int | None = static(None, "Dream and ar: keep the k largest logits")
    top_p: float = traced(1.0, "Dream and ar: nucleus filtering (1 = off)")
    alg_temp: float = traced(0.0, "Dream: > 0 samples positions (confidence / alg_temp + Gumbel) instead of the top ones")
    eps: float = traced(1e-3, "Dream: last timestep of linspace(1, eps, steps + 1)")

    def check(self) -> None:
        if self.alg not in DREAM_ALGS:
            raise DlmjaxError(f"unknown Dream alg '{self.alg}'; use one of {', '.join(DREAM_ALGS)}")
        if not 0 < self.top_p <= 1:
            raise DlmjaxError(f"top_p {self.top_p} is outside (0, 1]; pass e.g. top_p=0.95")
        if self.top_k is not None and (int(self.top_k) != self.top_k or self.top_k < 1):
            raise DlmjaxError(f"top_k {self.top_k} must be a positive integer")
        if self.alg_temp < 0:
            raise DlmjaxError(f"alg_temp {self.alg_temp} is negative; use 0 (top-n) or a positive temperature")
        if not 0 < self.eps < 1:
            raise DlmjaxError(f"eps {self.eps} is outside (0, 1); Dream's default is 1e-3")

    def decide(self, logits, candidates, masked_in_block, block_start, block_length: int, i, steps_per_block: int,
               temperature, sample_key, select_key):
        """Dream's samplers on one block: (x0 [B, G], commit [B, G]).

        Only the block's logits [B, K, V] are filtered, softmaxed and sampled (the block holds every
        candidate); the rest of the region takes the plain argmax of the logits (read only by an
        early exit's fill)."""
        spb, k = steps_per_block, block_length
        b, _, v = logits.shape
        block_logits = jax.lax.dynamic_slice_in_dim(logits, block_start, k, axis=1)
        filtered = filter_logits(block_logits, temperature, self.top_p, self.top_k)
        probs = jax.nn.softmax(filtered, axis=-1)

        def sampled(_):
            g = position_gumbel(sample_key, block_start + jnp.arange(k), b, v, False)
            return jnp.argmax(filtered + g, axis=-1)

        block_x0 = jax.lax.cond(temperature > 0, sampled, lambda _: jnp.argmax(probs, axis=-1), None)
        x0 = jax.lax.dynamic_update_slice_in_dim(
            jnp.argmax(logits, axis=-1).astype(jnp.int32), block_x0.astype(jnp.int32), block_start, axis=1
        )

        def in_block(a):
            return jax.lax.dynamic_slice_in_dim(a, block_start, k, axis=1)

        def to_region(block_commit):
            return jax.lax.dynamic_update_slice_in_dim(jnp.zeros_like(candidates), block_commit, block_start, axis=1)

        block_candidates = in_block(candidates)
        ts = jnp.linspace(1.0, self.eps, spb + 1, dtype=jnp.float32)
        t, s = ts[i], ts[i + 1]
        last = i == spb - 1
        if self.alg == "origin":
            p_transfer = jnp.where(last, 1.0, 1.0 - s / t)
            u = in_block(jax.random.uniform(select_key, candidates.shape, jnp.float32))  # [B, G]: small, stream unchanged
            return x0, to_region(block_candidates & (u < p_transfer))
        if self.alg == "maskgit_plus":
            confidence = jnp.take_along_axis(probs, block_x0[..., None], axis=-1)[..., 0]
        elif self.alg == "topk_margin":
            confidence = margins(probs)  # p1 - p2
        else:
            confidence = jnp.sum(probs * jnp.log(probs + 1e-10), axis=-1)
        mean_masks = jnp.mean(jnp.sum(masked_in_block, axis=-1).astype(jnp.float32))
        n = jnp.floor(jnp.where(last, mean_masks, mean_masks * (1.0 - s / t))).astype(jnp.int32)
        noise = in_block(jax.random.gumbel(select_key, candidates.shape, jnp.float32))
        score = jnp.where(self.alg_temp > 0, confidence / jnp.maximum(self.alg_temp, 1e-30) + noise, confidence)
        score = jnp.where(block_candidates, score, NEG_INF)
        return x0, to_region(quota_commit(score, block_candidates, jnp.broadcast_to(n, (b,))))


RULES: dict[str, type[Rule]] = {cls.name: cls for cls in (Quota, Threshold, QuotaThreshold, Editing, Factor, Entropy, D2F, Dream)}
