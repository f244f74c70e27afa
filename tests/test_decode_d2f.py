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
