"""Each method preset's defaults, pinned to the paper's or the official code's values.

Each line names its source: a section and line of ../shared/reference/dllm-algorithms.md (which
cites the upstream file it was read from). A changed default fails here, whatever the decode
tests happen to exercise.
"""

import numpy as np
import pytest

from dlmjax.decode import exits, presets, rules
from dlmjax.decode.api import build_method

# method -> (settings that must hold, where they come from)
PINS = {
    # 1.6 (line 131): generate.py signature defaults remasking='low_confidence', block_length = gen_length
    "llada": dict(rule="quota", remasking="low_confidence", block_length=None),
    # 3.1 (line 282-288): `confidence >= threshold`, "Default threshold 0.9"; "PrefixCache with block size 32"
    "fast-dllm": dict(rule="threshold", threshold=0.9, block_length=32),
    # 6.5 (line 575-578): entropy H <= tau, "Quick-start tau=0.5"; "block 32, gen 256"
    "dparallel": dict(rule="entropy", threshold=0.5, block_length=32),
    # 7.1 (line 600-601): tau_high = 7.5 fixed, tau_low 2.5 (conservative); 7.2 (line 613): "LLaDA-Instruct exp-k=4 (7.5,2.5)"
    "sched": dict(rule="quota", schedule="exp", tau_high=7.5, tau_low=2.5, exit_k=4.0, block_length=None),
    # 7.3 (line 617-619): Prophet's LLaDA block loop, "block 32", staged thresholds 7.5 / 5.0 / 2.5
    "prophet": dict(rule="quota", schedule="prophet", block_length=32),
    # 2.4 (line 217-218): DreamGenerationConfig defaults eps 1e-3, alg 'origin'; one block (no block loop upstream)
    "dream": dict(rule="dream", alg="origin", eps=1e-3, block_length=None),
    # d2f-fdv2-decoding.md 1.1 (lines 44-46): the eval scripts' common setting, blocks of 32 with tau_add 0.1
    # (LLaDA math/humaneval, Dream gsm8k_cot), tau_act 0.95 and tau_conf 0.9 everywhere; line 40: fallback "default" = max prob;
    # 1.2: the official decoder always runs its (exact) in-order block cache
    "d2f": dict(rule="d2f", blocks="d2f", tau_add=0.1, tau_act=0.95, tau_conf=0.9, alg="maskgit_plus", block_length=32,
                attention="prompt_block_causal", cache="block"),
    # d2f-fdv2-decoding.md 2.1 (lines 176-178): bd_size 32, small_block_size 8, eval.py threshold 0.9, use_block_cache
    # False (the block-level prefix cache only, no sub-block DualCache); 2.3: `c > threshold`
    "fast-dllm-v2": dict(rule="threshold", blocks="fdv2", threshold=0.9, strict=True, sub_block_length=8, block_length=32,
                         attention="block_causal", cache="block"),
    # llada2.md 6 (M20:1263-1277): generate() defaults block_length 32, steps 32 (per block), threshold 0.95 (strict,
    # step 4), minimal_topk 1, eos_early_stop False; blocks from position 0 (5); the exact cache is SGLang's/dInfer's (5)
    "llada2": dict(rule="quota_threshold", blocks="aligned", threshold=0.95, steps=32, minimal_topk=1, eos_early_stop=False,
                   block_length=32, attention="block_causal", cache="block"),
    # llada2.md 7 (M21:1239-1257): editing_threshold 0.9 in the signature, 0.5 in its docstring; 7.3: mode Q is
    # threshold 0.7 / editing 0.5 (the default here), S 0.5 / 0.0; max_post_steps 16, num_to_transfer 1, block 32
    "llada2.1": dict(rule="editing", blocks="editing", threshold=0.7, editing_threshold=0.5, max_post_steps=16,
                     num_to_transfer=1, eos_early_stop=False, block_length=32, attention="block_causal", cache="block"),
}


@pytest.mark.parametrize("method", sorted(PINS))
def test_preset_defaults(method):
    pins = dict(PINS[method])
    block_length = pins.pop("block_length")
    m = build_method(method, gen_length=256)
    assert m.block_length == (block_length or 256), m
    # LLaDA's and the papers' steps = gen_length by default (LLaDA2's are per block)
    assert m.gen_length == 256 and m.steps == pins.pop("steps", 256)
    assert type(m.rule) is rules.RULES[pins.pop("rule")], m.rule
    blocks = pins.pop("blocks", "semi_ar")
    assert m.blocks.name == blocks, m.blocks
    assert m.attention == pins.pop("attention", "bidirectional")
    assert m.cache.name == pins.pop("cache", "none")
    schedule = pins.pop("schedule", None)
    assert (m.exit is None) == (schedule is None), m.exit
    if schedule == "prophet":
        assert isinstance(m.exit, exits.Prophet)
    elif schedule is not None:
        assert m.exit.schedule == schedule
    for key, value in pins.items():  # every other pin is a field of the rule, the block schedule or the exit rule
        owner = m.rule if hasattr(m.rule, key) else m.blocks if hasattr(m.blocks, key) else m.exit
        assert getattr(owner, key) == value, (key, owner)
    assert presets.PRESETS[method](256) == m  # the preset function is the method


def test_prophet_stage_values():
    """7.3 (line 617-619): <1/3 of the steps -> 7.5, <2/3 -> 5.0, else 2.5; gap >= threshold exits."""
    p = np.array([0.0, 0.2, 0.34, 0.5, 0.66, 0.7, 1.0], np.float32)
    tau = np.asarray(exits.Prophet().threshold_at(p))
    np.testing.assert_array_equal(tau, [7.5, 7.5, 5.0, 5.0, 5.0, 2.5, 2.5])


def test_unset_knobs_fall_back_to_the_papers_values():
    """Knobs a preset leaves unset take the same paper values (a rule switched on by hand)."""
    assert rules.Threshold().threshold == np.float32(0.9) and rules.Factor().factor == 1.0  # 3.1: threshold 0.9, eval factor 1.0
    sched = exits.SchED()
    assert (sched.tau_high, sched.tau_low, sched.exit_k) == (7.5, 2.5, 4.0)  # 7.1-7.2
    assert rules.Dream().eps == np.float32(1e-3) and build_method("llada", gen_length=8).temperature == 0.0  # 2.4
    m = build_method("fast-dllm", gen_length=64, rule="factor")
    assert isinstance(m.rule, rules.Factor) and m.rule.factor == 1.0  # 3.1: "eval default factor=1.0"
