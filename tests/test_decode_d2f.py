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


@pytest.mark.parametrize("family,alg", [("llada", "maskgit_plus"), ("llada", "topk_margin"), ("llada", "entropy"),
                                        ("dream", "maskgit_plus")])
def test_pipelined_decode_matches_the_reference(loaded, family, alg, monkeypatch):
    lm = loaded(family)
    knobs = dict(block_length=4, tau_add=0.25, tau_act=0.75, tau_conf=0.6, alg=alg)
    monkeypatch.setattr(lm, "config", dataclasses.replace(lm.config, eos_token_id=NEVER))  # nothing stops the pipeline
    out = _engine(lm, PROMPTS, gen_length=16, **knobs)
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


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_an_eos_stops_adding_blocks(loaded, family, monkeypatch):
    lm = loaded(family)
    knobs = dict(block_length=4, tau_add=0.5, tau_act=0.5, tau_conf=0.7)
    free = reference_d2f(lm, PROMPTS[0], gen_length=16, eos_id=NEVER, **knobs)[0]
    eos = free[5]  # a token the model commits in the second block
    monkeypatch.setattr(lm, "config", dataclasses.replace(lm.config, eos_token_id=eos))
    out = _engine(lm, [PROMPTS[0]], gen_length=16, **knobs)
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
        (dict(cache="dual"), "cache='none'"),
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
