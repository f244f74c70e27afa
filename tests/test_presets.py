"""Each method preset's defaults, pinned to the paper's or the official code's values.

Each line names its source: a section and line of ../shared/reference/dllm-algorithms.md (which
cites the upstream file it was read from). A changed default fails here, whatever the decode
tests happen to exercise.
"""

import numpy as np
import pytest

from dlmjax.decode import exits
from dlmjax.decode.api import build_method
from dlmjax.decode.engine import Knobs

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
}


@pytest.mark.parametrize("method", sorted(PINS))
def test_preset_defaults(method):
    pins = dict(PINS[method])
    block_length = pins.pop("block_length")
    m, settings = build_method(method, gen_length=256, block_length=None, steps=None)
    assert m.block_length == (block_length or 256), m
    assert m.gen_length == 256 and m.steps == 256  # LLaDA's and the papers' steps = gen_length by default
    for key, value in pins.items():
        if key == "rule":
            assert m.rule == value
        elif key == "schedule":
            assert m.exit == value
        elif key == "remasking":
            assert m.remasking == value
        elif key == "alg":
            assert m.alg == value
        else:
            assert settings[key] == value, (key, settings)


def test_prophet_stage_values():
    """7.3 (line 617-619): <1/3 of the steps -> 7.5, <2/3 -> 5.0, else 2.5; gap >= threshold exits."""
    p = np.array([0.0, 0.2, 0.34, 0.5, 0.66, 0.7, 1.0], np.float32)
    tau = np.asarray(exits.threshold_at("prophet", p, 0.0, 0.0, 0.0))
    np.testing.assert_array_equal(tau, [7.5, 7.5, 5.0, 5.0, 5.0, 2.5, 2.5])


def test_unset_knobs_fall_back_to_the_papers_values():
    """Knobs a preset leaves unset take the same paper values (a rule switched on by hand)."""
    k = Knobs.make()
    assert float(k.threshold) == np.float32(0.9) and float(k.factor) == 1.0  # 3.1: threshold 0.9, eval factor 1.0
    assert (float(k.tau_high), float(k.tau_low), float(k.exit_k)) == (7.5, 2.5, 4.0)  # 7.1-7.2
    assert float(k.eps) == np.float32(1e-3) and float(k.temperature) == 0.0  # 2.4
    m, settings = build_method("fast-dllm", gen_length=64, block_length=None, steps=None, rule="factor")
    assert m.rule == "factor" and settings["factor"] == 1.0  # 3.1: "eval default factor=1.0"
