"""D2F's pipelined decoding in the jitted engine (method="d2f") against the plain-loop reference
(tests/decode_reference_d2f.py): tokens and real NFE, on both families, for single prompts and a
left-padded batch, with and without EOS, for every fallback ranking."""

import dataclasses

import numpy as np
import pytest

from decode_reference_d2f import reference_d2f

from dlmjax.errors import DlmjaxError

PROMPTS = [[5, 9, 14, 3, 22, 8, 31], [7, 2, 40, 11]]
NEVER = -1


def _engine(lm, prompts, **knobs):
    return lm.generate(prompts, method="d2f", **knobs)


def _expected(lm, prompt, gen_length, eos_id, **knobs):
    tokens, nfe = reference_d2f(lm, prompt, gen_length=gen_length, eos_id=eos_id, **knobs)
    if len(tokens) < gen_length:  # blocks never added (an EOS stopped the pipeline) read as EOS
        tokens = tokens + [eos_id] * (gen_length - len(tokens))
    return tokens, nfe


@pytest.mark.parametrize("family,alg,cache", [("llada", "maskgit_plus", "none"), ("llada", "topk_margin", "none"),
                                              ("llada", "entropy", "block"), ("dream", "maskgit_plus", "none"),
                                              ("llada", "maskgit_plus", "block"), ("dream", "maskgit_plus", "block")])
def test_pipelined_decode_matches_the_reference(loaded, family, alg, cache, monkeypatch):
    """cache="block" (D2F's in-order block cache) is exact: the same tokens and NFE as the reference,
    which recomputes the canvas every forward."""
    lm = loaded(family)
    knobs = dict(block_length=4, tau_add=0.25, tau_act=0.75, tau_conf=0.6, alg=alg, cache=cache)
    monkeypatch.setattr(lm, "config", dataclasses.replace(lm.config, eos_token_id=NEVER))  # nothing stops the pipeline
    out = _engine(lm, PROMPTS, gen_length=16, **knobs)
    del knobs["cache"]
    trace = []
    reference_d2f(lm, PROMPTS[0], gen_length=16, eos_id=NEVER, trace=trace, **knobs)
    in_flight = {}
    for t in trace:
        in_flight.setdefault(t["forward"], set()).add(t["block"])
    assert max(len(b) for b in in_flight.values()) >= 2  # the pipeline runs blocks side by side here
    for row, prompt in enumerate(PROMPTS):
        tokens, nfe = _expected(lm, prompt, 16, NEVER, **knobs)
        np.testing.assert_array_equal(out.tokens[row], tokens)
        assert int(out.nfe[row]) == nfe
    assert int(out.steps) == max(int(n) for n in out.nfe)
    assert out.trajectory.max() <= out.steps and (out.trajectory > 0).all()


@pytest.mark.parametrize("family,cache", [("llada", "none"), ("dream", "none"), ("dream", "block")])
def test_an_eos_stops_adding_blocks(loaded, family, cache, monkeypatch):
    lm = loaded(family)
    knobs = dict(block_length=4, tau_add=0.5, tau_act=0.5, tau_conf=0.7)
    free = reference_d2f(lm, PROMPTS[0], gen_length=16, eos_id=NEVER, **knobs)[0]
    eos = free[5]  # a token the model commits in the second block
    monkeypatch.setattr(lm, "config", dataclasses.replace(lm.config, eos_token_id=eos))
    out = _engine(lm, [PROMPTS[0]], gen_length=16, cache=cache, **knobs)
    tokens, nfe = _expected(lm, PROMPTS[0], 16, eos, **knobs)
    assert len(reference_d2f(lm, PROMPTS[0], gen_length=16, eos_id=eos, **knobs)[0]) < 16  # the EOS stopped it
    np.testing.assert_array_equal(out.tokens[0], tokens)
    assert int(out.nfe[0]) == nfe


def test_bad_d2f_knobs_are_refused(loaded):
    lm = loaded("llada")
    for knobs, words in [
        (dict(tau_add=1.5), "tau_add 1.5 is outside [0, 1]"),
        (dict(tau_conf=-0.1), "tau_conf -0.1 is outside [0, 1]"),
        (dict(alg="origin"), "unknown D2F alg 'origin'"),
        (dict(block_length=5), "not divisible by block_length 5"),
        (dict(cache="dual"), "takes cache='none' or 'block', not 'dual'"),
        (dict(steps=4), "steps does not apply to method 'd2f'"),
        (dict(rule="quota"), "fixed number of steps"),
    ]:
        with pytest.raises(DlmjaxError, match=words.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
            lm.generate([PROMPTS[0]], method="d2f", gen_length=16, **knobs)


def test_the_d2f_rule_on_crafted_statistics():
    """The rule alone, on windows where the cases differ: tau_conf is strict (a probability equal to it
    does not pass), a window that must commit and passes nothing commits its best by `alg`, and one
    that need not commits nothing."""
    import jax
    import jax.numpy as jnp

    from dlmjax.decode import rules

    # one window of 3 positions over a vocabulary of 3: position 0 has the top probability (0.50) and the
    # lowest entropy, position 1 the widest top-1 - top-2 margin (0.22)
    probs = jnp.asarray([[[0.50, 0.49, 0.01], [0.48, 0.26, 0.26], [0.45, 0.45, 0.10]]], jnp.float32)
    ranked = {alg: int(jnp.argmax(rules.D2F(alg=alg).rank(probs)[0])) for alg in rules.D2F_ALGS}
    assert ranked == {"maskgit_plus": 0, "topk_margin": 1, "entropy": 0}, ranked
    candidates = jnp.ones((1, 3), bool)
    confidence = jnp.max(probs, axis=-1)

    def commit(alg, tau, force):
        rule = rules.D2F(tau_conf=tau, alg=alg)
        step = rules.Step(candidates=candidates, confidence=confidence, entropy=None, quota=None,
                          select_key=jax.random.key(0), rank=rule.rank(probs), force=jnp.asarray([force]))
        return [bool(c) for c in rule.commit(step)[0]]

    assert commit("maskgit_plus", 0.48, False) == [True, False, False]  # 0.48 is not > 0.48
    assert commit("maskgit_plus", 0.50, False) == [False, False, False]  # nothing passes, nothing forced
    assert commit("maskgit_plus", 0.50, True) == [True, False, False]  # forced: the most probable
    assert commit("topk_margin", 0.50, True) == [False, True, False]  # forced: the widest margin
    assert commit("entropy", 0.50, True) == [True, False, False]
    step = rules.Step(candidates=candidates, confidence=confidence, entropy=None, quota=None, select_key=jax.random.key(0))
    strict = rules.Threshold(threshold=0.48, strict=True)
    assert [bool(c) for c in strict.commit(step)[0]] == [True, False, False]  # Fast-dLLM v2: > 0.48, plus the best
    assert [bool(c) for c in rules.Threshold(threshold=0.48).commit(step)[0]] == [True, True, False]  # v1: >= 0.48


def test_the_d2f_cache_window_starts_at_the_first_block_not_final():
    """Pipeline's in-order block cache: the window covers every block whose K/V are not final in some
    running row (the first forward, the whole canvas), in the narrowest compiled width; after a step,
    a row's final blocks are its leading blocks that were fully decoded when the step's forward ran."""
    import jax.numpy as jnp

    from dlmjax.decode.schedules import Pipeline

    sched = Pipeline(gen_length=32, block_length=4)  # 8 blocks; the prompt is 10 tokens
    masked = jnp.ones((2, 32), bool)
    st = sched.init(masked, jnp.asarray([10, 7]))

    def width(final, done=(False, False), shifted=False):
        win = sched.exact_window(dataclasses.replace(st, final=jnp.asarray(final)), masked, jnp.asarray(done), shifted, 10)
        assert int(win.end) == 32
        return win.widths[int(win.which)], win.widths

    assert width([-1, -1]) == (42, (4, 8, 16, 32, 42))  # nothing cached: the whole canvas
    assert width([3, 5])[0] == 32  # blocks 3..7 of row 0: 20 tokens
    assert width([6, 7])[0] == 8
    assert width([0, 7], done=(True, False))[0] == 4  # a done row no longer holds the window back
    assert width([7, 7], shifted=True) == (5, (5, 9, 17, 33, 42))  # one slot more on the left
    before = np.ones((2, 32), bool)
    before[0, :8] = False  # row 0: blocks 0 and 1 decoded, block 2 not, block 3 decoded
    before[0, 12:16] = False
    before[1, 4:8] = False  # row 1: block 0 not decoded
    after, _, _ = sched.after(st, jnp.asarray(before), jnp.zeros((2, 32), jnp.int32), _tokens())
    assert after.final.tolist() == [2, 0]


def _tokens():
    from dlmjax.decode.engine import Tokens

    return Tokens(mask=-7, eos=None, eot=None)
