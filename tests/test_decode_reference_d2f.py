"""The D2F plain-loop reference (tests/decode_reference_d2f.py) against what the spec implies.

The jitted D2F decoder will be checked against this reference; here the reference itself is
checked: its mask, its degenerate case (no pipelining, one token per forward) against dlmjax's
LLaDA loop under the same block mask, and the pipeline's and EOS's behaviour from section 1.5 of
../shared/reference/d2f-fdv2-decoding.md.
"""

import numpy as np
import pytest

from decode_reference_d2f import d2f_block_ids, d2f_mask, reference_d2f

PROMPT = [5, 9, 14, 3, 22, 8, 31]  # 7 tokens: the generation blocks start mid-way through a block of 4
NEVER = -1  # an EOS id no model produces: nothing stops the adding of blocks


def test_the_d2f_mask_counts_blocks_from_the_prompts_end():
    blocks = d2f_block_ids(3, 3 + 8, 4)
    np.testing.assert_array_equal(blocks, [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    mask = d2f_mask(3, 11, 4)
    assert mask[0, :3].all() and not mask[0, 3:].any()  # the prompt is one bidirectional block
    assert mask[4, :7].all() and not mask[4, 7:].any()  # block 1 sees the prompt and itself, not block 2
    assert mask[10].all()


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_without_pipelining_it_is_llada_one_token_a_step(loaded, family):
    """tau_add = 1 adds a block only once the newest is decoded, and tau_conf = 1 never passes (a
    probability is never > 1), so each forward commits the single most probable mask of the one
    active block: LLaDA's low-confidence rule with steps = gen_length, under the same block mask."""
    lm = loaded(family)
    tokens, nfe = reference_d2f(lm, PROMPT, gen_length=12, block_length=4, tau_add=1.0, tau_act=0.5, tau_conf=1.0,
                                eos_id=NEVER)
    assert len(tokens) == 12 and nfe == 12
    llada = lm.generate([PROMPT], method="llada", gen_length=12, block_length=4, steps=12, attention="prompt_block_causal")
    np.testing.assert_array_equal(tokens, llada.tokens[0])
    assert int(llada.nfe[0]) == nfe


def test_pipelined_blocks_decode_side_by_side(loaded):
    """tau_add = 0 adds a block every iteration: several blocks are in flight at once; a block that
    is not fully activated commits only tokens above tau_conf; every block is decoded in the end
    with fewer forwards than tokens; the fallback ranking changes what a stuck block commits."""
    lm = loaded("llada")
    trace = []
    tokens, nfe = reference_d2f(lm, PROMPT, gen_length=16, block_length=4, tau_add=0.0, tau_act=0.75, tau_conf=0.9,
                                eos_id=NEVER, trace=trace)
    assert len(tokens) == 16 and lm.config.mask_token_id not in tokens
    in_flight = {}
    for t in trace:
        in_flight.setdefault(t["forward"], set()).add(t["block"])
    assert max(len(b) for b in in_flight.values()) >= 3
    assert any(not t["complete"] and not t["committed"] for t in trace)  # a semi-activated block may wait
    assert nfe < 16
    others = {alg: reference_d2f(lm, PROMPT, gen_length=16, block_length=4, tau_add=0.0, tau_act=0.75, tau_conf=1.0,
                                 alg=alg, eos_id=NEVER)[0] for alg in ("maskgit_plus", "topk_margin", "entropy")}
    assert len({tuple(t) for t in others.values()}) > 1


def test_eos_stops_adding_blocks_but_blocks_in_flight_finish(loaded):
    lm = loaded("llada")
    args = dict(gen_length=16, block_length=4, tau_add=1.0, tau_act=0.5, tau_conf=1.0)
    tokens, _ = reference_d2f(lm, PROMPT, eos_id=NEVER, **args)
    eos = tokens[5]  # committed in block 2
    first = tokens.index(eos)
    stopped, nfe = reference_d2f(lm, PROMPT, eos_id=eos, **args)
    assert len(stopped) == 4 * (first // 4 + 1) and nfe == len(stopped)  # the block holding the EOS is the last
    assert stopped == tokens[: len(stopped)]  # the whole block, tokens after the EOS included
