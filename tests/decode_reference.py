"""A deliberately plain Python-loop reference of the decode rules in dlmjax/decode/SPEC.md.

It exists only to check the jitted decoder: one eager `lm.logits` call per step, then
per-row Python loops over positions. Clarity over speed; nothing here is shared with
the engine.

Choices where SPEC.md leaves room (the parity tests rely on them):
- "Masked" is a per-position state of the generation region, not `token == mask id`: a
  position is masked until it is committed, even if the token it commits is the mask id
  itself (tiny random models predict it now and then). So every step of a non-quota rule
  removes at least one mask and a block takes at most K steps, as SPEC.md says.
- Thresholds are compared in float32 (conf, H and the factor bound 1 - f/(j+1) are float32,
  tau is cast to float32), as a jitted float32 engine compares them. The early-exit signal
  and tau(p) are computed in float64.
- Entropy: 0 * log 0 counts as 0 (columns at -inf, e.g. EOS under logits_eos_inf).
  confidence_eos_eot_inf changes conf only, so it has no effect on the entropy rule.
- remasking="random": at every step each active row draws rng.random(K) for the K
  positions of its current block (rows in increasing order); only candidates use them.
- Done rows are never active, also under the quota rule: when steps per block exceed the
  masks of the last block, a row finishes (no masks left) before spb steps there, so its
  NFE is below `steps` in that corner case.
"""

from __future__ import annotations

import math

import numpy as np

RULES = ("quota", "threshold", "factor", "entropy")
EXITS = (None, "linear", "cosine", "exp", "prophet")


def exit_tau(exit, progress, tau_high=7.5, tau_low=2.5, exit_k=4.0):
    """The exit threshold tau(p) of a schedule, p clipped to [0, 1] (float64)."""
    p = min(max(float(progress), 0.0), 1.0)
    if exit == "linear":
        return tau_high + (tau_low - tau_high) * p
    if exit == "cosine":
        return tau_low + (tau_high - tau_low) * (1.0 + math.cos(math.pi * p)) / 2.0
    if exit == "exp":
        return tau_low + (tau_high - tau_low) * math.exp(-exit_k * p)
    if exit == "prophet":
        if p < 1.0 / 3.0:
            return 7.5
        if p < 2.0 / 3.0:
            return 5.0
        return 2.5
    raise ValueError(f"unknown exit {exit!r}")


def step_logits(lm, x, full_mask, prompt_length, gen_length, logits_eos_inf=False):
    """float32 [B, G, V]: the generation region of one forward, shifted for Dream/v2, mask (and EOS if asked) at -inf."""
    raw = np.asarray(lm.logits(x, full_mask), dtype=np.float32)
    if lm.config.shifted_logits:
        shifted = raw.copy()
        shifted[:, 1:] = raw[:, :-1]  # shifted[:, i] = raw[:, i-1]; position 0 keeps its own
        raw = shifted
    out = raw[:, prompt_length:prompt_length + gen_length].copy()
    out[:, :, lm.config.mask_token_id] = -np.inf  # SPEC: the mask token is never a prediction
    if logits_eos_inf:
        out[:, :, lm.config.eos_token_id] = -np.inf
    return out


def softmax32(row_logits):
    """Softmax over the last axis in float32."""
    z = row_logits.astype(np.float32)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def entropy32(row_logits):
    """H = -sum p log p in float32, with 0 log 0 = 0."""
    z = row_logits.astype(np.float32)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    total = e.sum(axis=-1, keepdims=True)
    p = e / total
    logp = z - np.log(total)
    terms = np.where(p > 0, p * np.where(p > 0, logp, np.float32(0)), np.float32(0))
    return (-terms.sum(axis=-1)).astype(np.float32)


def top_gap_mean(row_logits):
    """Mean over positions of top-1 minus top-2 logit (float64)."""
    gaps = []
    for pos in range(row_logits.shape[0]):
        values = np.sort(row_logits[pos].astype(np.float64))
        gaps.append(values[-1] - values[-2])
    return float(np.mean(gaps))


def argmax_first(values):
    """Index of the largest value, first on ties (np.argmax already breaks ties this way)."""
    return int(np.argmax(values))


def _by_conf(cands, score, descending=True):
    """Candidates sorted by score (descending or ascending), lower position first on ties."""
    if descending:
        return sorted(cands, key=lambda j: (-float(score[j]), j))
    return sorted(cands, key=lambda j: (float(score[j]), j))


def quota_schedule(n_masks, spb):
    """quota[i] = n // spb + (1 if i < n % spb else 0), i = 0..spb-1."""
    return [n_masks // spb + (1 if i < n_masks % spb else 0) for i in range(spb)]


def choose_commits(rule, cands, conf, entropy, *, quota=0, threshold=None, factor=None):
    """Positions to commit among `cands` (relative positions) for one row and one step."""
    if not cands:
        return []
    if rule == "quota":
        return _by_conf(cands, conf)[:quota]
    if rule == "threshold":
        tau = np.float32(threshold)
        best = _by_conf(cands, conf)[0]
        return sorted(set([j for j in cands if conf[j] >= tau] + [best]))
    if rule == "factor":
        order = _by_conf(cands, conf)
        accepted = [order[0]]
        f = np.float32(factor)
        for rank in range(2, len(order) + 1):  # rank j is 1-based; rank 1 is always accepted
            bound = np.float32(1.0) - f / np.float32(rank + 1)
            if conf[order[rank - 1]] >= bound:
                accepted.append(order[rank - 1])
            else:
                break
        return sorted(accepted)
    if rule == "entropy":
        tau = np.float32(threshold)
        best = _by_conf(cands, entropy, descending=False)[0]
        return sorted(set([j for j in cands if entropy[j] <= tau] + [best]))
    raise ValueError(f"unknown rule {rule!r}")


def prepare(prompt_ids, attention_mask, gen_length, block_length, steps):
    """Prompt [B, P], its mask, and (G, K, S, number of blocks, steps per block), checked."""
    prompt = np.asarray(prompt_ids)
    if prompt.ndim == 1:
        prompt = prompt[None]
    batch, plen = prompt.shape
    if attention_mask is None:
        pmask = np.ones((batch, plen), dtype=np.int32)
    else:
        pmask = np.asarray(attention_mask).astype(np.int32)
        if pmask.ndim == 1:
            pmask = pmask[None]
    G, K, S = int(gen_length), int(block_length), int(steps)
    if G <= 0 or K <= 0 or S <= 0 or G % K:
        raise ValueError(f"gen_length {G} must be a positive multiple of block_length {K}")
    nb = G // K
    if S % nb:
        raise ValueError(f"steps {S} must be a multiple of the number of blocks {nb}")
    return prompt, pmask, (G, K, S, nb, S // nb)


def reference_generate(lm, prompt_ids, attention_mask=None, *, gen_length, block_length, steps,
                       rule="quota", remasking="low_confidence", threshold=None, factor=None,
                       exit=None, tau_high=7.5, tau_low=2.5, exit_k=4.0,
                       stop_at_eos=False, logits_eos_inf=False, confidence_eos_eot_inf=False,
                       rng=None) -> dict:
    """Decode per SPEC.md with plain loops. Returns {"tokens", "nfe", "trajectory"} (numpy int)."""
    cfg = lm.config
    prompt, pmask, (G, K, S, nb, spb) = prepare(prompt_ids, attention_mask, gen_length, block_length, steps)
    batch, plen = prompt.shape
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}")
    if exit not in EXITS:
        raise ValueError(f"unknown exit {exit!r}")
    if remasking not in ("low_confidence", "random"):
        raise ValueError(f"unknown remasking {remasking!r}")
    if remasking == "random" and rule != "quota":
        raise ValueError("remasking='random' goes with the quota rule only")
    if rule in ("threshold", "entropy") and threshold is None:
        raise ValueError(f"rule {rule!r} needs threshold")
    if rule == "factor" and factor is None:
        raise ValueError("rule 'factor' needs factor")
    if remasking == "random" and not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)

    if (stop_at_eos or logits_eos_inf or confidence_eos_eot_inf) and cfg.eos_token_id is None:
        raise ValueError("stop_at_eos, logits_eos_inf and confidence_eos_eot_inf need the model's eos_token_id")

    mask_id = cfg.mask_token_id
    eos_id = cfg.eos_token_id
    eot_id = cfg.eot_token_id

    x = np.concatenate([prompt.astype(np.int64), np.full((batch, G), mask_id, dtype=np.int64)], axis=1)
    full_mask = np.concatenate([pmask, np.ones((batch, G), dtype=np.int32)], axis=1)
    masked = [[True] * G for _ in range(batch)]  # per row, per generation position
    done = [False] * batch
    nfe = [0] * batch
    traj = [[0] * G for _ in range(batch)]

    def set_token(r, j, token, t):
        x[r, plen + j] = int(token)
        masked[r][j] = False
        traj[r][j] = t

    for b in range(nb):
        s, e = b * K, (b + 1) * K
        quotas = [quota_schedule(sum(masked[r][s:e]), spb) for r in range(batch)]
        i = 0
        while True:
            active = []
            for r in range(batch):
                if done[r]:
                    continue
                if rule == "quota":
                    if i < spb:
                        active.append(r)
                elif any(masked[r][s:e]):
                    active.append(r)
            if not active:
                break
            if i >= max(spb, K):  # cannot happen: every non-quota step commits at least one mask of the block
                raise RuntimeError(f"block {b} did not finish in {i} steps")

            logits = step_logits(lm, x, full_mask, plen, G, logits_eos_inf)  # ONE forward of the whole batch

            for r in active:
                before = nfe[r]
                nfe[r] += 1
                t = nfe[r]
                row = logits[r]  # [G, V] float32
                x0 = [argmax_first(row[j]) for j in range(G)]

                # 1. early exit, checked before committing
                if exit is not None:
                    g = top_gap_mean(row)
                    if g >= exit_tau(exit, before / S, tau_high, tau_low, exit_k):
                        for j in range(G):
                            if masked[r][j]:
                                set_token(r, j, x0[j], t)
                        done[r] = True
                        continue

                # 2. commit
                cands = [j for j in range(s, e) if masked[r][j]]
                conf = {}
                if remasking == "random":
                    draws = rng.random(K)
                    for j in range(s, e):
                        conf[j] = np.float32(draws[j - s])
                else:
                    for j in cands:
                        conf[j] = softmax32(row[j])[x0[j]]
                if confidence_eos_eot_inf:
                    for j in cands:
                        if x0[j] == eos_id or (eot_id is not None and x0[j] == eot_id):
                            conf[j] = np.float32(-np.inf)
                entropy = {j: entropy32(row[j]) for j in cands} if rule == "entropy" else {}
                chosen = choose_commits(rule, cands, conf, entropy,
                                        quota=quotas[r][i] if rule == "quota" else 0,
                                        threshold=threshold, factor=factor)
                for j in chosen:
                    set_token(r, j, x0[j], t)

                # 3. done?
                if not any(masked[r]):
                    done[r] = True
                elif stop_at_eos:
                    eos_positions = [j for j in range(G) if not masked[r][j] and x[r, plen + j] == eos_id]
                    if eos_positions:
                        first = eos_positions[0]
                        if not any(masked[r][:first]):
                            for j in range(first + 1, G):
                                if masked[r][j]:
                                    set_token(r, j, eos_id, t)
                            done[r] = True
            i += 1

    return {
        "tokens": x[:, plen:].astype(np.int64),
        "nfe": np.array(nfe, dtype=np.int64),
        "trajectory": np.array(traj, dtype=np.int64),
    }
