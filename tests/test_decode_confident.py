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


_prompts = engine_models.padded_prompts
_check = engine_models.assert_same_decode


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


def _stage(nfe: int, steps: int) -> int:
    """Prophet's stage (1, 2, 3) of the forward numbered `nfe` (1-based): progress is the
    forwards before it over `steps` (SPEC.md), stages split at 1/3 and 2/3."""
    p = (nfe - 1) / steps
    return 1 if p < 1 / 3 else 2 if p < 2 / 3 else 3


@pytest.mark.parametrize("family,scales,stages", [("llada", (6.0, 10.0), {1, 2, 3}), ("dream", (8.0,), {2, 3})])
def test_prophet_exits_in_every_stage(loaded, family, scales, stages):
    """Prophet's staged exit (7.5 / 5.0 / 2.5) on models sharpened so that rows exit in each stage."""
    seen = set()
    for scale in scales:
        lm = engine_models.sharpened(loaded(family), scale)
        ids, mask = _prompts(lm)
        ref = decode_reference.reference_generate(lm, ids, mask, rule="quota", exit="prophet", **SHAPE)
        out = lm.generate(ids, mask, prompt_bucket=1, method="prophet", **SHAPE)
        _check(out, ref)
        for row, n in zip(out.trajectory, out.nfe):
            if n < SHAPE["steps"] or np.bincount(row)[-1] > 1:  # exited: the rest filled at its last forward
                seen.add(_stage(int(n), SHAPE["steps"]))
    assert seen >= stages, seen


# The Fast-dLLM caches on the sharpened models, against the cached Python loop.
CACHED = {
    "fast-dllm-0.9": (dict(method="fast-dllm"), dict(rule="threshold", threshold=0.9)),
    "dparallel-0.5": (dict(method="dparallel"), dict(rule="entropy", threshold=0.5)),
    "factor-1": (dict(method="fast-dllm", rule="factor", factor=1.0), dict(rule="factor", factor=1.0)),
}


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("case", sorted(CACHED))
def test_sharpened_models_match_the_cached_python_loop(sharp, case, family, cache):
    lm = sharp[family]
    engine_kwargs, ref_kwargs = CACHED[case]
    ids, mask = _prompts(lm)
    shape = dict(gen_length=16, block_length=8, steps=16)
    ref = decode_reference_cache.reference_generate_cached(lm, ids, mask, cache=cache, **shape, **ref_kwargs)
    out = lm.generate(ids, mask, cache=cache, prompt_bucket=1, **shape, **engine_kwargs)
    _check(out, ref)
    assert most_in_one_step(out) >= 2 and single_steps(out) >= 1, out.trajectory


# ----------------------------------------------------------------------------- tiny-llada


@pytest.fixture(scope="module")
def tiny_llada():
    import dlmjax

    return dlmjax.load("tiny-llada", dtype="float32", progress=False)


def _task_batch(lm, n=4):
    """The first n problems of the tiny models' test split, left-padded into one batch."""
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "experiments"))
    import tasks

    rows = [tasks.encode_prompt(lm.tokenizer, e.prompt) for e in tasks.make_split("test", n)]
    width = max(map(len, rows))
    ids = np.full((n, width), lm.config.pad_token_id)
    mask = np.zeros((n, width), np.int64)
    for r, row in enumerate(rows):
        ids[r, width - len(row):], mask[r, width - len(row):] = row, 1
    return ids, mask


TINY = {
    "fast-dllm-0.9": (dict(method="fast-dllm"), dict(rule="threshold", threshold=0.9), "several"),
    "dparallel-0.5": (dict(method="dparallel"), dict(rule="entropy", threshold=0.5), "several"),
    "factor-1": (dict(method="fast-dllm", rule="factor", factor=1.0), dict(rule="factor", factor=1.0), "several"),
    "sched-exp": (dict(method="sched"), dict(rule="quota", exit="exp", tau_high=7.5, tau_low=2.5, exit_k=4.0), "exit"),
}
TINY_SHAPE = dict(gen_length=32, block_length=8, steps=32)


@pytest.mark.parametrize("case", sorted(TINY))
def test_tiny_llada_on_task_prompts_matches_the_python_loop(tiny_llada, case):
    """The trained model is sure of most tokens of its answers, as a real model is."""
    engine_kwargs, ref_kwargs, fired = TINY[case]
    ids, mask = _task_batch(tiny_llada)
    shape = TINY_SHAPE
    ref = decode_reference.reference_generate(tiny_llada, ids, mask, **shape, **ref_kwargs)
    out = tiny_llada.generate(ids, mask, prompt_bucket=1, **shape, **engine_kwargs)
    _check(out, ref)
    if fired == "several":
        assert most_in_one_step(out) >= 2, out.trajectory
    else:
        assert (out.nfe < shape["steps"]).all(), out.nfe


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_tiny_llada_caches_match_the_cached_python_loop(tiny_llada, cache):
    ids, mask = _task_batch(tiny_llada)
    shape = TINY_SHAPE
    ref = decode_reference_cache.reference_generate_cached(tiny_llada, ids, mask, cache=cache, rule="threshold", threshold=0.9,
                                                           **shape)
    out = tiny_llada.generate(ids, mask, method="fast-dllm", cache=cache, prompt_bucket=1, **shape)
    _check(out, ref)
    assert most_in_one_step(out) >= 2, out.trajectory
