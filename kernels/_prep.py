"""Input layout shared by the Pallas kernels (plain XLA ops, run outside the kernels).

The kernels see one "row" per (query head in a KV group, query position), so the query
heads that share a KV head form one matrix and K/V are read once per KV head:

    q [B, H, Tq, D]  ->  q_rows [B, Hkv, R, D],  R = round_up(G * Tq8, row_multiple)

with G = H // Hkv, Tq8 = Tq rounded up to a multiple of 8, row index r = g * Tq8 + t.

The three masks collapse into one int32 per key, `kbe` [B, Sp] ("key block, effective"):
the key's block id if the key is valid, else `INVALID` (2**30). A row may attend to a
key iff `qb_row >= kbe`. Without block ids every valid key has id 0 and every row 0, so
this covers bidirectional, absolute block-causal and prompt-as-one-block masks. Padded
query rows get block id -1 (they attend to nothing and are sliced away); padded keys get
`INVALID`. Block ids are clipped to [-1, INVALID - 1].
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

INVALID = 2**30


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


@dataclasses.dataclass(frozen=True)
class Rows:
    q_rows: jax.Array  # [B, Hkv, R, D]
    qb_rows: jax.Array  # [R] int32
    kbe: jax.Array  # [B, Sp] int32
    k: jax.Array  # [B, Hkv, Sp, D]
    v: jax.Array  # [B, Hkv, Sp, D]
    group: int
    tq: int
    tq8: int


def effective_key_blocks(key_valid, k_block, batch: int, s: int) -> jax.Array:
    """kbe [B, S] int32 (see the module docstring)."""
    if k_block is None:
        kb = jnp.zeros((s,), jnp.int32)
    else:
        kb = jnp.clip(jnp.asarray(k_block).astype(jnp.int32), -1, INVALID - 1)
    kb = jnp.broadcast_to(kb[None, :], (batch, s))
    if key_valid is not None:
        kb = jnp.where(jnp.asarray(key_valid).astype(bool), kb, INVALID)
    return kb


def query_blocks(q_block, tq: int) -> jax.Array:
    if q_block is None:
        return jnp.zeros((tq,), jnp.int32)
    return jnp.clip(jnp.asarray(q_block).astype(jnp.int32), -1, INVALID - 1)


def to_rows(q, k, v, key_valid, q_block, k_block, *, s_pad: int, row_multiple: int) -> Rows:
    b, h, tq, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    g = h // hkv
    tq8 = round_up(tq, 8)
    rows = round_up(g * tq8, row_multiple)

    qg = q.reshape(b, hkv, g, tq, d)
    if tq8 != tq:
        qg = jnp.pad(qg, ((0, 0), (0, 0), (0, 0), (0, tq8 - tq), (0, 0)))
    q_rows = qg.reshape(b, hkv, g * tq8, d)
    if rows != g * tq8:
        q_rows = jnp.pad(q_rows, ((0, 0), (0, 0), (0, rows - g * tq8), (0, 0)))

    qb = query_blocks(q_block, tq)
    qb = jnp.pad(qb, (0, tq8 - tq), constant_values=-1)
    qb_rows = jnp.pad(jnp.tile(qb, g), (0, rows - g * tq8), constant_values=-1)

    kbe = effective_key_blocks(key_valid, k_block, b, s)
    if s_pad != s:
        # A copy of the cache: callers pick tiles that divide S when they can.
        widths = ((0, 0), (0, 0), (0, s_pad - s), (0, 0))
        k, v = jnp.pad(k, widths), jnp.pad(v, widths)
        kbe = jnp.pad(kbe, ((0, 0), (0, s_pad - s)), constant_values=INVALID)
    return Rows(q_rows, qb_rows, kbe, k, v, g, tq, tq8)


def from_rows(out_rows: jax.Array, r: Rows) -> jax.Array:
    b, hkv, _, d = out_rows.shape
    out = out_rows[:, :, : r.group * r.tq8].reshape(b, hkv, r.group, r.tq8, d)[:, :, :, : r.tq]
    return out.reshape(b, hkv * r.group, r.tq, d)
