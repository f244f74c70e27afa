"""Cached block attention: a small block of queries against a long cached K/V sequence.

    out = cached_block_attention(q, k, v, key_valid=..., q_block=..., k_block=...)

Shapes: q [B, H, Tq, D] (Tq <= 128 for the kernels), k, v [B, Hkv, S, D] with
H % Hkv == 0 (query head h uses KV head h // (H // Hkv), as in jax.nn). Scale 1/sqrt(D).
Output [B, H, Tq, D] in q's dtype.

Mask: query t may attend to key s iff key_valid[b, s] and q_block[t] >= k_block[s].
`key_valid` [B, S] bool (None = all valid) marks left padding and unused cache slots;
`q_block` [Tq] / `k_block` [S] int32 block ids (both None = no block constraint; block
ids must lie in [-1, 2**30)). Bidirectional: no ids. Absolute block-causal (Fast-dLLM
v2): ids = position // block_size. Prompt as one block (D2F): prompt ids 0, then
1 + (position - prompt_length) // block_size.

Fully masked rows: a query row that may attend to no key returns ZEROS in every
implementation (never NaN).

Numerics: scores, softmax and accumulation in float32; both matmuls take the input dtype
and accumulate in float32 (the kernels use an online softmax over KV tiles).

Implementations (`implementation=`):
- "xla": `reference_attention`, plain jnp (runs everywhere).
- "pallas_tpu": Pallas TPU (Mosaic) kernel; on CPU only with interpret=True.
- "pallas_gpu": Pallas Mosaic GPU kernel (Hopper); UNVERIFIED on hardware.
- "pallas": the Pallas kernel of the inputs' platform, no fallback (on CPU: the TPU
  kernel in interpret mode).
- "auto" (default): the Pallas kernel of the inputs' platform (TPU -> pallas_tpu,
  GPU -> pallas_gpu, CPU -> xla). Before first use for a shape it compiles the kernel
  and, once per (dtype, Tq, GQA group, head_dim), runs it on small random inputs against
  the reference (a guard for kernels not yet run on that hardware). It falls back to
  "xla" when the kernel does not apply (platform, dtype, shape), when compiling raises,
  or when the self-check fails; each distinct reason is logged once on the
  "dlmjax.kernels" logger (INFO for expected cases, WARNING for failures).
The environment variable DLMJAX_ATTENTION=xla|pallas overrides "auto" (forces "xla" or
"pallas"). Asking for a Pallas implementation explicitly never falls back: it raises
ValueError when the kernel does not apply.

The platform of the inputs is their device's platform for concrete arrays and
`jax.default_backend()` under tracing (jit, shard_map).

Padding: S is padded to a multiple of the KV tile (padded keys are masked); the kernels
choose tiles that divide S when S is a multiple of 128, so K/V are copied only for
ragged S. Tq is padded to a multiple of 8 (TPU) or the group rows to 64 (GPU).
"""

from __future__ import annotations

import functools
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

logger = logging.getLogger("dlmjax.kernels")

IMPLEMENTATIONS = ("auto", "xla", "pallas", "pallas_tpu", "pallas_gpu")
ENV_VAR = "DLMJAX_ATTENTION"
_NEG = -0.7 * float(np.finfo(np.float32).max)
_logged_reasons: set[str] = set()


def _log_once(reason: str, level: int = logging.INFO) -> None:
    if reason not in _logged_reasons:
        _logged_reasons.add(reason)
        logger.log(level, "cached_block_attention: falling back to XLA: %s", reason)


def attention_mask(key_valid, q_block, k_block, batch: int, tq: int, s: int) -> jax.Array | None:
    """Boolean [B, Tq, S] mask (True = attend), or None when nothing is masked."""
    mask = None
    if key_valid is not None:
        mask = jnp.broadcast_to(jnp.asarray(key_valid).astype(bool)[:, None, :], (batch, tq, s))
    if q_block is not None:
        causal = jnp.asarray(q_block)[:, None] >= jnp.asarray(k_block)[None, :]
        causal = jnp.broadcast_to(causal[None], (batch, tq, s))
        mask = causal if mask is None else mask & causal
    return mask


def reference_attention(q, k, v, *, key_valid=None, q_block=None, k_block=None) -> jax.Array:
    """The XLA reference: f32 einsum scores, mask, softmax, einsum. Same contract as
    `cached_block_attention` (fully masked rows give zeros)."""
    key_valid, q_block, k_block = _as_arrays(key_valid, q_block, k_block)
    _check_args(q, k, v, key_valid, q_block, k_block)
    b, h, tq, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    qg = q.reshape(b, hkv, h // hkv, tq, d)
    scores = jnp.einsum("bhgqd,bhkd->bhgqk", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / d**0.5)
    mask = attention_mask(key_valid, q_block, k_block, b, tq, s)
    if mask is None:
        probs = jax.nn.softmax(scores, axis=-1)
    else:
        m = mask[:, None, None]
        probs = jax.nn.softmax(jnp.where(m, scores, _NEG), axis=-1)
        probs = jnp.where(m, probs, 0.0)  # rows with no visible key become zeros
    out = jnp.einsum("bhgqk,bhkd->bhgqd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, h, tq, d).astype(q.dtype)


def _as_arrays(*xs):
    return tuple(None if x is None else jnp.asarray(x) for x in xs)


def _check_args(q, k, v, key_valid, q_block, k_block) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be 4-D [B, H, T, D]; got {q.shape}, {k.shape}, {v.shape}")
    b, h, tq, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k and v must be [B, Hkv, S, D] matching q {q.shape}; got {k.shape}, {v.shape}")
    if h % k.shape[1]:
        raise ValueError(f"query heads {h} must be a multiple of KV heads {k.shape[1]}")
    s = k.shape[2]
    if key_valid is not None and tuple(key_valid.shape) != (b, s):
        raise ValueError(f"key_valid must be [B, S] = {(b, s)}; got {key_valid.shape}")
    if (q_block is None) != (k_block is None):
        raise ValueError("pass both q_block and k_block, or neither")
    if q_block is not None and (tuple(q_block.shape) != (tq,) or tuple(k_block.shape) != (s,)):
        raise ValueError(f"q_block must be [Tq] = ({tq},) and k_block [S] = ({s},)")


def concrete_device(x):
    """The first device of a concrete jax.Array; None for tracers (jit, shard_map) and others."""
    try:
        return next(iter(x.devices())) if isinstance(x, jax.Array) else None
    except Exception:  # noqa: BLE001 - tracers raise ConcretizationTypeError
        return None


def _platform(x) -> str:
    dev = concrete_device(x)
    return dev.platform if dev is not None else jax.default_backend()


def _device(x):
    dev = concrete_device(x)
    return dev if dev is not None else jax.devices()[0]


def _kernel_fn(impl: str, block_k: int, interpret):
    if impl == "pallas_tpu":
        from . import _tpu

        return functools.partial(_tpu.attention, block_k=block_k, interpret=interpret)
    from . import _gpu

    return functools.partial(_gpu.attention, interpret=interpret)


def _unsupported(impl: str, q, k, v) -> str | None:
    if impl == "pallas_tpu":
        from . import _tpu

        return _tpu.unsupported_reason(q, k, v)
    from . import _gpu

    return _gpu.unsupported_reason(q, k, v)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200] if text else ''}"


@functools.lru_cache(maxsize=512)
def _compile_error(impl: str, block_k: int, avals: tuple) -> str | None:
    """Lower and compile the kernel once for these shapes; the error text if it raises."""
    args = [None if a is None else jax.ShapeDtypeStruct(a[0], a[1]) for a in avals]
    try:
        jax.jit(_kernel_fn(impl, block_k, False)).lower(*args).compile()
    except Exception as e:  # noqa: BLE001 - any lowering/compile failure means "use XLA"
        return f"{impl} failed to compile ({_first_line(e)})"
    return None


@functools.lru_cache(maxsize=64)
def _self_check_error(impl: str, block_k: int, dtype: str, tq: int, group: int, d: int) -> str | None:
    """Run the compiled kernel once on small random inputs with this dtype, Tq, GQA group
    and head_dim (2 batch rows, 1 KV head, S = 384: several KV tiles, key padding, block
    ids, a ragged tail) and compare with the XLA reference. The error text on mismatch.

    A guard for kernels that were never run on this hardware: a layout or indexing bug
    gives O(1) errors; the tolerance (5e-2, max |a - ref| / max |ref|) only has to allow
    for 16-bit probabilities and TPU default-precision float32 matmuls."""
    rng = np.random.default_rng(0)
    s = 384
    pos = np.arange(s)
    q_block = np.full(tq, 5, np.int32)
    q_block[0] = 0
    shapes = ((2, group, tq, d), (2, 1, s, d), (2, 1, s, d))
    args = [rng.standard_normal(shape, np.float32).astype(jnp.dtype(dtype)) for shape in shapes]
    args += [np.stack([pos < 300, pos >= 37]), q_block, (pos // 64).astype(np.int32)]
    avals = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
    try:
        # Compiled executables called with numpy inputs run now, even while an outer jit traces.
        run = jax.jit(_kernel_fn(impl, block_k, False)).lower(*avals).compile()
        out = np.asarray(run(*args), np.float32)
        check = jax.jit(
            lambda q, k, v, kv, qb, kb: reference_attention(q, k, v, key_valid=kv, q_block=qb, k_block=kb)
        )
        ref = np.asarray(check.lower(*avals).compile()(*args), np.float32)
    except Exception as e:  # noqa: BLE001
        return f"{impl} failed its self-check run ({_first_line(e)})"
    err = float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))
    if not np.isfinite(out).all() or err > 5e-2:
        return f"{impl} disagrees with XLA in its self-check (relative error {err:.2e}, dtype {dtype}, Tq {tq})"
    return None


def _aval_key(*xs) -> tuple:
    return tuple(None if x is None else (tuple(x.shape), jnp.dtype(x.dtype).name) for x in xs)


def cached_block_attention(
    q,
    k,
    v,
    *,
    key_valid=None,
    q_block=None,
    k_block=None,
    implementation: str = "auto",
    block_k: int = 512,
    interpret=None,
) -> jax.Array:
    """Attention of q [B, H, Tq, D] to cached k, v [B, Hkv, S, D]; see the module docstring.

    block_k: KV tile of the TPU kernel (rounded to a multiple of 128, shrunk for many query
    rows or to divide S); the GPU kernel uses 128.
    interpret: run the Pallas kernel in interpret mode, the only way to run it on CPU.
    For pallas_tpu: True (generic interpreter) or a `pltpu.InterpretParams` (TPU
    simulator). For pallas_gpu: True uses jax's Mosaic GPU interpreter (a private API in
    jax 0.10) with the two matmuls done as dots, since that interpreter cannot run wgmma
    on these operands: it checks the kernel's pipeline, masks and softmax, not wgmma.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}; got {implementation!r}")
    key_valid, q_block, k_block = _as_arrays(key_valid, q_block, k_block)
    _check_args(q, k, v, key_valid, q_block, k_block)
    impl = implementation
    if impl == "auto":
        forced = os.environ.get(ENV_VAR, "").strip().lower()
        if forced not in ("", "xla", "pallas"):
            raise ValueError(f"{ENV_VAR} must be 'xla' or 'pallas'; got {forced!r}")
        impl = forced or "auto"
    if impl == "xla":
        return reference_attention(q, k, v, key_valid=key_valid, q_block=q_block, k_block=k_block)

    platform = _platform(q)
    mask_args = dict(key_valid=key_valid, q_block=q_block, k_block=k_block)

    if impl == "auto":
        candidate = {"tpu": "pallas_tpu", "gpu": "pallas_gpu"}.get(platform)
        if candidate is None:
            _log_once(f"no Pallas attention kernel for platform {platform!r}")
            return reference_attention(q, k, v, **mask_args)
        reason = _unsupported(candidate, q, k, v)
        if reason is None and candidate == "pallas_gpu":
            from . import _gpu

            reason = _gpu.device_reason(_device(q))
        if reason is not None:
            _log_once(reason)
            return reference_attention(q, k, v, **mask_args)
        if not interpret:
            reason = _compile_error(candidate, block_k, _aval_key(q, k, v, key_valid, q_block, k_block))
            if reason is None:
                group = q.shape[1] // k.shape[1]
                reason = _self_check_error(candidate, block_k, jnp.dtype(q.dtype).name, q.shape[2], group, q.shape[3])
            if reason is not None:
                _log_once(reason, logging.WARNING)
                return reference_attention(q, k, v, **mask_args)
        return _kernel_fn(candidate, block_k, interpret or False)(q, k, v, **mask_args)

    if impl == "pallas":
        impl = "pallas_gpu" if platform == "gpu" else "pallas_tpu"
        if platform not in ("tpu", "gpu") and interpret is None:
            interpret = True  # on CPU a Pallas kernel only runs interpreted
    reason = _unsupported(impl, q, k, v)
    if reason is not None:
        raise ValueError(f"cached_block_attention: {reason}")
    want = "tpu" if impl == "pallas_tpu" else "gpu"
    if not interpret and platform != want:
        raise ValueError(
            f"cached_block_attention: {impl} runs on {want.upper()} only (inputs are on {platform!r}); "
            "pass interpret=True to run it in Pallas interpret mode, or use implementation='auto' or 'xla'"
        )
    return _kernel_fn(impl, block_k, interpret or False)(q, k, v, **mask_args)
