"""A deliberately plain Python-loop reference of Fast-dLLM v2's hierarchical decoding (block cache only).

Written from ../shared/reference/d2f-fdv2-decoding.md section 2.4 (the hub `generate`, "G"), one
unpadded prompt at a time, with Python lists:

* Blocks of `block_length` (bs) are aligned to absolute position 0. A prompt longer than one block
  is prefilled up to its last whole block (one forward); if it ends exactly on a block boundary,
  the prefill's last logit gives the first generated token (AR-style).
* Each generated block: masks are appended up to the next multiple of bs (a prompt that ends
  mid-block is re-fed with them), then sub-blocks of `sub_block_length` are decoded strictly left to
  right, one forward per step; when the block has no mask left, a commit forward of the block gives,
  from its last logit, the first token of the next block (never re-decoded).
* A step: softmax of the current sub-block's predictions (position q reads the output at q - 1), x1 =
  argmax, c = p[x1] on masked positions (-inf elsewhere); commit every c > threshold (strict) and
  always the argmax of c; float32.
* Stop: before every forward, and when a block starts, generation ends once a stop token sits after
  the prompt with no mask before it in the current block (the hub's check); the output is cut after
  the first stop token (kept).
* The forward is a full recompute of the canvas under the block-causal mask (a query sees a key iff
  key // bs <= query // bs). Upstream's prefix cache holds only committed whole blocks whose tokens
  are final, so this is exact for cache="block".
* cache="dual" (the sub-block DualCache, section 2.2-2.3, approximate) keeps K/V itself, as upstream
  does: a prefix store (per layer, the post-RoPE K/V of whole blocks, appended by the prefill and the
  commit forwards) and a block store. A step runs the whole block (bs tokens; its K/V replace the
  block store) on the block's first forward and whenever the current sub-block's first token is
  masked; otherwise it runs only the sub-block, whose fresh K/V are written into the block store in
  place, while its queries read the rest of the block from the store (stale). Every query sees the
  whole prefix and the whole block. Predictions: position q reads the output at q - 1 when q - 1 is
  in the forward's input, else its own (never a masked position). The model is called with the
  keys and values this file keeps (`kv=`), not through dlmjax's cache.

Where we depart from upstream (dlmjax/decode/SPEC.md says why):
* a prompt of exactly bs tokens is prefilled (upstream's `P0 > bs` never feeds it, so its output
  ignores the prompt);
* the in-block forwards use the real block size for the mask (upstream's in-block calls fall back to
  a 32-token mask, which for bs = 64 hides half the block from the other half);
* the mask token's logit is -inf before the softmax;
* at most gen_length tokens: upstream's last commit forward appends one token past max_new_tokens
  when the prompt ends on a block boundary (gen_length + 1 tokens); that forward is not run here.

Returns (generated tokens after the prompt, NFE: prefill + steps + commit forwards).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from decode_reference_d2f import canvas_logits  # the model call on an explicit mask (nothing D2F-specific)


def block_causal_mask(length: int, block_length: int) -> np.ndarray:
    i = np.arange(length)
    return (i[None, :] // block_length) <= (i[:, None] // block_length)


def raw_logits(model, canvas: list[int], block_length: int) -> np.ndarray:
    """float32 [T, V]: the model's output at every canvas position under the block-causal mask."""
    return canvas_logits(model, canvas, block_causal_mask(len(canvas), block_length))


def _kv_call(graphdef, state, ids, mask, prefix_k, prefix_v, store_k, store_v, offset):
    """Queries `ids` [1, T] at absolute positions offset_position .. (given by `mask`'s caller) attend,
    under `mask` [1, T, Pc + S], to the prefix K/V [1, H, Pc, D] followed by the store [1, H, S, D]
    whose rows [offset, offset + T) are replaced by the queries' fresh K/V. Returns the logits and the
    updated stores (per layer)."""
    from flax import nnx

    ids, positions = ids
    module = nnx.merge(graphdef, state)

    def kv(layer, k, v):
        sk = jax.lax.dynamic_update_slice_in_dim(store_k[layer], k, offset, axis=2)
        sv = jax.lax.dynamic_update_slice_in_dim(store_v[layer], v, offset, axis=2)
        return jnp.concatenate([prefix_k[layer], sk], axis=2), jnp.concatenate([prefix_v[layer], sv], axis=2)

    logits, attended = module(ids, positions, mask, kv=kv)
    pc = prefix_k[0].shape[2]
    return logits[0], [k[:, :, pc:] for k, _ in attended], [v[:, :, pc:] for _, v in attended]


_kv_call_jit = jax.jit(_kv_call, static_argnums=(0,))


class _DualStores:
    """The sub-block DualCache's K/V, kept here: the prefix (whole blocks) and the current block."""

    def __init__(self, model):
        from flax import nnx

        self.graphdef, self.state = nnx.split(model)
        cfg = model.config
        self.empty = lambda n: [jnp.zeros((1, cfg.num_kv_heads, n, cfg.head_dim), jnp.float32) for _ in range(cfg.num_layers)]
        self.prefix_k, self.prefix_v = self.empty(0), self.empty(0)
        self.block_k = self.block_v = None

    def call(self, tokens, first_position, store_k, store_v, offset, mask):
        t = len(tokens)
        ids = (jnp.asarray([tokens], jnp.int32), (first_position + jnp.arange(t, dtype=jnp.int32))[None])
        logits, k, v = _kv_call_jit(self.graphdef, self.state, ids, jnp.asarray(mask)[None], self.prefix_k, self.prefix_v,
                                    store_k, store_v, offset)
        return np.array(logits, dtype=np.float32), k, v

    def prefill(self, tokens, bs):
        """The prompt's whole blocks, block-causal among themselves; their K/V become the prefix."""
        n = len(tokens)
        logits, k, v = self.call(tokens, 0, self.empty(n), self.empty(n), 0, block_causal_mask(n, bs))
        self.prefix_k, self.prefix_v = k, v
        return logits

    def block(self, tokens, start):
        """The whole block at positions start ..; its K/V replace the block store."""
        n = len(tokens)
        width = self.prefix_k[0].shape[2] + n
        logits, self.block_k, self.block_v = self.call(tokens, start, self.empty(n), self.empty(n), 0, np.ones((n, width), bool))
        return logits

    def sub_block(self, tokens, start, offset):
        """The sub-block at positions start + offset ..; its K/V are written into the block store."""
        width = self.prefix_k[0].shape[2] + self.block_k[0].shape[2]
        logits, self.block_k, self.block_v = self.call(tokens, start + offset, self.block_k, self.block_v, offset,
                                                       np.ones((len(tokens), width), bool))
        return logits

    def commit(self, tokens, start):
        """The finished block, run whole; its K/V are appended to the prefix."""
        logits = self.block(tokens, start)
        self.prefix_k = [jnp.concatenate([a, b], axis=2) for a, b in zip(self.prefix_k, self.block_k)]
        self.prefix_v = [jnp.concatenate([a, b], axis=2) for a, b in zip(self.prefix_v, self.block_v)]
        return logits


def reference_fdv2(lm, prompt: list[int], *, gen_length: int, block_length: int = 32, sub_block_length: int = 8,
                   threshold: float = 0.9, stop_ids=None, cache: str = "block", trace: list | None = None):
    cfg = lm.config
    mask_id = cfg.mask_token_id
    if stop_ids is None:
        stop_ids = [t for t in (cfg.eos_token_id, cfg.eot_token_id) if t is not None]
    stops = set(stop_ids)
    bs, sbs = block_length, sub_block_length
    model = lm.model
    p0 = len(prompt)
    x = list(prompt)
    nfe = 0

    def predict(canvas):
        raw = raw_logits(model, canvas, bs)
        raw[:, mask_id] = -np.inf
        return raw

    def stopped(pl):
        """A stop token after position pl with no mask before it (in x[pl:])."""
        tail = x[pl:]
        first = next((i for i, t in enumerate(tail) if t in stops), None)
        return first is not None and mask_id not in tail[:first]

    if cache not in ("none", "block", "dual"):  # none and block: the exact full recompute
        raise ValueError(f"cache {cache!r}: the reference models 'none', 'block' and 'dual'")
    stores = _DualStores(model) if cache == "dual" else None

    def shifted_rows(out, first, a, e):
        """Predictions for positions [a, e) from the outputs `out` of positions first ..: the output
        at q - 1 when it is in the input, else q's own (never read: such a q is not masked)."""
        rows = np.stack([out[q - 1 - first] if q - 1 >= first else out[q - first] for q in range(a, e)])
        rows[:, mask_id] = -np.inf
        return rows

    if p0 >= bs:  # prefill the prompt's whole blocks (upstream: p0 > bs, see the module docstring)
        raw = predict(x[: p0 // bs * bs]) if stores is None else stores.prefill(x[: p0 // bs * bs], bs)
        raw[:, mask_id] = -np.inf
        nfe += 1
        if p0 % bs == 0:
            x.append(int(np.argmax(raw[-1])))
    done = False
    for _ in range(gen_length // bs):
        if any(t in stops for t in x[p0:]):
            break
        pl = len(x)
        x += [mask_id] * (bs - pl % bs)
        start = len(x) - bs  # the block's first canvas position
        fresh = True  # the block's first forward runs the whole block (dual)
        for s in range(bs // sbs):
            a, e = start + s * sbs, start + (s + 1) * sbs
            while mask_id in x[a:e]:
                if stopped(pl):
                    done = True
                    break
                kind = "block" if stores is None or fresh or x[a] == mask_id else "sub_block"
                if stores is None:
                    raw = predict(x)
                    logits = raw[a - 1:e - 1]  # position q reads the output at q - 1
                elif fresh or x[a] == mask_id:
                    logits = shifted_rows(stores.block(x[start:], start), start, a, e)
                    fresh = False
                else:
                    logits = shifted_rows(stores.sub_block(x[a:e], start, a - start), a, a, e)
                nfe += 1
                z = logits - logits.max(axis=-1, keepdims=True)
                ez = np.exp(z)
                probs = (ez / ez.sum(axis=-1, keepdims=True)).astype(np.float32)
                x1 = probs.argmax(axis=-1)
                masked = np.array([t == mask_id for t in x[a:e]])
                c = np.where(masked, probs.max(axis=-1), -np.inf).astype(np.float32)
                commit = c > np.float32(threshold)
                commit[int(np.argmax(c))] = True
                commit &= masked
                for j in np.flatnonzero(commit):
                    x[a + j] = int(x1[j])
                if trace is not None:
                    trace.append(dict(forward=nfe, block=start // bs, sub_block=s, kind=kind, committed=[a + j - p0 for j in np.flatnonzero(commit)]))
            if done:
                break
        if done or stopped(pl):
            done = True
            break
        if len(x) - p0 >= gen_length:  # the next block's first token would not fit in gen_length (see above)
            break
        # the commit forward: the block's K/V become final, its last logit starts the next block
        raw = predict(x) if stores is None else stores.commit(x[start:], start)
        raw[:, mask_id] = -np.inf
        nfe += 1
        x.append(int(np.argmax(raw[-1])))
    out = x[p0:]
    first = next((i for i, t in enumerate(out) if t in stops), None)
    if first is not None:
        out = out[: first + 1]
    return out, nfe
