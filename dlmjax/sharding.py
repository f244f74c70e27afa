"""Logical axes -> mesh axes: one rules table, presets, and the mesh parser.

Every parameter carries logical axis names (`logical_axes` metadata: embed, heads,
kv_heads, mlp, vocab); activations use batch and length. A `ShardingRules` maps each
logical name to mesh axes among data, fsdp and tensor. Presets:

    single    everything replicated
    dp        batch over data
    fsdp      batch over (data, fsdp); parameters' embed dim over fsdp
    tp        heads, kv_heads, mlp and vocab over tensor
    fsdp_tp   both

Meshes use `AxisType.Auto`, so XLA's partitioner propagates shardings through the model
and the decode's while_loop carry.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from dlmjax.errors import DlmjaxError

MESH_AXES = ("data", "fsdp", "tensor")
LOGICAL_AXES = ("batch", "length", "embed", "heads", "kv_heads", "head_dim", "mlp", "vocab")
logger = logging.getLogger("dlmjax.sharding")

_TP = {"heads": "tensor", "kv_heads": "tensor", "mlp": "tensor", "vocab": "tensor"}
PRESETS: dict[str, dict[str, Any]] = {
    "single": {},
    "dp": {"batch": "data"},
    "fsdp": {"batch": ("data", "fsdp"), "embed": "fsdp"},
    "tp": {"batch": "data", **_TP},
    "fsdp_tp": {"batch": ("data", "fsdp"), "embed": "fsdp", **_TP},
}


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """logical axis name -> mesh axis (or tuple of axes, or None = replicated)."""

    rules: tuple[tuple[str, Any], ...]

    @classmethod
    def preset(cls, name: str) -> "ShardingRules":
        if name not in PRESETS:
            raise DlmjaxError(f"unknown sharding preset '{name}'; use one of {', '.join(PRESETS)}")
        return cls(tuple(PRESETS[name].items()))

    def axes_for(self, logical: str | None):
        return dict(self.rules).get(logical) if logical is not None else None

    def spec(self, logical_axes: tuple[str | None, ...]) -> P:
        return P(*(self.axes_for(name) for name in logical_axes))


def parse_mesh(text: str) -> dict[str, int]:
    """'data=2,tensor=4' -> {'data': 2, 'tensor': 4}."""
    sizes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name not in MESH_AXES:
            raise DlmjaxError(f"mesh axis '{name}' does not exist; use data, fsdp and tensor, e.g. --mesh data=2,tensor=4")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise DlmjaxError(f"mesh axis size '{part}' is not name=integer; write e.g. --mesh data=2,tensor=4") from None
        if sizes[name] < 1:
            raise DlmjaxError(f"mesh axis {name} has size {sizes[name]}; sizes must be at least 1")
    return sizes


def make_mesh(sizes: Mapping[str, int] | str, devices=None) -> jax.sharding.Mesh:
    """A (data, fsdp, tensor) mesh of Auto axes; axes not named have size 1."""
    if isinstance(sizes, str):
        sizes = parse_mesh(sizes)
    unknown = [name for name in sizes if name not in MESH_AXES]
    if unknown:
        raise DlmjaxError(f"mesh axis '{unknown[0]}' does not exist; use data, fsdp and tensor")
    devices = list(devices if devices is not None else jax.devices())
    shape = tuple(int(sizes.get(name, 1)) for name in MESH_AXES)
    if math.prod(shape) != len(devices):
        raise DlmjaxError(
            f"the mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices but {len(devices)} are available; "
            f"make the sizes multiply to {len(devices)}, e.g. data={len(devices)}"
        )
    return jax.sharding.Mesh(
        np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    )


def axis_size(mesh, axes) -> int:
    """Devices along mesh axes (a name, a tuple of names, or None = 1)."""
    if axes is None:
        return 1
    axes = axes if isinstance(axes, tuple) else (axes,)
    return math.prod(mesh.shape[a] for a in axes)


def fit_rules(rules: ShardingRules, mesh, cfg) -> ShardingRules:
    """Check that the model's sizes divide their mesh axes. kv_heads that do not divide
    the tensor axis are replicated (logged); anything else raises with a mesh that works."""
    sizes = {
        "heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads, "mlp": cfg.intermediate_size,
        "vocab": cfg.vocab_size, "embed": cfg.hidden_size,
    }
    table = dict(rules.rules)
    for name, size in sizes.items():
        n = axis_size(mesh, table.get(name))
        if size % n == 0:
            continue
        if name == "kv_heads":
            logger.info("kv_heads %d do not split over %d devices: key/value projections are replicated", size, n)
            table[name] = None
            continue
        good = [d for d in range(1, n + 1) if size % d == 0 and n % d == 0]
        raise DlmjaxError(
            f"{name} size {size} does not split over the {n} devices of mesh axes {table.get(name)}; "
            f"use a mesh where that product divides {size} (e.g. {max(good)})"
        )
    return ShardingRules(tuple(table.items()))


def param_shardings(abstract_state: nnx.State, mesh, rules: ShardingRules):
    """NamedSharding of every parameter (a pure dict like nnx.to_pure_dict), from its logical axes."""
    axes = jax.tree.map(
        lambda v: v.get_metadata().get("logical_axes"), abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )
    return jax.tree.map(
        lambda a: NamedSharding(mesh, rules.spec(a)), nnx.to_pure_dict(axes), is_leaf=lambda x: isinstance(x, tuple)
    )


def batch_axes(mesh, rules: ShardingRules, batch: int):
    """The mesh axes a batch of `batch` rows splits over: the rules' batch axes when they
    divide it, else None (replicated)."""
    axes = rules.axes_for("batch")
    return axes if batch % axis_size(mesh, axes) == 0 else None


def batch_sharding(mesh, rules: ShardingRules, shape: tuple[int, ...]) -> NamedSharding:
    """Inputs [B, ...]: batch over its mesh axes where B divides, the rest replicated."""
    return NamedSharding(mesh, P(batch_axes(mesh, rules, shape[0]), *([None] * (len(shape) - 1))))


def memory_estimate(lm, batch: int, length: int, gen_length: int, cache: bool) -> dict[str, float]:
    """Rough bytes per device: parameters (as sharded), the KV cache, and the largest
    activations of a decode step (the logits of the generation region and one MLP)."""
    def per_device(x) -> int:
        shards = len({tuple((s.start, s.stop) for s in idx) for idx in x.sharding.devices_indices_map(x.shape).values()})
        return x.nbytes // max(shards, 1)

    params = sum(per_device(x) for x in jax.tree.leaves(nnx.to_pure_dict(lm.state)))
    cfg, itemsize = lm.config, np.dtype(lm.dtype).itemsize
    batch_split = 1 if lm.mesh is None else axis_size(lm.mesh, batch_axes(lm.mesh, lm.rules, batch))
    kv_split = 1 if lm.mesh is None else axis_size(lm.mesh, lm.rules.axes_for("kv_heads"))
    rows = batch / batch_split
    kv_cache = 2 * cfg.num_layers * rows * cfg.num_kv_heads * length * cfg.head_dim * itemsize / kv_split if cache else 0
    activations = rows * (gen_length * cfg.vocab_size * 4 * 3 + length * cfg.intermediate_size * itemsize * 3)
    return {"parameters": params, "cache": kv_cache, "activations": activations}
