"""Properties of the sampled-decode reference (tests/decode_reference_sampling.py) on tiny random models.

Counts are read back from trajectories: the commits of forward k of a row are the positions
whose trajectory is k. Where a check replays a step, the canvas before step k is rebuilt from the
trajectory (committed before k iff 0 < trajectory < k) and the rule is written out again here,
vectorised, with the random draws taken from SPEC.md's key schedule.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decode_reference_sampling import dream_process, reference_generate

G, K, P = 16, 8, 6  # generation length, block length, prompt length
NB = G // K


@pytest.fixture(scope="module")
def models(loaded):
    return {name: loaded(name) for name in ("llada", "dream")}


def _prompt(seed, batch=2, length=P):
    ids = np.random.default_rng(seed).integers(0, 96, (batch, length))
    mask = np.ones_like(ids)
    if batch > 1:
        mask[0, :2] = 0  # row 0 is left-padded
    return ids, mask


def _pad(lm, ids, mask):
    ids = ids.copy()
    ids[mask == 0] = lm.config.pad_token_id
    return ids


class Counting:
    """An LM look-alike that counts logits calls."""

    def __init__(self, lm):
        self.lm, self.config, self.calls = lm, lm.config, 0

    def logits(self, ids, mask=None):
        self.calls += 1
        return self.lm.logits(ids, mask)


def _step_counts(traj_row, nfe_row):
    return [int(np.sum(traj_row == k)) for k in range(1, int(nfe_row) + 1)]


def _canvas_before(lm, ids, traj, tokens, k):
    """Canvas [B, P+G] before forward k (single-increment trajectories)."""
    gen = np.where((traj > 0) & (traj < k), tokens, lm.config.mask_token_id)
    return np.concatenate([ids, gen], axis=1)


def _region_logits(lm, canvas, mask):
    full = np.concatenate([mask, np.ones((canvas.shape[0], G), mask.dtype)], axis=1)
    raw = lm.logits(canvas, full).astype(np.float32)
    if lm.config.shifted_logits:
        raw = np.concatenate([raw[:, :1], raw[:, :-1]], axis=1)
    out = raw[:, P:P + G].copy()
    out[..., lm.config.mask_token_id] = -np.inf
    return out


def _keys(seed, t):
    return jax.random.split(jax.random.fold_in(jax.random.key(seed), t))


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# ----------------------------------------------------------------------------- quota rule
@pytest.mark.parametrize("kw", [dict(), dict(temperature=1.5), dict(remasking="random"),
                                dict(remasking="random", temperature=0.7)])
def test_quota_commits_quota_every_step(models, kw):
    lm = models["llada"]
    ids, mask = _prompt(1)
    ids = _pad(lm, ids, mask)
    steps = 8  # spb = 4, quota 2 per step
    out = reference_generate(lm, ids, mask, gen_length=G, block_length=K, steps=steps, rule="quota", seed=3, **kw)
    assert out["tokens"].shape == (2, G) and out["trajectory"].shape == (2, G)
    assert (out["tokens"] != lm.config.mask_token_id).all()
    assert out["nfe"].tolist() == [steps, steps]
    for r in range(2):
        assert _step_counts(out["trajectory"][r], steps) == [2] * steps
        for b in range(NB):  # block b is decoded by forwards b*spb+1 .. (b+1)*spb
            blk = out["trajectory"][r, b * K:(b + 1) * K]
            assert blk.min() == b * 4 + 1 and blk.max() == (b + 1) * 4


def test_quota_uneven_quota(models):
    lm = models["llada"]
    ids, mask = _prompt(2, batch=1)
    out = reference_generate(lm, ids, gen_length=G, block_length=K, steps=6, rule="quota", temperature=1.0)
    # n_b = 8 over spb = 3 steps: 3, 3, 2
    assert _step_counts(out["trajectory"][0], 6) == [3, 3, 2, 3, 3, 2]
    assert out["nfe"].tolist() == [6]


def test_quota_done_row_stops_in_last_block(models):
    """SPEC.md's literal reading, pinned: a row is ACTIVE only while not done, so with spb > block
    length the quota-0 steps of earlier blocks still count but the last block stops when it is full
    (8 tokens, blocks of 4, 12 steps: 6 + 4 forwards, not 12)."""
    lm = models["llada"]
    ids, _ = _prompt(3, batch=1)
    out = reference_generate(lm, ids, gen_length=8, block_length=4, steps=12, rule="quota")
    assert out["nfe"].tolist() == [10]
    assert _step_counts(out["trajectory"][0], 10) == [1, 1, 1, 1, 0, 0, 1, 1, 1, 1]


def test_quota_tiny_temperature_is_greedy(models):
    lm = models["llada"]
    ids, mask = _prompt(5)
    ids = _pad(lm, ids, mask)
    kw = dict(gen_length=G, block_length=K, steps=8, rule="quota")
    greedy = reference_generate(lm, ids, mask, **kw)
    cold = reference_generate(lm, ids, mask, temperature=1e-7, seed=9, **kw)
    for name in ("tokens", "nfe", "trajectory"):
        np.testing.assert_array_equal(greedy[name], cold[name])


def test_random_remasking_seeds(models):
    lm = models["llada"]
    ids, mask = _prompt(6)
    ids = _pad(lm, ids, mask)
    kw = dict(gen_length=G, block_length=K, steps=16, rule="quota", remasking="random")
    a = reference_generate(lm, ids, mask, seed=1, **kw)
    a2 = reference_generate(lm, ids, mask, seed=1, **kw)
    b = reference_generate(lm, ids, mask, seed=2, **kw)
    for name in ("tokens", "nfe", "trajectory"):
        np.testing.assert_array_equal(a[name], a2[name])
    assert not np.array_equal(a["trajectory"], b["trajectory"])
    assert not np.array_equal(a["tokens"], b["tokens"])
    # one commit per step (spb = 8 = K); forward k's commit is the masked block position with the
    # largest u of select_key from fold_in(key, k - 1)
    for r in range(2):
        assert _step_counts(a["trajectory"][r], 16) == [1] * 16
    for k in range(1, 17):
        u = np.asarray(jax.random.uniform(_keys(1, k - 1)[1], (2, G), jnp.float32))
        b0 = (k - 1) // 8
        for r in range(2):
            lo = b0 * K
            still = [j for j in range(lo, lo + K) if a["trajectory"][r, j] >= k]
            best = still[int(np.argmax(u[r, still]))]
            assert a["trajectory"][r, best] == k


# ----------------------------------------------------------------------------- CFG
def test_cfg_scale_zero_is_off(models):
    lm = Counting(models["llada"])
    ids, mask = _prompt(7)
    ids = _pad(lm, ids, mask)
    kw = dict(gen_length=G, block_length=K, steps=8, rule="quota", temperature=0.5, seed=4)
    plain = reference_generate(lm, ids, mask, **kw)
    calls = lm.calls
    zero = reference_generate(lm, ids, mask, cfg_scale=0.0, **kw)
    assert calls == 8 and lm.calls == 16
    assert plain["nfe"].tolist() == [8, 8]
    for name in ("tokens", "nfe", "trajectory"):
        np.testing.assert_array_equal(plain[name], zero[name])


def test_cfg_counts_two_forwards_and_combines(models):
    lm = Counting(models["llada"])
    ids, mask = _prompt(8)
    ids = _pad(lm, ids, mask)
    s = 1.5
    out = reference_generate(lm, ids, mask, gen_length=G, block_length=K, steps=8, rule="quota", cfg_scale=s)
    assert lm.calls == 16
    assert out["nfe"].tolist() == [16, 16]
    assert (out["trajectory"] % 2 == 0).all() and out["trajectory"].min() == 2
    for r in range(2):
        assert [int(np.sum(out["trajectory"][r] == 2 * k)) for k in range(1, 9)] == [2] * 8
    plain = reference_generate(lm.lm, ids, mask, gen_length=G, block_length=K, steps=8, rule="quota")
    assert not np.array_equal(plain["tokens"], out["tokens"])
    # replay the first step with u + (s + 1)(c - u), the unconditional canvas masking the whole prompt
    M = lm.config.mask_token_id
    canvas = np.concatenate([ids, np.full((2, G), M)], axis=1)
    uncond = canvas.copy()
    uncond[:, :P] = M
    full = np.concatenate([mask, np.ones((2, G), mask.dtype)], axis=1)
    c, u = lm.lm.logits(canvas, full), lm.lm.logits(uncond, full)
    logits = (u + np.float32(s + 1) * (c - u))[:, P:P + G]
    logits[..., M] = -np.inf
    x0 = logits.argmax(-1)
    conf = np.take_along_axis(_softmax(logits), x0[..., None], -1)[..., 0]
    for r in range(2):
        committed = np.flatnonzero(out["trajectory"][r] == 2)
        assert committed.tolist() == np.sort(np.argsort(-conf[r, :K], kind="stable")[:2]).tolist()
        assert out["tokens"][r, committed].tolist() == x0[r, committed].tolist()


# ----------------------------------------------------------------------------- Dream
@pytest.mark.parametrize("kw", [dict(), dict(temperature=0.8, top_p=0.9)])
def test_dream_origin(models, kw):
    lm = models["dream"]
    ids, mask = _prompt(9)
    ids = _pad(lm, ids, mask)
    steps, seed, spb = 8, 5, 4
    out = reference_generate(lm, ids, mask, gen_length=G, block_length=K, steps=steps, rule="dream",
                             alg="origin", seed=seed, **kw)
    assert (out["tokens"] != lm.config.mask_token_id).all()
    assert out["nfe"].tolist() == [steps, steps]
    ts = np.asarray(jnp.linspace(1.0, 1e-3, spb + 1, dtype=jnp.float32))
    for r in range(2):
        for b in range(NB):  # the last step of a block commits what is left: nothing outlives it
            blk = out["trajectory"][r, b * K:(b + 1) * K]
            assert blk.min() >= b * spb + 1 and blk.max() <= (b + 1) * spb
    # forward 1 commits exactly the block-0 positions with u < 1 - s/t
    u = np.asarray(jax.random.uniform(_keys(seed, 0)[1], (2, G), jnp.float32))
    p = np.float32(1) - ts[1] / ts[0]
    for r in range(2):
        assert np.flatnonzero(out["trajectory"][r] == 1).tolist() == np.flatnonzero(u[r, :K] < p).tolist()


def _dream_expected_counts(B, spb, nb, block, eps=1e-3):
    ts = np.asarray(jnp.linspace(1.0, eps, spb + 1, dtype=jnp.float32))
    counts = []
    for _ in range(nb):
        left = block
        for i in range(spb):
            mean = np.float32(left * B) / np.float32(B)
            if i == spb - 1:
                n = math.floor(mean)
            else:
                n = math.floor(np.float32(mean * (np.float32(1) - ts[i + 1] / ts[i])))
            n = min(n, left)
            counts.append(n)
            left -= n
    return counts


@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy"])
@pytest.mark.parametrize("steps", [4, 8, 12])
def test_dream_counts_follow_linspace(models, alg, steps):
    lm = models["dream"]
    ids, mask = _prompt(10)
    ids = _pad(lm, ids, mask)
    out = reference_generate(lm, ids, mask, gen_length=G, block_length=K, steps=steps, rule="dream", alg=alg,
                             temperature=0.6, top_p=0.95, seed=1)
    expect = _dream_expected_counts(2, steps // NB, NB, K)
    assert sum(expect) == G  # the last step of each block takes the rest
    assert out["nfe"].tolist() == [steps, steps]
    for r in range(2):
        assert _step_counts(out["trajectory"][r], steps) == expect
    assert (out["tokens"] != lm.config.mask_token_id).all()


def test_dream_steps_equal_gen_length_quirk(models):
    """Upstream quirk (a): with steps == gen_length, step 0 commits floor(G * 0.999 / G) = 0 tokens."""
    lm = models["dream"]
    ids, _ = _prompt(11, batch=1)
    out = reference_generate(lm, ids, gen_length=K, block_length=K, steps=K, rule="dream", alg="maskgit_plus")
    counts = _step_counts(out["trajectory"][0], K)
    assert out["nfe"].tolist() == [K]
    assert counts[0] == 0 and counts[-1] >= 2 and sum(counts) == K
    assert counts == _dream_expected_counts(1, K, 1, K)


def test_dream_top_k_one(models):
    lm = models["dream"]
    ids, mask = _prompt(13)
    ids = _pad(lm, ids, mask)
    kw = dict(gen_length=G, block_length=K, steps=8, rule="dream", seed=2)
    # origin: selection ignores confidence, so top_k=1 sampling is greedy decoding
    greedy = reference_generate(lm, ids, mask, alg="origin", **kw)
    hot = reference_generate(lm, ids, mask, alg="origin", temperature=1.3, top_k=1, **kw)
    for name in ("tokens", "nfe", "trajectory"):
        np.testing.assert_array_equal(greedy[name], hot[name])
    warm = reference_generate(lm, ids, mask, alg="origin", temperature=1.3, **kw)
    assert not np.array_equal(greedy["tokens"], warm["tokens"])
    # maskgit_plus: with top_k=1 every confidence is 1, so commits go left to right, sampled or not
    a = reference_generate(lm, ids, mask, alg="maskgit_plus", top_k=1, **kw)
    b = reference_generate(lm, ids, mask, alg="maskgit_plus", top_k=1, temperature=2.0, **kw)
    for name in ("tokens", "nfe", "trajectory"):
        np.testing.assert_array_equal(a[name], b[name])
    for r in range(2):
        assert (np.diff(a["trajectory"][r]) >= 0).all()


@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy"])
def test_dream_alg_temp_same_counts(models, alg):
    lm = models["dream"]
    ids, mask = _prompt(14)
    ids = _pad(lm, ids, mask)
    kw = dict(gen_length=G, block_length=K, steps=8, rule="dream", alg=alg, seed=3)
    cold = reference_generate(lm, ids, mask, **kw)
    hot = reference_generate(lm, ids, mask, alg_temp=5.0, **kw)
    np.testing.assert_array_equal(cold["nfe"], hot["nfe"])
    for r in range(2):
        assert _step_counts(cold["trajectory"][r], 8) == _step_counts(hot["trajectory"][r], 8)
    assert not np.array_equal(cold["trajectory"], hot["trajectory"])
    again = reference_generate(lm, ids, mask, alg_temp=5.0, **kw)
    np.testing.assert_array_equal(hot["trajectory"], again["trajectory"])


def test_dream_process_top_p_top_k():
    logits = np.log(np.array([0.05, 0.5, 0.3, 0.15], np.float32))
    # top_p 0.7: sorted probs .5 .3 .15 .05, cum .5 .8 .95 1 -> the first past 0.7 (.3) stays
    l, p = dream_process(logits, 0.0, 0.7, None)
    assert np.isneginf(l[[0, 3]]).all() and np.isfinite(l[[1, 2]]).all()
    np.testing.assert_allclose(p, [0, 0.5 / 0.8, 0.3 / 0.8, 0], rtol=1e-6)
    # top_p below the largest probability keeps just the top token
    _, p = dream_process(logits, 0.0, 0.1, None)
    np.testing.assert_array_equal(p, [0, 1, 0, 0])
    # top_k keeps ties with the k-th largest; temperature divides first
    l, _ = dream_process(np.array([1.0, 3.0, 2.0, 2.0], np.float32), 2.0, 1.0, 2)
    np.testing.assert_array_equal(l, [-np.inf, 1.5, 1.0, 1.0])
    l, _ = dream_process(np.array([1.0, 3.0, 2.0, 2.0], np.float32), 0.0, 1.0, 10)
    np.testing.assert_array_equal(l, [1.0, 3.0, 2.0, 2.0])


def test_bad_arguments(models):
    lm = models["llada"]
    ids, _ = _prompt(0, batch=1)
    with pytest.raises(ValueError):
        reference_generate(lm, ids, gen_length=G, block_length=6, steps=8, rule="quota")
    with pytest.raises(ValueError):
        reference_generate(lm, ids, gen_length=G, block_length=K, steps=5, rule="quota")
    with pytest.raises(ValueError):
        reference_generate(lm, ids, gen_length=G, block_length=K, steps=8, rule="threshold")
    with pytest.raises(ValueError):
        reference_generate(lm, ids, gen_length=G, block_length=K, steps=8, rule="dream", alg="nope")
    with pytest.raises(ValueError):
        reference_generate(lm, ids, gen_length=G, block_length=K, steps=8, rule="quota", top_k=3)


# ----------------------------------------------------------------------------- full replays
def _canvas(ids, gen):
    return np.concatenate([ids, gen], axis=1)


def _logits_of(lm, ids, mask, gen, cfg_scale):
    """[B, G, V] logits of a canvas as SPEC.md builds them (CFG, shift, mask column -inf)."""
    M = lm.config.mask_token_id
    full = np.concatenate([mask, np.ones_like(gen)], axis=1)
    raw = lm.logits(_canvas(ids, gen), full)
    if cfg_scale > 0:
        uncond = _canvas(np.full_like(ids, M), gen)
        u = lm.logits(uncond, full)
        raw = u + np.float32(cfg_scale + 1) * (raw - u)
    if lm.config.shifted_logits:
        raw = np.concatenate([raw[:, :1], raw[:, :-1]], axis=1)
    out = raw[:, P:P + G].copy()
    out[..., M] = -np.inf
    return out


def _replay(lm, ids, mask, out, *, steps, rule, remasking="low_confidence", temperature=0.0, cfg_scale=0.0,
            alg="maskgit_plus", alg_temp=0.0, top_p=1.0, top_k=None, seed=0, eps=1e-3):
    """Re-derive every forward of a run from its trajectory and check its commits and tokens."""
    B, V, M = ids.shape[0], lm.config.vocab_size, lm.config.mask_token_id
    per = 2 if cfg_scale > 0 else 1
    spb = steps // NB
    assert out["nfe"].tolist() == [per * steps] * B
    traj, tokens = out["trajectory"], out["tokens"]
    ts = np.asarray(jnp.linspace(1.0, eps, spb + 1, dtype=jnp.float32))
    for k in range(1, steps + 1):
        b, i = divmod(k - 1, spb)
        gen = np.where((traj > 0) & (traj < per * k), tokens, M)
        logits = _logits_of(lm, ids, mask, gen, cfg_scale)[:, b * K:(b + 1) * K]
        sample_key, select_key = _keys(seed, k - 1)
        # the block's noise: position j draws [B, V] from fold_in(sample_key, j)
        g = np.stack([np.asarray(jax.random.gumbel(jax.random.fold_in(sample_key, j), (B, V), jnp.float32))
                      for j in range(b * K, (b + 1) * K)], axis=1)
        masked = gen[:, b * K:(b + 1) * K] == M
        if rule == "quota":
            x0 = (logits + np.float32(temperature) * g).argmax(-1) if temperature > 0 else logits.argmax(-1)
            if remasking == "random":
                score = np.asarray(jax.random.uniform(select_key, (B, G), jnp.float32))[:, b * K:(b + 1) * K]
            else:
                score = np.take_along_axis(_softmax(logits), x0[..., None], -1)[..., 0]
            n = [K // spb + (1 if i < K % spb else 0)] * B
        else:
            l = logits / np.float32(temperature) if temperature > 0 else logits.copy()
            if top_p < 1:
                order = np.argsort(-l, axis=-1, kind="stable")
                cum = np.cumsum(_softmax(np.take_along_axis(l, order, -1)), -1)
                drop_sorted = np.concatenate([np.zeros_like(cum[..., :1], bool), cum[..., :-1] > top_p], -1)
                drop = np.zeros_like(drop_sorted)
                np.put_along_axis(drop, order, drop_sorted, -1)
                l = np.where(drop, -np.inf, l)
            if top_k:
                l = np.where(l < np.sort(l, -1)[..., -top_k:][..., :1], -np.inf, l)
            probs = _softmax(l)
            x0 = (l + g).argmax(-1) if temperature > 0 else probs.argmax(-1)
            if alg == "origin":
                u = np.asarray(jax.random.uniform(select_key, (B, G), jnp.float32))[:, b * K:(b + 1) * K]
                p = 1.0 if i == spb - 1 else np.float32(1) - ts[i + 1] / ts[i]
                for r in range(B):
                    want = np.flatnonzero(masked[r] & (u[r] < p)) + b * K
                    got = np.flatnonzero(traj[r] == k)
                    assert got.tolist() == want.tolist(), (k, r)
                    assert tokens[r, got].tolist() == x0[r, got - b * K].tolist()
                continue
            if alg == "maskgit_plus":
                score = np.take_along_axis(probs, x0[..., None], -1)[..., 0]
            elif alg == "topk_margin":
                top2 = np.sort(probs, -1)[..., -2:]
                score = top2[..., 1] - top2[..., 0]
            else:
                score = (probs * np.log(probs + np.float32(1e-10))).sum(-1)
            if alg_temp > 0:
                h = np.asarray(jax.random.gumbel(select_key, (B, G), jnp.float32))[:, b * K:(b + 1) * K]
                score = score / np.float32(alg_temp) + h
            mean = np.float32(masked.sum()) / np.float32(B)
            n_all = math.floor(mean) if i == spb - 1 else math.floor(np.float32(mean * (np.float32(1) - ts[i + 1] / ts[i])))
            n = [min(n_all, int(masked[r].sum())) for r in range(B)]
        for r in range(B):
            s = np.where(masked[r], score[r], -np.inf)
            want = np.sort(np.argsort(-s, kind="stable")[:n[r]]) + b * K
            got = np.flatnonzero(traj[r] == per * k)
            assert got.tolist() == want.tolist(), (k, r)
            assert tokens[r, got].tolist() == x0[r, got - b * K].tolist()


@pytest.mark.parametrize("kw", [
    dict(rule="quota", steps=16, temperature=3.0),
    dict(rule="quota", steps=8, temperature=1.0, remasking="random"),
    dict(rule="quota", steps=8, temperature=0.5, cfg_scale=1.0),
    dict(rule="dream", steps=8, alg="maskgit_plus", temperature=0.7, top_p=0.9),
    dict(rule="dream", steps=12, alg="topk_margin", temperature=0.5, top_k=20, alg_temp=0.3),
    dict(rule="dream", steps=8, alg="entropy", alg_temp=2.0, top_p=0.95),
    dict(rule="dream", steps=8, alg="origin", temperature=1.2, top_p=0.8),
    dict(rule="dream", steps=4, alg="maskgit_plus", temperature=2.0, cfg_scale=0.5),
], ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_replay_every_step(models, kw):
    lm = models["llada" if kw["rule"] == "quota" else "dream"]
    ids, mask = _prompt(15)
    ids = _pad(lm, ids, mask)
    out = reference_generate(lm, ids, mask, gen_length=G, block_length=K, seed=7, **kw)
    assert (out["tokens"] != lm.config.mask_token_id).all()
    _replay(lm, ids, mask, out, seed=7, **kw)
