"""Plain NumPy single-row reference of LLaDA2.0 `generate()` and LLaDA2.1 token editing.

Written from /work/shared/reference/llada2.md sections 5-8 alone ("spec §N", quirks "QN"). The model is a
callable, so nothing here imports the library under test:

    logits_fn(ids [W] int, positions [W] int, allowed [W, W] bool) -> logits [W, V]

called exactly once per forward (NFE = number of calls) on the window x[:(b+1)*B], positions arange(W),
allowed[q, k] = (k // B <= q // B): strict block-causal, blocks aligned to absolute position 0 (§5).
No cache: the whole prefix is recomputed at every step, as in the official code.

Deliberate departures from the shipped code (the algorithms as they are meant to work):
* Q1 fixed: temperature 0 is greedy, x0 = argmax(logits) (ties: lowest token id), conf = softmax(logits)[x0]
  in float64. Only greedy decoding exists here (no temperature / top-k / top-p).
* The mask token's logit is -inf before the softmax and the argmax (a committed mask would stay a mask).
  With `eos_inf=True` (an extra keyword, default False, the library's logits_eos_inf convention) the EOS
  logit is -inf too; with the default nothing else changes.
* Q2 fixed: LLaDA2.1 uses the strict block-causal mask, not the additive 0/1 mask.
* Q3 fixed: the 2.0 eos_early_stop in-step return keeps the generated part only, and the first EOS is
  searched from P on (a prompt EOS never triggers it).
Kept as shipped: Q4 (2.0 always stops after the first block whose generated part holds an EOS), Q5 (2.1
ignores steps / minimal_topk, so it does not take them), Q6 (the last block is decoded past gen_length; the
extra positions use quota / attend / may be edited and are dropped), Q7 (the 2.0 quota schedule comes from
block_length, so a block with a prompt tail finishes in fewer steps), Q13 (mask ids inside the prompt tail
are "active" and get filled; non-mask prompt tokens are never changed nor edited).

Conventions where the spec leaves room:
* top-k ties (2.0 quota fallback, 2.1 m2t fallback): higher confidence first, then LOWER position first.
* 2.0 needs steps = min(steps, gen_length // minimal_topk) >= 1 (the official code divides by zero);
  2.1 needs num_to_transfer >= 1 (with 0 the official loop can spin forever). Both raise ValueError.
* block_nfe / edits: one entry per denoised block actually run, from block P // B on (shorter on a stop).
  edits counts t2t positions of the block summed over its steps, Q6 overflow positions included.
* Output: tokens = x[P:P+gen_length]; every position after the first EOS is set to eos_id (also positions
  never decoded because of a stop). An EOS only in the Q6 overflow is not part of tokens.
"""
from __future__ import annotations

import numpy as np


def block_causal(W: int, B: int) -> np.ndarray:
    """allowed[q, k] = key block <= query block (§5), blocks aligned to position 0."""
    blk = np.arange(W) // B
    return blk[None, :] <= blk[:, None]


def _greedy(logits, mask_id, eos_id, eos_inf):
    """Greedy rule (M21:1213-1217 / Q1 fix): x0 = argmax, conf = softmax[x0], float64; mask (eos) at -inf."""
    z = np.array(logits, dtype=np.float64)
    z[:, mask_id] = -np.inf
    if eos_inf:
        z[:, eos_id] = -np.inf
    x0 = np.argmax(z, axis=-1)  # first maximum = lowest token id on ties
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    p = e / e.sum(axis=-1, keepdims=True)
    return x0, p[np.arange(len(x0)), x0]


def _top(conf, active, k):
    """Positions (block-relative) of the k most confident active ones; ties: lower position first."""
    idx = np.flatnonzero(active)
    return idx[np.argsort(-conf[idx], kind="stable")[:k]]


class _Canvas:
    def __init__(self, logits_fn, prompt, gen_length, B, mask_id, eos_id, eos_inf):
        if gen_length < 1 or B < 1 or mask_id == eos_id:
            raise ValueError("need gen_length >= 1, block_length >= 1, mask_id != eos_id")
        self.fn, self.B, self.G, self.mask, self.eos, self.eos_inf = logits_fn, B, gen_length, mask_id, eos_id, eos_inf
        self.P = P = len(prompt)
        self.nb = -(-(P + gen_length) // B)  # num_blocks = ceil((P + gen_length) / B)  (§5)
        self.x = np.full(self.nb * B, mask_id, dtype=np.int64)
        self.x[:P] = np.asarray(prompt, dtype=np.int64)
        self.nfe = 0

    def forward(self, b):
        """One NFE on the window x[:(b+1)B]; returns (x0, conf) of its last B rows."""
        W = (b + 1) * self.B
        out = np.asarray(self.fn(self.x[:W].copy(), np.arange(W), block_causal(W, self.B)))
        if out.ndim != 2 or out.shape[0] != W:
            raise ValueError(f"logits_fn returned shape {out.shape}, expected [{W}, V]")
        self.nfe += 1
        return _greedy(out[W - self.B:], self.mask, self.eos, self.eos_inf)

    def tokens(self):
        t = [int(v) for v in self.x[self.P:self.P + self.G]]
        if self.eos in t:
            k = t.index(self.eos)
            t = t[:k + 1] + [self.eos] * (self.G - k - 1)
        assert self.mask not in t, "a generated position was left masked"
        return t


def llada2_generate(logits_fn, prompt: list[int], *, gen_length, block_length=32, steps=32, threshold=0.95,
                    minimal_topk=1, eos_early_stop=False, mask_id, eos_id, eos_inf=False) -> dict:
    """LLaDA2.0 block decoding (§6), greedy, strict block-causal."""
    c = _Canvas(logits_fn, prompt, gen_length, block_length, mask_id, eos_id, eos_inf)
    B, P, x = block_length, c.P, c.x
    steps = min(steps, gen_length // minimal_topk)  # §6.1, steps per block
    if steps < 1:
        raise ValueError("steps = min(steps, gen_length // minimal_topk) must be >= 1")
    quota = [B // steps + (s < B % steps) for s in range(steps)]  # §6.3 / Q7: from block_length
    block_nfe, log = [], []
    for b in range(P // B, c.nb):
        lo, W = b * B, (b + 1) * B
        n0, stop = c.nfe, False
        for s in range(steps):
            active = x[lo:W] == mask_id  # masks in the last B positions of the window
            if not active.any():
                break  # no forward spent
            x0, conf = c.forward(b)
            conf = np.where(active, conf, -np.inf)
            hi = conf > threshold  # strict
            if hi.sum() >= quota[s]:
                sel = np.flatnonzero(hi)
            else:
                sel = _top(conf, active, min(quota[s], int(active.sum())))
            x[lo + sel] = x0[sel]
            log.append(dict(block=b, step=s, committed=[int(lo + i) for i in sel], edited=[]))
            if eos_early_stop and (x0[sel] == eos_id).any():  # §6 step 6, Q3 fixed: from P on
                gen = x[P:W]
                e = int(np.flatnonzero(gen == eos_id)[0])
                if not (gen[:e] == mask_id).any():
                    stop = True
                    break
        block_nfe.append(c.nfe - n0)
        if stop or (x[P:W] == eos_id).any():  # Q4: unconditional block-level stop
            break
    return dict(tokens=c.tokens(), nfe=c.nfe, block_nfe=block_nfe, edits=[0] * len(block_nfe), steps_log=log)


def llada21_generate(logits_fn, prompt: list[int], *, gen_length, block_length=32, threshold=0.7,
                     editing_threshold=0.5, max_post_steps=16, num_to_transfer=1, eos_early_stop=False,
                     mask_id, eos_id, eos_inf=False) -> dict:
    """LLaDA2.1 block decoding with token editing (§7.2), greedy, strict block-causal (Q2 fixed)."""
    if num_to_transfer < 1:
        raise ValueError("num_to_transfer must be >= 1")
    c = _Canvas(logits_fn, prompt, gen_length, block_length, mask_id, eos_id, eos_inf)
    B, P, x = block_length, c.P, c.x
    block_nfe, edits, log = [], [], []
    for b in range(P // B, c.nb):
        lo, W = b * B, (b + 1) * B
        prompt_in_block = np.arange(lo, W) < P  # prompt tail: never edited
        n0, post, ed, s = c.nfe, 0, 0, 0
        while True:
            old = x[lo:W].copy()  # old / active taken before this step's commit
            active = old == mask_id
            if not active.any():
                post += 1
            if post > max_post_steps:  # checked before the forward
                break
            x0, conf = c.forward(b)
            m2t = np.zeros(B, dtype=bool)
            if active.any():
                hi = active & (conf > threshold)
                if hi.sum() >= num_to_transfer:
                    m2t = hi
                else:
                    m2t[_top(conf, active, min(num_to_transfer, int(active.sum())))] = True
            t2t = ~active & ~prompt_in_block & (conf > editing_threshold) & (x0 != old)
            sel = m2t | t2t
            x[lo:W][sel] = x0[sel]
            ed += int(t2t.sum())
            log.append(dict(block=b, step=s, committed=[int(lo + i) for i in np.flatnonzero(m2t)],
                            edited=[int(lo + i) for i in np.flatnonzero(t2t)]))
            s += 1
            if not active.any() and not t2t.any():  # the step filling the last masks never ends the block
                break
        block_nfe.append(c.nfe - n0)
        edits.append(ed)
        gen = x[P:W]
        if eos_early_stop and not (gen == mask_id).any() and (gen == eos_id).any():
            break
    return dict(tokens=c.tokens(), nfe=c.nfe, block_nfe=block_nfe, edits=edits, steps_log=log)


# ----------------------------------------------------------------------------------------------- self-check
def _tiny_model(V=12, D=16, seed=0, eos_id=1, eos_bias=0.0, scale=2.0):
    """A fixed random embedding table + one attention layer honouring `allowed` + an output projection."""
    rng = np.random.default_rng(seed)
    E, Pe = rng.normal(size=(V, D)), rng.normal(size=(256, D))
    Wq, Wk, Wv = rng.normal(size=(3, D, D)) / np.sqrt(D)
    Wo = rng.normal(size=(D, V)) * scale / np.sqrt(D)

    def fn(ids, pos, allowed):
        h = E[ids] + Pe[pos]
        s = np.where(allowed, (h @ Wq) @ (h @ Wk).T / np.sqrt(D), -np.inf)
        a = np.exp(s - s.max(axis=-1, keepdims=True))
        a /= a.sum(axis=-1, keepdims=True)
        out = (h + a @ (h @ Wv)) @ Wo
        out[:, eos_id] += eos_bias
        return out
    return fn


def _probe(fn, prompt, B):
    """Wraps fn: checks the prompt is intact, positions / mask are as promised, and counts the calls."""
    P, calls = len(prompt), [0]

    def wrapped(ids, pos, allowed):
        W = len(ids)
        assert W % B == 0 and W >= P and list(ids[:P]) == list(prompt), "window / prompt changed"
        assert (pos == np.arange(W)).all() and (allowed == block_causal(W, B)).all()
        calls[0] += 1
        return fn(ids, pos, allowed)
    return wrapped, calls


def _fill_steps(masks, quota):
    """Steps the 2.0 quota rule needs for `masks` masks when nothing passes the threshold."""
    done, n = 0, 0
    while done < masks:
        done += quota[n]
        n += 1
    return n


if __name__ == "__main__":
    MASK, EOS, V = 0, 1, 12
    rng = np.random.default_rng(1)
    checked = 0
    for trial in range(60):
        B = int(rng.choice([2, 4, 8]))
        P = int(rng.integers(0, 3 * B))
        G = int(rng.integers(1, 4 * B))
        prompt = [int(t) for t in rng.integers(2, V, size=P)]
        fn = _tiny_model(V=V, seed=trial, eos_id=EOS, eos_bias=float(rng.choice([-1.0, 1.0, 3.0])))
        first = P // B
        masks_in = lambda b: sum(1 for p in range(b * B, (b + 1) * B) if p >= P)  # noqa: E731
        # 2.0, threshold > 1 and EOS at -inf: quota-only, exactly `steps` forwards per full block (Q7 otherwise)
        st = int(rng.integers(1, 2 * B))
        f, calls = _probe(fn, prompt, B)
        r = llada2_generate(f, prompt, gen_length=G, block_length=B, steps=st, threshold=1.5,
                            mask_id=MASK, eos_id=EOS, eos_inf=True)
        eff = min(st, G)
        quota = [B // eff + (s < B % eff) for s in range(eff)]
        want = [_fill_steps(masks_in(b), quota) for b in range(first, -(-(P + G) // B))]
        assert r["block_nfe"] == want and r["nfe"] == calls[0] == sum(want), (r["block_nfe"], want)
        if eff <= B:
            assert all(n == eff for b, n in zip(range(first, 99), want) if b * B >= P)
        assert len(r["tokens"]) == G and EOS not in r["tokens"] and MASK not in r["tokens"]
        # 2.0 with EOS allowed, both eos_early_stop settings
        for es in (False, True):
            f, calls = _probe(fn, prompt, B)
            r = llada2_generate(f, prompt, gen_length=G, block_length=B, steps=st, threshold=0.6,
                                eos_early_stop=es, mask_id=MASK, eos_id=EOS)
            t = r["tokens"]
            assert len(t) == G and r["nfe"] == calls[0] == sum(r["block_nfe"]) and set(r["edits"]) <= {0}
            if EOS in t:
                assert all(v == EOS for v in t[t.index(EOS):])
        # 2.1: editing_threshold 1.0 never edits; NFE per block = ceil(masks / k) + (max_post_steps >= 1)
        k, mps = int(rng.integers(1, 4)), int(rng.integers(0, 3))
        f, calls = _probe(fn, prompt, B)
        r = llada21_generate(f, prompt, gen_length=G, block_length=B, threshold=1.5, editing_threshold=1.0,
                             max_post_steps=mps, num_to_transfer=k, mask_id=MASK, eos_id=EOS)
        want = [-(-masks_in(b) // k) + (mps >= 1) for b in range(first, -(-(P + G) // B))]
        assert r["block_nfe"] == want and r["nfe"] == calls[0], (r["block_nfe"], want)
        assert set(r["edits"]) <= {0} and len(r["tokens"]) == G
        # 2.1 with edits (S mode) and Q mode with eos_early_stop
        for thr, ethr, es in ((0.5, 0.0, False), (0.7, 0.5, True)):
            f, calls = _probe(fn, prompt, B)
            r = llada21_generate(f, prompt, gen_length=G, block_length=B, threshold=thr, editing_threshold=ethr,
                                 max_post_steps=mps, eos_early_stop=es, mask_id=MASK, eos_id=EOS)
            t = r["tokens"]
            assert len(t) == G and r["nfe"] == calls[0] == sum(r["block_nfe"])
            assert all(n <= B + mps for n in r["block_nfe"])
            if EOS in t:
                assert all(v == EOS for v in t[t.index(EOS):])
            checked += sum(r["edits"])
    print(f"decode_reference_llada2 self-check OK (60 trials, {checked} edits seen in editing runs)")
