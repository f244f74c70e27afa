"""Properties of the Python-loop decode reference (tests/decode_reference.py) on tiny random models.

Most checks replay a single-row run: from its trajectory the canvas before every forward
is rebuilt (a position is committed before step t iff 0 < trajectory < t), the logits are
recomputed with lm.logits, and the commits of that step are checked against the rule of
SPEC.md, written out again here.
"""

import dataclasses
import math

import numpy as np
import pytest

from decode_reference import entropy32, exit_tau, reference_generate, softmax32, step_logits

G, K, P = 16, 8, 6  # generation length, block length, prompt length
NB = G // K


@pytest.fixture(scope="module")
def models(loaded):
    return {name: loaded(name) for name in ("llada", "dream")}


def _prompt(seed, batch=1, length=P):
    return np.random.default_rng(seed).integers(0, 96, (batch, length))


class Wrapped:
    """An LM look-alike: the same config (optionally replaced) and logits with edits applied."""

    def __init__(self, lm, scale=1.0, boosts=(), **config_changes):
        self.lm = lm
        self.scale = scale
        self.boosts = boosts  # (row, raw position, column, amount)
        self.config = dataclasses.replace(lm.config, **config_changes) if config_changes else lm.config
        self.calls = 0

    def logits(self, ids, mask=None):
        self.calls += 1
        out = self.lm.logits(ids, mask) * np.float32(self.scale)
        for row, pos, col, amount in self.boosts:
            out[row, pos, col] += amount
        return out


def _gen_logits(lm, canvas, prompt_length, eos_inf=False):
    """[B, G, V] logits of the generation region for one canvas (shift for Dream)."""
    raw = lm.logits(canvas, np.ones_like(canvas))
    if lm.config.shifted_logits:
        raw = np.concatenate([raw[:, :1], raw[:, :-1]], axis=1)
    out = raw[:, prompt_length:prompt_length + G].astype(np.float32)
    out[..., lm.config.mask_token_id] = -np.inf  # SPEC: the mask token is never a prediction
    if eos_inf:
        out[..., lm.config.eos_token_id] = -np.inf
    return out


def _probs(logits):
    z = logits - logits.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _replay(lm, prompt, out, eos_inf=False):
    """For each forward t of a single-row run: (t, logits [G, V], masked-before [G] bool, committed-at-t [G] bool)."""
    traj, tokens = out["trajectory"][0], out["tokens"][0]
    mask_id = lm.config.mask_token_id
    for t in range(1, int(out["nfe"][0]) + 1):
        masked = (traj == 0) | (traj >= t)
        canvas = np.concatenate([prompt[0], np.where(masked, mask_id, tokens)])[None]
        yield t, _gen_logits(lm, canvas, prompt.shape[1], eos_inf)[0], masked, traj == t


def _check_row_basics(out, row=0, nfe=None):
    traj = out["trajectory"][row]
    n = int(out["nfe"][row])
    if nfe is not None:
        assert n == nfe
    assert (traj >= 1).all() and (traj <= n).all(), "every position is committed, by a forward that happened"
    for b in range(NB - 1):  # blocks complete left to right
        assert traj[b * K:(b + 1) * K].max() < traj[(b + 1) * K:(b + 2) * K].min()


# ---------------------------------------------------------------------------------- quota


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("steps, quota", [(6, [3, 3, 2]), (16, [1] * 8), (2, [8])])
def test_quota_counts_nfe_and_block_order(models, family, steps, quota):
    out = reference_generate(models[family], _prompt(0, batch=2), gen_length=G, block_length=K, steps=steps)
    spb = steps // NB
    assert out["tokens"].shape == out["trajectory"].shape == (2, G) and out["nfe"].shape == (2,)
    for r in range(2):
        _check_row_basics(out, r, nfe=steps)
        traj = out["trajectory"][r]
        for b in range(NB):
            counts = [int((traj[b * K:(b + 1) * K] == b * spb + i + 1).sum()) for i in range(spb)]
            assert counts == quota


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_quota_commits_the_most_confident_argmax(models, family):
    lm, prompt, steps = models[family], _prompt(1), 6
    out = reference_generate(lm, prompt, gen_length=G, block_length=K, steps=steps)
    spb = steps // NB
    for t, logits, masked, committed in _replay(lm, prompt, out):
        b = (t - 1) // spb
        block = np.zeros(G, bool)
        block[b * K:(b + 1) * K] = True
        cands = np.flatnonzero(masked & block)
        x0 = logits.argmax(-1)
        conf = _probs(logits)[np.arange(G), x0]
        n = int(committed.sum())
        expected = sorted(cands, key=lambda j: (-conf[j], j))[:n]
        assert set(np.flatnonzero(committed)) == set(expected)
        np.testing.assert_array_equal(out["tokens"][0][committed], x0[committed])


def test_quota_zero_quota_steps_count_but_a_finished_row_stops(models):
    """spb = 6 > K = 4: quota [1, 1, 1, 1, 0, 0]. The empty steps of block 0 count as forwards;
    in the last block the row has no masks after 4 steps, is done and stops (NFE 10, not 12)."""
    out = reference_generate(models["llada"], _prompt(2), gen_length=8, block_length=4, steps=12)
    traj = out["trajectory"][0]
    assert sorted(traj[:4]) == [1, 2, 3, 4]
    assert sorted(traj[4:]) == [7, 8, 9, 10]
    assert out["nfe"][0] == 10


def test_random_remasking(models):
    lm, prompt = models["llada"], _prompt(3)
    kw = dict(gen_length=G, block_length=K, steps=G, remasking="random")
    a = reference_generate(lm, prompt, rng=np.random.default_rng(7), **kw)
    b = reference_generate(lm, prompt, rng=np.random.default_rng(7), **kw)
    greedy = reference_generate(lm, prompt, gen_length=G, block_length=K, steps=G)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    _check_row_basics(a, nfe=G)
    assert sorted(a["trajectory"][0]) == list(range(1, G + 1))  # quota 1 per step
    assert not np.array_equal(a["trajectory"], greedy["trajectory"])
    for t, logits, masked, committed in _replay(lm, prompt, a):
        np.testing.assert_array_equal(a["tokens"][0][committed], logits.argmax(-1)[committed])


# ------------------------------------------------------------------------ dynamic rules


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_threshold_extremes(models, family):
    lm, prompt = models[family], _prompt(4, batch=2)
    one = reference_generate(lm, prompt, gen_length=G, block_length=K, steps=G, rule="threshold", threshold=1.5)
    allin = reference_generate(lm, prompt, gen_length=G, block_length=K, steps=G, rule="threshold", threshold=1e-9)
    for r in range(2):
        _check_row_basics(one, r, nfe=G)
        assert sorted(one["trajectory"][r]) == list(range(1, G + 1))
        _check_row_basics(allin, r, nfe=NB)
        np.testing.assert_array_equal(allin["trajectory"][r], np.repeat(np.arange(1, NB + 1), K))


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_entropy_extremes(models, family):
    lm, prompt = models[family], _prompt(5, batch=2)
    allin = reference_generate(lm, prompt, gen_length=G, block_length=K, steps=G, rule="entropy", threshold=1e9)
    one = reference_generate(lm, prompt, gen_length=G, block_length=K, steps=G, rule="entropy", threshold=0.0)
    for r in range(2):
        _check_row_basics(allin, r, nfe=NB)
        _check_row_basics(one, r, nfe=G)
        assert sorted(one["trajectory"][r]) == list(range(1, G + 1))


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_factor_extremes(models, family):
    lm, prompt = models[family], _prompt(6, batch=2)
    allin = reference_generate(lm, prompt, gen_length=G, block_length=K, steps=G, rule="factor", factor=1e6)
    one = reference_generate(lm, prompt, gen_length=G, block_length=K, steps=G, rule="factor", factor=0.0)
    for r in range(2):
        _check_row_basics(allin, r, nfe=NB)
        _check_row_basics(one, r, nfe=G)


def _first_step(lm, prompt, eos_inf=False):
    canvas = np.concatenate([prompt, np.full((prompt.shape[0], G), lm.config.mask_token_id)], axis=1)
    return _gen_logits(lm, canvas, prompt.shape[1], eos_inf)


def _dynamic_case(lm, prompt, rule):
    """A rule setting that commits several tokens at the first step (chosen from that step's logits)."""
    logits = _first_step(lm, prompt)[0, :K]
    # tau halfway between two first-step values, so that rounding cannot move a decision
    if rule == "threshold":
        conf = np.sort(_probs(logits.astype(np.float64)).max(-1))
        return dict(threshold=float(conf[K // 2 - 1] + conf[K // 2]) / 2)
    if rule == "entropy":
        p = _probs(logits.astype(np.float64))
        h = np.sort(-(p * np.log(np.where(p > 0, p, 1.0))).sum(-1))  # 0 log 0 = 0
        return dict(threshold=float(h[K // 2 - 1] + h[K // 2]) / 2)
    return dict(factor=3.0)  # rank 2 always passes (1 - 3/3 = 0)


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("rule", ["threshold", "factor", "entropy"])
def test_dynamic_rules_replay(models, family, rule):
    lm, prompt = models[family], _prompt(7)
    kw = _dynamic_case(lm, prompt, rule)
    out = reference_generate(lm, prompt, gen_length=G, block_length=K, steps=G, rule=rule, **kw)
    _check_row_basics(out)
    assert NB <= out["nfe"][0] <= G
    sizes = []
    for t, logits, masked, committed in _replay(lm, prompt, out):
        first = int(np.flatnonzero(masked)[0])
        b = first // K  # the current block: the one of the leftmost mask
        block = np.zeros(G, bool)
        block[b * K:(b + 1) * K] = True
        cands = np.flatnonzero(masked & block)
        x0 = logits.argmax(-1)
        p = _probs(logits)
        conf = p[np.arange(G), x0]
        if rule == "threshold":
            best = sorted(cands, key=lambda j: (-conf[j], j))[0]
            expected = {j for j in cands if conf[j] >= np.float32(kw["threshold"])} | {best}
        elif rule == "entropy":
            h = -(p * np.log(np.where(p > 0, p, 1.0))).sum(-1)  # 0 log 0 = 0
            best = sorted(cands, key=lambda j: (h[j], j))[0]
            expected = {j for j in cands if h[j] <= np.float32(kw["threshold"])} | {best}
        else:
            order = sorted(cands, key=lambda j: (-conf[j], j))
            n = 1
            while n < len(order) and conf[order[n]] >= 1 - kw["factor"] / (n + 2):
                n += 1
            expected = set(order[:n])
            # the accepted prefix satisfies the bound, the first refused candidate does not
            assert all(conf[order[j - 1]] >= 1 - kw["factor"] / (j + 1) for j in range(2, n + 1))
        assert set(np.flatnonzero(committed)) == expected
        np.testing.assert_array_equal(out["tokens"][0][committed], x0[committed])
        sizes.append(len(expected))
    assert sizes[0] > 1  # the setting is not degenerate


class Tied(Wrapped):
    """Every generation position gets the same logits (the raw row of position P - 1): all scores tie."""

    def logits(self, ids, mask=None):
        out = np.array(self.lm.logits(ids, mask))
        out[:, P - 1:] = out[:, P - 1:P]
        return out


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("rule, kw", [("quota", {}), ("threshold", dict(threshold=1.5)),
                                      ("factor", dict(factor=0.0)), ("entropy", dict(threshold=0.0))])
def test_ties_go_to_the_lower_position(models, family, rule, kw):
    out = reference_generate(Tied(models[family]), _prompt(15), gen_length=G, block_length=K, steps=G, rule=rule, **kw)
    np.testing.assert_array_equal(out["trajectory"][0], np.arange(1, G + 1))


def test_factor_bound_is_inclusive(models):
    """All confidences tie at c; f makes the rank-2 bound 1 - f/3 equal c in float32: two commits at step 1."""
    prompt = _prompt(17)
    canvas = np.concatenate([prompt, np.full((1, G), models["llada"].config.mask_token_id)], axis=1)
    for scale in (1, 2, 4, 8, 16, 32, 64):  # sharpen until c > 1/2, where float32 f/3 is finer than c's spacing
        lm = Tied(Wrapped(models["llada"], scale=scale))
        c = softmax32(step_logits(lm, canvas, np.ones_like(canvas), P, G)[0, 0]).max()
        if c > 0.5:
            break
    f = np.float32((1.0 - float(c)) * 3.0)
    for _ in range(64):  # nudge f until the float32 bound hits c exactly
        bound = np.float32(1.0) - f / np.float32(3.0)
        if bound == c:
            break
        f = np.nextafter(f, np.float32(np.inf) if bound > c else np.float32(-np.inf))
    assert bound == c and np.float32(1.0) - f / np.float32(4.0) > c
    out = reference_generate(lm, prompt, gen_length=G, block_length=K, steps=G, rule="factor", factor=float(f))
    # (the tied logits move as the canvas fills, so only the first step is pinned)
    np.testing.assert_array_equal(np.flatnonzero(out["trajectory"][0] == 1), [0, 1])


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("rule", ["threshold", "entropy"])
def test_thresholds_are_inclusive(models, family, rule):
    """tau equal to a candidate's own float32 score commits it (conf >= tau, H <= tau)."""
    lm, prompt = models[family], _prompt(16)
    canvas = np.concatenate([prompt, np.full((1, G), lm.config.mask_token_id)], axis=1)
    logits = step_logits(lm, canvas, np.ones_like(canvas), P, G)[0, :K]
    if rule == "threshold":
        score = np.array([softmax32(row).max() for row in logits])
        tau = float(np.sort(score)[::-1][2])  # the third highest confidence
    else:
        score = np.array([entropy32(row) for row in logits])
        tau = float(np.sort(score)[2])  # the third lowest entropy
    assert len(set(score.tolist())) == K
    out = reference_generate(lm, prompt, gen_length=G, block_length=K, steps=G, rule=rule, threshold=tau)
    assert (out["trajectory"][0, :K] == 1).sum() == 3


# ------------------------------------------------------------------------------ early exit


def test_exit_tau_formulas():
    assert exit_tau("linear", 0.0) == 7.5 and exit_tau("linear", 1.0) == 2.5
    assert math.isclose(exit_tau("linear", 0.25), 6.25)
    assert math.isclose(exit_tau("cosine", 0.5), 5.0) and exit_tau("cosine", 0.0) == 7.5
    assert math.isclose(exit_tau("exp", 0.5, exit_k=2.0), 2.5 + 5.0 * math.exp(-1.0))
    assert math.isclose(exit_tau("exp", 1.0, tau_low=0.0, exit_k=8.0), 7.5 * math.exp(-8.0))
    assert [exit_tau("prophet", p) for p in (0.0, 0.33, 1 / 3, 0.66, 2 / 3, 1.0)] == [7.5, 7.5, 5.0, 5.0, 2.5, 2.5]
    assert exit_tau("linear", 1.7, tau_low=0.0) == 0.0 and exit_tau("linear", -1.0) == 7.5  # p clipped


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("rule", ["quota", "threshold"])
def test_exit_always_satisfied_fills_at_the_first_forward(models, family, rule):
    lm, prompt = models[family], _prompt(8, batch=2)
    out = reference_generate(lm, prompt, gen_length=G, block_length=K, steps=G, rule=rule, threshold=0.9,
                             exit="linear", tau_high=-1.0, tau_low=-1.0)
    np.testing.assert_array_equal(out["nfe"], [1, 1])
    np.testing.assert_array_equal(out["trajectory"], np.ones((2, G)))
    np.testing.assert_array_equal(out["tokens"], _first_step(lm, prompt).argmax(-1))


def _gap(logits):
    s = np.sort(logits.astype(np.float64), axis=-1)
    return float((s[:, -1] - s[:, -2]).mean())


def test_exit_schedules_replay(models):
    """Exit happens at the first forward whose mean top-2 gap reaches tau(nfe_before / S)."""
    mid_way = 0
    for family in ("llada", "dream"):
        prompt = _prompt(9)
        g1 = _gap(_first_step(models[family], prompt)[0])
        for exit in ("linear", "cosine", "exp", "prophet"):
            # scale the logits so that the first gap is 4 (6 for prophet): no exit at the first step
            lm = Wrapped(models[family], scale=(6.0 if exit == "prophet" else 4.0) / g1)
            kw = dict(tau_high=7.5, tau_low=0.0, exit_k=4.0)
            out = reference_generate(lm, prompt, gen_length=G, block_length=K, steps=G, exit=exit, **kw)
            n = int(out["nfe"][0])
            assert (out["trajectory"][0] >= 1).all()
            exited = False
            for t, logits, masked, committed in _replay(lm, prompt, out):
                hit = _gap(logits) >= exit_tau(exit, (t - 1) / G, **kw)
                if t < n:
                    assert not hit
                elif hit:
                    exited = True  # every mask left (all blocks) takes this step's argmax
                    assert (committed == masked).all()
                    np.testing.assert_array_equal(out["tokens"][0][masked], logits.argmax(-1)[masked])
            assert exited or n == G
            mid_way += exited and 1 < n < G
    assert mid_way > 0


# ------------------------------------------------------------------------ EOS handling


def _eos_boosted(lm, j0=3, rows=(0,), column=None, amount=50.0, **config_changes):
    """Boost a column's logit where generation position j0 reads it (after Dream's shift)."""
    pos = P + j0 - (1 if lm.config.shifted_logits else 0)
    col = lm.config.eos_token_id if column is None else column
    return Wrapped(lm, boosts=[(r, pos, col, amount) for r in rows], **config_changes)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_stop_at_eos(models, family):
    prompt, j0 = _prompt(10, batch=2), 3
    lm = _eos_boosted(models[family], j0)
    eos = lm.config.eos_token_id
    kw = dict(gen_length=G, block_length=K, steps=G, rule="threshold", threshold=1.5)
    out = reference_generate(lm, prompt, stop_at_eos=True, **kw)
    tokens, traj, n = out["tokens"][0], out["trajectory"][0], int(out["nfe"][0])
    assert tokens[j0] == eos and traj[j0] == 1  # the boosted EOS is the most confident
    first = int(np.flatnonzero(tokens == eos)[0])
    assert n <= K and (traj >= 1).all() and (traj <= n).all()
    assert traj[:first + 1].max() == n  # the row stops once EOS and everything before it are committed
    np.testing.assert_array_equal(tokens[K:], eos)  # the untouched block is filled with EOS ...
    np.testing.assert_array_equal(traj[K:], n)  # ... by the last forward
    # the other row is unaffected: it equals its own run
    alone = reference_generate(models[family], prompt[1:], stop_at_eos=True, **kw)
    for key in out:
        np.testing.assert_array_equal(out[key][1], alone[key][0])
    # without stop_at_eos the boosted row runs to the end; with logits_eos_inf EOS never appears
    full = reference_generate(lm, prompt, **kw)
    assert full["nfe"][0] == G and full["tokens"][0, j0] == eos
    banned = reference_generate(lm, prompt, stop_at_eos=True, logits_eos_inf=True, **kw)
    np.testing.assert_array_equal(banned["nfe"], [G, G])
    assert not (banned["tokens"] == eos).any()


@pytest.mark.parametrize("special", ["eos", "eot"])
def test_confidence_eos_eot_inf_commits_them_last(models, special):
    base, j0 = models["llada"], 3
    column = base.config.vocab_size - 1  # an in-vocabulary stand-in for EoT (the tiny config's is out of range)
    if special == "eos":
        lm = _eos_boosted(base, j0)
    else:
        lm = _eos_boosted(base, j0, column=column, eot_token_id=column)
    token = lm.config.eos_token_id if special == "eos" else column
    prompt = _prompt(11)
    kw = dict(gen_length=G, block_length=K, steps=G)
    plain = reference_generate(lm, prompt, **kw)
    last = reference_generate(lm, prompt, confidence_eos_eot_inf=True, **kw)
    assert plain["tokens"][0, j0] == token and plain["trajectory"][0, j0] == 1
    assert last["tokens"][0, j0] == token and last["trajectory"][0, j0] == K  # the block's last step
    _check_row_basics(last, nfe=G)


# --------------------------------------------------------------------------- padded batch


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("rule", ["quota", "threshold", "entropy"])
def test_left_padded_rows_equal_single_runs(models, family, rule):
    lm = models[family]
    short, long = _prompt(12, length=4), _prompt(13, length=7)
    pad = long.shape[1] - short.shape[1]
    batch = np.concatenate([np.pad(short, ((0, 0), (pad, 0)), constant_values=lm.config.pad_token_id), long])
    mask = np.ones_like(batch)
    mask[0, :pad] = 0
    kw = dict(gen_length=G, block_length=K, steps=8, rule=rule, threshold=0.12 if rule == "threshold" else 3.5)
    out = reference_generate(lm, batch, mask, **kw)
    for row, prompt in enumerate((short, long)):
        alone = reference_generate(lm, prompt, **kw)
        for key in out:
            np.testing.assert_array_equal(out[key][row], alone[key][0], err_msg=f"row {row} {key}")


def test_one_forward_per_step_for_the_whole_batch(models):
    lm = Wrapped(models["llada"])
    out = reference_generate(lm, _prompt(14, batch=3), gen_length=G, block_length=K, steps=G, rule="threshold",
                             threshold=0.1)
    # each forward commits >= 1 token of the row's block, so a row's forwards in a block = distinct trajectory values
    per_block = [[len(set(out["trajectory"][r, b * K:(b + 1) * K])) for b in range(NB)] for r in range(3)]
    np.testing.assert_array_equal(out["nfe"], [sum(c) for c in per_block])
    assert lm.calls == sum(max(c[b] for c in per_block) for b in range(NB))  # one forward serves every active row
    assert len({tuple(c) for c in per_block}) > 1  # rows differ, so some forwards have idle rows


def test_argument_checks(models):
    lm, prompt = models["llada"], _prompt(0)
    with pytest.raises(ValueError, match="multiple of block_length"):
        reference_generate(lm, prompt, gen_length=16, block_length=5, steps=16)
    with pytest.raises(ValueError, match="multiple of the number of blocks"):
        reference_generate(lm, prompt, gen_length=16, block_length=4, steps=6)
    with pytest.raises(ValueError, match="needs threshold"):
        reference_generate(lm, prompt, gen_length=16, block_length=8, steps=16, rule="threshold")
    with pytest.raises(ValueError, match="quota rule only"):
        reference_generate(lm, prompt, gen_length=16, block_length=8, steps=16, rule="entropy", threshold=1.0,
                           remasking="random")
