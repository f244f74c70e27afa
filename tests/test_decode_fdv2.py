"""Fast-dLLM v2's hierarchical decoding in the jitted engine (method="fast-dllm-v2") against the
plain-loop reference (tests/decode_reference_fdv2.py): tokens and NFE per row, for prompts that
end mid-block, on a block boundary, shorter and longer than a block, alone and as one left-padded
batch, with and without a stop token."""

import dataclasses

import numpy as np
import pytest

from decode_reference_fdv2 import reference_fdv2

from dlmjax.errors import DlmjaxError

BS, SBS = 8, 4


def _prompt(n, offset=0):
    return [(5 + 7 * i + offset) % 90 + 3 for i in range(n)]


PROMPTS = [_prompt(5), _prompt(8, 1), _prompt(10, 2), _prompt(16, 3)]


def _check(lm, out, prompts, gen_length, stop_ids, **knobs):
    eos = lm.config.eos_token_id if lm.config.eos_token_id is not None else lm.config.mask_token_id
    for row, prompt in enumerate(prompts):
        tokens, nfe = reference_fdv2(lm, prompt, gen_length=gen_length, stop_ids=stop_ids, **knobs)
        assert len(tokens) <= gen_length
        expected = tokens + [eos] * (gen_length - len(tokens))  # the rest of the canvas reads as EOS (as the mask without one)
        np.testing.assert_array_equal(out.tokens[row], expected, err_msg=f"row {row}, prompt length {len(prompt)}")
        assert int(out.nfe[row]) == nfe, (row, len(prompt))


@pytest.mark.parametrize("threshold,cache", [(1.0, "none"), (0.5, "none"), (0.5, "block")])
def test_hierarchical_decode_matches_the_reference(loaded, threshold, cache, monkeypatch):
    """cache="block" (the block-level cache: finished blocks' K/V written once, each step feeds the
    row's block) is exact: the reference's full recomputes give the same tokens and NFE."""
    lm = loaded("fast_dllm_v2")
    knobs = dict(block_length=BS, sub_block_length=SBS, threshold=threshold)
    monkeypatch.setattr(lm, "config", dataclasses.replace(lm.config, eos_token_id=None, eot_token_id=None))  # no stop
    out = lm.generate(PROMPTS, method="fast-dllm-v2", gen_length=3 * BS, cache=cache, **knobs)
    _check(lm, out, PROMPTS, 3 * BS, [], **knobs)
    alone = lm.generate([PROMPTS[2]], method="fast-dllm-v2", gen_length=3 * BS, cache=cache, **knobs)
    np.testing.assert_array_equal(alone.tokens[0], out.tokens[2])


def test_the_sub_block_dual_cache_matches_its_reference(loaded, monkeypatch):
    """cache="dual" (approximate: a sub-block whose first token is decoded is recomputed alone and
    reads the rest of its block from the block's last full forward) against the reference that keeps
    the K/V itself, as upstream does; in this padded batch some rows reuse their block's K/V while
    others run their block whole in the same forward. The tokens differ from the exact cache's, so
    this test tells the two apart."""
    lm = loaded("fast_dllm_v2")
    knobs = dict(block_length=BS, sub_block_length=SBS, threshold=0.5)
    monkeypatch.setattr(lm, "config", dataclasses.replace(lm.config, eos_token_id=None, eot_token_id=None))
    out = lm.generate(PROMPTS, method="fast-dllm-v2", gen_length=3 * BS, cache="dual", **knobs)
    _check(lm, out, PROMPTS, 3 * BS, [], cache="dual", **knobs)
    trace, differs = [], 0
    for prompt in PROMPTS:
        dual, _ = reference_fdv2(lm, prompt, gen_length=3 * BS, stop_ids=[], cache="dual", trace=trace, **knobs)
        exact, _ = reference_fdv2(lm, prompt, gen_length=3 * BS, stop_ids=[], cache="block", **knobs)
        differs += dual != exact
    assert any(t["kind"] == "sub_block" for t in trace) and any(t["kind"] == "block" for t in trace)
    assert differs >= 1


@pytest.mark.parametrize("cache", ["none", "dual"])
def test_a_stop_token_ends_the_row(loaded, cache, monkeypatch):
    lm = loaded("fast_dllm_v2")
    knobs = dict(block_length=BS, sub_block_length=SBS, threshold=0.5, cache=cache)
    free, _ = reference_fdv2(lm, PROMPTS[2], gen_length=3 * BS, stop_ids=[], **{**knobs, "cache": "block"})
    stop = free[9]  # a token of the second block: the row stops there
    monkeypatch.setattr(lm, "config", dataclasses.replace(lm.config, eos_token_id=stop, eot_token_id=None))
    stopped, _ = reference_fdv2(lm, PROMPTS[2], gen_length=3 * BS, stop_ids=[stop], **knobs)
    assert len(stopped) < len(free)
    out = lm.generate(PROMPTS, method="fast-dllm-v2", gen_length=3 * BS, **knobs)
    _check(lm, out, PROMPTS, 3 * BS, [stop], **knobs)


def test_bad_fdv2_input_is_refused(loaded):
    lm = loaded("fast_dllm_v2")
    for knobs, words in [
        (dict(sub_block_length=3), "sub_block_length 3 does not divide block_length 8"),
        (dict(gen_length=12), "gen_length 12 is not divisible by block_length 8"),
        (dict(cache="prefix"), "takes cache='none' or 'block' or 'dual', not 'prefix'"),
        (dict(tau_add=0.5), "tau_add does not apply to method 'fast-dllm-v2'"),
    ]:
        args = {**dict(gen_length=16, block_length=BS), **knobs}
        with pytest.raises(DlmjaxError, match=words):
            lm.generate([PROMPTS[0]], method="fast-dllm-v2", **args)
    with pytest.raises(DlmjaxError, match="needs a block-diffusion model"):
        loaded("llada").generate([PROMPTS[0]], method="fast-dllm-v2", gen_length=16, block_length=BS)
