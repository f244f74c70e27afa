"""Logical axes -> mesh axes: one rules table, presets, and the mesh parser.

Every parameter carries logical axis names (`logical_axes` metadata: embed, heads,
kv_heads, head_dim, mlp, vocab, expert (LLaDA2's stacked experts and router), and lora_rank for
LoRA adapters); activations use batch and length. A `ShardingRules` maps each logical name to
mesh axes among data, fsdp, tensor and expert. Presets:

    single    everything replicated
    dp        batch over data
    fsdp      batch over (data, fsdp); parameters' embed dim over fsdp, and LoRA adapters'
              rank dim over fsdp where their other dim does not take it (B of q/k/v/o/gate/up,
              A of down), so adapters and their optimizer state shrink with the mesh too
    tp        heads, kv_heads, mlp and vocab over tensor
    fsdp_tp   both
    ep        expert parallelism: experts over expert, the batch over (data, fsdp, expert);
              the routed experts run per shard (dlmjax.model.MoE: all-gather the tokens along
              expert, each shard its experts, reduce-scatter the sums back)
    ep_fsdp   ep and fsdp's parameter sharding
    ep_tp     ep and tp: heads, mlp (each expert's width too) and vocab over tensor

Any mesh a user builds is accepted: `resolve_mesh` turns it, once, into the same devices
on (data, fsdp, tensor, expert) axes that are all `AxisType.Auto` (`jax.make_mesh` builds Explicit
axes by default; other axes of size 1 are dropped), and `on_model_mesh` runs dlmjax's
entry points under that mesh whatever mesh the caller set with `jax.set_mesh`. A mesh that
cannot work raises one line naming a mesh that does (`mesh_call`).

A `Layout` (a mesh and the rules fitted to the model) is a static argument of the jitted
forward and decode; `constrain(x, logical_axes, layout)` pins an activation to its logical
axes' sharding there (the residual stream, q/k/v, the MLP hidden, the logits, and every
array of the decode's while_loop carry), and does nothing without a layout, so one-device
programs are unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from dlmjax.errors import DlmjaxError

MESH_AXES = ("data", "fsdp", "tensor", "expert")
LOGICAL_AXES = ("batch", "length", "embed", "heads", "kv_heads", "head_dim", "mlp", "vocab", "lora_rank", "expert")
logger = logging.getLogger("dlmjax.sharding")

_TP = {"heads": "tensor", "kv_heads": "tensor", "mlp": "tensor", "vocab": "tensor"}
PRESETS: dict[str, dict[str, Any]] = {
    "single": {},
    "dp": {"batch": "data"},
    "fsdp": {"batch": ("data", "fsdp"), "embed": "fsdp", "lora_rank": "fsdp"},
    "tp": {"batch": "data", **_TP},
    "fsdp_tp": {"batch": ("data", "fsdp"), "embed": "fsdp", "lora_rank": "fsdp", **_TP},
    # expert parallelism (mixture-of-experts models): experts over "expert", tokens over it too
    "ep": {"batch": ("data", "fsdp", "expert"), "expert": "expert"},
    "ep_fsdp": {"batch": ("data", "fsdp", "expert"), "embed": "fsdp", "lora_rank": "fsdp", "expert": "expert"},
    "ep_tp": {"batch": ("data", "expert"), **_TP, "expert": "expert"},
}


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """logical axis name -> mesh axis (or tuple of axes, or None = replicated)."""

    rules: tuple[tuple[str, Any], ...]

    def __post_init__(self):
        for logical, axes in self.rules:
            if logical not in LOGICAL_AXES:
                raise DlmjaxError(f"unknown logical axis '{logical}' in the sharding rules; use {', '.join(LOGICAL_AXES)}")
            names = (axes,) if isinstance(axes, str) else tuple(axes or ())
            bad = [a for a in names if a not in MESH_AXES]
            if bad:
                raise DlmjaxError(
                    f"the sharding rule for '{logical}' names mesh axis '{bad[0]}', which does not exist; use data, fsdp, tensor or expert"
                )
            if len(set(names)) != len(names):
                raise DlmjaxError(f"the sharding rule for '{logical}' names a mesh axis twice: {names}")

    @classmethod
    def preset(cls, name: str) -> "ShardingRules":
        if name not in PRESETS:
            raise DlmjaxError(f"unknown sharding preset '{name}'; use one of {', '.join(PRESETS)}")
        return cls(tuple(PRESETS[name].items()))

    def axes_for(self, logical: str | None):
        return dict(self.rules).get(logical) if logical is not None else None

    def spec(self, logical_axes: tuple[str | None, ...], shape: tuple[int, ...] | None = None, mesh=None) -> P:
        """A parameter's PartitionSpec. The lora_rank dim takes its mesh axes last: those no
        other dim uses, where they divide it (given `shape` and `mesh`); otherwise it is whole."""
        axes = [None if name == "lora_rank" else self.axes_for(name) for name in logical_axes]
        used = {a for entry in axes for a in _names(entry)}
        for i, name in enumerate(logical_axes):
            if name == "lora_rank":
                free = tuple(a for a in _names(self.axes_for(name)) if a not in used)
                if free and shape is not None and mesh is not None and shape[i] % axis_size(mesh, free) == 0:
                    axes[i] = free[0] if len(free) == 1 else free
                    used.update(free)
        return P(*axes)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where activations live: a mesh and the rules fitted to the model (`fit_rules`).

    Hashable, so it is a static argument of the jitted functions: another mesh or other
    rules compile another program, and a program traced without a layout never sees one.
    """

    mesh: jax.sharding.Mesh
    rules: ShardingRules

    def spec(self, shape: tuple[int, ...], logical_axes: tuple[str | None, ...]) -> P:
        """The PartitionSpec of an activation of `shape` named `logical_axes`.

        A mesh axis serves one dimension at most, the first that asks for it (in fsdp the
        batch takes fsdp and the embed dim of activations stays whole), and a dimension that
        its axes do not divide is replicated (a batch of 1 on data=2), as in `batch_axes`."""
        if len(shape) != len(logical_axes) or not set(logical_axes) <= {*LOGICAL_AXES, None}:
            raise ValueError(f"logical axes {logical_axes} do not name the dimensions of an array of shape {shape}")
        used: set[str] = set()
        spec = []
        for size, name in zip(shape, logical_axes):
            axes = self.rules.axes_for(name)
            axes = tuple(a for a in ((axes,) if isinstance(axes, str) else axes or ()) if a not in used)
            if not axes or size % axis_size(self.mesh, axes):
                spec.append(None)
                continue
            used.update(axes)
            spec.append(axes[0] if len(axes) == 1 else axes)
        return P(*spec)

    def sharding(self, shape: tuple[int, ...], logical_axes: tuple[str | None, ...]) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(tuple(shape), logical_axes))

    def constrain(self, x: jax.Array, logical_axes: tuple[str | None, ...]) -> jax.Array:
        return jax.lax.with_sharding_constraint(x, self.sharding(x.shape, logical_axes))

    def attention_shard(self, batch: int, num_heads: int, num_kv_heads: int) -> tuple:
        """(mesh, batch axes, head axis) over which the cached-attention kernel runs per shard
        (shard_map): rows over the batch axes, heads over the heads' axis where the sizes divide
        (GQA groups stay whole)."""
        head_axis = self.rules.axes_for("heads")
        n = axis_size(self.mesh, head_axis)
        if head_axis is not None and (num_heads % n or (num_kv_heads % n and num_kv_heads != 1)):
            head_axis = None
        return (self.mesh, batch_axes(self.mesh, self.rules, batch), head_axis)


def constrain(x: jax.Array, logical_axes: tuple[str | None, ...], layout: Layout | None) -> jax.Array:
    """x pinned to the sharding of its logical axes under `layout`; x itself without one."""
    return x if layout is None else layout.constrain(x, logical_axes)


def parse_mesh(text: str) -> dict[str, int]:
    """'data=2,tensor=4' -> {'data': 2, 'tensor': 4}."""
    sizes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name not in MESH_AXES:
            raise DlmjaxError(f"mesh axis '{name}' does not exist; use data, fsdp, tensor and expert, e.g. --mesh data=2,tensor=4")
        if name in sizes:
            raise DlmjaxError(f"mesh axis {name} is given twice in '{text}'; name each axis once")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise DlmjaxError(f"mesh axis size '{part}' is not name=integer; write e.g. --mesh data=2,tensor=4") from None
        if sizes[name] < 1:
            raise DlmjaxError(f"mesh axis {name} has size {sizes[name]}; sizes must be at least 1")
    return sizes


def make_mesh(sizes: Mapping[str, int] | str, devices=None) -> jax.sharding.Mesh:
    """A (data, fsdp, tensor, expert) mesh of Auto axes; axes not named have size 1."""
    if isinstance(sizes, str):
        sizes = parse_mesh(sizes)
    unknown = [name for name in sizes if name not in MESH_AXES]
    if unknown:
        raise DlmjaxError(f"mesh axis '{unknown[0]}' does not exist; use data, fsdp, tensor and expert")
    devices = list(devices if devices is not None else jax.devices())
    shape = tuple(int(sizes.get(name, 1)) for name in MESH_AXES)
    if math.prod(shape) != len(devices):
        raise DlmjaxError(
            f"the mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices but {len(devices)} are available; "
            f"make the sizes multiply to {len(devices)}, e.g. data={len(devices)}"
        )
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    # jax.make_mesh orders the devices by their physical topology (TPU ICI rings); on CPU
    # and GPU it keeps jax.devices() order, process by process.
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def resolve_mesh(mesh) -> jax.sharding.Mesh:
    """The mesh dlmjax computes on, from any mesh a user hands it: the same devices at the
    same (data, fsdp, tensor) coordinates, every axis `AxisType.Auto`.

    `jax.make_mesh` builds Explicit axes by default (JAX >= 0.9), users build Auto ones with
    `jax.sharding.Mesh` or mix the two, and dlmjax pins activations with
    `with_sharding_constraint`, which names Auto axes only. Converting once, here, rather
    than running in each mesh's own mode keeps one program per (mesh, rules): explicit mode
    would need a `reshard` at every constrain site, sharding-invariant `while_loop` carries
    built with `out_sharding=`, and `auto_axes` around the Pallas `shard_map`, in every
    decode method, and mixed meshes are not fully supported by JAX's own `reshard` (0.10).
    The devices and their coordinates are what the user chose, so the placement is too;
    only the typing differs: arrays dlmjax returns are host numpy, and `lm.mesh` is the
    converted mesh. A string or mapping ("data=2,tensor=4") goes through `make_mesh`.

    Axes other than data, fsdp, tensor and expert may be there with size 1 (a "stage"
    axis a larger program uses) and are dropped; missing dlmjax axes get size 1. An axis of
    size > 1 that dlmjax does not shard over cannot be honoured: one line says which mesh to
    build instead."""
    if isinstance(mesh, (str, Mapping)):
        return make_mesh(mesh)
    if not isinstance(mesh, jax.sharding.Mesh):
        raise DlmjaxError(
            f"mesh must be a jax.sharding.Mesh with devices or a string such as 'data=2,tensor=4', got {type(mesh).__name__}; "
            "build one with dlmjax.sharding.make_mesh('data=2,tensor=4')"
        )
    sizes = dict(mesh.shape)
    foreign = {name: size for name, size in sizes.items() if name not in MESH_AXES and size > 1}
    if foreign:
        name, size = next(iter(foreign.items()))
        fits = {a: sizes.get(a, 1) for a in MESH_AXES}
        fits["data"] *= math.prod(foreign.values())  # data parallelism fits any model
        raise DlmjaxError(
            f"mesh axis '{name}' has size {size}, but dlmjax shards only over data, fsdp, tensor and expert (any other axis "
            f"must have size 1); build {mesh_call(fits)} instead"
        )
    names = [name for name in mesh.axis_names if name in MESH_AXES]
    devices = np.asarray(mesh.devices).reshape([sizes[name] for name in names])  # drops the size-1 foreign axes
    devices = devices.transpose([names.index(a) for a in MESH_AXES if a in names])
    devices = devices.reshape([sizes.get(a, 1) for a in MESH_AXES])  # inserts the missing axes
    return jax.sharding.Mesh(devices, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def on_model_mesh(fn):
    """`fn(lm, ...)` run with `lm.mesh` as JAX's context mesh (none for a one-device model).

    A caller may have set a mesh of its own with `jax.set_mesh` (the way into explicit
    sharding); JAX refuses to trace dlmjax's arrays, which live on `lm.mesh` (all Auto) or on
    one device, under a context mesh of other devices or axis types. The caller's context
    mesh is back in place when `fn` returns."""

    @functools.wraps(fn)
    def under_model_mesh(lm, *args, **kwargs):
        with jax.set_mesh(lm.mesh):
            return fn(lm, *args, **kwargs)

    return under_model_mesh


def mesh_call(sizes: Mapping[str, int], devices: int | None = None) -> str:
    """The call that builds a (data, fsdp, tensor) mesh of `sizes`, for error messages; on
    fewer than the `devices` the mesh had, the call names the first ones."""
    text = ",".join(f"{a}={sizes[a]}" for a in MESH_AXES if sizes.get(a, 1) > 1) or "data=1"
    n = math.prod(sizes.get(a, 1) for a in MESH_AXES)
    if devices is not None and n < devices:
        return f'dlmjax.sharding.make_mesh("{text}", devices=jax.devices()[:{n}])'
    return f'dlmjax.sharding.make_mesh("{text}") (on the command line: --mesh {text})'


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
    if cfg.num_experts:
        sizes["expert"] = cfg.num_experts
    table = dict(rules.rules)
    missing = [a for axes in table.values() for a in _names(axes) if a not in mesh.shape]
    if missing:
        raise DlmjaxError(
            f"the mesh has no axis '{missing[0]}' (its axes: {', '.join(mesh.shape)}); pass it through "
            "dlmjax.sharding.resolve_mesh, or build it with dlmjax.sharding.make_mesh, whose axes are data, fsdp, tensor and expert"
        )
    for name, size in sizes.items():
        n = axis_size(mesh, table.get(name))
        if size % n == 0:
            continue
        if name == "kv_heads":
            logger.info("kv_heads %d do not split over %d devices: key/value projections are replicated", size, n)
            table[name] = None
            continue
        fits = _mesh_that_fits(dict(mesh.shape), table, sizes)
        raise DlmjaxError(
            f"{name} size {size} does not split over the {n} devices of mesh axes {table.get(name)}; "
            f"build {mesh_call(fits, math.prod(dict(mesh.shape).values()))} instead"
        )
    return ShardingRules(tuple(table.items()))


def _names(axes) -> tuple[str, ...]:
    """A rule's mesh axes as a tuple: 'tensor' -> ('tensor',), None -> ()."""
    return (axes,) if isinstance(axes, str) else tuple(axes or ())


def _mesh_that_fits(shape: Mapping[str, int], table: Mapping[str, Any], dims: Mapping[str, int]) -> dict[str, int]:
    """The (data, fsdp, tensor) sizes nearest `shape` that divide every model size the rules
    split: each axis shrinks to the largest size that divides, and the devices it frees go to
    data, which splits the batch only (a batch it does not divide is replicated). kv_heads
    never need it (they are replicated instead)."""
    sizes = {a: int(shape.get(a, 1)) for a in MESH_AXES}
    changed = True
    while changed:  # axes only shrink, and data grows only when another axis shrinks: this ends
        changed = False
        for name, dim in dims.items():
            axes = _names(table.get(name))
            if name == "kv_heads" or dim % math.prod(sizes[a] for a in axes) == 0:
                continue
            left = dim
            for a in axes:
                keep = math.gcd(sizes[a], left)
                left //= keep
                if keep == sizes[a]:
                    continue
                if "data" not in axes:
                    sizes["data"] *= sizes[a] // keep
                sizes[a], changed = keep, True
    return sizes


def param_shardings(abstract_state: nnx.State, mesh, rules: ShardingRules):
    """NamedSharding of every parameter (a pure dict like nnx.to_pure_dict), from its logical axes."""
    def sharding(v):
        value = v.get_value() if hasattr(v, "get_value") else v.value
        return NamedSharding(mesh, rules.spec(v.get_metadata().get("logical_axes"), tuple(value.shape), mesh))

    return nnx.to_pure_dict(jax.tree.map(sharding, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def batch_axes(mesh, rules: ShardingRules, batch: int):
    """The mesh axes a batch of `batch` rows splits over: the rules' batch axes when they
    divide it, else None (replicated)."""
    axes = rules.axes_for("batch")
    return axes if batch % axis_size(mesh, axes) == 0 else None


def batch_sharding(mesh, rules: ShardingRules, shape: tuple[int, ...]) -> NamedSharding:
    """Inputs [B, ...]: batch over its mesh axes where B divides, the rest replicated."""
    return NamedSharding(mesh, P(batch_axes(mesh, rules, shape[0]), *([None] * (len(shape) - 1))))


def put_global(array, sharding: NamedSharding) -> jax.Array:
    """A host array that every process holds whole, as one global array: each process
    hands over only the shards of its own devices (device_put of the whole array needs
    every device to be local, which a multi-host mesh is not)."""
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def to_host(x: jax.Array) -> np.ndarray:
    """The whole of a (possibly multi-host) array as numpy on every process."""
    if x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
