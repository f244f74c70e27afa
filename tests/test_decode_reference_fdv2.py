"""The Fast-dLLM v2 plain-loop reference (tests/decode_reference_fdv2.py) against what the spec implies
(../shared/reference/d2f-fdv2-decoding.md section 2): forwards and lengths, sub-block order, the stop
rule, and the prompt of exactly one block."""

import numpy as np
import pytest

from decode_reference_fdv2 import block_causal_mask, reference_fdv2

BS, SBS = 8, 4


def _prompt(n, offset=0):
    return [(5 + 7 * i + offset) % 90 + 3 for i in range(n)]


def test_block_causal_mask_from_position_zero():
    mask = block_causal_mask(12, 4)
    assert mask[5, :8].all() and not mask[5, 8:].any() and mask[0, :4].all() and not mask[3, 4:].any()


@pytest.mark.parametrize("p0", [5, 8, 10, 16])
def test_one_token_a_forward_at_threshold_one(loaded, p0):
    """threshold = 1 commits only the argmax (c > 1 never holds). Forwards: the prefill (a prompt of a
    block or more), one per mask, one commit per block; the output: every mask plus one AR token per
    block (2.4: "P0 + sum(masks per block) + num_blocks"), except the last block's when it would land
    past gen_length (a prompt that ends on a block boundary; SPEC.md)."""
    lm = loaded("fast_dllm_v2")
    tokens, nfe = reference_fdv2(lm, _prompt(p0), gen_length=2 * BS, block_length=BS, sub_block_length=SBS,
                                 threshold=1.0, stop_ids=[])
    ar_first = p0 >= BS and p0 % BS == 0  # the prefill's last logit gave the first token
    first_block = BS - (p0 + ar_first) % BS
    masks = first_block + (BS - 1)
    last_fits = ar_first + masks + 1 < 2 * BS
    assert len(tokens) == ar_first + masks + 1 + last_fits <= 2 * BS
    assert nfe == (p0 >= BS) + masks + 1 + last_fits
    assert lm.config.mask_token_id not in tokens


def test_sub_blocks_run_left_to_right(loaded):
    lm = loaded("fast_dllm_v2")
    trace = []
    tokens, _ = reference_fdv2(lm, _prompt(8), gen_length=3 * BS, block_length=BS, sub_block_length=SBS, threshold=0.5,
                               stop_ids=[], trace=trace)
    for block in {t["block"] for t in trace}:
        order = [t["sub_block"] for t in trace if t["block"] == block]
        assert order == sorted(order) and len(set(order)) == BS // SBS
    for t in trace:  # a step commits inside its own sub-block only
        lo = (t["block"] * BS - 8) + t["sub_block"] * SBS
        assert all(lo <= j < lo + SBS for j in t["committed"]), t


def test_a_stop_token_ends_the_output(loaded):
    lm = loaded("fast_dllm_v2")
    args = dict(gen_length=3 * BS, block_length=BS, sub_block_length=SBS, threshold=1.0)
    tokens, nfe = reference_fdv2(lm, _prompt(8), stop_ids=[], **args)
    stop = tokens[BS + 2]  # inside the second generated block
    first = tokens.index(stop)
    cut, cut_nfe = reference_fdv2(lm, _prompt(8), stop_ids=[stop], **args)
    assert cut == tokens[: first + 1] and cut_nfe < nfe


def test_a_prompt_of_exactly_one_block_is_read(loaded):
    """Upstream never feeds a prompt of exactly block_size tokens; here it is prefilled, so two
    different prompts of one block decode differently."""
    lm = loaded("fast_dllm_v2")
    args = dict(gen_length=BS, block_length=BS, sub_block_length=SBS, threshold=1.0, stop_ids=[])
    a, _ = reference_fdv2(lm, _prompt(BS), **args)
    b, _ = reference_fdv2(lm, _prompt(BS, offset=11), **args)
    assert a != b
    np.testing.assert_equal(len(a), BS)  # the AR token from the prefill and 7 masks (the next block's would not fit)
