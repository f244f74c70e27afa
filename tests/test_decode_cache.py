"""KV caches in the decode: the exact block cache equals the uncached block-causal decode;
Fast-dLLM's prefix and dual caches follow a Python loop of the cached algorithm."""

import numpy as np
import pytest

import decode_reference_cache
from dlmjax.errors import DlmjaxError

# The exact cache is exact for the commit rules. (An early exit reads the carried margins, and
# a cached step only refreshes its own block's, so SchED is not exact under it.)
RULES = {
    "quota": dict(method="llada"),
    "threshold": dict(method="fast-dllm", threshold=0.3),
    "factor": dict(method="fast-dllm", rule="factor", factor=2.0),
    "entropy": dict(method="dparallel", threshold=3.0),
}


def _batch(lm):
    ids = np.random.default_rng(5).integers(0, 96, (2, 10))
    mask = np.ones_like(ids)
    ids[0, :4] = lm.config.pad_token_id
    mask[0, :4] = 0
    return ids, mask


# A fixed-quota and a dynamic rule under the prompt-block-causal mask for both families, the
# factor and entropy rules once each, and the block-causal mask (the prompt split into blocks too)
# with two rules. The cache path does not depend on the rule beyond its commits.
EXACT = [(rule, family, "prompt_block_causal") for rule in ("quota", "threshold") for family in ("llada", "dream")]
EXACT += [("factor", "dream", "prompt_block_causal"), ("entropy", "llada", "prompt_block_causal")]
EXACT += [("quota", "dream", "block_causal"), ("threshold", "llada", "block_causal")]


@pytest.mark.parametrize("rule,family,attention", EXACT)
def test_exact_block_cache_gives_the_uncached_tokens(rule, family, attention, loaded):
    lm = loaded(family)
    ids, mask = _batch(lm)
    args = dict(gen_length=24, block_length=8, steps=24, attention=attention, **RULES[rule])
    plain = lm.generate(ids, mask, **args)
    cached = lm.generate(ids, mask, cache="block", **args)
    np.testing.assert_array_equal(cached.tokens, plain.tokens)
    # one extra forward: the prompt's K/V are written once, before the first block
    np.testing.assert_array_equal(cached.nfe, plain.nfe + 1)
    np.testing.assert_array_equal(cached.trajectory, plain.trajectory + 1)
    # and the attention mode matters: bidirectional decoding gives other tokens
    if rule == "quota":
        assert not np.array_equal(lm.generate(ids, mask, **{**args, "attention": "bidirectional"}).tokens, plain.tokens)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(cache="block"), "cache='block' is exact only under block-causal attention"),
        (dict(cache="ring"), "unknown cache 'ring'"),
        (dict(attention="causal"), "unknown attention 'causal'"),
        (dict(cache="dual", cfg_scale=1.0), "cache='dual' works with the quota, threshold, factor and entropy rules without CFG"),
        (dict(cache="prefix", method="dream"), "cache='prefix' works with"),
    ],
)
def test_bad_cache_arguments(kwargs, message, loaded):
    lm = loaded("llada")
    with pytest.raises(DlmjaxError, match=message):
        lm.generate([[5, 6, 7]], gen_length=16, **kwargs)


def test_dream_dual_cache_needs_two_steps_per_block(loaded):
    lm = loaded("dream")
    with pytest.raises(DlmjaxError, match="needs at least 2 steps per block"):
        lm.generate([[5, 6, 7]], gen_length=16, block_length=8, steps=2, cache="dual")


# (engine kwargs, reference kwargs). The threshold, factor and entropy rules run under both caches
# in tests/test_decode_confident.py, on sharpened models where they commit several tokens a step.
APPROXIMATE = {
    "quota": (dict(method="llada"), dict(rule="quota")),
    "sched": (dict(method="sched", schedule="cosine", tau_high=6.0, tau_low=0.0),
              dict(rule="quota", exit="cosine", tau_high=6.0, tau_low=0.0)),
    "eos": (dict(method="fast-dllm", threshold=0.3, stop_at_eos=True, logits_eos_inf=True),
            dict(rule="threshold", threshold=0.3, stop_at_eos=True, logits_eos_inf=True)),
}


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("case", sorted(APPROXIMATE))
def test_fast_dllm_caches_match_the_cached_python_loop(case, family, cache, loaded):
    lm = loaded(family)
    engine_kwargs, ref_kwargs = APPROXIMATE[case]
    ids, mask = _batch(lm)
    shape = dict(gen_length=24, block_length=8, steps=24)
    ref = decode_reference_cache.reference_generate_cached(lm, ids, mask, cache=cache, **shape, **ref_kwargs)
    out = lm.generate(ids, mask, cache=cache, prompt_bucket=1, **shape, **engine_kwargs)
    np.testing.assert_array_equal(out.tokens, ref["tokens"])
    np.testing.assert_array_equal(out.nfe, ref["nfe"])
    np.testing.assert_array_equal(out.trajectory, ref["trajectory"])


@pytest.mark.parametrize("cache,attention", [("dual", "bidirectional"), ("block", "prompt_block_causal")])
def test_cached_steps_through_the_pallas_kernel(cache, attention, loaded, monkeypatch):
    """Forcing the Pallas cached-block kernel (interpret mode on CPU) gives the XLA path's tokens."""
    lm = loaded("dream")
    ids, mask = _batch(lm)
    args = dict(method="fast-dllm", threshold=0.3, gen_length=16, block_length=8, cache=cache, attention=attention)
    monkeypatch.setenv("DLMJAX_ATTENTION", "pallas")  # the default an explicit kernel= overrides
    xla = lm.generate(ids, mask, kernel="xla", **args)
    monkeypatch.delenv("DLMJAX_ATTENTION")
    with pytest.raises(DlmjaxError, match="kernel 'triton' is not an attention implementation"):
        lm.generate(ids, mask, kernel="triton", **args)
    monkeypatch.setenv("DLMJAX_ATTENTION", "pallas")  # the default: part of the program's key, so it compiles anew
    from dlmjax.kernels import attention as kernels

    built = []
    kernel_fn = kernels._kernel_fn
    monkeypatch.setattr(kernels, "_kernel_fn", lambda *a: built.append(a[0]) or kernel_fn(*a))
    kernel = lm.generate(ids, mask, **args)
    assert built, "the Pallas kernel was not traced (a cached XLA trace was reused)"
    np.testing.assert_array_equal(kernel.tokens, xla.tokens)
    np.testing.assert_array_equal(kernel.nfe, xla.nfe)
