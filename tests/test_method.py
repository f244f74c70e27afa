"""A method is a value (dlmjax/decode/method.py): parts, knobs, composition and the CLI's flags."""

import dataclasses
import inspect
from typing import ClassVar

import jax.numpy as jnp
import numpy as np
import pytest

from dlmjax.decode import api, exits, method, presets, rules
from dlmjax.decode.parts import part, traced
from dlmjax.errors import DlmjaxError
from dlmjax.generate import _parser, knob_flags


def test_every_knob_is_a_generate_argument_and_a_cli_flag():
    knobs = set(method.knob_table()) | set(method.SELECTORS)
    assert knobs == set(knob_flags())
    signature = set(inspect.signature(api.generate).parameters)
    assert knobs <= signature, knobs - signature
    flags = {option for action in _parser()._actions for option in action.option_strings}
    assert {"--" + k.replace("_", "-") for k in knobs} <= flags
    # the cache and attention choices are the engine's (the CLI once lacked --cache block and --attention)
    by_flag = {a.option_strings[0]: a for a in _parser()._actions if a.option_strings}
    assert set(by_flag["--cache"].choices) == {"none", "prefix", "dual", "block"}
    assert set(by_flag["--attention"].choices) == set(method.ATTENTIONS)


def test_cli_flags_reach_the_method():
    args = _parser().parse_args(["--prompt", "x", "--method", "fast-dllm", "--threshold", "0.7", "--cache", "dual",
                                 "--gen-length", "64", "--block-length", "16", "--stop-at-eos"])
    knobs = {name: getattr(args, name) for name in knob_flags() if getattr(args, name) is not None}
    m = api.build_method(args.method, **knobs)
    assert m == presets.fast_dllm(64, threshold=0.7, cache="dual", block_length=16, stop_at_eos=True)
    assert m.rule.threshold == 0.7 and m.cache.name == "dual" and m.block_length == 16 and m.stop_at_eos


def test_traced_knobs_keep_the_structure_and_static_ones_change_it():
    a, b = presets.fast_dllm(64, threshold=0.5, temperature=0.3), presets.fast_dllm(64, threshold=0.8)
    assert a.structure() == b.structure() and a != b
    for other in (presets.fast_dllm(64, cache="dual"), presets.fast_dllm(64, block_length=16), presets.dparallel(64),
                  presets.fast_dllm(64, stop_at_eos=True), presets.sched(64), presets.prophet(64)):
        assert other.structure() != b.structure(), other
    assert presets.sched(64, tau_high=9.0).structure() == presets.sched(64).structure()
    assert presets.sched(64, schedule="linear").structure() != presets.sched(64).structure()


@pytest.mark.parametrize(
    "name,knobs,message",
    [
        ("llada", dict(threshold=0.9), "threshold does not apply to method 'llada' .*rule 'threshold' and rule 'quota_threshold' and rule 'editing' and rule 'entropy'"),
        ("fast-dllm", dict(tau_low=1.0), "tau_low does not apply .*schedule 'linear' and schedule 'cosine' and schedule 'exp'"),
        ("dream", dict(factor=1.0), "factor does not apply to method 'dream' .*rule 'factor'"),
        ("llada", dict(schedule="exp", exit_k=2.0, alg_temp=0.1), "alg_temp does not apply .*rule 'dream'"),
        ("dparallel", dict(threshold=-1.0), "entropy bound -1.0 is negative"),
        ("llada", dict(gen_length=0), "must be positive, got 0"),
        ("llada", dict(rule="nope"), "unknown commit rule 'nope'"),
        ("llada", dict(schedule="nope"), "unknown schedule 'nope'"),
    ],
)
def test_knobs_the_method_does_not_use_are_refused(name, knobs, message):
    knobs = {"gen_length": 32, **knobs}
    with pytest.raises(DlmjaxError, match=message):
        api.build_method(name, **knobs)


def test_a_preset_value_the_user_did_not_set_is_not_refused():
    m = api.build_method("fast-dllm", gen_length=32, rule="factor")  # fast-dllm's threshold 0.9 is simply not used
    assert isinstance(m.rule, rules.Factor)
    m = api.build_method("sched", gen_length=32, schedule="prophet")  # nor sched's tau_high / tau_low / exit_k
    assert isinstance(m.exit, exits.Prophet)


def test_a_composed_method_decodes_like_its_preset_name(loaded):
    lm = loaded("llada")
    ids = [[5, 6, 7, 8]]
    by_name = lm.generate(ids, method="fast-dllm", gen_length=16, block_length=8, threshold=0.5)
    composed = lm.generate(ids, method=presets.fast_dllm(16, block_length=8, threshold=0.5))
    np.testing.assert_array_equal(composed.tokens, by_name.tokens)
    np.testing.assert_array_equal(composed.nfe, by_name.nfe)
    assert composed.compile_seconds == 0.0 and composed.method == by_name.method  # one program: the same structure
    with pytest.raises(DlmjaxError, match="a composed Method carries its own knobs; set threshold in it"):
        lm.generate(ids, method=presets.fast_dllm(16, block_length=8), threshold=0.7)
    with pytest.raises(DlmjaxError, match="confidence threshold 3.0 is outside"):
        lm.generate(ids, method=dataclasses.replace(presets.fast_dllm(16), rule=rules.Threshold(3.0)))


@part
class FirstMask(rules.Rule):
    """A rule written for this test: commit the leftmost candidates, `count` a step."""

    name: ClassVar[str] = "first_mask"
    count: float = traced(1.0, "how many masks, leftmost first, each step commits")

    def commit(self, step: rules.Step) -> jnp.ndarray:
        order = jnp.cumsum(step.candidates, axis=-1)
        return step.candidates & (order <= self.count)


def test_a_new_rule_is_one_class(loaded, monkeypatch):
    """Registering one class is all a rule takes: its knob is a generate argument by name, and the
    engine runs it (here: left to right, one or two tokens a step)."""
    monkeypatch.setitem(rules.RULES, "first_mask", FirstMask)
    assert "count" in method.knob_table()
    lm = loaded("llada")
    m = method.compose(dict(rule="first_mask", count=2.0, gen_length=16, block_length=8, steps=16), {"count"}, "custom")
    out = lm.generate([[5, 6, 7, 8]], method=m)
    np.testing.assert_array_equal(out.trajectory[0], np.repeat(np.arange(1, 9), 2))  # two tokens a step, in order
    one = lm.generate([[5, 6, 7, 8]], method=dataclasses.replace(m, rule=FirstMask(1.0)))
    np.testing.assert_array_equal(one.trajectory[0], np.arange(1, 17))
    assert one.compile_seconds == 0.0  # a traced knob: the same program
