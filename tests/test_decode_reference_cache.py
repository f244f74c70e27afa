"""Properties of the Python-loop KV-cache decode reference (tests/decode_reference_cache.py).

The central check is a replay of single-row runs written independently of the reference: from a
run's trajectory the canvas before every forward is rebuilt; a refresh's logits are the uncached
forward of that canvas; a cached step's logits are rebuilt from scratch (a zero cache, one refresh
of the block-start canvas, one window forward of the current canvas: under both caches the window's
outputs depend only on those two canvases); the carried predictions are tracked, and the commits
of each step are checked against the rule of SPEC.md.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlmjax.attention import attention_mask
from dlmjax.cache import KVCache
from dlmjax.model import position_ids
from decode_reference import exit_tau, reference_generate, step_logits
from decode_reference_cache import jitted_forward, reference_generate_cached

G, K, P = 16, 8, 6  # generation length, block length, prompt length
NB = G // K
CACHE_KINDS = ("prefix", "dual")


@pytest.fixture(scope="module")
def models(loaded):
    return {name: loaded(name) for name in ("llada", "dream")}


def _prompt(seed, batch=2, length=P):
    return np.random.default_rng(seed).integers(0, 96, (batch, length))


class Edited:
    """An LM look-alike for the cached reference: `.config` and a `.model` whose logits are edited.

    boosts: (row, canvas slot, column, amount), added to the raw output of that slot when the
    forward's window holds it."""

    def __init__(self, lm, scale=1.0, boosts=()):
        self.config = lm.config
        self._model = jitted_forward(lm.model)
        self._cache_api = _cache_api_module(lm.model)
        self.scale = scale
        self.boosts = boosts
        self.calls = 0

    @property
    def model(self):
        return self._call

    def _call(self, ids, positions, mask, cache_k, cache_v, cache_index, keep):
        self.calls += 1
        logits, k_new, v_new = self._model(ids, positions, mask, cache_k, cache_v, cache_index, keep)
        return self._edit(logits, ids.shape[1], cache_index), k_new, v_new

    def _edit(self, logits, width, cache_index):
        logits = logits * jnp.float32(self.scale)
        for row, slot, col, amount in self.boosts:
            k = slot - int(cache_index)
            if 0 <= k < width:
                logits = logits.at[row, k, col].add(amount)
        return logits

    def cache_api(self, ids, positions, mask, cache=None, cache_index=0, cache_keep=None):
        """The same edits on a forward through dlmjax's cache API (for the replays below)."""
        logits, cache = self._cache_api(ids, positions, mask, cache=cache, cache_index=cache_index, cache_keep=cache_keep)
        return self._edit(logits, ids.shape[1], cache_index), cache


# --------------------------------------------------------------------------- independent forwards


def _canvas(prompt_row, tokens, masked, mask_id):
    return np.concatenate([prompt_row, np.where(masked, mask_id, tokens)])[None]


def _pair(a):
    """Single rows are run as a batch of two copies, so that every forward here reuses the compiled
    batch-2 shapes of the decodes (a row's outputs do not depend on the other rows)."""
    return np.repeat(a, 2, axis=0) if a.shape[0] == 1 else a


def _cache_api_module(model):
    """The module's call through dlmjax's own cache API (model(..., cache=, cache_index=, cache_keep=)),
    compiled with jax.jit: the tests here check the reference's own cache against it."""
    from flax import nnx

    graphdef, state = nnx.split(model)

    def call(ids, positions, mask, cache=None, cache_index=0, cache_keep=None):
        return _cache_api_jit(graphdef, state, ids, positions, mask, cache, jnp.asarray(cache_index, jnp.int32), cache_keep)

    return call


def _cache_api_call(graphdef, state, ids, positions, mask, cache, cache_index, cache_keep):
    from flax import nnx

    return nnx.merge(graphdef, state)(ids, positions, mask, cache=cache, cache_index=cache_index, cache_keep=cache_keep)


_cache_api_jit = jax.jit(_cache_api_call, static_argnums=(0,))


def _fwd(model, cfg, canvas, w0=0, T=None, cache=None, keep=None):
    """One model call on canvas[:, w0:w0+T] through `cache` (None: a fresh zero cache), as float32 numpy."""
    canvas = _pair(canvas)
    L = canvas.shape[1]
    T = L - w0 if T is None else T
    fm = jnp.ones(canvas.shape, jnp.int32)
    pos = position_ids(cfg, fm)[:, w0:w0 + T]
    att = attention_mask("bidirectional", fm, query_index=jnp.arange(w0, w0 + T))
    ids = jnp.asarray(canvas[:, w0:w0 + T], jnp.int32)
    if cache is None:
        cache = KVCache.zeros(cfg, canvas.shape[0], L, jnp.float32)
    logits, cache = model(ids, pos, att, cache=cache, cache_index=w0,
                          cache_keep=None if keep is None else jnp.asarray(keep))
    return np.asarray(logits), cache


def _uncached(lm, canvas):
    """lm.logits of a canvas (rows paired like _fwd)."""
    return lm.logits(_pair(canvas))[:canvas.shape[0]]


def _window(kind, s):
    """(w0, T, keep) of a cached step of the block starting at generation position s."""
    if kind == "dual":
        return P + s, K, None
    return P, G, np.arange(G) < s


def _prep(logits, cfg, eos_inf=False):
    out = np.array(logits, dtype=np.float32)
    out[..., cfg.mask_token_id] = -np.inf
    if eos_inf:
        out[..., cfg.eos_token_id] = -np.inf
    return out


def _stats(logits):
    """x0, conf (float32), entropy (float32, 0 log 0 = 0), top1 - top2 margin (float64) per position."""
    x0 = logits.argmax(-1)
    z = logits - logits.max(-1, keepdims=True)
    e = np.exp(z)
    p = (e / e.sum(-1, keepdims=True)).astype(np.float32)
    conf = p[np.arange(len(x0)), x0]
    logp = z - np.log(e.sum(-1, keepdims=True))
    ent = -np.where(p > 0, p * np.where(p > 0, logp, 0), 0).sum(-1).astype(np.float32)
    srt = np.sort(logits.astype(np.float64), -1)
    return x0, conf, ent, srt[:, -1] - srt[:, -2]


def _replay(lm, prompt, out, kind, spb=None, row=0, eos_inf=False):
    """Per forward t of row `row`: dict(t, block, refresh, x0, conf, ent, margin, masked, committed).

    The carried predictions are those the step's rule reads (after this forward's update)."""
    cfg, model = lm.config, (lm.cache_api if isinstance(lm, Edited) else _cache_api_module(lm.model))
    traj, tokens, n = out["trajectory"][row], out["tokens"][row], int(out["nfe"][row])
    shifted = cfg.shifted_logits
    carried = None
    prev_block, refresh_cache = -1, None
    for t in range(1, n + 1):
        if spb is not None:
            block = (t - 1) // spb
        else:  # every step of a dynamic rule commits in its block (an exit fills it too)
            block = min(j // K for j in np.flatnonzero(traj == t))
        masked = (traj == 0) | (traj >= t)
        canvas = _canvas(prompt[row], tokens, masked, cfg.mask_token_id)
        refresh = block != prev_block
        s = block * K
        if refresh:  # a fresh cache, filled by the refresh of this canvas
            raw, refresh_cache = _fwd(model, cfg, canvas)
            gen = raw[0, P - 1:P - 1 + G] if shifted else raw[0, P:P + G]
            carried = [a.copy() for a in _stats(_prep(gen, cfg, eos_inf))]
            predicted = np.arange(G)
        else:  # the window of the current canvas on the cache of the block's refresh
            w0, T, keep = _window(kind, s)
            raw, _ = _fwd(model, cfg, canvas, w0, T, refresh_cache, keep)
            first = w0 - P
            if shifted:
                predicted, rows = first + np.arange(1, T), raw[0, :T - 1]
            else:
                predicted, rows = first + np.arange(T), raw[0]
            for a, new in zip(carried, _stats(_prep(rows, cfg, eos_inf))):
                a[predicted] = new
        prev_block = block
        x0, conf, ent, margin = carried
        yield dict(t=t, block=block, refresh=refresh, x0=x0.copy(), conf=conf.copy(), ent=ent.copy(),
                   margin=margin.copy(), masked=masked, committed=traj == t, predicted=predicted)


def _check_basics(out, row=0, nfe=None):
    traj = out["trajectory"][row]
    n = int(out["nfe"][row])
    if nfe is not None:
        assert n == nfe
    assert (traj >= 1).all() and (traj <= n).all(), "every position is committed, by a forward that happened"
    for b in range(NB - 1):  # blocks complete left to right
        assert traj[b * K:(b + 1) * K].max() < traj[(b + 1) * K:(b + 2) * K].min()


def _by_conf(cands, score, descending=True):
    sign = -1.0 if descending else 1.0
    return sorted(cands, key=lambda j: (sign * float(score[j]), j))


def _expected_commits(rule, cands, step, kw, quota):
    if rule == "quota":
        return set(_by_conf(cands, step["conf"])[:quota])
    if rule == "threshold":
        return {j for j in cands if step["conf"][j] >= np.float32(kw["threshold"])} | {_by_conf(cands, step["conf"])[0]}
    if rule == "entropy":
        return {j for j in cands if step["ent"][j] <= np.float32(kw["threshold"])} | {
            _by_conf(cands, step["ent"], descending=False)[0]}
    if rule == "factor":
        order = _by_conf(cands, step["conf"])
        acc = {order[0]}
        for rank in range(2, len(order) + 1):
            if step["conf"][order[rank - 1]] >= np.float32(1) - np.float32(kw["factor"]) / np.float32(rank + 1):
                acc.add(order[rank - 1])
            else:
                break
        return acc
    raise AssertionError(rule)


def _quota_schedule(n, spb):
    return [n // spb + (1 if i < n % spb else 0) for i in range(spb)]


# --------------------------------------------------------------------------------- the replay


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("kind", CACHE_KINDS)
@pytest.mark.parametrize("rule, kw", [("quota", dict(steps=6)), ("threshold", dict(steps=G, threshold=0.09)),
                                      ("entropy", dict(steps=G, threshold=4.3)), ("factor", dict(steps=G, factor=3.0))])
def test_commits_follow_the_rule_on_carried_predictions(models, family, kind, rule, kw):
    lm, prompt = models[family], _prompt(1 + len(rule))
    out = reference_generate_cached(lm, prompt, cache=kind, gen_length=G, block_length=K, rule=rule, **kw)
    spb = kw["steps"] // NB if rule == "quota" else None
    shifted = lm.config.shifted_logits
    multi = 0
    for row in range(2):
        _check_basics(out, row, nfe=kw["steps"] if rule == "quota" else None)
        multi += _check_replay(lm, prompt, out, kind, rule, kw, spb, row, shifted)
    if rule != "quota":
        assert multi > 0, "the setting should commit several tokens at some step"


def _check_replay(lm, prompt, out, kind, rule, kw, spb, row, shifted):
    multi = 0
    quota = None
    for step in _replay(lm, prompt, out, kind, spb, row):
        s, e = step["block"] * K, (step["block"] + 1) * K
        committed = np.flatnonzero(step["committed"])
        assert all(s <= j < e for j in committed), "commits stay in the current block"
        np.testing.assert_array_equal(out["tokens"][row][committed], step["x0"][committed])
        cands = [j for j in range(s, e) if step["masked"][j]]
        if shifted and step["refresh"]:
            assert list(committed) == [s], "Dream's refresh commits exactly the block's first position"
            quota = iter(_quota_schedule(len(cands) - 1, spb - 1)) if spb else None
            continue
        if step["refresh"]:
            quota = iter(_quota_schedule(len(cands), spb)) if spb else None
        expected = _expected_commits(rule, cands, step, kw, next(quota) if quota else 0)
        assert set(committed) == expected, f"row {row} step {step['t']}"
        multi += len(committed) > 1
    return multi


# ------------------------------------------------------------------------- refresh vs uncached


@pytest.mark.parametrize("kind", CACHE_KINDS)
@pytest.mark.parametrize("rule, kw", [("quota", dict(steps=4)), ("threshold", dict(steps=G, threshold=0.09))])
def test_one_block_refresh_equals_the_uncached_first_step(models, kind, rule, kw):
    lm, prompt = models["llada"], _prompt(3, batch=2)
    common = dict(gen_length=G, block_length=G, rule=rule, **kw)
    out = reference_generate_cached(lm, prompt, cache=kind, **common)
    ref = reference_generate(lm, prompt, **common)
    first = ref["trajectory"] == 1
    assert first.any()
    np.testing.assert_array_equal(out["trajectory"] == 1, first)
    np.testing.assert_array_equal(out["tokens"][first], ref["tokens"][first])
    if rule == "quota":  # a later step sees the approximation
        assert not np.array_equal(out["trajectory"], ref["trajectory"])


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("kind", CACHE_KINDS)
def test_exit_at_the_refresh_equals_the_uncached_exit(models, family, kind):
    lm, prompt = models[family], _prompt(4, batch=2)
    kw = dict(gen_length=G, block_length=K, steps=G, rule="threshold", threshold=0.9, exit="linear",
              tau_high=-1.0, tau_low=-1.0)
    out = reference_generate_cached(lm, prompt, cache=kind, **kw)
    ref = reference_generate(lm, prompt, **kw)
    np.testing.assert_array_equal(out["nfe"], [1, 1])
    for key in out:
        np.testing.assert_array_equal(out[key], ref[key])


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("kind", CACHE_KINDS)
def test_cached_logits_equal_uncached_only_on_the_refresh_canvas(models, family, kind):
    lm = models[family]
    cfg, model = lm.config, (lm.cache_api if isinstance(lm, Edited) else _cache_api_module(lm.model))
    rng = np.random.default_rng(5)
    prompt = _prompt(5, batch=1)
    tokens = rng.integers(0, 96, G)
    masked = np.ones(G, bool)
    masked[:K] = False  # block 0 decoded, block 1 masked
    masked[K + 2] = False
    canvas = _canvas(prompt[0], tokens, masked, cfg.mask_token_id)
    s = K
    w0, T, keep = _window(kind, s)
    plain = _uncached(lm, canvas)
    refreshed, kv = _fwd(model, cfg, canvas)
    np.testing.assert_allclose(refreshed[:1], plain, atol=1e-5, rtol=0)
    same, _ = _fwd(model, cfg, canvas, w0, T, kv, keep)
    np.testing.assert_allclose(same[:1], plain[:, w0:w0 + T], atol=1e-5, rtol=0)
    # commit two more tokens of the block: the window now differs from an uncached forward
    masked2 = masked.copy()
    masked2[[K, K + 5]] = False
    canvas2 = _canvas(prompt[0], tokens, masked2, cfg.mask_token_id)
    approx, _ = _fwd(model, cfg, canvas2, w0, T, kv, keep)
    exact = _uncached(lm, canvas2)
    assert np.abs(approx[:1] - exact[:, w0:w0 + T]).max() > 1e-3


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("kind", CACHE_KINDS)
def test_trace_windows_and_cache_slots(models, family, kind):
    lm, prompt = models[family], _prompt(6, batch=2)
    cfg = lm.config
    trace = []
    out = reference_generate_cached(lm, prompt, cache=kind, gen_length=G, block_length=K, steps=6, trace=trace)
    spb = 6 // NB
    assert len(trace) == 6 and [r["step"] for r in trace] == [0, 1, 2] * NB
    L = P + G
    cached_diff = 0.0
    for rec in trace:
        s = rec["block"] * K
        k_before, v_before = rec["cache_before"]
        k_after, v_after = rec["cache_after"]
        if rec["step"] == 0:
            assert (rec["kind"], rec["w0"], rec["T"]) == ("refresh", 0, L)
            raw = lm.logits(rec["canvas"])
            np.testing.assert_allclose(rec["raw"], raw, atol=1e-5, rtol=0)  # the refresh is the uncached forward
            refresh_k = k_after
            refresh_canvas = rec["canvas"]
            continue
        w0, T, _ = _window(kind, s)
        assert (rec["kind"], rec["w0"], rec["T"]) == ("cached", w0, T)
        written = np.zeros(L, bool)
        written[P + s:P + s + K if kind == "dual" else L] = True
        for layer in range(cfg.num_layers):
            for before, after in ((k_before[layer], k_after[layer]), (v_before[layer], v_after[layer])):
                np.testing.assert_array_equal(after[:, :, ~written], before[:, :, ~written])
            # untouched slots still hold the K/V of the block's refresh
            np.testing.assert_array_equal(k_after[layer][:, :, ~written], refresh_k[layer][:, :, ~written])
        # the last layer's K of every written slot moved away from the refresh (the block changed since)
        last = cfg.num_layers - 1
        moved = np.abs(k_after[last] - refresh_k[last]).max(axis=(1, 3))  # [B, L]
        assert (moved[:, written] > 1e-6).all()
        # layer 0 K/V depend on the slot's token only: unchanged tokens keep them, new ones are rewritten
        changed = rec["canvas"] != refresh_canvas  # [B, L]
        moved0 = np.abs(k_after[0] - refresh_k[0]).max(axis=(1, 3))
        assert changed.any() and (moved0[changed] > 1e-6).all()
        assert (moved0[~changed] < 1e-5).all()
        # the window's logits are an approximation of the uncached forward of the same canvas
        exact = lm.logits(rec["canvas"])[:, w0:w0 + T]
        cached_diff = max(cached_diff, float(np.abs(rec["raw"] - exact).max()))
    assert cached_diff > 1e-3
    _check_basics(out, 0, nfe=6)
    assert spb == 3


# ------------------------------------------------------------------------------- NFE, order


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("kind", CACHE_KINDS)
@pytest.mark.parametrize("steps", [4, 6, 16])
def test_quota_nfe_and_per_step_counts(models, family, kind, steps):
    lm = models[family]
    out = reference_generate_cached(lm, _prompt(7, batch=2), cache=kind, gen_length=G, block_length=K, steps=steps)
    spb = steps // NB
    if lm.config.shifted_logits:
        quota = [1] + _quota_schedule(K - 1, spb - 1)  # the refresh commits the block's first position
    else:
        quota = _quota_schedule(K, spb)
    for r in range(2):
        _check_basics(out, r, nfe=steps)
        traj = out["trajectory"][r]
        for b in range(NB):
            counts = [int((traj[b * K:(b + 1) * K] == b * spb + i + 1).sum()) for i in range(spb)]
            assert counts == quota
            if lm.config.shifted_logits:
                assert traj[b * K] == b * spb + 1


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("kind", CACHE_KINDS)
def test_dynamic_rule_extremes(models, family, kind):
    lm, prompt = models[family], _prompt(8, batch=2)
    kw = dict(cache=kind, gen_length=G, block_length=K, steps=G)
    allin = reference_generate_cached(lm, prompt, rule="threshold", threshold=1e-9, **kw)
    one = reference_generate_cached(lm, prompt, rule="threshold", threshold=1.5, **kw)
    ent_all = reference_generate_cached(lm, prompt, rule="entropy", threshold=1e9, **kw)
    fac_all = reference_generate_cached(lm, prompt, rule="factor", factor=1e6, **kw)
    shifted = lm.config.shifted_logits
    for r in range(2):
        _check_basics(one, r, nfe=G)
        assert sorted(one["trajectory"][r]) == list(range(1, G + 1))
        for res in (allin, ent_all, fac_all):
            if shifted:  # refresh: the first position; first cached step: the rest of the block
                _check_basics(res, r, nfe=2 * NB)
                expected = np.concatenate([[2 * b + 1] + [2 * b + 2] * (K - 1) for b in range(NB)])
            else:
                _check_basics(res, r, nfe=NB)
                expected = np.repeat(np.arange(1, NB + 1), K)
            np.testing.assert_array_equal(res["trajectory"][r], expected)


@pytest.mark.parametrize("kind", CACHE_KINDS)
@pytest.mark.parametrize("rule, kw", [("quota", dict(steps=6)), ("threshold", dict(steps=G, threshold=0.09)),
                                      ("entropy", dict(steps=G, threshold=4.3))])
def test_dream_refresh_commits_only_the_block_first_position(models, kind, rule, kw):
    lm, prompt = models["dream"], _prompt(9, batch=2)
    out = reference_generate_cached(lm, prompt, cache=kind, gen_length=G, block_length=K, rule=rule, **kw)
    canvas = np.concatenate([prompt, np.full((2, G), lm.config.mask_token_id)], axis=1)
    for r in range(2):
        _check_basics(out, r)
        traj = out["trajectory"][r]
        for b in range(NB):
            s = b * K
            first_step = traj[s:s + K].min()
            assert traj[s] == first_step and (traj[s:s + K] == first_step).sum() == 1
            # the refresh canvas: the prompt, earlier blocks decoded, this and later blocks masked
            canvas[r, P:P + s] = out["tokens"][r, :s]
            gen = step_logits(lm, _pair(canvas[r:r + 1]), np.ones((2, P + G)), P, G)[0]
            assert out["tokens"][r, s] == gen[s].argmax()


# ------------------------------------------------------------------------------------- exits


def _check_exit_replay(lm, prompt, out, kind, exit, kw, row):
    n = int(out["nfe"][row])
    assert (out["trajectory"][row] >= 1).all()
    exited = False
    for step in _replay(lm, prompt, out, kind, row=row):
        hit = float(np.mean(step["margin"])) >= exit_tau(exit, (step["t"] - 1) / G, **kw)
        if step["t"] < n:
            assert not hit
        elif hit:
            exited = True  # every mask left (all blocks) takes the carried x0
            assert (step["committed"] == step["masked"]).all()
            m = step["masked"]
            np.testing.assert_array_equal(out["tokens"][row][m], step["x0"][m])
    assert exited or n == G
    return exited and 1 < n < G


def test_exit_replay_on_carried_margins(models):
    """Exit happens at the first forward whose mean CARRIED top-2 gap reaches tau(nfe_before / S)."""
    mid_way = 0
    for family in ("llada", "dream"):
        prompt = _prompt(10)
        canvas = np.concatenate([prompt, np.full((2, G), models[family].config.mask_token_id)], axis=1)
        g1 = float(np.mean(_stats(step_logits(models[family], canvas, np.ones_like(canvas), P, G)[0])[3]))
        for kind in CACHE_KINDS:
            for exit in ("linear", "cosine", "exp", "prophet"):
                lm = Edited(models[family], scale=(6.0 if exit == "prophet" else 4.0) / g1)
                kw = dict(tau_high=7.5, tau_low=0.0, exit_k=4.0)
                out = reference_generate_cached(lm, prompt, cache=kind, gen_length=G, block_length=K, steps=G,
                                                exit=exit, **kw)  # quota: one commit per step
                for row in range(2):
                    mid_way += _check_exit_replay(lm, prompt, out, kind, exit, kw, row)
    assert mid_way > 0


# ---------------------------------------------------------------------------------------- EOS


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("kind", CACHE_KINDS)
def test_stop_at_eos_and_eos_options(models, family, kind):
    base, prompt, j0 = models[family], _prompt(11, batch=2), 3
    eos = base.config.eos_token_id
    slot = P + j0 - (1 if base.config.shifted_logits else 0)  # the raw output read by position j0
    lm = Edited(base, boosts=[(0, slot, eos, 50.0)])
    kw = dict(cache=kind, gen_length=G, block_length=K, steps=G, rule="threshold", threshold=1.5)
    out = reference_generate_cached(lm, prompt, stop_at_eos=True, **kw)
    tokens, traj, n = out["tokens"][0], out["trajectory"][0], int(out["nfe"][0])
    assert tokens[j0] == eos and traj[j0] == (2 if base.config.shifted_logits else 1)
    first = int(np.flatnonzero(tokens == eos)[0])
    assert n <= K and (traj >= 1).all() and (traj <= n).all()
    assert traj[:first + 1].max() == n
    np.testing.assert_array_equal(tokens[K:], eos)
    np.testing.assert_array_equal(traj[K:], n)
    alone = reference_generate_cached(base, _pair(prompt[1:]), stop_at_eos=True, **kw)
    for key in out:
        np.testing.assert_array_equal(out[key][1], alone[key][0])
    banned = reference_generate_cached(lm, prompt, stop_at_eos=True, logits_eos_inf=True, **kw)
    np.testing.assert_array_equal(banned["nfe"], [G, G])
    assert not (banned["tokens"] == eos).any()
    if not base.config.shifted_logits:  # confidence -inf: the boosted EOS is committed last in its block
        last = reference_generate_cached(lm, prompt, confidence_eos_eot_inf=True,
                                         **dict(kw, rule="quota", steps=G))
        assert last["tokens"][0, j0] == eos and last["trajectory"][0, j0] == K


# ------------------------------------------------------------------------------- batch rows


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("kind", CACHE_KINDS)
@pytest.mark.parametrize("rule", ["quota", "threshold"])
def test_left_padded_rows_equal_single_runs(models, family, kind, rule):
    lm = models[family]
    short, long = _prompt(12, batch=1, length=4), _prompt(13, batch=1, length=P)
    pad = long.shape[1] - short.shape[1]
    batch = np.concatenate([np.pad(short, ((0, 0), (pad, 0)), constant_values=lm.config.pad_token_id), long])
    mask = np.ones_like(batch)
    mask[0, :pad] = 0
    kw = dict(cache=kind, gen_length=G, block_length=K, steps=8 if rule == "quota" else G, rule=rule, threshold=0.09)
    out = reference_generate_cached(lm, batch, mask, **kw)
    for row, prompt in enumerate((short, long)):
        alone = reference_generate_cached(lm, _pair(prompt), **kw)  # two copies: the batch-2 compiles serve
        for key in out:
            np.testing.assert_array_equal(out[key][row], alone[key][0], err_msg=f"row {row} {key}")


@pytest.mark.parametrize("kind", CACHE_KINDS)
def test_one_forward_per_step_for_the_whole_batch(models, kind):
    lm = Edited(models["llada"])
    out = reference_generate_cached(lm, _prompt(14), cache=kind, gen_length=G, block_length=K, steps=G,
                                    rule="threshold", threshold=0.09)
    per_block = [[len(set(out["trajectory"][r, b * K:(b + 1) * K])) for b in range(NB)] for r in range(2)]
    np.testing.assert_array_equal(out["nfe"], [sum(c) for c in per_block])
    assert lm.calls == sum(max(c[b] for c in per_block) for b in range(NB))
    assert len({tuple(c) for c in per_block}) > 1


def test_argument_checks(models):
    llada, dream, prompt = models["llada"], models["dream"], _prompt(0)
    kw = dict(gen_length=G, block_length=K)
    with pytest.raises(ValueError, match="unknown cache"):
        reference_generate_cached(llada, prompt, cache="full", steps=G, **kw)
    with pytest.raises(ValueError, match="at least 2 steps per block"):
        reference_generate_cached(dream, prompt, cache="dual", steps=NB, **kw)
    with pytest.raises(ValueError, match="needs threshold"):
        reference_generate_cached(llada, prompt, cache="prefix", steps=G, rule="threshold", **kw)
    with pytest.raises(ValueError, match="multiple of the number of blocks"):
        reference_generate_cached(llada, prompt, cache="prefix", steps=3, **kw)
    # one step per block is fine without a shift: the refresh commits the whole block
    out = reference_generate_cached(llada, prompt, cache="dual", steps=NB, **kw)
    np.testing.assert_array_equal(out["trajectory"][0], np.repeat(np.arange(1, NB + 1), K))


# ----------------------------------------------------------------------------- sampled, engine vs reference
# SPEC.md, Randomness: only the current block is sampled, each position j from fold_in(sample_key, j),
# so the prefix window (the whole region) and the dual window (the block) read the same noise, and an
# early exit fills the other positions with the argmax. (engine cache, reference cache, engine, reference)
SAMPLED = {
    "prefix-sched": ("prefix", "prefix", dict(method="sched", schedule="cosine", tau_high=6.0, tau_low=0.0),
                     dict(rule="quota", exit="cosine", tau_high=6.0, tau_low=0.0)),
    "dual-sched": ("dual", "dual", dict(method="sched", schedule="cosine", tau_high=6.0, tau_low=0.0),
                   dict(rule="quota", exit="cosine", tau_high=6.0, tau_low=0.0)),
    "prefix-threshold-x64": ("prefix", "prefix", dict(method="fast-dllm", threshold=0.2, gumbel_x64=True),
                             dict(rule="threshold", threshold=0.2, gumbel_x64=True)),
    # an exit at the first step: the refresh is the uncached forward, so the uncached engine must agree
    "none-exit-at-once": ("none", "dual", dict(method="sched", schedule="linear", tau_high=-1.0, tau_low=-1.0),
                          dict(rule="quota", exit="linear", tau_high=-1.0, tau_low=-1.0)),
}


@pytest.mark.parametrize("family,case", [("llada", c) for c in sorted(SAMPLED)] + [("dream", "prefix-sched"), ("dream", "dual-sched")])
def test_engine_samples_like_the_cached_reference(models, family, case):
    lm = models[family]
    engine_cache, ref_cache, engine_kwargs, ref_kwargs = SAMPLED[case]
    ids = _prompt(16, batch=2)
    ids[0, :2] = lm.config.pad_token_id
    mask = np.ones_like(ids)
    mask[0, :2] = 0
    shape = dict(gen_length=G, block_length=K, steps=8)
    ref = reference_generate_cached(lm, ids, mask, cache=ref_cache, temperature=2.0, seed=5, **shape, **ref_kwargs)
    out = lm.generate(ids, mask, cache=engine_cache, prompt_bucket=1, temperature=2.0, seed=5, **shape, **engine_kwargs)
    for key in ("tokens", "nfe", "trajectory"):
        np.testing.assert_array_equal(getattr(out, key), ref[key], err_msg=key)
    # the noise mattered (temperature is traced: the greedy run reuses the program)
    greedy = lm.generate(ids, mask, cache=engine_cache, prompt_bucket=1, temperature=0.0, **shape, **engine_kwargs)
    assert not np.array_equal(greedy.tokens, out.tokens)
    if case == "none-exit-at-once":  # block 0 sampled, the rest of the region is the first step's argmax
        np.testing.assert_array_equal(out.nfe, [1, 1])
        np.testing.assert_array_equal(out.tokens[:, K:], greedy.tokens[:, K:])
        assert not np.array_equal(out.tokens[:, :K], greedy.tokens[:, :K])
