"""A deliberately plain Python-loop reference of Fast-dLLM's prefix and dual KV-cache decoding.

It follows the section "Fast-dLLM KV caches" of dlmjax/decode/SPEC.md on top of the uncached
rules that tests/decode_reference.py implements (its helpers are reused). One model call
per forward through the cache API (`model(x_window, positions, mask, cache=, cache_index=,
cache_keep=)`), then numpy and per-row Python loops. Clarity over speed; nothing is shared with
the engine. Low-confidence remasking only; temperature > 0 samples x0 of the current block with the
noise of SPEC.md's "Randomness" (position j of the block: [B, V] from fold_in(sample_key, j), where
sample_key comes from the count t of the batch's forwards so far; float64 with gumbel_x64), and every
other position carries the argmax.

Choices where SPEC.md leaves room (the parity tests rely on them):
- Everything the uncached reference chose carries over: "masked" is a per-position state (a
  committed mask id stays committed), thresholds are compared in float32, the exit signal and
  tau(p) are float64, 0 log 0 = 0, done rows are never active.
- The carried predictions (x0, conf, entropy, top1 - top2 margin) are refreshed for the ACTIVE
  rows of a forward only (no other row reads them before its next refresh). conf is p[x0] of the
  step that predicted the position; confidence_eos_eot_inf is applied when the rule reads it
  (same result: x0 is carried with it).
- Which generation positions a forward predicts:
    refresh             every position, with the uncached shift (position j reads raw[P + j - 1]
                        for shifted families, so it is exactly the uncached step);
    dual, unshifted     the block [s, e) (window = slots P+s .. P+e-1);
    dual, shifted       s+1 .. e-1 (window position k > 0 reads raw[k-1]); s keeps its refresh values;
    prefix, unshifted   the whole region 0 .. G-1 (window = slots P .. L-1; slots before P+s keep their K/V);
    prefix, shifted     1 .. G-1 (window position k > 0 reads raw[k-1]); generation position 0 keeps the
                        values of the block's refresh. So, for prefix + Dream, position s IS updated at
                        cached steps (from the query at slot P+s-1, which is inside the window); this only
                        matters for the SchED signal, since s is committed by the refresh.
- Shifted families: the refresh commits exactly position s (if it is still masked) with its x0,
  after the early-exit check and followed by the usual done / stop_at_eos check. With the quota rule
  the quotas of cached steps i = 1 .. spb-1 are quota_schedule(masks of the block left after the
  refresh, spb - 1)[i - 1]; spb < 2 is refused (ValueError).
- The cache is float32 (`cache_dtype` may change it) and starts as zeros; the first refresh writes
  every slot, so its initial content never matters.
- `trace` (optional list): one dict per forward is appended, with keys block, step (i), kind
  ("refresh" | "cached"), w0, T, keep, canvas (before the forward), active (rows), cache_before and
  cache_after ((k, v) lists of numpy [B, Hkv, L, D] per layer) and raw (the window's raw logits).
- The model call is compiled with jax.jit by default (`jit=False`: the module is called eagerly).
  It is still one call per forward, made from the Python loop with the same arguments; jit only
  removes op-by-op dispatch (on a tiny CPU model eager mode spends its time compiling single ops).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from decode_reference import EXITS, choose_commits, entropy32, exit_tau, prepare, quota_schedule, softmax32

CACHED_RULES = ("quota", "threshold", "factor", "entropy")
CACHES = ("prefix", "dual")


def _run_module(graphdef, state, ids, positions, mask, cache, cache_index, cache_keep):
    from flax import nnx

    module = nnx.merge(graphdef, state)
    return module(ids, positions, mask, cache=cache, cache_index=cache_index, cache_keep=cache_keep)


_run_module_jit = jax.jit(_run_module, static_argnums=(0,))


def jitted_module(model):
    """The module's call (same signature) with its forward compiled by jax.jit, one compile per shape.

    Still one model call per forward, made from the Python loop; only the op-by-op dispatch is gone
    (tiny test models spend most eager time compiling single ops). The window start is passed as a
    traced int32 so the dual cache's blocks share one compile. A non-module callable is returned as is."""
    from flax import nnx

    if not isinstance(model, nnx.Module):
        return model
    graphdef, state = nnx.split(model)

    def call(ids, positions, mask, cache=None, cache_index=0, cache_keep=None):
        return _run_module_jit(graphdef, state, ids, positions, mask, cache, jnp.asarray(cache_index, jnp.int32),
                               cache_keep)

    return call


def cached_forward(model, cfg, canvas, full_mask, cache, w0, T, keep=None):
    """One eager forward of the window canvas[:, w0:w0+T] through the cache.

    Returns (raw float32 logits [B, T, V] as numpy, the new cache)."""
    from dlmjax.attention import attention_mask
    from dlmjax.model import position_ids

    fm = jnp.asarray(full_mask, dtype=jnp.int32)
    positions = position_ids(cfg, fm)
    ids = jnp.asarray(np.asarray(canvas)[:, w0:w0 + T], dtype=jnp.int32)
    mask = attention_mask("bidirectional", fm, query_index=jnp.arange(w0, w0 + T))
    keep_arr = None if keep is None else jnp.asarray(np.asarray(keep, dtype=bool))
    logits, cache = model(ids, positions[:, w0:w0 + T], mask, cache=cache, cache_index=w0, cache_keep=keep_arr)
    return np.array(logits, dtype=np.float32), cache


def cache_to_numpy(cache):
    """(k, v): lists over layers of numpy [B, Hkv, L, D]."""
    return [np.array(k) for k in cache.k], [np.array(v) for v in cache.v]


def _margin64(row_logits):
    """top1 - top2 of one position's logits (float64)."""
    values = np.sort(row_logits.astype(np.float64))
    return float(values[-1] - values[-2])


def reference_generate_cached(lm, prompt_ids, attention_mask=None, *, cache, gen_length, block_length, steps,
                              rule="quota", threshold=None, factor=None, exit=None, tau_high=7.5, tau_low=2.5,
                              exit_k=4.0, stop_at_eos=False, logits_eos_inf=False, confidence_eos_eot_inf=False,
                              temperature=0.0, seed=0, gumbel_x64=False, cache_dtype=jnp.float32, trace=None,
                              jit=True) -> dict:
    """Decode per SPEC.md with a prefix or dual KV cache. Returns {"tokens", "nfe", "trajectory"} (numpy int).

    `lm` needs `.config` and `.model` (the cache-aware module); any object with both works."""
    from dlmjax.cache import KVCache

    cfg = lm.config
    model = jitted_module(lm.model) if jit else lm.model
    prompt, pmask, (G, K, S, nb, spb) = prepare(prompt_ids, attention_mask, gen_length, block_length, steps)
    batch, plen = prompt.shape
    if cache not in CACHES:
        raise ValueError(f"unknown cache {cache!r}; use one of {CACHES}")
    if rule not in CACHED_RULES:
        raise ValueError(f"unknown rule {rule!r}")
    if exit not in EXITS:
        raise ValueError(f"unknown exit {exit!r}")
    if rule in ("threshold", "entropy") and threshold is None:
        raise ValueError(f"rule {rule!r} needs threshold")
    if rule == "factor" and factor is None:
        raise ValueError("rule 'factor' needs factor")
    if (stop_at_eos or logits_eos_inf or confidence_eos_eot_inf) and cfg.eos_token_id is None:
        raise ValueError("stop_at_eos, logits_eos_inf and confidence_eos_eot_inf need the model's eos_token_id")
    shifted = bool(cfg.shifted_logits)
    if shifted and rule == "quota" and spb < 2:
        raise ValueError("the quota rule with a cache on a shifted-logit model needs at least 2 steps per block")
    if plen < 1:
        raise ValueError("the prompt must not be empty")

    mask_id, eos_id, eot_id = cfg.mask_token_id, cfg.eos_token_id, cfg.eot_token_id
    L = plen + G

    x = np.concatenate([prompt.astype(np.int64), np.full((batch, G), mask_id, dtype=np.int64)], axis=1)
    full_mask = np.concatenate([pmask, np.ones((batch, G), dtype=np.int32)], axis=1)
    masked = [[True] * G for _ in range(batch)]
    done = [False] * batch
    nfe = [0] * batch
    traj = [[0] * G for _ in range(batch)]
    # carried predictions per row and generation position
    c_x0 = [[0] * G for _ in range(batch)]
    c_conf = [[np.float32(0)] * G for _ in range(batch)]
    c_ent = [[np.float32(0)] * G for _ in range(batch)]
    c_margin = [[0.0] * G for _ in range(batch)]
    kv = KVCache.zeros(cfg, batch, L, cache_dtype)
    key = jax.random.key(seed)
    forwards = 0  # t of SPEC's randomness section: forwards of the batch before this one

    def set_token(r, j, token, t):
        x[r, plen + j] = int(token)
        masked[r][j] = False
        traj[r][j] = t

    def clean_logits(v):
        """The SPEC's column edits on one position's logits [V] (a copy)."""
        v = v.astype(np.float32).copy()
        v[mask_id] = -np.inf
        if logits_eos_inf:
            v[eos_id] = -np.inf
        return v

    def block_noise(sample_key, s, e):
        """{j: Gumbel noise [B, V]} for the block's positions, each from its own key."""
        noise = {}
        for j in range(s, e):
            position_key = jax.random.fold_in(sample_key, j)
            if gumbel_x64:
                with jax.enable_x64(True):
                    u = jax.random.uniform(position_key, (batch, cfg.vocab_size), jnp.float64,
                                           minval=np.finfo(np.float64).tiny)
                    noise[j] = np.asarray(-jnp.log(-jnp.log(u)), dtype=np.float64)
            else:
                noise[j] = np.asarray(jax.random.gumbel(position_key, (batch, cfg.vocab_size), jnp.float32))
        return noise

    def carry(r, j, v, noise):
        v = clean_logits(v)
        if j in noise:  # sampled: a position of the current block at temperature > 0
            if gumbel_x64:
                c_x0[r][j] = int(np.argmax(v.astype(np.float64) + np.float64(np.float32(temperature)) * noise[j][r]))
            else:
                c_x0[r][j] = int(np.argmax((v + np.float32(temperature) * noise[j][r]).astype(np.float32)))
        else:
            c_x0[r][j] = int(np.argmax(v))
        c_conf[r][j] = softmax32(v)[c_x0[r][j]]
        c_ent[r][j] = entropy32(v)
        c_margin[r][j] = _margin64(v)

    for b in range(nb):
        s, e = b * K, (b + 1) * K
        quotas = {}
        if rule == "quota" and not shifted:
            quotas = {r: quota_schedule(sum(masked[r][s:e]), spb) for r in range(batch)}
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

            # ---- the window of this forward
            if i == 0:
                kind, w0, T, keep = "refresh", 0, L, None
            elif cache == "dual":
                kind, w0, T, keep = "cached", plen + s, K, None
            else:
                kind, w0, T, keep = "cached", plen, G, [k < s for k in range(G)]
            record = None
            if trace is not None:
                record = dict(block=b, step=i, kind=kind, w0=w0, T=T, keep=None if keep is None else np.array(keep),
                              canvas=x.copy(), active=list(active), cache_before=cache_to_numpy(kv))
            raw, kv = cached_forward(model, cfg, x, full_mask, kv, w0, T, keep)  # ONE forward of the whole batch
            sample_key = jax.random.split(jax.random.fold_in(key, forwards))[0]
            forwards += 1
            noise = block_noise(sample_key, s, e) if temperature > 0 else {}
            if record is not None:
                record["raw"] = raw
                record["cache_after"] = cache_to_numpy(kv)
                trace.append(record)

            # ---- which generation position reads which window output
            if kind == "refresh":
                reads = [(j, plen + j - 1 if shifted else plen + j) for j in range(G)]
            else:
                first = w0 - plen  # generation position of window position 0
                if shifted:
                    reads = [(first + k, k - 1) for k in range(1, T)]
                else:
                    reads = [(first + k, k) for k in range(T)]

            for r in active:
                before = nfe[r]
                nfe[r] += 1
                t = nfe[r]
                for j, k in reads:
                    carry(r, j, raw[r, k], noise)

                # 1. early exit on the carried margins, before committing
                if exit is not None:
                    g = float(np.mean(c_margin[r]))
                    if g >= exit_tau(exit, before / S, tau_high, tau_low, exit_k):
                        for j in range(G):
                            if masked[r][j]:
                                set_token(r, j, c_x0[r][j], t)
                        done[r] = True
                        continue

                # 2. commit
                if shifted and kind == "refresh":
                    chosen = [s] if masked[r][s] else []  # the block's first position, no rule
                else:
                    cands = [j for j in range(s, e) if masked[r][j]]
                    conf = {}
                    for j in cands:
                        conf[j] = c_conf[r][j]
                        special = c_x0[r][j] == eos_id or (eot_id is not None and c_x0[r][j] == eot_id)
                        if confidence_eos_eot_inf and special:
                            conf[j] = np.float32(-np.inf)
                    entropy = {j: c_ent[r][j] for j in cands}
                    quota = 0
                    if rule == "quota":
                        quota = quotas[r][i - 1] if shifted else quotas[r][i]
                    chosen = choose_commits(rule, cands, conf, entropy, quota=quota, threshold=threshold,
                                            factor=factor)
                for j in chosen:
                    set_token(r, j, c_x0[r][j], t)
                if shifted and kind == "refresh" and rule == "quota":
                    quotas[r] = quota_schedule(sum(masked[r][s:e]), spb - 1)

                # 3. done?
                if not any(masked[r]):
                    done[r] = True
                elif stop_at_eos:
                    eos_positions = [j for j in range(G) if not masked[r][j] and x[r, plen + j] == eos_id]
                    if eos_positions:
                        first_eos = eos_positions[0]
                        if not any(masked[r][:first_eos]):
                            for j in range(first_eos + 1, G):
                                if masked[r][j]:
                                    set_token(r, j, eos_id, t)
                            done[r] = True
            i += 1

    return {
        "tokens": x[:, plen:].astype(np.int64),
        "nfe": np.array(nfe, dtype=np.int64),
        "trajectory": np.array(traj, dtype=np.int64),
    }
