"""Models for engine tests whose confidences are known: the rules' real paths must fire.

The random tiny checkpoints of conftest.py give first-step confidences of 0.06-0.47, so a
0.9 threshold, a 0.5-nat entropy bound or Prophet's exits never fire on them and only the
"commit the best one" fallback runs. Two ways out, both keeping the checkpoint's config (so
the engine reuses the programs it compiled for the random model):

- `sharpened(lm, scale)`: the output head times `scale`. The argmax tokens stay those of the
  random model; every softmax gets peakier, so the thresholds, bounds and exits fire.
- `constant_logits(lm, row)`: every position of every sequence gets exactly the logits `row`
  [V], bit for bit. Confidences, entropies and margins are then exact numbers (a two-way tie
  gives p = 0.5, a margin of m gives exactly m), so a test can sit a knob exactly on a rule's
  comparison, or one ulp either side.
"""

from __future__ import annotations

import numpy as np
from flax import nnx

import dlmjax

# RMSNorm of s * e_0 in a hidden size H: mean(x^2) = s^2 / H. With s^2 / H = 2^20 the norm's
# eps (1e-6 .. 1e-5) vanishes in float32 (2^20's ulp is 0.125), rsqrt(2^20) = 2^-10 exactly,
# and the normed residual is exactly (s / 1024) e_0.
_RMS_SQUARE = 2.0**20


def _own_copy(lm):
    """A module with its own parameter variables: `lm.model` shares them with `lm.state`, so
    assigning to them there would change `lm` (and every test sharing it)."""
    return nnx.clone(lm.model)


def sharpened(lm, scale: float):
    """`lm` with its output head multiplied by `scale` (a new LM; `lm` is unchanged)."""
    model = _own_copy(lm)
    head = model.embed if model.lm_head is None else model.lm_head
    head.value = head.value * np.float32(scale)
    return dlmjax.LM(model, directory=lm.directory)


def constant_logits(lm, row) -> dlmjax.LM:
    """`lm`'s architecture with every position's logits exactly `row` ([V] float32 values that
    are multiples of a power of two, so that dividing them by the normed scale is exact).

    Every token embeds to s * e_0, attention and MLP outputs are zero (o_proj, down_proj = 0),
    so the residual stream is s * e_0 at every position and layer; the final norm makes it
    exactly c * e_0 and the head's column 0 holds row / c."""
    cfg = lm.config
    if cfg.tie_word_embeddings:
        raise ValueError("constant_logits needs an untied output head")
    h = cfg.hidden_size
    scale = float(np.sqrt(_RMS_SQUARE * h))
    normed = scale / np.sqrt(_RMS_SQUARE)  # = sqrt(h)
    if normed != int(normed) or int(normed) & (int(normed) - 1):
        raise ValueError(f"constant_logits needs a hidden size that is a power of 4, not {h}")
    row = np.asarray(row, np.float32)
    if row.shape != (cfg.vocab_size,):
        raise ValueError(f"row must have the vocabulary's {cfg.vocab_size} entries")
    column = row / np.float32(normed)
    if not np.array_equal(column * np.float32(normed), row):
        raise ValueError("row / sqrt(hidden_size) is not exact in float32")
    model = _own_copy(lm)
    embed = np.zeros(model.embed.value.shape, np.float32)
    embed[:, 0] = scale
    model.embed.value = model.embed.value.at[...].set(embed)
    for layer in model.layers:
        for proj in (layer.o_proj, layer.down_proj):
            proj.weight.value = proj.weight.value * 0
    for norm in [model.final_norm] + [n for layer in model.layers for n in (layer.attn_norm, layer.mlp_norm)]:
        norm.weight.value = norm.weight.value * 0 + 1
    head = np.zeros(model.lm_head.value.shape, np.float32)
    head[:, 0] = column
    model.lm_head.value = model.lm_head.value.at[...].set(head)
    return dlmjax.LM(model, directory=lm.directory)


def padded_prompts(lm):
    """The engine tests' batch: 3 rows of 12 random ids, rows 0 and 2 left-padded by 5 and 2."""
    ids = np.random.default_rng(11).integers(0, 96, (3, 12))
    mask = np.ones_like(ids)
    for row, pad in ((0, 5), (2, 2)):
        ids[row, :pad] = lm.config.pad_token_id
        mask[row, :pad] = 0
    return ids, mask


def assert_same_decode(out, ref):
    """The engine's output equals a reference loop's dict: tokens, NFE and trajectory."""
    np.testing.assert_array_equal(out.tokens, ref["tokens"])
    np.testing.assert_array_equal(out.nfe, ref["nfe"])
    np.testing.assert_array_equal(out.trajectory, ref["trajectory"])


def two_way_tie(vocab: int, first: int = 0, second: int = 1, low: float = -1.0e4) -> np.ndarray:
    """Logits with two tokens tied on top (softmax exactly 0.5 each) and the rest at `low`
    (exp underflows to exactly 0)."""
    row = np.full((vocab,), low, np.float32)
    row[[first, second]] = 0.0
    return row


def with_margin(vocab: int, margin: float, first: int = 0, second: int = 1, low: float = -1.0e4) -> np.ndarray:
    """Logits whose top-1 minus top-2 gap is exactly `margin` (token `first` on top)."""
    row = np.full((vocab,), low, np.float32)
    row[first] = np.float32(margin)
    row[second] = 0.0
    return row
