"""Fast-dLLM v2's block-diffusion fine-tuning objective, with its noise explicit
(training-recipes.md sections 3 and 5.3, read off the Fast_dLLM_v2_7B modeling code and
NVlabs/Fast-dLLM `v2/train_scripts`).

    noise = fdv2_sample_noise(key, batch, bd_size=32)
    loss, aux = fdv2_loss(bind(model), batch, noise, mask_id=151665, bd_size=32)

A packed row x0 of L tokens (L a multiple of `bd_size`; labels -100 where nothing is learned)
gets one masking ratio per block, t ~ U(0, 1), p = (1 - 1e-3) t + 1e-3; the label tokens are
masked with it in one copy and the complementary label tokens in the other. Each copy runs as
one 2L row [x_t ; x0] under the BD3-LM mask: a noisy block sees itself and the strictly earlier
clean blocks, the clean half is block-causal; both halves take positions 0..L-1. The logits of
the noisy half predict the next token (the causal-LM shift), and the loss is the cross entropy
at the masked label positions of both copies, summed, over the batch's label count (the official
Trainer's `num_items_in_batch`; normalize="targets" divides by the targets instead, as a bare
forward does).

Kept from the official code: the shift (a block's first token is predicted from the noisy
previous block's last position, quirk 3.6.2), a label at row position 0 never being a target yet
counted in the normaliser (3.6.3), a position whose input already is the mask id counting as a
target in both copies (3.6.6), documents packed without separation (the mask spans them).
Not part of the loss: the frozen `<|im_end|>` embedding row of the official model (3.6.1; its
`padding_idx`) is a property of the optimiser step: `TrainConfig.frozen_embedding_rows`, which the
Fast-dLLM v2 recipe sets to [151645]; the in-place mutation of the caller's labels
(3.6.5) has no counterpart in a pure function.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from dlmjax.errors import DlmjaxError

IGNORE = -100
EPS = 1e-3


def block_diff_mask(length: int, bd_size: int) -> jax.Array:
    """bool [1, 1, 2L, 2L] over [noisy ; clean], True = may attend (BD3-LM)."""
    i = jnp.arange(2 * length)
    clean = i >= length
    blk = jnp.where(clean, i - length, i) // bd_size
    q_clean, k_clean = clean[:, None], clean[None, :]
    q_blk, k_blk = blk[:, None], blk[None, :]
    own = (q_blk == k_blk) & (q_clean == k_clean)
    earlier_clean = (q_blk > k_blk) & k_clean & ~q_clean
    causal_clean = (q_blk >= k_blk) & k_clean & q_clean
    return (own | earlier_clean | causal_clean)[None, None]


def _check(length: int, bd_size: int) -> None:
    if length % bd_size:
        raise DlmjaxError(f"Fast-dLLM v2 rows must be a multiple of bd_size {bd_size} tokens, got {length}; "
                          "pack or pad the rows to a multiple")


def fdv2_sample_noise(key, batch, *, bd_size: int, eps: float = EPS) -> dict:
    """{"mask": bool [B, L]}: one ratio p = (1 - eps) t + eps, t ~ U(0, 1), per block of bd_size."""
    b, length = batch["input_ids"].shape
    _check(length, bd_size)
    k_t, k_m = jax.random.split(key)
    t = jax.random.uniform(k_t, (b, length // bd_size, 1))
    p = (1 - eps) * t + eps
    return {"mask": (jax.random.uniform(k_m, (b, length // bd_size, bd_size)) < p).reshape(b, length)}


def fdv2_loss(model, batch, noise, *, mask_id: int, bd_size: int, normalize: str = "labels",
              reduce: str = "batch") -> tuple[jax.Array, dict]:
    """The block-diffusion fine-tuning loss of one batch (module docstring) and its aux values.

    model: the interface's callable (`dlmjax.train.objectives.bind`); batch: {"input_ids" [B, L],
    "labels" [B, L]} with -100 where nothing is learned; noise: `fdv2_sample_noise`'s {"mask"}.
    Official: bd_size = the config's (32), normalize="labels". reduce="rows": the mean over rows
    of each row's own normalised loss (aux "row_losses" [B]), the official per-device batch of 1."""
    if normalize not in ("labels", "targets"):
        raise DlmjaxError(f"normalize must be 'labels' (the official Trainer) or 'targets', not {normalize!r}")
    ids = jnp.asarray(batch["input_ids"], jnp.int32)
    labels = jnp.asarray(batch["labels"], jnp.int32)
    b, length = ids.shape
    _check(length, bd_size)
    scored = labels != IGNORE
    x1 = jnp.where(noise["mask"] & scored, mask_id, ids)
    x2 = jnp.where(~noise["mask"] & scored, mask_id, ids)
    lab1 = jnp.where(x1 == mask_id, labels, IGNORE)
    lab2 = jnp.where(x2 == mask_id, labels, IGNORE)
    rows = jnp.concatenate([jnp.concatenate([x1, ids], 1), jnp.concatenate([x2, ids], 1)], 0)
    positions = jnp.concatenate([jnp.arange(length), jnp.arange(length)])[None]
    logits = model(rows, attn_mask=block_diff_mask(length, bd_size), positions=positions)[:, :length]
    targets = jnp.concatenate([lab1, lab2], 0)[:, 1:]  # the logit at j predicts the label at j + 1
    live = targets != IGNORE
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], jnp.where(live, targets, 0))
    ce = jnp.where(live, ce, 0.0)
    ce_noisy, ce_comp = jnp.sum(ce[:b]), jnp.sum(ce[b:])
    n_noisy, n_comp = jnp.sum(live[:b]), jnp.sum(live[b:])
    n_labels = jnp.sum(scored)
    denominator = n_labels if normalize == "labels" else n_noisy + n_comp
    loss = (ce_noisy + ce_comp) / jnp.maximum(denominator, 1)
    aux = {"ce_sum_noisy": ce_noisy, "ce_sum_comp": ce_comp, "n_targets_noisy": n_noisy.astype(jnp.int32),
           "n_targets_comp": n_comp.astype(jnp.int32), "n_labels": n_labels.astype(jnp.int32)}
    if reduce == "rows":
        row_ce = jnp.sum(ce[:b], axis=1) + jnp.sum(ce[b:], axis=1)
        row_n = jnp.sum(scored, axis=1) if normalize == "labels" else jnp.sum(live[:b], axis=1) + jnp.sum(live[b:], axis=1)
        rows = row_ce / jnp.maximum(row_n, 1)
        return jnp.mean(rows), aux | {"row_losses": rows}
    if reduce != "batch":
        raise DlmjaxError(f"reduce must be 'batch' (the official reductions) or 'rows' (per-row losses), not {reduce!r}")
    return loss, aux
