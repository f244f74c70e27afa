"""A deliberately plain Python-loop reference of the sampled decode rules of dlmjax/decode/SPEC.md.

Covers the quota rule (LLaDA; temperature, "low_confidence" / "random" remasking, classifier-free
guidance) and the Dream rules (origin, maskgit_plus, topk_margin, entropy; temperature, top_p, top_k,
alg_temp, eps). It is written independently of the jitted engine, for parity tests:

* logits come only from ``lm.logits(x, full_mask)`` (float32 [B, L, V], raw, unshifted);
* the random streams are the ones SPEC.md fixes: ``key = jax.random.key(seed)``; before a step whose
  batch forward count is t (0-based over the whole decode, one count per step, CFG included),
  ``sample_key, select_key = jax.random.split(jax.random.fold_in(key, t))``; Gumbel sampling noise
  of generation position j (only the current block's are ever read) is [B, V] from
  ``jax.random.fold_in(sample_key, j)``; uniform [B, G] (random remasking, Dream origin) or
  Gumbel [B, G] (Dream alg_temp > 0) selection noise from select_key. Only the draws use JAX;
  the rest is numpy;
* every row is handled in a Python loop, float32 math, ties go to the lower position (stable sorts
  of the negated score) and to the lower token id (argmax).

Resolutions of points SPEC.md leaves open (see the report in the docstring of reference_generate).
"""

from __future__ import annotations

import numpy as np

RULES = ("quota", "dream")
REMASKING = ("low_confidence", "random")
DREAM_ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")

F32 = np.float32


# ----------------------------------------------------------------------------- small numpy helpers
def softmax(logits):
    """float32 softmax over the last axis; -inf entries get probability 0."""
    x = np.asarray(logits, dtype=F32)
    top = np.max(x, axis=-1, keepdims=True)
    e = np.exp(x - top).astype(F32)
    return (e / np.sum(e, axis=-1, keepdims=True, dtype=F32)).astype(F32)


def top_by_score(positions, scores, n):
    """The n positions with the highest score; ties go to the position listed first (the lower one)."""
    positions = list(positions)
    if n <= 0 or not positions:
        return []
    order = np.argsort(-np.asarray(scores, dtype=F32), kind="stable")
    return [positions[k] for k in order[: min(n, len(positions))]]


def dream_timesteps(spb, eps):
    """ts = linspace(1, eps, spb + 1) in float32 (computed by jnp.linspace, as a float32 numpy array)."""
    import jax.numpy as jnp

    return np.asarray(jnp.linspace(1.0, eps, spb + 1, dtype=jnp.float32), dtype=F32)


def dream_process(logits, temperature, top_p, top_k):
    """Dream's sample_tokens logit processing for one position: returns (processed logits l, probs)."""
    l = np.array(logits, dtype=F32, copy=True)
    if temperature > 0:
        l = (l / F32(temperature)).astype(F32)
    if top_p is not None and top_p < 1:
        order = np.argsort(-l, kind="stable")  # descending, lower token id first on ties
        cum = np.cumsum(softmax(l[order]), dtype=F32)
        remove = cum > F32(top_p)
        remove[1:] = remove[:-1].copy()  # shift right: the first token past top_p stays
        remove[0] = False
        l[order[remove]] = -np.inf
    if top_k:
        k = min(int(top_k), l.shape[-1])
        kth = np.sort(l)[::-1][k - 1]
        l[l < kth] = -np.inf
    return l, softmax(l)


def dream_confidence(alg, probs, x0):
    if alg == "maskgit_plus":
        return F32(probs[x0])
    if alg == "topk_margin":
        s = np.sort(probs)[::-1]
        return F32(s[0] - s[1])
    if alg == "entropy":
        return F32(np.sum(probs * np.log(probs + F32(1e-10)), dtype=F32))
    raise ValueError(alg)


# ----------------------------------------------------------------------------- the decoder
def reference_generate(lm, prompt_ids, attention_mask=None, *, gen_length, block_length, steps,
                       rule, remasking="low_confidence", temperature=0.0, cfg_scale=0.0,
                       alg="maskgit_plus", alg_temp=0.0, top_p=1.0, top_k=None, eps=1e-3, seed=0):
    """Decode like SPEC.md; returns {"tokens": int [B, G], "nfe": int [B], "trajectory": int [B, G]}.

    rule "quota": LLaDA's fixed-count rule (remasking, temperature, cfg_scale).
    rule "dream": Dream's diffusion_generate rules (alg, temperature, top_p, top_k, alg_temp, eps, cfg_scale).

    Choices where SPEC.md is open:
    - t of the RANDOMNESS section counts decode steps that ran a forward (one per step, CFG's two
      passes included as one step), over the whole decode; steps where no row is active are not run.
    - "done" beats "i < spb": a row whose generation region has no masks left is inactive (no nfe)
      even inside its fixed spb steps (only happens in the last block when spb > block length for the
      quota rule, or when a Dream row fills its last block early).
    - CFG: cfg_scale == 0 is CFG off. With CFG on, nfe grows by 2 per step and a commit's trajectory
      value is the row's nfe after that step (2, 4, ...). CFG is also accepted by rule "dream"
      (combined on raw logits before the shift, as SPEC says).
    - Dream n: float32 mean over all B rows of the block's mask count now (done rows count 0), times
      float32 (1 - s/t), floored; floor(mean) at the last step; capped at the row's candidates.
      origin commits every candidate at the last step, else those with u < 1 - s/t (float32).
    - top_k None or 0 is off, top_k > V is V; top_p None or >= 1 is off. Filtered logits are -inf.
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if rule == "quota" and remasking not in REMASKING:
        raise ValueError(f"remasking must be one of {REMASKING}, got {remasking!r}")
    if rule == "dream" and alg not in DREAM_ALGS:
        raise ValueError(f"alg must be one of {DREAM_ALGS}, got {alg!r}")
    if rule == "quota" and ((top_p is not None and top_p < 1) or top_k or alg_temp):
        raise ValueError("top_p, top_k and alg_temp belong to rule 'dream'")
    G, K, S = int(gen_length), int(block_length), int(steps)
    if G <= 0 or K <= 0 or G % K:
        raise ValueError(f"gen_length {G} must be a positive multiple of block_length {K}")
    nb = G // K
    if S <= 0 or S % nb:
        raise ValueError(f"steps {S} must be a positive multiple of the number of blocks {nb}")
    spb = S // nb
    if temperature < 0 or cfg_scale < 0 or alg_temp < 0:
        raise ValueError("temperature, cfg_scale and alg_temp must be >= 0")

    import jax
    import jax.numpy as jnp

    prompt = np.asarray(prompt_ids)
    if prompt.ndim == 1:
        prompt = prompt[None]
    B, P = prompt.shape
    pmask = np.ones((B, P), np.int32) if attention_mask is None else np.asarray(attention_mask).reshape(B, P)
    cfg = lm.config
    M = int(cfg.mask_token_id)
    V = int(cfg.vocab_size)
    use_cfg = cfg_scale > 0

    x = np.concatenate([prompt.astype(np.int32), np.full((B, G), M, np.int32)], axis=1)
    full_mask = np.concatenate([pmask.astype(np.int32), np.ones((B, G), np.int32)], axis=1)

    def gen_logits(canvas):
        """[B, G, V] float32 logits of the generation region: CFG, shift, mask column -inf."""
        raw = np.asarray(lm.logits(canvas, full_mask), dtype=F32)
        if use_cfg:
            uncond = canvas.copy()
            uncond[:, :P] = M
            u = np.asarray(lm.logits(uncond, full_mask), dtype=F32)
            raw = (u + F32(cfg_scale + 1) * (raw - u)).astype(F32)
        if cfg.shifted_logits:
            raw = np.concatenate([raw[:, :1], raw[:, :-1]], axis=1)
        out = np.array(raw[:, P:P + G], dtype=F32, copy=True)
        out[..., M] = -np.inf
        return out

    key = jax.random.key(seed)
    nfe = np.zeros(B, np.int64)
    traj = np.zeros((B, G), np.int64)
    done = [False] * B
    forwards = 0  # t of SPEC's randomness section

    for b in range(nb):
        lo, hi = b * K, (b + 1) * K  # block, relative to the generation region
        n_b = [int(np.sum(x[r, P + lo:P + hi] == M)) for r in range(B)]
        quota = [[n_b[r] // spb + (1 if i < n_b[r] % spb else 0) for i in range(spb)] for r in range(B)]
        ts = dream_timesteps(spb, eps) if rule == "dream" else None

        for i in range(spb):
            active = [not done[r] for r in range(B)]
            if not any(active):
                break
            logits = gen_logits(x)
            sample_key, select_key = jax.random.split(jax.random.fold_in(key, forwards))
            forwards += 1
            # sampling noise of block position j: [B, V] from its own key (drawn only when sampling)
            g = {j: np.asarray(jax.random.gumbel(jax.random.fold_in(sample_key, j), (B, V), jnp.float32), dtype=F32)
                 for j in range(lo, hi)} if temperature > 0 else None
            needs_u = (rule == "quota" and remasking == "random") or (rule == "dream" and alg == "origin")
            needs_h = rule == "dream" and alg != "origin" and alg_temp > 0
            u = np.asarray(jax.random.uniform(select_key, (B, G), jnp.float32), dtype=F32) if needs_u else None
            h = np.asarray(jax.random.gumbel(select_key, (B, G), jnp.float32), dtype=F32) if needs_h else None

            if rule == "dream" and alg != "origin":
                # batch-average count of the block's masks NOW (done rows have none, so count 0)
                total = sum(int(np.sum(x[r, P + lo:P + hi] == M)) for r in range(B))
                mean = F32(total) / F32(B)
                t_now, s_next = ts[i], ts[i + 1]
                if i == spb - 1:
                    n_dream = int(np.floor(mean))
                else:
                    n_dream = int(np.floor(F32(mean * (F32(1) - F32(s_next / t_now)))))

            for r in range(B):
                if not active[r]:
                    continue
                nfe[r] += 2 if use_cfg else 1
                cands = [j for j in range(lo, hi) if x[r, P + j] == M]
                if not cands:
                    chosen, x0 = [], {}
                elif rule == "quota":
                    x0, conf = {}, []
                    for j in cands:
                        lj = logits[r, j]
                        if temperature > 0:
                            x0[j] = int(np.argmax((lj + F32(temperature) * g[j][r]).astype(F32)))
                        else:
                            x0[j] = int(np.argmax(lj))
                        if remasking == "low_confidence":
                            conf.append(softmax(lj)[x0[j]])
                        else:
                            conf.append(u[r, j])
                    chosen = top_by_score(cands, conf, quota[r][i])
                else:  # dream
                    x0, conf = {}, []
                    for j in cands:
                        l, probs = dream_process(logits[r, j], temperature, top_p, top_k)
                        if temperature > 0:
                            x0[j] = int(np.argmax((l + g[j][r]).astype(F32)))
                        else:
                            x0[j] = int(np.argmax(probs))
                        if alg != "origin":
                            c = dream_confidence(alg, probs, x0[j])
                            if alg_temp > 0:
                                c = F32(F32(c / F32(alg_temp)) + h[r, j])
                            conf.append(c)
                    if alg == "origin":
                        if i == spb - 1:
                            chosen = list(cands)
                        else:
                            p_transfer = F32(F32(1) - F32(ts[i + 1] / ts[i]))
                            chosen = [j for j in cands if u[r, j] < p_transfer]
                    else:
                        chosen = top_by_score(cands, conf, n_dream)
                for j in chosen:
                    x[r, P + j] = x0[j]
                    traj[r, j] = nfe[r]
                if not np.any(x[r, P:] == M):
                    done[r] = True

    return {"tokens": x[:, P:].copy(), "nfe": nfe, "trajectory": traj}
