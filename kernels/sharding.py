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

Any mesh works, whatever its axis types (`jax.make_mesh` builds Explicit axes by default).
On an all-Explicit mesh `shard_map` only asserts that its inputs already have the in_specs,
so traced inputs are `jax.sharding.reshard`ed to them first; on an Auto mesh they are
constrained to them; on a mixed mesh (where `reshard` takes only Explicit axes and a
sharding constraint only Auto ones) `shard_map` reshards them itself. A concrete mesh typed
Manual, over which `shard_map` cannot lower, is read as Auto: its devices are what count.
Concrete inputs are placed with `device_put`. A call from inside another `shard_map` (axes
already Manual) is refused: call `cached_block_attention` on the per-shard arrays there.

Every extra keyword goes to `cached_block_attention` (implementation, block_k, interpret);
"auto" picks the kernel for the devices' platform. `check_vma=False` because a
pallas_call's out_shape carries no varying-manual-axes type.
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


def _kernel_mesh(mesh):
    """`mesh` with Manual axes read as Auto, after refusing a call from inside a shard_map."""
    inside = tuple(jax.sharding.get_abstract_mesh().manual_axes)
    if inside:
        raise ValueError(
            f"sharded_cached_block_attention runs its own shard_map, but mesh axes {inside} are already Manual here; "
            "call cached_block_attention on the per-shard arrays instead"
        )
    types = tuple(mesh.axis_types)
    if jax.sharding.AxisType.Manual not in types:
        return mesh
    auto = tuple(jax.sharding.AxisType.Auto if t == jax.sharding.AxisType.Manual else t for t in types)
    return jax.sharding.Mesh(mesh.devices, mesh.axis_names, axis_types=auto)


def _place(x, mesh, spec):
    sharding = NamedSharding(mesh, spec)
    if concrete_device(x) is not None or not isinstance(x, jax.Array):  # concrete: place it now
        return jax.device_put(x, sharding)
    types = tuple(mesh.axis_types)
    if all(t == jax.sharding.AxisType.Explicit for t in types):  # shard_map asserts the in_specs here
        return jax.sharding.reshard(x, sharding)
    if jax.sharding.AxisType.Explicit in types:  # mixed: neither call takes the spec; shard_map reshards
        return x
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
    mesh = _kernel_mesh(mesh)
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
