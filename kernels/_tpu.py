"""Pallas TPU (Mosaic) kernel for cached block attention.

Grid (B, Hkv, S / block_k): the first two axes are "parallel", the KV axis is the
"arbitrary" (sequential) reduction. One program holds all R query rows of a KV head
(G = H / Hkv heads times Tq rounded up to 8, then to 16 for 16-bit dtypes), so K and V
are read from HBM exactly once. Per KV tile it runs the online softmax
in float32 (running max `m`, sum `l` and accumulator `acc` in VMEM scratch); both
matmuls take the input dtype and accumulate in float32.

Block shapes follow the TPU rules (last two dims divisible by 8 and 128, or equal to the
array's): q/out (R, D) and the row block ids (R, 128) are whole arrays, K/V tiles are
(block_k, D) with block_k % 128 == 0, and the per-key ids are laid out [B, 1, S].
Row statistics are kept lane-replicated as (R, 128) float32, the layout Mosaic handles
natively.

Tile skipping: a scalar-prefetched [2B] table holds, per batch row, the first and last
KV tile that any query may see (valid key, block id <= the largest query block id).
Tiles outside that range do no compute, and their index map repeats a fetched tile so
the pipeline issues no new DMA: unused cache slots at the tail (and left padding) cost
neither bandwidth nor FLOPs.

Verified on CPU in interpret mode and by lowering for the "tpu" platform (Pallas ->
Mosaic MLIR); the Mosaic compile and run on TPU hardware are UNVERIFIED.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from . import _prep

LANES = 128
NEG = -1e30  # finite "minus infinity": exp(NEG - x) == 0 and NEG - NEG == 0, never NaN
SCORE_TILE_BYTES = 1 << 20  # cap R * block_k * 4 so the f32 score tile stays ~1 MiB of VMEM


def choose_block_k(s: int, block_k: int, rows: int) -> tuple[int, int]:
    """(tile, padded S). Tiles are multiples of 128 that divide round_up(S, 128), so
    S is only padded (a copy of K/V) when it is not a multiple of 128."""
    bk = max(LANES, (block_k // LANES) * LANES)
    while bk > LANES and rows * bk * 4 > SCORE_TILE_BYTES:
        bk -= LANES
    s_pad = _prep.round_up(s, LANES)
    bk = min(bk, s_pad)
    while s_pad % bk:
        bk -= LANES
    return bk, s_pad


def unsupported_reason(q, k, v) -> str | None:
    d = q.shape[-1]
    if not (q.dtype == k.dtype == v.dtype):
        return "pallas_tpu needs q, k, v of one dtype"
    if q.dtype not in (jnp.float32, jnp.bfloat16):
        return f"pallas_tpu supports float32 and bfloat16, not {q.dtype}"
    if q.shape[2] > 128:
        return "pallas_tpu needs Tq <= 128"
    if d > LANES and d % LANES:
        return f"pallas_tpu needs head_dim <= 128 or a multiple of 128, not {d}"
    return None


def _lanes_to(x, n: int):
    """Widen a lane-replicated (R, 128) array to (R, n)."""
    if n == LANES:
        return x
    if n % LANES == 0:
        return jnp.tile(x, (1, n // LANES))
    return x[:, :n]  # n < 128


def _kernel(range_ref, qb_ref, kbe_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, acc_ref, *, scale, num_tiles):
    b = pl.program_id(0)
    j = pl.program_id(2)

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, NEG, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    first, last = range_ref[2 * b], range_ref[2 * b + 1]

    @pl.when(jnp.logical_and(j >= first, j <= last))
    def _step():
        q = q_ref[...]  # [R, D]
        k = k_ref[...]  # [bk, D]
        v = v_ref[...]  # [bk, D]
        bk, d = k.shape
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
        mask = _lanes_to(qb_ref[...], bk) >= kbe_ref[...]  # [R, bk] >= [1, bk]
        s = jnp.where(mask, s, NEG)
        m_prev = m_ref[...]  # [R, 128]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        p = jnp.where(mask, jnp.exp(s - _lanes_to(m_new, bk)), 0.0)
        alpha = jnp.exp(m_prev - m_new)
        l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
        m_ref[...] = m_new
        pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        acc_ref[...] = acc_ref[...] * _lanes_to(alpha, d) + pv

    @pl.when(j == num_tiles - 1)
    def _finish():
        l = l_ref[...]
        inv = 1.0 / jnp.where(l > 0.0, l, 1.0)  # a row that saw no key has acc == 0: output 0
        o_ref[...] = (acc_ref[...] * _lanes_to(inv, o_ref.shape[-1])).astype(o_ref.dtype)


def _tile_range(kbe, qb_rows, bk: int) -> jax.Array:
    """[2B] int32: first and last KV tile some query row may attend to (last < first: none)."""
    b, s_pad = kbe.shape
    nk = s_pad // bk
    usable = kbe <= jnp.max(qb_rows)
    tiles = usable.reshape(b, nk, bk).any(axis=-1)
    any_tile = tiles.any(axis=-1)
    first = jnp.where(any_tile, jnp.argmax(tiles, axis=-1), 0)
    last = jnp.where(any_tile, nk - 1 - jnp.argmax(tiles[:, ::-1], axis=-1), -1)
    return jnp.stack([first, last], axis=-1).reshape(-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("block_k", "interpret"))
def attention(q, k, v, key_valid, q_block, k_block, *, block_k: int = 512, interpret=False):
    """q [B, H, Tq, D], k/v [B, Hkv, S, D] -> [B, H, Tq, D]; see dlmjax.kernels.attention."""
    b, h, tq, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    row_multiple = 16 if jnp.dtype(q.dtype).itemsize == 2 else 8  # whole packed (16, 128) bf16 tiles
    rows = _prep.round_up((h // hkv) * _prep.round_up(tq, 8), row_multiple)
    bk, s_pad = choose_block_k(s, block_k, rows)
    r = _prep.to_rows(q, k, v, key_valid, q_block, k_block, s_pad=s_pad, row_multiple=row_multiple)
    nk = s_pad // bk
    tile_range = _tile_range(r.kbe, r.qb_rows, bk)
    qb_lanes = jnp.broadcast_to(r.qb_rows[:, None], (rows, LANES))
    kbe3 = r.kbe[:, None, :]  # [B, 1, Sp]: a (1, bk) block obeys the TPU block rules

    def kv_tile(bi, j, rng):
        first, last = rng[2 * bi], rng[2 * bi + 1]
        return jnp.minimum(jnp.maximum(j, first), jnp.maximum(last, first))

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(b, hkv, nk),
        in_specs=[
            pl.BlockSpec((rows, LANES), lambda bi, hi, j, rng: (0, 0)),
            pl.BlockSpec((None, 1, bk), lambda bi, hi, j, rng: (bi, 0, kv_tile(bi, j, rng))),
            pl.BlockSpec((None, None, rows, d), lambda bi, hi, j, rng: (bi, hi, 0, 0)),
            pl.BlockSpec((None, None, bk, d), lambda bi, hi, j, rng: (bi, hi, kv_tile(bi, j, rng), 0)),
            pl.BlockSpec((None, None, bk, d), lambda bi, hi, j, rng: (bi, hi, kv_tile(bi, j, rng), 0)),
        ],
        out_specs=pl.BlockSpec((None, None, rows, d), lambda bi, hi, j, rng: (bi, hi, 0, 0)),
        scratch_shapes=[
            pltpu.VMEM((rows, LANES), jnp.float32),
            pltpu.VMEM((rows, LANES), jnp.float32),
            pltpu.VMEM((rows, d), jnp.float32),
        ],
    )
    itemsize = jnp.dtype(q.dtype).itemsize
    cost = pl.CostEstimate(
        flops=4 * b * hkv * rows * s_pad * d,
        transcendentals=b * hkv * rows * s_pad,
        bytes_accessed=itemsize * (2 * b * hkv * s_pad * d + 2 * b * hkv * rows * d) + 4 * b * s_pad,
    )
    out_rows = pl.pallas_call(
        functools.partial(_kernel, scale=1.0 / d**0.5, num_tiles=nk),
        out_shape=jax.ShapeDtypeStruct((b, hkv, rows, d), q.dtype),
        grid_spec=grid_spec,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        cost_estimate=cost,
        interpret=interpret,
        name="dlmjax_cached_block_attention_tpu",
    )(tile_range, qb_lanes, kbe3, r.q_rows, r.k, r.v)
    return _prep.from_rows(out_rows, r)
