"""Which KV-cache slots each decode step writes and reads, observed in the engine itself.

A spy on the model's forward records, for every forward the jitted decode runs, the window it
wrote (cache index and width), the last layer's cached keys before and after, and the attention
mask its queries used (after the cache's written-slot restriction). The expected slots come from
SPEC.md ("Fast-dLLM KV caches", "Exact block cache"), not from the reference loop, so a bug in
the shared cache plumbing cannot hide behind an identical bug in the reference.

P = 6 prompt slots (row 0 left-padded by 2), G = 16 generated, blocks of K = 8, LLaDA's quota
rule with 4 steps per block.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dlmjax
import dlmjax.model
from dlmjax.attention import MaskSpec

P, G, K, STEPS = 6, 16, 8, 8
L = P + G


@pytest.fixture
def spy(loaded, monkeypatch):
    """(lm, records): a fresh LM whose decode programs are traced with the spy in place."""
    records = []

    def on_forward(index, width, k_before, k_after, written_after):
        records.append(dict(kind="forward", index=int(index), width=width, k_before=np.asarray(k_before),
                            k_after=np.asarray(k_after), written=np.asarray(written_after)))

    def on_attend(mask):
        records.append(dict(kind="mask", mask=np.asarray(mask)))

    call, attend = dlmjax.model.Transformer.__call__, dlmjax.model.attend

    def spied_call(self, input_ids, positions, mask, cache=None, cache_index=0, logits_from=0, cache_keep=None,
                   layout=None, kv=None, kernel="auto"):
        logits, out = call(self, input_ids, positions, mask, cache, cache_index, logits_from, cache_keep, layout, kv, kernel)
        if cache is not None:
            jax.debug.callback(functools.partial(on_forward, width=input_ids.shape[1]), jnp.asarray(cache_index),
                               k_before=cache.k[-1], k_after=out.k[-1], written_after=out.written, ordered=True)
        return logits, out

    def spied_attend(q, k, v, mask, shard=None, kernel="auto"):
        jax.debug.callback(on_attend, mask.dense() if isinstance(mask, MaskSpec) else mask, ordered=True)
        return attend(q, k, v, mask, shard, kernel)

    monkeypatch.setattr(dlmjax.model.Transformer, "__call__", spied_call)
    monkeypatch.setattr(dlmjax.model, "attend", spied_attend)
    jax.clear_caches()  # jit's trace cache would otherwise hand back a program traced without the spy
    lm = loaded("llada")
    yield dlmjax.LM(lm.model, directory=lm.directory), records
    monkeypatch.undo()
    jax.clear_caches()  # and no later test may reuse a spied program


def _forwards(records, layers):
    """One dict per forward, with the first layer's mask [B, T, L] attached."""
    out, masks = [], []
    for r in records:
        if r["kind"] == "mask":
            masks.append(r["mask"])
        else:
            assert len(masks) == layers, "one mask per layer before every forward's record"
            out.append({**r, "mask": masks[0]})
            masks = []
    return out


def _batch(lm):
    ids = np.random.default_rng(3).integers(0, 96, (2, P))
    mask = np.ones_like(ids)
    ids[0, :2], mask[0, :2] = lm.config.pad_token_id, 0
    return ids, mask


def _changed(f):
    """[L] bool: the slots whose last-layer keys this forward changed (any row, head or dim)."""
    return np.abs(f["k_after"] - f["k_before"]).max(axis=(0, 1, 3)) > 0


def _reads(f, key_valid):
    """Check the mask: every query reads exactly the real keys of the slots it may see ([L] bool)."""
    want = key_valid[:, None, :] & f["allowed"][None, None, :]
    np.testing.assert_array_equal(f["mask"], np.broadcast_to(want, f["mask"].shape))


def _key_valid(mask):
    return np.concatenate([mask, np.ones((mask.shape[0], G), mask.dtype)], axis=1).astype(bool)


@pytest.mark.parametrize("cache", ["dual", "prefix"])
def test_fast_dllm_cache_slots(spy, cache):
    lm, records = spy
    ids, mask = _batch(lm)
    lm.generate(ids, mask, method="llada", cache=cache, gen_length=G, block_length=K, steps=STEPS, prompt_bucket=1)
    forwards = _forwards(records, lm.config.num_layers)
    spb = STEPS // (G // K)
    assert len(forwards) == STEPS  # one forward per step, the refresh included
    key_valid = _key_valid(mask)
    everything = np.ones(L, bool)
    for n, f in enumerate(forwards):
        block, step = divmod(n, spb)
        start = P + block * K
        if step == 0:  # the refresh: the whole canvas, every slot rewritten
            assert (f["index"], f["width"]) == (0, L)
            assert _changed(f).all() or n == 0
            f["allowed"] = everything
        elif cache == "dual":  # queries = the block; only its slots are rewritten
            assert (f["index"], f["width"]) == (start, K)
            window = (np.arange(L) >= start) & (np.arange(L) < start + K)
            assert not _changed(f)[~window].any() and _changed(f)[window].all(), np.flatnonzero(_changed(f))
            f["allowed"] = everything
        else:  # prefix: queries = the whole generation region; slots before the block keep their K/V
            assert (f["index"], f["width"]) == (P, G)
            kept = np.arange(L) < start
            assert not _changed(f)[kept].any(), np.flatnonzero(_changed(f) & kept)
            assert _changed(f)[start:].all(), np.flatnonzero(_changed(f))
            f["allowed"] = everything
        assert f["written"].all()  # after the first refresh every slot holds keys
        _reads(f, key_valid)


def test_exact_block_cache_slots(spy):
    """Block-causal (prompt as block 0): the prompt's K/V once, then each block's first step
    rewrites the previous block and its own (2K queries), later steps its own K; a query reads
    the written slots of its own and earlier blocks, never a later one."""
    lm, records = spy
    ids, mask = _batch(lm)
    lm.generate(ids, mask, method="llada", cache="block", attention="prompt_block_causal", gen_length=G, block_length=K,
                steps=STEPS, prompt_bucket=1)
    forwards = _forwards(records, lm.config.num_layers)
    spb = STEPS // (G // K)
    assert len(forwards) == 1 + STEPS
    key_valid = _key_valid(mask)
    slots = np.arange(L)
    prompt = forwards[0]
    assert (prompt["index"], prompt["width"]) == (0, P)
    np.testing.assert_array_equal(prompt["written"], slots < P)
    assert _changed(prompt)[:P].all() and not _changed(prompt)[P:].any()
    # the prompt's queries (block 0) read the prompt only
    np.testing.assert_array_equal(prompt["mask"], np.broadcast_to(key_valid[:, None, :] & (slots < P), prompt["mask"].shape))
    high = P  # one past the highest slot written so far
    for n, f in enumerate(forwards[1:]):
        block, step = divmod(n, spb)
        start, end = P + block * K, P + (block + 1) * K
        width = 2 * K if step == 0 else K
        # the window ends at the block's end, unless it would start before slot 0 (a prompt shorter
        # than K): then it starts at 0 and reaches into the next block, whose slots are written but
        # not read before that block rewrites them
        first = min(max(end - width, 0), L - width)
        assert (f["index"], f["width"]) == (first, width)
        window = (slots >= first) & (slots < first + width)
        assert not _changed(f)[~window].any(), np.flatnonzero(_changed(f) & ~window)
        assert _changed(f)[start:end].all(), np.flatnonzero(_changed(f))
        high = max(high, first + width)
        np.testing.assert_array_equal(f["written"], slots < high)
        # every query's block: the prompt is block 0, generation block j is j + 1
        queries = np.arange(first, first + width)
        q_block = np.where(queries < P, 0, 1 + (queries - P) // K)
        k_block = np.where(slots < P, 0, 1 + (slots - P) // K)
        want = key_valid[:, None, :] & (k_block[None, None, :] <= q_block[None, :, None]) & (slots < high)[None, None, :]
        np.testing.assert_array_equal(f["mask"], want)


def test_kept_slots_are_neither_overwritten_nor_marked_written():
    """KVCache.write / mark_written with `keep`: the kept slots hold their old K/V and their
    written flag (a slot never written is never attended to), the others take the new ones."""
    from dlmjax.cache import KVCache
    from dlmjax.config import from_hf_config
    from dlmjax.testing import tiny_hf_config

    cfg = from_hf_config(tiny_hf_config("llada", num_layers=1))
    cache = KVCache.zeros(cfg, 1, 8, jnp.float32)
    first = jnp.ones((1, cfg.num_kv_heads, 2, cfg.head_dim))
    cache = cache.write(0, first, first, 0).mark_written(0, 2)  # slots 0, 1 written
    new = jnp.full((1, cfg.num_kv_heads, 4, cfg.head_dim), 2.0)
    keep = jnp.array([True, False, True, False])  # slots 0 (written) and 2 (never written) are kept
    cache = cache.write(0, new, new, 0, keep=keep).mark_written(0, 4, keep=keep)
    np.testing.assert_array_equal(np.asarray(cache.k[0][0, 0, :5, 0]), [1.0, 2.0, 0.0, 2.0, 0.0])
    np.testing.assert_array_equal(np.asarray(cache.written), [True, True, False, True] + [False] * 4)
    assert int(cache.lengths) == 4
