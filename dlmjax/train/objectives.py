"""Training objectives, as pure functions of (model, batch, key).

masked_diffusion_loss (LLaDA SFT, dllm-algorithms.md 1.5): t ~ U(eps, 1) per row; every
  scored token is replaced by the mask id with probability t; the loss is the cross
  entropy on the masked tokens divided by t, summed per row, divided by the row's number
  of scored tokens, averaged over rows. The prompt is never masked.
  With t_sampling="stratified" (the default) the batch's t values are one uniform draw
  shifted by i/B (the low-discrepancy sampler of MDLM, Sahoo et al. 2024): each t is
  still U(eps, 1), so the loss has the same expectation as LLaDA's i.i.d. draw, with lower
  variance, which matters for the 1/t weight. t_sampling="iid" is LLaDA's draw exactly.
autoregressive_loss: next-token cross entropy on the scored tokens under causal attention.

Both return (loss, metrics). Families with shifted logits (Dream, Qwen) read the
prediction for position i from output i-1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from dlmjax.attention import attention_mask
from dlmjax.errors import DlmjaxError
from dlmjax.model import position_ids, shift_right


def _causal_mask(attn: jax.Array) -> jax.Array:
    t = attn.shape[1]
    return jnp.tril(jnp.ones((t, t), bool))[None] & (attn[:, None, :] > 0)


T_SAMPLING = ("stratified", "iid")


def sample_t(key, batch_size: int, eps: float, t_sampling: str = "stratified") -> jax.Array:
    """[batch_size, 1] masking rates, each distributed U(eps, 1)."""
    if t_sampling == "iid":
        u = jax.random.uniform(key, (batch_size, 1))
    elif t_sampling == "stratified":
        u = (jax.random.uniform(key, ()) + jnp.arange(batch_size)[:, None] / batch_size) % 1.0
    else:
        raise DlmjaxError(f"t_sampling must be one of {T_SAMPLING}, not {t_sampling!r}")
    return eps + (1.0 - eps) * u


def masked_diffusion_loss(model, batch, key, *, eps: float = 1e-3, t_sampling: str = "stratified"):
    cfg = model.config
    ids, attn, scored = batch["input_ids"], batch["attention_mask"], batch["loss_mask"] > 0
    t_key, m_key = jax.random.split(key)
    t = sample_t(t_key, ids.shape[0], eps, t_sampling)
    masked = (jax.random.uniform(m_key, ids.shape) < t) & scored
    noisy = jnp.where(masked, cfg.mask_token_id, ids)
    logits, _ = model(noisy, position_ids(cfg, attn), attention_mask("bidirectional", attn))
    if cfg.shifted_logits:
        logits = shift_right(logits)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, ids)
    per_row = jnp.sum(jnp.where(masked, ce / t, 0.0), axis=1) / jnp.maximum(jnp.sum(scored, axis=1), 1)
    n_masked = jnp.maximum(jnp.sum(masked), 1)
    accuracy = jnp.sum((jnp.argmax(logits, -1) == ids) & masked) / n_masked
    return jnp.mean(per_row), {"masked_ce": jnp.sum(jnp.where(masked, ce, 0.0)) / n_masked, "masked_acc": accuracy}


def autoregressive_loss(model, batch, key=None):
    del key
    cfg = model.config
    ids, attn, scored = batch["input_ids"], batch["attention_mask"], batch["loss_mask"] > 0
    logits, _ = model(ids, position_ids(cfg, attn), _causal_mask(attn))
    logits, targets, weights = logits[:, :-1], ids[:, 1:], scored[:, 1:]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    count = jnp.maximum(jnp.sum(weights), 1)
    loss = jnp.sum(jnp.where(weights, ce, 0.0)) / count
    accuracy = jnp.sum((jnp.argmax(logits, -1) == targets) & weights) / count
    return loss, {"token_acc": accuracy}


OBJECTIVES = {"mdm": masked_diffusion_loss, "ar": autoregressive_loss}
