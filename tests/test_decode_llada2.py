"""method="llada2" (LLaDA2.0's block decoding) against tests/decode_reference_llada2.py, a plain
loop written from llada2.md section 6 alone that calls the model once per forward on the whole
window (no cache): tokens and NFE per row, single prompts and left-padded batches, with and
without the exact block cache, across thresholds, step counts and prompt/answer lengths that put
the prompt's tail in the first block and run the last block past gen_length."""

import numpy as np
import pytest

import dlmjax
from dlmjax import testing
from dlmjax.errors import DlmjaxError

import decode_reference_llada2 as reference

B = 8  # block length of the tiny runs


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    directory = testing.write_tiny_checkpoint(tmp_path_factory.mktemp("llada2") / "hf", "llada2", num_layers=3,
                                              hidden_size=64, num_heads=4, num_kv_heads=2)
    return dlmjax.load(directory, dtype="float32", progress=False)


def _logits_fn(lm):
    def logits(ids, positions, allowed):
        w = len(ids)
        assert np.array_equal(positions, np.arange(w))
        assert np.array_equal(allowed, (np.arange(w)[None] // B) <= (np.arange(w)[:, None] // B))
        return np.asarray(lm.logits(np.asarray(ids)[None], mode="block_causal", block_size=B))[0].astype(np.float64)

    return logits


def _prompts(seed, lengths):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(0, 95, n)] for n in lengths]


@pytest.mark.parametrize("cache", ["none", "block"])
@pytest.mark.parametrize("threshold, steps, minimal_topk, gen_length", [
    (0.05, 4, 1, 13),  # mostly the threshold's commits; the last block runs past gen_length
    (0.3, 3, 1, 16),  # uneven quotas (3, 3, 2)
    (1.0, 8, 1, 11),  # never above the threshold: the quota path alone, one token a step
    (0.5, 8, 4, 12),  # minimal_topk caps steps at gen_length // 4 = 3
])
def test_tokens_and_nfe_equal_the_reference(lm, cache, threshold, steps, minimal_topk, gen_length):
    """Rows of a left-padded batch (prompts of 3, 8, 11 and 16 tokens: shorter than a block, on a
    block boundary, ending mid-block) each decode as the reference decodes them alone."""
    prompts = _prompts(0, (3, 8, 11, 16))
    cfg = lm.config
    out = lm.generate(prompts, method="llada2", gen_length=gen_length, block_length=B, steps=steps, threshold=threshold,
                      minimal_topk=minimal_topk, cache=cache, stop_token_ids=[])
    for row, prompt in enumerate(prompts):
        want = reference.llada2_generate(_logits_fn(lm), prompt, gen_length=gen_length, block_length=B, steps=steps,
                                         threshold=threshold, minimal_topk=minimal_topk, mask_id=cfg.mask_token_id,
                                         eos_id=cfg.eos_token_id)
        assert list(out.tokens[row]) == want["tokens"], (row, len(prompt))
        assert int(out.nfe[row]) == want["nfe"], (row, len(prompt))
    # a low threshold commits beyond the quotas (fewer forwards than the quota path alone)
    if threshold <= 0.05:
        quota_only = lm.generate(prompts, method="llada2", gen_length=gen_length, block_length=B, steps=steps,
                                 threshold=1.0, minimal_topk=minimal_topk, cache=cache, stop_token_ids=[])
        assert np.sum(quota_only.nfe) > np.sum(out.nfe)


def test_stops_equal_the_reference(lm):
    """A stop token ends a row after the block that holds it (always, as upstream) or at the step
    that commits it (eos_early_stop): the answer up to it and the NFE equal the reference's with
    that token as its EOS. The stop token is one the model writes often, chosen so that the two
    rules end some row at different forwards."""
    prompts = _prompts(1, (5, 9, 14))
    cfg = lm.config
    knobs = dict(gen_length=24, block_length=B, steps=4, threshold=0.2)
    free = lm.generate(prompts, method="llada2", stop_token_ids=[], **knobs)
    values, counts = np.unique(free.tokens, return_counts=True)

    def want(stop, early):
        return [reference.llada2_generate(_logits_fn(lm), p, eos_early_stop=early, mask_id=cfg.mask_token_id, eos_id=stop,
                                          **knobs) for p in prompts]

    for stop in values[np.argsort(-counts, kind="stable")][:8]:
        wants = {early: want(int(stop), early) for early in (False, True)}
        if [w["nfe"] for w in wants[False]] != [w["nfe"] for w in wants[True]]:
            break
    else:
        pytest.fail("no frequent token whose in-step stop changes the reference's NFE")
    for early in (False, True):
        out = lm.generate(prompts, method="llada2", eos_early_stop=early, stop_token_ids=[int(stop)], **knobs)
        for row, w in enumerate(wants[early]):
            tokens = w["tokens"]
            end = tokens.index(stop) + 1 if stop in tokens else len(tokens)
            assert list(out.tokens[row][:end]) == tokens[:end], (early, row)
            assert int(out.lengths[row]) == end
            assert int(out.nfe[row]) == w["nfe"], (early, row)
        assert np.any(out.nfe < free.nfe)  # some row stopped early


def test_bad_knobs_are_one_line(lm, tmp_path):
    with pytest.raises(DlmjaxError, match="sub_block_length does not apply to method 'llada2'"):
        lm.generate([[1, 2, 3]], method="llada2", gen_length=8, sub_block_length=4)
    with pytest.raises(DlmjaxError, match="threshold 1.5 is outside"):
        lm.generate([[1, 2, 3]], method="llada2", gen_length=8, threshold=1.5)
    with pytest.raises(DlmjaxError, match="takes cache='none' or 'block'"):
        lm.generate([[1, 2, 3]], method="llada2", gen_length=8, cache="dual")
    with pytest.raises(DlmjaxError, match="minimal_topk 9 exceeds gen_length 8"):
        lm.generate([[1, 2, 3]], method="llada2", gen_length=8, minimal_topk=9)
    dream = dlmjax.load(testing.write_tiny_checkpoint(tmp_path / "dream", "dream", num_layers=1), progress=False)
    with pytest.raises(DlmjaxError, match="predicts the next token"):
        dream.generate([[1, 2, 3]], method="llada2", gen_length=8)
