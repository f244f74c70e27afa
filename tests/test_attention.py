"""The mask builder, block-causal parity against PyTorch, and the explicit KV cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dlmjax.attention import attention_mask
from dlmjax.cache import KVCache
from dlmjax.model import position_ids
from torch_reference import load_reference, reference_logits


def _allowed(mode, q, k, valid, block, prompt):
    """The rule written out per pair, independently of the vectorised builder."""
    if not valid:
        return False
    if mode == "bidirectional":
        return True
    if mode == "block_causal":
        return q // block >= k // block
    qb = 0 if q < prompt else 1 + (q - prompt) // block
    kb = 0 if k < prompt else 1 + (k - prompt) // block
    return qb >= kb


@pytest.mark.parametrize("mode", ["bidirectional", "block_causal", "prompt_block_causal"])
def test_mask_builder_matches_the_rule(mode):
    valid = np.ones((2, 13), bool)
    valid[1, :3] = False  # left padding
    block, prompt = 4, 5
    got = np.asarray(attention_mask(mode, jnp.asarray(valid), block_size=block, prompt_length=prompt))
    want = np.array([[[_allowed(mode, q, k, valid[b, k], block, prompt) for k in range(13)] for q in range(13)] for b in range(2)])
    np.testing.assert_array_equal(got, want)


def test_mask_builder_with_query_window():
    """Queries can be a window of the canvas (the cached case): indices, not positions, decide."""
    valid = jnp.ones((1, 12), bool)
    got = np.asarray(attention_mask("block_causal", valid, query_index=jnp.arange(8, 12), block_size=4))
    assert got.shape == (1, 4, 12) and got.all()
    got = np.asarray(attention_mask("block_causal", valid, query_index=jnp.arange(4, 8), block_size=4))
    np.testing.assert_array_equal(got[0, 0], np.arange(12) < 8)


@pytest.mark.parametrize(
    "name,mode,kwargs",
    [
        ("fast_dllm_v2", "block_causal", dict(block_size=8)),
        ("llada", "prompt_block_causal", dict(block_size=6, prompt_length=9)),
        ("dream", "prompt_block_causal", dict(block_size=4, prompt_length=7)),
    ],
)
def test_block_causal_logits_match_pytorch(name, mode, kwargs, hf_checkpoint, loaded):
    lm = loaded(name)
    ids = np.random.default_rng(7).integers(0, 96, (2, 27))
    q = np.arange(27)
    mask4d = np.array([[_allowed(mode, i, j, True, kwargs["block_size"], kwargs.get("prompt_length")) for j in q] for i in q])
    mask4d = np.broadcast_to(mask4d, (2, 1, 27, 27))
    ref_model, family = load_reference(hf_checkpoint(name), torch.float32)
    ref = reference_logits(ref_model, family, ids, mask4d)
    out = lm.logits(ids, mode=mode, **kwargs)
    assert np.abs(out - ref).max() <= 1e-4
    # and the mask matters: the bidirectional logits differ
    assert np.abs(lm.logits(ids) - ref).max() > 1e-2


@pytest.mark.parametrize(
    "name,mode,prompt", [("fast_dllm_v2", "block_causal", 0), ("llada", "prompt_block_causal", 8), ("dream", "prompt_block_causal", 5)]
)
def test_exact_block_cache_equals_full_forward(name, mode, prompt, loaded):
    """Blocks appended to the cache one at a time give the logits of one full block-causal pass."""
    lm = loaded(name)
    model, block, total = lm.model, 4, prompt + 12
    ids = jnp.asarray(np.random.default_rng(8).integers(0, 96, (2, total)), jnp.int32)
    valid = jnp.ones((2, total), jnp.int32)
    pos = position_ids(lm.config, valid)
    full, _ = model(ids, pos, attention_mask(mode, valid, block_size=block, prompt_length=prompt))

    cache = KVCache.zeros(lm.config, 2, total, jnp.float32)
    starts = ([0] if prompt else []) + list(range(prompt, total, block))
    ends = starts[1:] + [total]
    step = jax.jit(lambda c, x, p, m, i: model(x, p, m, cache=c, cache_index=i))
    for start, end in zip(starts, ends):
        m = attention_mask(mode, valid, query_index=jnp.arange(start, end), block_size=block, prompt_length=prompt)
        # slots beyond `end` are still empty; the block-causal rule already hides them
        logits, cache = step(cache, ids[:, start:end], pos[:, start:end], m, start)
        np.testing.assert_allclose(np.asarray(logits), np.asarray(full[:, start:end]), atol=1e-5, rtol=0)


def test_cache_write_and_attend_bidirectional(loaded):
    """A bidirectional pass through a longer cache with the extra slots masked equals the plain pass."""
    lm = loaded("dream")
    model = lm.model
    ids = jnp.asarray(np.random.default_rng(9).integers(0, 96, (1, 10)), jnp.int32)
    valid = jnp.ones((1, 10), jnp.int32)
    pos = position_ids(lm.config, valid)
    plain, no_cache = model(ids, pos, attention_mask("bidirectional", valid))
    assert no_cache is None
    slots = jnp.concatenate([valid, jnp.zeros((1, 6), jnp.int32)], axis=1)
    cache = KVCache.zeros(lm.config, 1, 16, jnp.float32)
    cached, cache = model(ids, pos, attention_mask("bidirectional", slots, query_index=jnp.arange(10)), cache=cache, cache_index=0)
    np.testing.assert_allclose(np.asarray(cached), np.asarray(plain), atol=1e-5, rtol=0)
    assert float(jnp.abs(cache.k[0][:, :, :10]).sum()) > 0 and float(jnp.abs(cache.k[0][:, :, 10:]).sum()) == 0


def test_unwritten_cache_slots_are_never_attended(loaded):
    """Slots nothing was written to are masked even when the caller's mask allows them."""
    lm = loaded("llada")
    model = lm.model
    ids = jnp.asarray(np.random.default_rng(10).integers(0, 96, (1, 6)), jnp.int32)
    valid = jnp.ones((1, 6), jnp.int32)
    pos = position_ids(lm.config, valid)
    plain, _ = model(ids, pos, attention_mask("bidirectional", valid))
    cache = KVCache.zeros(lm.config, 1, 16, jnp.float32)
    noise = jnp.asarray(np.random.default_rng(1).standard_normal(cache.k[0].shape), jnp.float32)
    cache = KVCache(k=tuple(noise for _ in cache.k), v=tuple(noise for _ in cache.v), written=cache.written, lengths=cache.lengths)
    everything = attention_mask("bidirectional", jnp.ones((1, 16), jnp.int32), query_index=jnp.arange(4, 10))
    cached, cache = model(ids, pos, everything, cache=cache, cache_index=4)
    np.testing.assert_allclose(np.asarray(cached), np.asarray(plain), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.asarray(cache.written), (np.arange(16) >= 4) & (np.arange(16) < 10))
    assert int(cache.lengths) == 10


def test_forward_on_explicit_keys_and_values(loaded):
    """`kv=`: the caller supplies the keys and values each layer attends to. Returning the fresh
    ones gives the plain forward; the cache's own K/V, passed this way, give the cached forward."""
    lm = loaded("dream")
    model = lm.model
    ids = jnp.asarray(np.random.default_rng(12).integers(0, 96, (2, 10)), jnp.int32)
    valid = jnp.ones((2, 10), jnp.int32)
    pos = position_ids(lm.config, valid)
    mask = attention_mask("bidirectional", valid)
    plain, _ = model(ids, pos, mask)
    seen = []
    same, attended = model(ids, pos, mask, kv=lambda layer, k, v: seen.append((layer, k.shape)) or (k, v))
    np.testing.assert_array_equal(np.asarray(same), np.asarray(plain))
    assert seen == [(i, (2, lm.config.num_kv_heads, 10, lm.config.head_dim)) for i in range(lm.config.num_layers)]
    assert len(attended) == lm.config.num_layers and attended[0][0].shape == seen[0][1]
    # the last 4 positions as queries over the 10 keys of the plain pass (its K/V of the first 6
    # slots, the fresh K/V of the window for the rest): the plain logits of those positions
    window = attention_mask("bidirectional", valid, query_index=jnp.arange(6, 10))

    def explicit(layer, k, v):
        full_k, full_v = attended[layer]
        return full_k.at[:, :, 6:].set(k), full_v.at[:, :, 6:].set(v)

    tail, _ = model(ids[:, 6:], pos[:, 6:], window, kv=explicit)
    np.testing.assert_allclose(np.asarray(tail), np.asarray(plain[:, 6:]), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="either cache or kv"):
        model(ids, pos, mask, cache=KVCache.zeros(lm.config, 2, 10, jnp.float32), kv=explicit)
