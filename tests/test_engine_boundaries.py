"""Every comparison of the commit and exit rules at its boundary, on the engine (`lm.generate`)
and on the Python-loop reference: a knob exactly at the model's confidence, entropy or margin,
and one ulp either side.

The model gives every position the same logits, bit for bit (tests/engine_models.py), so the
numbers the rules compare are exact: a two-way tie has confidence 0.5 and entropy -log(0.5), a
top-1/top-2 gap of m has margin m. Which side of each comparison is inclusive, next to the
official code (sections of ../shared/reference/dllm-algorithms.md):

| comparison                        | dlmjax        | official code                                              |
|-----------------------------------|---------------|------------------------------------------------------------|
| threshold: conf >= tau            | inclusive     | Fast-dLLM v1 get_transfer_index `confidence >= threshold` (3.1); Fast-dLLM v2 uses a strict `>` (4) |
| factor: c_(n) >= 1 - f / (n + 1)  | inclusive     | Fast-dLLM get_transfer_index_dynamic (3.1)                  |
| entropy: H <= tau                 | inclusive     | dParallel LLaDA drops H > tau, i.e. keeps H <= tau; its Dream code keeps H < tau (6.5) |
| exit: mean margin >= tau(p)       | inclusive     | Prophet should_early_exit `answer_gap >= threshold` (7.3); SchED "exit when g >= tau(p)" (7.1) |
| Prophet stage: p < 1/3, p < 2/3   | exclusive     | Prophet `progress < 0.33`, `< 0.67` (7.3); see SPEC.md on the stage bounds |

Expected NFEs are worked out by hand in each case, so a test fails if either loop moves a
boundary.
"""

import numpy as np
import pytest

import decode_reference
import engine_models

PROMPT = np.array([[5, 6, 7, 8]])


def _up(x):
    return float(np.nextafter(np.float32(x), np.float32(np.inf)))


def _down(x):
    return float(np.nextafter(np.float32(x), np.float32(-np.inf)))


def _factor_below(f):
    """The largest float32 factor below `f` whose rank-2 bound 1 - f / 3 (float32, as the rule
    computes it) is above 1 - f / 3 at f: one ulp of 1.5 rounds back to the same bound, two do not."""
    f, at = np.float32(f), np.float32(1) - np.float32(f) / np.float32(3)
    below = np.nextafter(f, np.float32(0))
    while np.float32(1) - below / np.float32(3) <= at:
        below = np.nextafter(below, np.float32(0))
    assert f - below <= 2 * (f - np.nextafter(f, np.float32(0)))
    return float(below)


@pytest.fixture(scope="module")
def tie(loaded):
    """Every position: tokens 0 and 1 tied on top, the rest at -1e4 (p = 0.5, 0.5, 0, ...)."""
    lm = loaded("llada")
    return engine_models.constant_logits(lm, engine_models.two_way_tie(lm.config.vocab_size))


def _margin_model(loaded, margin):
    lm = loaded("llada")
    return engine_models.constant_logits(lm, engine_models.with_margin(lm.config.vocab_size, margin))


def _run(lm, engine_kwargs, ref_kwargs, shape):
    out = lm.generate(PROMPT, prompt_bucket=1, **shape, **engine_kwargs)
    ref = decode_reference.reference_generate(lm, PROMPT, None, **shape, **ref_kwargs)
    engine_models.assert_same_decode(out, ref)
    return out


ONE_BLOCK = dict(gen_length=8, block_length=8, steps=8)


def test_the_fixture_is_exact(tie, loaded):
    """The premise: logits exactly the chosen row at every position, whatever the tokens."""
    ids = np.array([[5, 6, 7, 8, 120, 3, 120, 0]])
    logits = np.asarray(tie.logits(ids))
    np.testing.assert_array_equal(logits, np.broadcast_to(engine_models.two_way_tie(tie.config.vocab_size), logits.shape))
    margin = _margin_model(loaded, 7.5)
    assert np.asarray(margin.logits(ids))[0, 3, 0] == np.float32(7.5)


@pytest.mark.parametrize("side,nfe", [("at", 1), ("below", 1), ("above", 8)])
@pytest.mark.parametrize("cache", ["none", "dual"])
def test_threshold_is_inclusive(tie, side, nfe, cache):
    """conf = 0.5 everywhere. tau <= 0.5 commits the whole block in one step; a tau one ulp
    above 0.5 leaves only the always-committed best token, one per step."""
    tau = {"at": 0.5, "below": _down(0.5), "above": _up(0.5)}[side]
    out = tie.generate(PROMPT, prompt_bucket=1, method="fast-dllm", threshold=tau, cache=cache, **ONE_BLOCK)
    assert int(out.nfe[0]) == nfe  # LLaDA (unshifted): the dual cache's refresh commits by the rule too
    if cache == "none":
        _run(tie, dict(method="fast-dllm", threshold=tau), dict(rule="threshold", threshold=tau), ONE_BLOCK)
    assert sorted(np.bincount(out.trajectory[0])[1:].tolist(), reverse=True)[0] == (8 if nfe == 1 else 1)


@pytest.mark.parametrize("side,nfe", [("at", 4), ("below", 8), ("above", 4)])
def test_factor_bound_is_inclusive(tie, side, nfe):
    """conf = 0.5 everywhere; with f = 1.5 the bound at rank 2 is 1 - 1.5 / 3 = 0.5 exactly (rank 1:
    0.25, rank 3: 0.625). f = 1.5 or more accepts 2 per step (4 steps); the next factor below whose
    bound is above 0.5, 1 (8 steps)."""
    f = {"at": 1.5, "below": _factor_below(1.5), "above": _up(1.5)}[side]
    out = _run(tie, dict(method="fast-dllm", rule="factor", factor=f), dict(rule="factor", factor=f), ONE_BLOCK)
    assert int(out.nfe[0]) == nfe


@pytest.mark.parametrize("side,nfe", [("at", 1), ("below", 8), ("above", 1)])
def test_entropy_bound_is_inclusive(tie, side, nfe):
    """H = -2 * 0.5 * log(0.5) = -log(0.5) exactly in float32 (halving and doubling are exact)."""
    import jax
    import jax.numpy as jnp

    h = float(-jax.jit(jnp.log)(jnp.float32(0.5)))
    assert h == float(np.float32(-np.log(np.float32(0.5))))
    tau = {"at": h, "below": _down(h), "above": _up(h)}[side]
    out = _run(tie, dict(method="dparallel", threshold=tau), dict(rule="entropy", threshold=tau), ONE_BLOCK)
    assert int(out.nfe[0]) == nfe


@pytest.mark.parametrize("schedule", ["linear", "cosine", "exp"])
@pytest.mark.parametrize("side,nfe", [("at", 1), ("below", 1), ("above", 8)])
def test_sched_exit_is_inclusive(loaded, schedule, side, nfe):
    """Margin exactly 2 at every position, so the signal (their mean) is exactly 2; with
    tau_high = tau_low = tau every schedule gives tau(p) = tau exactly. At or below: exit at the
    first step (every position committed there); one ulp above: no exit, LLaDA's 8 steps."""
    lm = _margin_model(loaded, 2.0)
    tau = {"at": 2.0, "below": _down(2.0), "above": _up(2.0)}[side]
    knobs = dict(tau_high=tau, tau_low=tau, exit_k=4.0)
    out = _run(lm, dict(method="sched", schedule=schedule, **knobs), dict(rule="quota", exit=schedule, **knobs), ONE_BLOCK)
    assert int(out.nfe[0]) == nfe
    if nfe == 1:
        assert (out.trajectory == 1).all()


# 16 positions (a power of two, so the mean of 16 equal margins is exact), 12 steps: progress
# n / 12 of the forwards before this one is exactly 1/3 at n = 4 and 2/3 at n = 8 (in float32 and
# in float64). Stage 1 is forwards 1-4, stage 2 forwards 5-8, stage 3 forwards 9-12.
PROPHET = dict(gen_length=16, block_length=16, steps=12)
JUST_BELOW = 2.0**-10  # below each stage value by a margin whose multiples stay exact in float32


@pytest.mark.parametrize(
    "margin,nfe",
    [(7.5, 1), (7.5 - JUST_BELOW, 5), (5.0, 5), (5.0 - JUST_BELOW, 9), (2.5, 9), (2.5 - JUST_BELOW, 12)],
)
def test_prophet_stages(loaded, margin, nfe):
    """The staged thresholds 7.5 / 5.0 / 2.5, each inclusive, and the stage bounds at p = 1/3 and
    2/3 exclusive: a margin of exactly 5.0 exits at the first forward of stage 2 (n = 4, p = 1/3)."""
    lm = _margin_model(loaded, margin)
    out = _run(lm, dict(method="prophet"), dict(rule="quota", exit="prophet"), PROPHET)
    assert int(out.nfe[0]) == nfe
