"""A deliberately plain Python-loop reference of D2F's pipelined multi-block decoding.

Written from ../shared/reference/d2f-fdv2-decoding.md section 1 (read off the official
`DreamLoRA._generate_block_single` of D2F-eval/eval_llada.py and eval_dream.py), one row at a time,
with Python lists and dicts for the blocks, exactly as the spec's pseudo-code (section 1.4) runs:

* The canvas is the prompt plus the blocks added so far. Each loop iteration adds at most one
  block (judged on the newest block's decoded ratio >= tau_add), updates the sticky "complete"
  flags (block b+1 is fully activated once block b's ratio >= tau_act, the prompt block included),
  stops when no mask is left and no block is active, runs ONE forward (the NFE), decodes every
  active block in ascending order, and hands finished blocks to the cache strictly in order.
* The forward is a full recompute of the current canvas under the D2F block mask (the prompt is
  block 0; generated block k >= 1 is [P + (k-1)B, P + kB); a query sees a key iff the key's block
  is not later than its own). Section 1.2 shows the official KV cache is exact, so this gives the
  official logits; nothing here models the cache.
* Positions are absolute (0 .. T-1). The logits of position p are the output at p (LLaDA) or at
  p - 1 (Dream: AR shift).
* Per active block: p = softmax(logits) in float32 over the block's masked positions, x0 = argmax
  (first index on ties), confidence = max p; commit every position with confidence > tau_conf
  (strict); a fully activated block that commits nothing commits the one position ranked best by
  `alg` ("maskgit_plus": max p, "topk_margin": top1 - top2, "entropy": sum p log(p + 1e-10)).
  Committing a token equal to `eos_id` stops the adding of blocks (blocks in flight finish).

Where we depart from the official code (dlmjax/decode/SPEC.md says why):
* the mask token's logit is -inf before the softmax (upstream can commit the mask id and then
  decode that position forever);
* NFE is the number of forwards actually run (the official wrappers report 1 per request or
  diffusion_steps per request).

Only temperature 0 (every official D2F script decodes greedily). Returns the generated tokens
(every added block, tokens after an EOS included, as upstream returns the canvas) and the NFE.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

ALGS = ("maskgit_plus", "topk_margin", "entropy")


def d2f_block_ids(prompt_length: int, length: int, block_length: int) -> np.ndarray:
    """Block of every canvas position: 0 for the prompt, 1 + (i - P) // B after it."""
    i = np.arange(length)
    return np.where(i < prompt_length, 0, 1 + (i - prompt_length) // block_length)


def d2f_mask(prompt_length: int, length: int, block_length: int) -> np.ndarray:
    """[T, T] bool: query q sees key k iff block(k) <= block(q)."""
    blocks = d2f_block_ids(prompt_length, length, block_length)
    return blocks[None, :] <= blocks[:, None]


def _call(graphdef, state, ids, positions, mask):
    from flax import nnx

    logits, _ = nnx.merge(graphdef, state)(ids, positions, mask)
    return logits


_call_jit = jax.jit(_call, static_argnums=(0,))


def canvas_logits(model, canvas: list[int], mask: np.ndarray) -> np.ndarray:
    """float32 [T, V]: the model's raw output for one unpadded canvas at absolute positions 0 .. T-1,
    under the [T, T] bool attention mask (jitted per canvas length)."""
    from flax import nnx

    graphdef, state = nnx.split(model)
    t = len(canvas)
    out = _call_jit(graphdef, state, jnp.asarray([canvas], jnp.int32), jnp.arange(t, dtype=jnp.int32)[None],
                    jnp.asarray(mask)[None])
    return np.array(out[0], dtype=np.float32)


def full_logits(model, canvas: list[int], prompt_length: int, block_length: int, shifted: bool, mask_id: int) -> np.ndarray:
    """float32 [T, V]: the prediction for every canvas position (shifted for Dream), mask id at -inf."""
    raw = canvas_logits(model, canvas, d2f_mask(prompt_length, len(canvas), block_length))
    if shifted:
        raw[1:] = raw[:-1].copy()  # position p reads the output at p - 1 (position 0 keeps its own; never read)
    raw[:, mask_id] = -np.inf
    return raw


def _rank(probs: np.ndarray, alg: str) -> np.ndarray:
    if alg == "maskgit_plus":
        return probs.max(axis=-1)
    if alg == "topk_margin":
        top = np.sort(probs, axis=-1)
        return top[:, -1] - top[:, -2]
    return np.sum(probs * np.log(probs + np.float32(1e-10)), axis=-1)


def reference_d2f(lm, prompt: list[int], *, gen_length: int, block_length: int, tau_add: float, tau_act: float,
                  tau_conf: float, alg: str = "maskgit_plus", eos_id: int | None = None, max_iterations: int = 10000,
                  trace: list | None = None):
    """D2F on one unpadded prompt: (generated tokens as a list, NFE)."""
    if alg not in ALGS:
        raise ValueError(f"unknown alg {alg!r}")
    cfg = lm.config
    mask_id = cfg.mask_token_id
    eos_id = cfg.eos_token_id if eos_id is None else eos_id
    shifted = bool(cfg.shifted_logits)
    model = lm.model
    p = len(prompt)
    x = list(prompt)
    blocks = [dict(start=0, end=p, total=p, left=0, state="to_cache", complete=True)]
    n_active, eos, cache_len, nfe = 0, False, 0, 0
    max_blocks = gen_length // block_length

    def ratio(b):
        return (b["total"] - b["left"]) / b["total"]

    for _ in range(max_iterations):
        # (1) add at most one block, judged on the newest one
        if len(blocks) - 1 < max_blocks and not eos and ratio(blocks[-1]) >= tau_add:
            blocks.append(dict(start=len(x), end=len(x) + block_length, total=block_length, left=block_length,
                               state="active", complete=False))
            x += [mask_id] * block_length
            n_active += 1
        # (2) sticky activation: block b+1 is complete once block b's ratio >= tau_act (prompt included)
        for i, b in enumerate(blocks):
            if ratio(b) >= tau_act and i + 1 < len(blocks):
                blocks[i + 1]["complete"] = True
        # (3) termination, before the forward
        if mask_id not in x and n_active == 0:
            break
        # (4) what the official code feeds (only its bookkeeping matters here: the forward is exact)
        to_cache = [i for i, b in enumerate(blocks) if b["state"] == "to_cache"]
        if to_cache:
            upd = blocks[max(to_cache)]["end"] - blocks[min(to_cache)]["start"]
        else:
            if not [b for b in blocks if b["state"] == "active" and b["start"] >= cache_len]:
                break
            upd = 0
        # (5) one forward
        logits = full_logits(model, x, p, block_length, shifted, mask_id)
        nfe += 1
        for i in to_cache:
            blocks[i]["state"] = "in_cache"
        # (6) decode every active block, ascending
        finished = []
        for i, b in enumerate(blocks):
            if b["state"] != "active":
                continue
            locs = [j for j in range(b["start"], b["end"]) if x[j] == mask_id]
            if not locs:
                finished.append(i)
                continue
            z = logits[locs].astype(np.float32)
            z = z - z.max(axis=-1, keepdims=True)
            e = np.exp(z)
            probs = (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)
            x0 = probs.argmax(axis=-1)
            conf = probs.max(axis=-1)
            chosen = [k for k in range(len(locs)) if np.float32(conf[k]) > np.float32(tau_conf)]
            if b["complete"] and not chosen:
                chosen = [int(np.argmax(_rank(probs, alg)))]
            for k in chosen:
                x[locs[k]] = int(x0[k])
                if int(x0[k]) == eos_id:
                    eos = True
            b["left"] -= len(chosen)
            if trace is not None:
                trace.append(dict(forward=nfe, block=i, committed=[locs[k] - p for k in chosen], complete=b["complete"]))
            if mask_id not in x[b["start"]:b["end"]]:
                finished.append(i)
        # (7) finished blocks go to the cache strictly in order
        for i in finished:
            if blocks[i]["state"] == "active" and not any(blocks[j]["state"] == "active" for j in range(1, i)):
                blocks[i]["state"] = "to_cache"
                n_active -= 1
        cache_len += upd
    return x[p:], nfe
