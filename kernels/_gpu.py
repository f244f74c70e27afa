"""Pallas Mosaic GPU kernel for cached block attention (Hopper, sm90, wgmma).

UNVERIFIED ON HARDWARE: written without a GPU. On CPU it is checked only by lowering it
for the "cuda" platform (Pallas -> Mosaic GPU MLIR); PTX generation, compilation and
numerics on an H100 have not been run. `implementation="auto"` therefore compiles it once
per shape before use and falls back to XLA if lowering or compilation raises.

Mosaic GPU, not Triton: the Triton-backed Pallas GPU ops are deprecated.

Deliberately simple (one warpgroup per program, no warp specialisation):
- grid (B, Hkv, R / 64): one program per KV head and 64 query rows (the G query heads
  of the group times the padded Tq, as in the TPU kernel), so K/V are read once per
  KV head when G * Tq8 <= 64 (LLaDA: Tq = 32, G = 1);
- `plgpu.emit_pipeline` streams (128, D) K/V tiles and the (128,) key ids through SMEM
  (TMA, 2 stages); QK^T and PV are `wgmma` with float32 accumulators, the online
  softmax runs in registers in float32 (WGMMA layout; row statistics in WGMMA.reduce(1)).
Requires bfloat16/float16, head_dim % 64 == 0 and <= 256. Unlike the TPU kernel it
does not skip KV tiles that no query can see (it always reads all of S), and it makes no
attempt at FlashAttention-3 style overlap (warp specialisation, ping-pong softmax).
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from . import _prep

BLOCK_ROWS = 64  # wgmma M
BLOCK_K = 128  # wgmma N of QK^T and K of PV
NEG = -1e30
_Tiling = getattr(plgpu, "TilingTransform", None) or getattr(plgpu, "TileTransform")
# plgpu.load(ref, idx, *, layout) in jax 0.10; plgpu.load(ref, *, layout) in jax 0.12.
_LOAD_TAKES_IDX = "idx" in inspect.signature(plgpu.load).parameters


def _load(ref, layout):
    return plgpu.load(ref, (), layout=layout) if _LOAD_TAKES_IDX else plgpu.load(ref, layout=layout)


def unsupported_reason(q, k, v) -> str | None:
    d = q.shape[-1]
    if not (q.dtype == k.dtype == v.dtype):
        return "pallas_gpu needs q, k, v of one dtype"
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return f"pallas_gpu supports bfloat16 and float16, not {q.dtype}"
    if q.shape[2] > 128:
        return "pallas_gpu needs Tq <= 128"
    if d % 64 or d > 256:
        return f"pallas_gpu needs head_dim % 64 == 0 and <= 256, not {d}"
    return None


def device_reason(device) -> str | None:
    cc = getattr(device, "compute_capability", None)
    if cc is None:
        return None  # unknown: let the compile check decide
    if not str(cc).startswith("9."):
        return f"pallas_gpu (wgmma) needs a Hopper GPU (sm90), found compute capability {cc}"
    return None


def _interpret_params(interpret):
    """interpret=True means the Mosaic GPU interpreter (InterpretGPUParams, a private API
    in jax 0.10; the generic interpreter cannot run Mosaic GPU primitives)."""
    if interpret is not True:
        return interpret
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams()


@functools.partial(jax.jit, static_argnames=("interpret",))
def attention(q, k, v, key_valid, q_block, k_block, *, interpret=False):
    """q [B, H, Tq, D], k/v [B, Hkv, S, D] -> [B, H, Tq, D]; see dlmjax.kernels.attention."""
    b, h, tq, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    dtype = q.dtype
    s_pad = _prep.round_up(s, BLOCK_K)
    r = _prep.to_rows(q, k, v, key_valid, q_block, k_block, s_pad=s_pad, row_multiple=BLOCK_ROWS)
    rows = r.q_rows.shape[2]
    swizzle = 128
    transforms = (_Tiling((8, swizzle // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(swizzle))
    scale = 1.0 / d**0.5

    # Interpret mode (a private jax API, used only by tests): the Mosaic GPU interpreter of
    # jax 0.10 has no rules for plgpu.load or layout_cast, and its wgmma takes neither a
    # transposed ref nor a register operand. Layouts do not change values, so interpret
    # mode reads plainly, skips the casts and does both matmuls as dots; the pipeline,
    # index maps, masks, online softmax and output staging are the real code.
    def cast(x, layout):
        return x if interpret else plgpu.layout_cast(x, layout)

    def load_vec(ref, layout):
        return ref[...] if interpret else _load(ref, layout)

    def body(q_gmem, qb_gmem, kbe_gmem, k_gmem, v_gmem, o_gmem, qo_smem, qb_smem, barriers):
        bi, hi, ri = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("r")
        row_slice = pl.ds(ri * BLOCK_ROWS, BLOCK_ROWS)
        plgpu.copy_gmem_to_smem(q_gmem.at[bi, hi, row_slice], qo_smem, barriers.at[0])
        plgpu.copy_gmem_to_smem(qb_gmem.at[row_slice], qb_smem, barriers.at[1])
        plgpu.barrier_wait(barriers.at[0])
        plgpu.barrier_wait(barriers.at[1])
        qb = load_vec(qb_smem, plgpu.Layout.WGMMA.reduce(1))

        def kv_step(_, k_smem, v_smem, kb_smem, carry):
            acc, m, l = carry

            def qk(acc_ref):
                plgpu.wgmma(acc_ref, qo_smem, k_smem.transpose((1, 0)))
                return acc_ref[...]

            if not interpret:
                s_tile = pl.run_scoped(qk, plgpu.ACC((BLOCK_ROWS, BLOCK_K), jnp.float32))
            else:  # the interpreter cannot wgmma a transposed ref
                s_tile = lax.dot_general(
                    qo_smem[...], k_smem[...], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
                )
            s_tile = s_tile * scale
            kb = load_vec(kb_smem, plgpu.Layout.WGMMA.reduce(0))
            shape = (BLOCK_ROWS, BLOCK_K)
            mask = lax.broadcast_in_dim(qb, shape, [0]) >= lax.broadcast_in_dim(kb, shape, [1])
            s_tile = jnp.where(mask, s_tile, NEG)
            m_new = jnp.maximum(m, s_tile.max(axis=1))
            p = jnp.where(mask, jnp.exp(s_tile - lax.broadcast_in_dim(m_new, shape, [0])), 0.0)
            alpha = jnp.exp(m - m_new)
            l = l * alpha + p.sum(axis=1)

            def pv(acc_ref):
                plgpu.wgmma(acc_ref, p.astype(dtype), v_smem)
                return acc_ref[...]

            if not interpret:
                pv_tile = pl.run_scoped(pv, plgpu.ACC((BLOCK_ROWS, d), jnp.float32))
            else:
                pv_tile = jnp.dot(p.astype(dtype), v_smem[...], preferred_element_type=jnp.float32)
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + pv_tile
            return acc, m_new, l

        init = (
            cast(jnp.zeros((BLOCK_ROWS, d), jnp.float32), plgpu.Layout.WGMMA),
            cast(jnp.full((BLOCK_ROWS,), NEG, jnp.float32), plgpu.Layout.WGMMA.reduce(1)),
            cast(jnp.zeros((BLOCK_ROWS,), jnp.float32), plgpu.Layout.WGMMA.reduce(1)),
        )
        acc, _, l = plgpu.emit_pipeline(
            kv_step,
            grid=(s_pad // BLOCK_K,),
            in_specs=[
                plgpu.BlockSpec((BLOCK_K, d), lambda j: (j, 0), transforms=transforms),
                plgpu.BlockSpec((BLOCK_K, d), lambda j: (j, 0), transforms=transforms),
                plgpu.BlockSpec((BLOCK_K,), lambda j: (j,)),
            ],
            max_concurrent_steps=2,
            init_carry=init,
        )(k_gmem.at[bi, hi], v_gmem.at[bi, hi], kbe_gmem.at[bi])

        l_safe = jnp.where(l > 0.0, l, 1.0)  # a row that saw no key has acc == 0: output 0
        out = acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])
        qo_smem[...] = out.astype(dtype)  # q is no longer needed: stage the output there
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(qo_smem, o_gmem.at[bi, hi, row_slice])
        plgpu.wait_smem_to_gmem(0)

    kwargs = {"interpret": _interpret_params(interpret)} if interpret else {}
    out_rows = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((b, hkv, rows, d), dtype),
        scratch_types=[
            plgpu.SMEM((BLOCK_ROWS, d), dtype, transforms=transforms),
            plgpu.SMEM((BLOCK_ROWS,), jnp.int32),
            plgpu.Barrier(num_barriers=2),
        ],
        grid=(b, hkv, rows // BLOCK_ROWS),
        grid_names=("b", "h", "r"),
        compiler_params=plgpu.CompilerParams(),
        **kwargs,
    )(r.q_rows, r.qb_rows, r.kbe, r.k, r.v)
    return _prep.from_rows(out_rows, r)
