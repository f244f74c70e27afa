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
  are final, so this is exact for cache="block" (no sub-block DualCache, which is approximate and not
  modelled here).

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

import numpy as np

from decode_reference_d2f import canvas_logits  # the model call on an explicit mask (nothing D2F-specific)


def block_causal_mask(length: int, block_length: int) -> np.ndarray:
    i = np.arange(length)
    return (i[None, :] // block_length) <= (i[:, None] // block_length)


def raw_logits(model, canvas: list[int], block_length: int) -> np.ndarray:
    """float32 [T, V]: the model's output at every canvas position under the block-causal mask."""
    return canvas_logits(model, canvas, block_causal_mask(len(canvas), block_length))


def reference_fdv2(lm, prompt: list[int], *, gen_length: int, block_length: int = 32, sub_block_length: int = 8,
                   threshold: float = 0.9, stop_ids=None, trace: list | None = None):
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

    if p0 >= bs:  # prefill the prompt's whole blocks (upstream: p0 > bs, see the module docstring)
        raw = predict(x[: p0 // bs * bs])
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
        for s in range(bs // sbs):
            a, e = start + s * sbs, start + (s + 1) * sbs
            while mask_id in x[a:e]:
                if stopped(pl):
                    done = True
                    break
                raw = predict(x)
                nfe += 1
                logits = raw[a - 1:e - 1]  # position q reads the output at q - 1
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
                    trace.append(dict(forward=nfe, block=start // bs, sub_block=s, committed=[a + j - p0 for j in np.flatnonzero(commit)]))
            if done:
                break
        if done or stopped(pl):
            done = True
            break
        if len(x) - p0 >= gen_length:  # the next block's first token would not fit in gen_length (see above)
            break
        raw = predict(x)  # the commit forward: the block's K/V become final, its last logit starts the next block
        nfe += 1
        x.append(int(np.argmax(raw[-1])))
    out = x[p0:]
    first = next((i for i, t in enumerate(out) if t in stops), None)
    if first is not None:
        out = out[: first + 1]
    return out, nfe
