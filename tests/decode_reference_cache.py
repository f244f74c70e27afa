"""A deliberately plain Python-loop reference of Fast-dLLM's prefix and dual KV-cache decoding.

It follows the section "Fast-dLLM KV caches" of dlmjax/decode/SPEC.md on top of the uncached
rules that tests/decode_reference.py implements (its helpers are reused). One model call
per forward, then numpy and per-row Python loops. Clarity over speed; nothing is shared with the
engine or its plumbing: the positions, the attention mask and the KV cache (a dict of arrays) are
built here, and the model's forward is called on keys and values this file keeps itself
(`model(window, positions, mask, kv=...)`), so a bug in dlmjax's cache, mask or position code
cannot show up identically here. Low-confidence remasking only; temperature > 0 samples x0 of the current block with the
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
- The cache is float32 (`cache_dtype` may change it) and starts as zeros with no slot written; the
  first refresh writes every slot, so its initial content never matters. A window's queries attend
  to every real key of a written slot (the window's own slots included, fresh or kept).
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


# ------------------------------------------------------------------ the reference's own plumbing
# Nothing below comes from dlmjax: the positions, the attention mask and the cache (a dict of
# arrays) are built here from SPEC.md; only the model's forward is called, on keys and values this
# file keeps itself (`kv=`, see dlmjax.model.Transformer.__call__).

POSITIONS_FROM_MASK = {"llada": False, "dream": True, "fast_dllm_v2": True}  # Dream: cumsum(mask) - 1, padding at 1
SHIFTED = {"llada": False, "dream": True, "fast_dllm_v2": True}  # the prediction for slot i is the output at i - 1


def own_positions(family, full_mask):
    """RoPE positions [B, L]: absolute 0..L-1 (LLaDA), or the real tokens numbered from 0 with
    padding at position 1 (Dream, as its generation_utils does)."""
    full_mask = np.asarray(full_mask, np.int64)
    b, length = full_mask.shape
    if not POSITIONS_FROM_MASK[family]:
        return np.broadcast_to(np.arange(length), (b, length)).copy()
    return np.where(full_mask > 0, np.cumsum(full_mask, axis=1) - 1, 1)


def own_mask(full_mask, T, written):
    """[B, T, L] bool: every query attends to every real (unpadded) key in a written slot."""
    keys = np.asarray(full_mask, bool) & np.asarray(written, bool)[None, :]
    return np.broadcast_to(keys[:, None, :], (keys.shape[0], T, keys.shape[1])).copy()


def empty_cache(cfg, batch, length, dtype=np.float32):
    """{"k": [per layer [B, Hkv, L, D]], "v": [...], "written": [L] bool}, all zeros / False."""
    shape = (batch, cfg.num_kv_heads, length, cfg.head_dim)
    return {"k": [jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)],
            "v": [jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)],
            "written": np.zeros(length, bool)}


def _window_merge(old, fresh, w0, keep):
    """old [B, H, L, D] with slots [w0, w0 + T) replaced by fresh [B, H, T, D], except the kept ones."""
    t = fresh.shape[2]
    if keep is not None:
        stale = jax.lax.dynamic_slice_in_dim(old, w0, t, axis=2)
        fresh = jnp.where(keep[None, None, :, None], stale, fresh.astype(old.dtype))
    return jax.lax.dynamic_update_slice_in_dim(old, fresh.astype(old.dtype), w0, axis=2)


def _forward(graphdef, state, ids, positions, mask, cache_k, cache_v, w0, keep):
    from flax import nnx

    module = nnx.merge(graphdef, state)

    def kv(layer, k, v):
        return _window_merge(cache_k[layer], k, w0, keep), _window_merge(cache_v[layer], v, w0, keep)

    logits, attended = module(ids, positions, mask, kv=kv)
    return logits, [k for k, _ in attended], [v for _, v in attended]


_forward_jit = jax.jit(_forward, static_argnums=(0,))


def jitted_forward(model):
    """forward(ids, positions, mask, cache_k, cache_v, w0, keep) -> (logits, k list, v list) of the
    module `model`, compiled with jax.jit (one compile per shape; the window start is traced, so the
    dual cache's blocks share one compile). It is still one model call per forward, made from the
    Python loop; jit only removes op-by-op dispatch. A non-module callable is returned as is (it
    must follow the same protocol)."""
    from flax import nnx

    if not isinstance(model, nnx.Module):
        return model
    graphdef, state = nnx.split(model)

    def call(ids, positions, mask, cache_k, cache_v, w0, keep):
        return _forward_jit(graphdef, state, ids, positions, mask, cache_k, cache_v, jnp.asarray(w0, jnp.int32), keep)

    return call


def eager_forward(model):
    """The same protocol as `jitted_forward`, called op by op (no jax.jit)."""
    from flax import nnx

    if not isinstance(model, nnx.Module):
        return model
    graphdef, state = nnx.split(model)
    return lambda ids, positions, mask, k, v, w0, keep: _forward(graphdef, state, ids, positions, mask, k, v, w0, keep)


def cached_forward(forward, cfg, canvas, full_mask, cache, w0, T, keep=None):
    """One forward of the window canvas[:, w0:w0+T]: its fresh K/V go to slots [w0, w0+T) except
    the kept ones, and its queries attend to every written slot. Returns (raw float32 logits
    [B, T, V] as numpy, the new cache)."""
    keep_arr = None if keep is None else np.asarray(keep, bool)
    written = cache["written"].copy()
    written[w0:w0 + T] |= True if keep_arr is None else ~keep_arr
    positions = own_positions(cfg.family, full_mask)[:, w0:w0 + T]
    mask = own_mask(full_mask, T, written)
    ids = jnp.asarray(np.asarray(canvas)[:, w0:w0 + T], dtype=jnp.int32)
    logits, k, v = forward(ids, jnp.asarray(positions, jnp.int32), jnp.asarray(mask), cache["k"], cache["v"], w0,
                           None if keep_arr is None else jnp.asarray(keep_arr))
    return np.array(logits, dtype=np.float32), {"k": list(k), "v": list(v), "written": written}


def cache_to_numpy(cache):
    """(k, v): lists over layers of numpy [B, Hkv, L, D]."""
    return [np.array(k) for k in cache["k"]], [np.array(v) for v in cache["v"]]


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
    cfg = lm.config
    if cfg.family not in SHIFTED:
        raise ValueError(f"no reference plumbing for family {cfg.family!r}")
    model = jitted_forward(lm.model) if jit else eager_forward(lm.model)
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
    shifted = SHIFTED[cfg.family]
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
    kv = empty_cache(cfg, batch, L, cache_dtype)
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
