"""D2F's asymmetric distillation (Discrete Diffusion Forcing), with its noise explicit
(training-recipes.md sections 2 and 5.2, read off SJTU-DENG-Lab/Discrete-Diffusion-Forcing
`D2F-train/utils/{loss,util}.py`).

    noise = d2f_sample_noise(key, batch, block_size=16)
    loss, aux = d2f_loss(bind(model), batch, noise, mask_id=126336, block_size=16, shift=False)

The response is cut into blocks of `block_size` from the prompt's end (the last may be partial);
block b of row i is masked token by token with a ratio p[i, b] that does not decrease along the
row (p0 ~ U[0.2, 0.7), then increments up to 0.7). The student (the model with its LoRA adapter)
reads the noisy row under a block-causal mask: the prompt sees the prompt, a response token sees
the prompt, the earlier blocks and its own block. The teacher is the same network with the
adapter off and full attention over the same noisy row (no second copy of the weights, no
gradient). The loss at each masked token is the cross entropy of the student against the
teacher's softmax (`self_align`; else against the clean token), divided by the block's ratio,
averaged over the batch's masked tokens.

Kept from the official code: the ratio generator, including its dependence on the batch's largest
block count; the prompt as one attended block; the teacher's full attention over the noisy row,
EOS padding included; Dream's shift (the logit at j - 1 predicts token j, position 0 filled
with ones, never used since position 0 is prompt); one mean over all masked tokens.
Dropped: a batch without any masked token gives the official code a NaN loss (the mean of an
empty tensor, quirk 2.6.2); here its loss is 0 with zero gradient, so one such batch does not
poison a run. The hard-coded LLaDA mask id (2.6.1) is the `mask_id` argument.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dlmjax.errors import DlmjaxError

P_LOW, P_HIGH = 0.2, 0.7


def block_causal_mask(prompt_lengths: jax.Array, length: int, block_size: int) -> jax.Array:
    """bool [B, 1, L, L], True = may attend: everyone sees the prompt; a response query also sees
    the earlier blocks and its own (blocks counted from the row's prompt end)."""
    p = jnp.asarray(prompt_lengths, jnp.int32)[:, None, None]
    q = jnp.arange(length)[None, :, None]
    k = jnp.arange(length)[None, None, :]
    blk_q, blk_k = (q - p) // block_size, (k - p) // block_size
    allow = (k < p) | ((q >= p) & (k >= p) & (blk_k <= blk_q))
    return allow[:, None]


def d2f_sample_noise(key, batch, *, block_size: int, per_row: bool = False) -> dict:
    """{"mask": bool [B, L], "ratio": float32 [B, L]} with the official distributions (module
    docstring): n_i = ceil((L - P_i) / block_size) blocks per row, Mb = max_i n_i,
    p = min(concat(p0, p0 + cumsum(inc)), 1) with p0 ~ U[0.2, 0.7) and inc ~ U * (0.7 - p0) / (Mb - 1).
    per_row=True uses each row's own n_i for Mb, as the official training (batch 1 per device) does."""
    ids = batch["input_ids"]
    b, length = ids.shape
    p = jnp.asarray(batch["prompt_lengths"], jnp.int32)
    n = -(-jnp.maximum(length - p, 0) // block_size)
    most = n[:, None] if per_row else jnp.max(n)
    slots = -(-length // block_size)  # a static bound on the block count: Mb's increments are the first Mb - 1
    k0, k1, k2 = jax.random.split(key, 3)
    p0 = jax.random.uniform(k0, (b, 1)) / 2 + P_LOW
    inc = jax.random.uniform(k1, (b, max(slots - 1, 0))) * (P_HIGH - p0) / jnp.maximum(most - 1, 1)
    ratios = jnp.minimum(jnp.concatenate([p0, p0 + jnp.cumsum(inc, axis=1)], axis=1), 1.0)
    j = jnp.arange(length)[None]
    response = j >= p[:, None]
    block = jnp.clip((j - p[:, None]) // block_size, 0, slots - 1)
    ratio = jnp.where(response, jnp.take_along_axis(ratios, block, axis=1), 0.0).astype(jnp.float32)
    mask = (jax.random.uniform(k2, (b, length)) < ratio) & response
    return {"mask": mask, "ratio": ratio}


def _shift(logits):
    return jnp.concatenate([jnp.ones_like(logits[:, :1]), logits[:, :-1]], axis=1)


def d2f_loss(model, batch, noise, *, mask_id: int, block_size: int, shift: bool,
             self_align: bool = True, reduce: str = "batch") -> tuple[jax.Array, dict]:
    """D2F's distillation loss of one batch (module docstring) and {"n_masked"}.

    model: the interface's callable (`dlmjax.train.objectives.bind`) of the model with its
    adapter; batch: {"input_ids" [B, L], "prompt_lengths" [B]}; noise: `d2f_sample_noise`'s
    {"mask", "ratio"} (the ratio is read at masked tokens only). Official: block_size 16,
    shift False for LLaDA and True for Dream, self_align True. reduce="rows": the mean over rows
    of each row's own mean (aux "row_losses" [B]), the official training's per-device batch of 1."""
    ids = jnp.asarray(batch["input_ids"], jnp.int32)
    b, length = ids.shape
    p = jnp.asarray(batch["prompt_lengths"], jnp.int32)
    m = noise["mask"] & (jnp.arange(length)[None] >= p[:, None])
    x = jnp.where(m, mask_id, ids)
    student = model(x, attn_mask=block_causal_mask(p, length, block_size), adapter=True)
    if shift:
        student = _shift(student)
    log_q = jax.nn.log_softmax(student, axis=-1)
    if self_align:
        teacher = jax.lax.stop_gradient(model(x, attn_mask=None, adapter=False))
        if shift:
            teacher = _shift(teacher)
        token = -jnp.sum(jax.nn.softmax(teacher, axis=-1) * log_q, axis=-1)
    else:
        token = -jnp.take_along_axis(log_q, ids[..., None], axis=-1)[..., 0]
    ratio = jnp.where(m, noise["ratio"], 1.0)
    weighted = jnp.where(m, token / ratio, 0.0)
    n = jnp.sum(m)
    if reduce == "rows":
        rows = jnp.sum(weighted, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1)
        return jnp.mean(rows), {"n_masked": n.astype(jnp.int32), "row_losses": rows}
    if reduce != "batch":
        raise DlmjaxError(f"reduce must be 'batch' (the official reductions) or 'rows' (per-row losses), not {reduce!r}")
    return jnp.sum(weighted) / jnp.maximum(n, 1), {"n_masked": n.astype(jnp.int32)}
