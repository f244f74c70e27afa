"""Cached block attention under a device mesh: the kernel runs per shard in `jax.shard_map`.

A `pallas_call` cannot be partitioned by the compiler (it needs all mesh axes Manual), so
the sharded entry point maps it explicitly:

    out = sharded_cached_block_attention(q, k, v, key_valid=..., q_block=..., k_block=...,
                                         mesh=mesh, batch_axis="data", head_axis="tensor")

Partitioning: batch over `batch_axis`; query heads over `head_axis`, and KV heads over the
same axis so that every shard keeps whole GQA groups (query head h uses KV head
h // (H // Hkv): contiguous query-head chunks map onto contiguous KV-head chunks). This
needs H % n == 0 and Hkv % n == 0 (n = size of `head_axis`), or Hkv == 1 (MQA: K/V are
replicated over `head_axis`). `key_valid` is split over batch; the block ids are
replicated; the output is sharded like q. Either axis may be None (not split).

Inputs are resharded to these layouts first (`jax.sharding.reshard` on Explicit meshes,
a sharding constraint otherwise). Every extra keyword goes to `cached_block_attention`
(implementation, block_k, interpret); "auto" picks the kernel for the devices' platform.
`check_vma=False` because a pallas_call's out_shape carries no varying-manual-axes type.
"""

from __future__ import annotations

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from .attention import _as_arrays, _check_args, cached_block_attention, concrete_device


def _axis_size(mesh, axis) -> int:
    if axis is None:
        return 1
    size = 1
    for name in axis if isinstance(axis, tuple) else (axis,):
        size *= mesh.shape[name]
    return size


def _place(x, mesh, spec):
    sharding = NamedSharding(mesh, spec)
    explicit = jax.sharding.AxisType.Explicit in tuple(getattr(mesh, "axis_types", ()))
    if concrete_device(x) is not None or not isinstance(x, jax.Array):  # concrete: place it now
        return jax.device_put(x, sharding)
    if explicit:
        return jax.sharding.reshard(x, sharding)
    return jax.lax.with_sharding_constraint(x, sharding)


def sharded_cached_block_attention(
    q,
    k,
    v,
    *,
    mesh,
    key_valid=None,
    q_block=None,
    k_block=None,
    batch_axis: str | None = "data",
    head_axis: str | None = "tensor",
    **kwargs,
) -> jax.Array:
    """`cached_block_attention` with batch and heads split over `mesh` (see module doc)."""
    key_valid, q_block, k_block = _as_arrays(key_valid, q_block, k_block)
    _check_args(q, k, v, key_valid, q_block, k_block)
    b, h = q.shape[:2]
    hkv = k.shape[1]
    nb, nh = _axis_size(mesh, batch_axis), _axis_size(mesh, head_axis)
    if b % nb:
        raise ValueError(f"batch {b} is not divisible by mesh axis {batch_axis!r} of size {nb}")
    if h % nh:
        raise ValueError(f"query heads {h} are not divisible by mesh axis {head_axis!r} of size {nh}")
    if hkv % nh == 0:
        kv_head_axis = head_axis
    elif hkv == 1:
        kv_head_axis = None
    else:
        raise ValueError(
            f"KV heads {hkv} must be divisible by mesh axis {head_axis!r} of size {nh} (or be 1) "
            "so that each shard holds whole GQA groups"
        )

    q_spec = P(batch_axis, head_axis, None, None)
    kv_spec = P(batch_axis, kv_head_axis, None, None)
    args = [q, k, v]
    specs = [q_spec, kv_spec, kv_spec]
    names = []
    for name, x, spec in (
        ("key_valid", key_valid, P(batch_axis, None)),
        ("q_block", q_block, P(None)),
        ("k_block", k_block, P(None)),
    ):
        if x is not None:
            names.append(name)
            args.append(x)
            specs.append(spec)
    args = [_place(x, mesh, spec) for x, spec in zip(args, specs)]

    def per_shard(q_s, k_s, v_s, *rest):
        return cached_block_attention(q_s, k_s, v_s, **dict(zip(names, rest)), **kwargs)

    fn = jax.shard_map(per_shard, mesh=mesh, in_specs=tuple(specs), out_specs=q_spec, check_vma=False)
    return fn(*args)
