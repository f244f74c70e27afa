"""dParallel's certainty-forcing objective, with its noise explicit (training-recipes.md sections
1 and 5.1, read off czg1225/dParallel `LLaDA/llada_train.py` and `Dream/dream_train.py`).

    noise = dparallel_sample_noise(key, batch, block_size=32)
    loss, aux = dparallel_loss(bind(model), batch, noise, mask_id=126336, block_size=32, shift=False,
                               entropy_weight=2.0)

Each row's response is cut at a segment: for LLaDA (`block_size` 32) one of the response's
blocks or, for the last choice, the trailing `R mod 32` tokens (possibly none); for Dream
(`block_size=None`) the whole response. Inside the segment each token is masked with
probability 0.5005 in one copy and the complementary tokens in the other; everything after the
segment is masked in both copies and is not a target; everything before stays clean. The loss
of each copy is the masked tokens' cross entropy (a mean over the batch's masked tokens) plus
`entropy_weight` x the mean entropy of softmax(logits / temperature) over the masked tokens the
model already predicts right (argmax over the vocabulary); the two copies add.

Kept from the official code: the fixed ratio (1 - 1e-3) * 0.5 + 1e-3, the inclusive block draw
(the last choice is the remainder segment, empty when the response is a multiple of the block,
and then the loss is exactly 0), full bidirectional attention with no attention mask (EOS
padding attended and trained), token means over the whole batch, a term of 0 when a copy has no
masked (or no correct) token, the entropy's log(p + 1e-12), and Dream's token shift (the logit
at j - 1 predicts token j).
Dropped: the official row loop writes row i's segment mask into every row and keeps only the
last row's masked suffix (quirk 1.6.1; harmless at its per-device batch of 1), here every row
has its own segment at any batch size; the entropy is computed from float32 logits, not bf16
(quirk 1.6.4).
Accumulation (quirk 1.6.7): the official LLaDA step averages its 8 micro-batch gradients, as our
`grad_accum` does, but the official Dream step sums them and clips the sum to norm 1. AdamW is
invariant to the gradient's scale but for its epsilon, so that sum is exactly our mean with clip
1/8 and epsilon 1e-8/8: experiments/recipes/dparallel-dream-7b.yaml sets grad_clip 0.125 and
adam_eps 1.25e-9 (tests/test_recipe_objectives.py checks the identity).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from dlmjax.errors import DlmjaxError

MASK_RATIO = 0.5
EPS = 1e-3


def segments(prompt_lengths: jax.Array, length: int, block_size: int | None, block_index: jax.Array):
    """[s, e) per row, and whether the row has a response at all (R = L - P > 0)."""
    p = jnp.asarray(prompt_lengths, jnp.int32)
    r = length - p
    has = r > 0
    if block_size is None:
        s, e = p, jnp.full_like(p, length)
    else:
        nb = jnp.maximum(r, 0) // block_size
        u = jnp.asarray(block_index, jnp.int32)
        s = p + u * block_size
        e = jnp.where(u == nb, length, s + block_size)
    s, e = jnp.where(has, s, length), jnp.where(has, e, length)
    return s, e, has


def _region(prompt_lengths, length, block_size, block_index):
    """Boolean [B, L] segment and suffix (the tokens masked in both copies)."""
    s, e, has = segments(prompt_lengths, length, block_size, block_index)
    j = jnp.arange(length)[None]
    seg = (j >= s[:, None]) & (j < e[:, None])
    suf = (j >= e[:, None]) & has[:, None]
    return seg, suf


def dparallel_sample_noise(key, batch, *, block_size: int | None, mask_ratio: float = MASK_RATIO, eps: float = EPS) -> dict:
    """{"block_index": int32 [B], "mask": bool [B, L]} with the official distributions: the block
    uniform over 0..(L - P) // block_size inclusive (0 without blocks or without a response), each
    segment token masked with probability (1 - eps) * mask_ratio + eps."""
    ids = batch["input_ids"]
    b, length = ids.shape
    p = jnp.asarray(batch["prompt_lengths"], jnp.int32)
    k_block, k_mask = jax.random.split(key)
    if block_size is None:
        block_index = jnp.zeros((b,), jnp.int32)
    else:
        nb = jnp.maximum(length - p, 0) // block_size
        block_index = jax.random.randint(k_block, (b,), 0, nb + 1).astype(jnp.int32)
    seg, _ = _region(p, length, block_size, block_index)
    mask = (jax.random.uniform(k_mask, (b, length)) < (1 - eps) * mask_ratio + eps) & seg
    return {"block_index": block_index, "mask": mask}


def _mean(values, where, axis):
    """Mean of `values` where `where`, 0 where nothing is selected (the official 0 * logits.sum())."""
    n = jnp.sum(where, axis=axis)
    return jnp.where(n > 0, jnp.sum(jnp.where(where, values, 0.0), axis=axis) / jnp.maximum(n, 1), 0.0)


def _copy_terms(logits, targets, masked, temperature, axis):
    """(CE mean, entropy mean over the correct, #masked, #correct) of one copy, over the whole
    batch (axis None) or per row (axis 1)."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    probs = jax.nn.softmax(logits / temperature, axis=-1)
    entropy = -jnp.sum(probs * jnp.log(probs + 1e-12), axis=-1)
    correct = masked & (jnp.argmax(logits, axis=-1) == targets)
    return (_mean(ce, masked, axis), _mean(entropy, correct, axis), jnp.sum(masked).astype(jnp.int32),
            jnp.sum(correct).astype(jnp.int32))


def dparallel_loss(model, batch, noise, *, mask_id: int, block_size: int | None, shift: bool,
                   temperature: float = 0.5, entropy_weight: float, reduce: str = "batch") -> tuple[jax.Array, dict]:
    """The certainty-forcing loss of one batch (module docstring) and its aux values.

    model: the interface's callable (`dlmjax.train.objectives.bind`); batch: {"input_ids" [B, L],
    "prompt_lengths" [B]}; noise: `dparallel_sample_noise`'s {"block_index", "mask"} (a mask
    outside the segment is ignored). Official: LLaDA block_size=32, shift=False,
    entropy_weight=2.0; Dream block_size=None, shift=True, entropy_weight=1.0; temperature 0.5.
    reduce="batch" takes every mean over the batch's tokens (the official code, the interface);
    reduce="rows" is the mean over rows of each row's own loss (aux "row_losses" [B]), which is
    what the official training computes with its per-device batch of 1."""
    ids = jnp.asarray(batch["input_ids"], jnp.int32)
    b, length = ids.shape
    seg, suf = _region(batch["prompt_lengths"], length, block_size, noise["block_index"])
    m = noise["mask"] & seg
    mc = ~noise["mask"] & seg
    x = jnp.where(m | suf, mask_id, ids)
    xc = jnp.where(mc | suf, mask_id, ids)
    logits = model(jnp.concatenate([x, xc], axis=0))  # both copies in one forward; rows are independent
    z, zc = logits[:b], logits[b:]
    targets = ids
    if shift:
        z, zc, targets, m, mc = z[:, :-1], zc[:, :-1], ids[:, 1:], m[:, 1:], mc[:, 1:]
    axis = _axis(reduce)
    ce, ent, n, nc = _copy_terms(z, targets, m, temperature, axis)
    ce_c, ent_c, n_c, nc_c = _copy_terms(zc, targets, mc, temperature, axis)
    loss = ce + ce_c + entropy_weight * (ent + ent_c)
    aux = {"ce": ce, "ce_c": ce_c, "ent": ent, "ent_c": ent_c, "n_masked": n, "n_masked_c": n_c,
           "n_correct": nc, "n_correct_c": nc_c}
    if axis is not None:
        aux = {k: (jnp.mean(v) if v.ndim else v) for k, v in aux.items()} | {"row_losses": loss}
        loss = jnp.mean(loss)
    return loss, aux


def _axis(reduce: str):
    if reduce not in ("batch", "rows"):
        raise DlmjaxError(f"reduce must be 'batch' (the official reductions) or 'rows' (per-row losses), not {reduce!r}")
    return None if reduce == "batch" else 1
