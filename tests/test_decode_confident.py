"""Loop parity on confident models, where every rule's real path fires.

The random tiny models of the other parity tests are unsure of everything (first-step
confidences 0.06-0.47): a 0.9 threshold, a 0.5-nat entropy bound and Prophet's exits never fire
there, and only the "commit the best one" fallback runs. Here the same comparisons run on

- the random models with their output head sharpened (tests/engine_models.py), and
- the embedded, trained `tiny-llada` on its own task prompts,

and each test asserts that the path it is about really fired (several tokens committed in one
step, an exit in the expected stage), so a fixture can never silently go flat again.
"""

import numpy as np
import pytest

import decode_reference
import decode_reference_cache
import engine_models


def _prompts(lm):
    rng = np.random.default_rng(11)
    ids = rng.integers(0, 96, (3, 12))
    mask = np.ones_like(ids)
    for row, pad in ((0, 5), (2, 2)):
        ids[row, :pad] = lm.config.pad_token_id
        mask[row, :pad] = 0
    return ids, mask


def _check(out, ref):
    np.testing.assert_array_equal(out.tokens, ref["tokens"])
    np.testing.assert_array_equal(out.nfe, ref["nfe"])
    np.testing.assert_array_equal(out.trajectory, ref["trajectory"])


def most_in_one_step(out) -> int:
    """The most tokens any row committed in one forward (early-exit fills included)."""
    return max(int(np.bincount(row[row > 0]).max()) for row in out.trajectory)


def single_steps(out) -> int:
    """Forwards (over all rows) that committed exactly one token: the fallback's mark."""
    return sum(int((np.bincount(row[row > 0]) == 1).sum()) for row in out.trajectory)


SHAPE = dict(gen_length=16, block_length=8, steps=16)
SCALE = 6.0  # the output head x6: first-step confidences spread over about 0.3-1


@pytest.fixture(scope="module")
def sharp(loaded):
    return {family: engine_models.sharpened(loaded(family), SCALE) for family in ("llada", "dream")}


# name -> (engine kwargs, reference kwargs, what must have fired)
CASES = {
    "fast-dllm-0.9": (dict(method="fast-dllm", block_length=8), dict(rule="threshold", threshold=0.9), "several"),
    "factor-1": (dict(method="fast-dllm", rule="factor", factor=1.0, block_length=8), dict(rule="factor", factor=1.0), "several"),
    "dparallel-0.5": (dict(method="dparallel", block_length=8), dict(rule="entropy", threshold=0.5), "several"),
    "sched-exp": (dict(method="sched"), dict(rule="quota", exit="exp", tau_high=7.5, tau_low=2.5, exit_k=4.0), "exit"),
    "sched-linear": (dict(method="sched", schedule="linear", tau_high=7.5, tau_low=0.0),
                     dict(rule="quota", exit="linear", tau_high=7.5, tau_low=0.0), "exit"),
}


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_sharpened_models_match_the_python_loop(sharp, case, family):
    lm = sharp[family]
    engine_kwargs, ref_kwargs, fired = CASES[case]
    ids, mask = _prompts(lm)
    ref = decode_reference.reference_generate(lm, ids, mask, **{**SHAPE, **ref_kwargs})
    out = lm.generate(ids, mask, prompt_bucket=1, **{**SHAPE, **engine_kwargs})
    _check(out, ref)
    if fired == "several":  # the rule committed several tokens in one step, and the fallback ran too
        assert most_in_one_step(out) >= 2 and single_steps(out) >= 1, out.trajectory
    else:  # some row exited early (every mask filled at once) and some did not
        assert (out.nfe < SHAPE["steps"]).any() and most_in_one_step(out) >= 3, out.nfe
