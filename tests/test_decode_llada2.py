"""method="llada2" (LLaDA2.0's block decoding) and "llada2.1" (its token editing) against
tests/decode_reference_llada2.py, plain loops written from llada2.md sections 6 and 7 alone that
call the model once per forward on the whole window (no cache): tokens, NFE and (2.1) the edits of
every position per row, single prompts and left-padded batches, with and without the exact block
cache, across thresholds, step counts and prompt/answer lengths that put the prompt's tail in the
first block and run the last block past gen_length."""

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


@pytest.mark.parametrize("threshold, steps, minimal_topk, gen_length", [
    (0.05, 4, 1, 13),  # mostly the threshold's commits; the last block runs past gen_length
    (0.3, 3, 1, 16),  # uneven quotas (3, 3, 2)
    (1.0, 8, 1, 11),  # never above the threshold: the quota path alone, one token a step
    (0.5, 8, 4, 12),  # minimal_topk caps steps at gen_length // 4 = 3
])
def test_tokens_and_nfe_equal_the_reference(lm, threshold, steps, minimal_topk, gen_length):
    """Rows of a left-padded batch (prompts of 3, 8, 11 and 16 tokens: shorter than a block, on a
    block boundary, ending mid-block) each decode as the reference decodes them alone, without a
    cache and with the exact block cache."""
    prompts = _prompts(0, (3, 8, 11, 16))
    cfg = lm.config
    wants = [reference.llada2_generate(_logits_fn(lm), prompt, gen_length=gen_length, block_length=B, steps=steps,
                                       threshold=threshold, minimal_topk=minimal_topk, mask_id=cfg.mask_token_id,
                                       eos_id=cfg.eos_token_id) for prompt in prompts]
    for cache in ("none", "block"):
        out = lm.generate(prompts, method="llada2", gen_length=gen_length, block_length=B, steps=steps, threshold=threshold,
                          minimal_topk=minimal_topk, cache=cache, stop_token_ids=[])
        for row, (prompt, want) in enumerate(zip(prompts, wants)):
            assert list(out.tokens[row]) == want["tokens"], (cache, row, len(prompt))
            assert int(out.nfe[row]) == want["nfe"], (cache, row, len(prompt))
    # a low threshold commits beyond the quotas (fewer forwards than the quota path alone)
    if threshold <= 0.05:
        quota_only = lm.generate(prompts, method="llada2", gen_length=gen_length, block_length=B, steps=steps,
                                 threshold=1.0, minimal_topk=minimal_topk, stop_token_ids=[])
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


def _edits(want, prompt, gen_length):
    """Per answer position, how often the reference rewrote it."""
    edits = np.zeros(gen_length, int)
    for step in want["steps_log"]:
        for position in step["edited"]:
            if position - len(prompt) < gen_length:
                edits[position - len(prompt)] += 1
    return edits


@pytest.mark.parametrize("threshold, editing_threshold, max_post_steps, num_to_transfer, gen_length", [
    (0.7, 0.5, 16, 1, 13),  # mode Q
    (0.5, 0.0, 16, 1, 16),  # mode S: every changed prediction is rewritten (blocks run to max_post_steps)
    (0.3, 0.2, 2, 2, 11),
    (0.9, 1.0, 0, 1, 12),  # no edit can pass 1.0; no post step
    (0.2, 0.1, 1, 3, 16),
])
def test_editing_equals_the_reference(lm, threshold, editing_threshold, max_post_steps, num_to_transfer, gen_length):
    """LLaDA2.1: rows of a left-padded batch decode as the reference decodes them alone, without a
    cache and with the exact block cache: the tokens (cut after the first EOS, as upstream returns
    them), the NFE and how often each position was rewritten (so also the edits of every block)."""
    prompts = _prompts(0, (3, 8, 11, 16))
    cfg = lm.config
    knobs = dict(gen_length=gen_length, block_length=B, threshold=threshold, editing_threshold=editing_threshold,
                 max_post_steps=max_post_steps, num_to_transfer=num_to_transfer)
    wants = [reference.llada21_generate(_logits_fn(lm), prompt, mask_id=cfg.mask_token_id, eos_id=cfg.eos_token_id, **knobs)
             for prompt in prompts]
    for cache in ("none", "block"):
        out = lm.generate(prompts, method="llada2.1", cache=cache, **knobs)
        edited = 0
        for row, (prompt, want) in enumerate(zip(prompts, wants)):
            assert list(out.tokens[row]) == want["tokens"], (cache, row, len(prompt))
            assert int(out.nfe[row]) == want["nfe"], (cache, row, len(prompt))
            assert np.array_equal(out.edits[row], _edits(want, prompt, gen_length)), (cache, row, len(prompt))
            edited += int(out.edits[row].sum())
        if editing_threshold >= 1:
            assert edited == 0
        elif editing_threshold <= 0.2:  # low editing thresholds do rewrite tokens of this random model
            assert edited > 0


def test_editing_stop_equals_the_reference(lm):
    """LLaDA2.1 with eos_early_stop ends a row after the block that leaves a stop token (without it,
    the row decodes to its last block): tokens up to the stop, NFE as the reference's."""
    prompts = _prompts(1, (5, 9, 14))
    cfg = lm.config
    knobs = dict(gen_length=24, block_length=B, threshold=0.3, editing_threshold=0.5, max_post_steps=2)
    free = lm.generate(prompts, method="llada2.1", stop_token_ids=[], **knobs)
    values, counts = np.unique(free.tokens, return_counts=True)
    for stop in values[np.argsort(-counts, kind="stable")][:8]:
        wants = [reference.llada21_generate(_logits_fn(lm), p, eos_early_stop=True, mask_id=cfg.mask_token_id, eos_id=int(stop),
                                            **knobs) for p in prompts]
        if any(w["nfe"] < n for w, n in zip(wants, free.nfe)):
            break
    else:
        pytest.fail("no frequent token whose stop ends a row early")
    out = lm.generate(prompts, method="llada2.1", eos_early_stop=True, stop_token_ids=[int(stop)], **knobs)
    for row, w in enumerate(wants):
        assert list(out.tokens[row]) [: int(out.lengths[row])] == w["tokens"][: int(out.lengths[row])], row
        assert int(out.nfe[row]) == w["nfe"], row


def test_modes_are_presets(lm):
    q, s = (lm.generate([[1, 2, 3]], method=m, gen_length=8).method for m in ("llada2.1-q", "llada2.1-s"))
    assert (float(q.rule.threshold), float(q.rule.editing_threshold)) == (0.7, 0.5)
    assert (float(s.rule.threshold), float(s.rule.editing_threshold)) == (0.5, 0.0)
    assert q.blocks.max_post_steps == s.blocks.max_post_steps == 16 and q.block_length == 32


def test_bad_knobs_are_one_line(lm, tmp_path):
    with pytest.raises(DlmjaxError, match="sub_block_length does not apply to method 'llada2'"):
        lm.generate([[1, 2, 3]], method="llada2", gen_length=8, sub_block_length=4)
    with pytest.raises(DlmjaxError, match="threshold 1.5 is outside"):
        lm.generate([[1, 2, 3]], method="llada2", gen_length=8, threshold=1.5)
    with pytest.raises(DlmjaxError, match="takes cache='none' or 'block'"):
        lm.generate([[1, 2, 3]], method="llada2", gen_length=8, cache="dual")
    with pytest.raises(DlmjaxError, match="editing_threshold does not apply to method 'llada2'"):
        lm.generate([[1, 2, 3]], method="llada2", gen_length=8, editing_threshold=0.5)
    with pytest.raises(DlmjaxError, match="steps does not apply to method 'llada2.1'"):
        lm.generate([[1, 2, 3]], method="llada2.1", gen_length=8, steps=8)
    with pytest.raises(DlmjaxError, match=r"editing_threshold 1.5 is outside \[0, 1\]"):
        lm.generate([[1, 2, 3]], method="llada2.1", gen_length=8, editing_threshold=1.5)
    with pytest.raises(DlmjaxError, match="num_to_transfer 0 must be at least 1"):
        lm.generate([[1, 2, 3]], method="llada2.1", gen_length=8, num_to_transfer=0)
    with pytest.raises(DlmjaxError, match="minimal_topk 9 exceeds gen_length 8"):
        lm.generate([[1, 2, 3]], method="llada2", gen_length=8, minimal_topk=9)
    dream = dlmjax.load(testing.write_tiny_checkpoint(tmp_path / "dream", "dream", num_layers=1), progress=False)
    with pytest.raises(DlmjaxError, match="predicts the next token"):
        dream.generate([[1, 2, 3]], method="llada2", gen_length=8)
