"""The train step: trainable and frozen parameters, placed over a mesh, and one jitted update with
gradient accumulation, rematerialisation and a precision policy.

* Trainable: every parameter, or with LoRA only the adapters (`nnx.LoRAParam`); only they have
  optimizer state. The rest of the weights are `frozen` (passed in, never updated).
* Mesh: the parameters, the optimizer state and the batch follow the model's logical-axis rules
  (`dlmjax.sharding`): fsdp shards parameters and optimizer state alike, the batch splits over
  data and fsdp. The step's outputs keep their inputs' shardings (`out_shardings`), and the
  parameters and optimizer state are donated.
* Accumulation: the step draws the objective's noise for the whole batch, splits batch and noise
  into `grad_accum` micro-batches and sums their gradients in a `lax.scan`; every micro-batch's
  loss is divided by the whole batch's weight, so the sum is the whole batch's gradient.
* Precision: "fp32"; "bf16_compute" keeps fp32 master weights and runs the forward in bf16;
  "bf16" stores bf16 weights and keeps the optimizer state (and the update) in fp32.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dlmjax import sharding
from dlmjax.errors import DlmjaxError
from dlmjax.model import LoRAConfig, Transformer, model_roles

PRECISIONS = ("fp32", "bf16_compute", "bf16")


@dataclasses.dataclass
class TrainState:
    graphdef: nnx.GraphDef
    params: nnx.State  # trainable
    frozen: nnx.State  # everything else (the base weights under LoRA)
    opt_state: object
    lora: LoRAConfig | None

    def model(self, params) -> Transformer:
        return nnx.merge(self.graphdef, params, self.frozen)


def _floats(tree, dtype):
    """Every floating leaf cast to `dtype`: arrays, or abstract `ShapeDtypeStruct`s (their sharding kept)."""

    def cast(x):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
        return x.astype(dtype)

    return jax.tree.map(cast, tree)


def with_lora(model: Transformer, lora: LoRAConfig, seed: int) -> Transformer:
    """`model`'s weights with fresh LoRA adapters on `lora.targets`: A ~ N(0, 1 / in), B = 0 (so
    the adapted model starts as the base). The base arrays are reused as they are (placed or
    sharded); only the adapters are allocated."""
    import zlib

    if model.lora is not None:
        raise DlmjaxError("the model already carries LoRA adapters (loaded with lora='keep'); drop lora= to train them")
    cfg = model.config
    dtype = model.embed[...].dtype
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, dtype=dtype, lora=lora)))
    base = nnx.to_pure_dict(nnx.state(model))
    key = jax.random.key(seed)

    def fill(path, shape):
        names = [str(getattr(p, "key", p)) for p in path]
        node = base
        for name in path:
            node = node.get(getattr(name, "key", name)) if isinstance(node, dict) else None
        if node is not None:
            return node
        if names[-1] == "lora_a":  # [rank, in]
            leaf = jax.random.fold_in(key, zlib.crc32("/".join(names).encode()) % (2**31))
            return (jax.random.normal(leaf, shape.shape, jnp.float32) / shape.shape[1] ** 0.5).astype(shape.dtype)
        return jnp.zeros(shape.shape, shape.dtype)  # lora_b

    pure = jax.tree_util.tree_map_with_path(fill, nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def train_layout(cfg, tc, mesh=None, rules=None) -> sharding.Layout | None:
    """The layout a run trains under (None on one device): the mesh resolved and the rules fitted
    to the model, after checking that the micro-batch splits over the batch axes."""
    if mesh is None:
        return None
    mesh = sharding.resolve_mesh(mesh)
    rules = sharding.fit_rules(rules or sharding.ShardingRules.preset("fsdp_tp"), mesh, cfg)
    micro = tc.batch_size // tc.grad_accum
    n = sharding.axis_size(mesh, rules.axes_for("batch"))
    if micro % n:
        raise DlmjaxError(
            f"the micro-batch of {micro} rows (batch_size {tc.batch_size} / grad_accum {tc.grad_accum}) does not split "
            f"over the {n} devices of the batch axes {rules.axes_for('batch')}; use a micro-batch that is a multiple of {n}"
        )
    return sharding.Layout(mesh, rules)


def placed(model: Transformer, layout) -> Transformer:
    """`model` with every parameter on its sharding under `layout`; an abstract model (from
    `nnx.eval_shape`) gets the shardings on its `ShapeDtypeStruct`s instead."""
    if layout is None:
        return model
    graphdef, state = nnx.split(model)
    shardings = sharding.param_shardings(state, layout.mesh, layout.rules)

    def put(x, s):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s) if isinstance(x, jax.ShapeDtypeStruct) else jax.device_put(x, s)

    pure = jax.tree.map(put, nnx.to_pure_dict(state), shardings)
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def split_state(model: Transformer, tx, tc, layout) -> TrainState:
    """The placed model split into trainable parameters (in the precision's storage dtype) and
    frozen state, with the optimizer state. For an abstract model everything is abstract (the
    optimizer state from `jax.eval_shape`), which is what a dry run compiles."""
    trainable = nnx.LoRAParam if model.lora is not None else nnx.Param
    graphdef, params, frozen = nnx.split(model, trainable, ...)
    params = _floats(params, jnp.bfloat16 if tc.precision == "bf16" else jnp.float32)
    params32 = _floats(params, jnp.float32)
    abstract = jax.eval_shape(tx.init, params32)
    shardings = None if layout is None else _like_params(abstract, params, layout.mesh)
    if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params)):
        opt_state = abstract if shardings is None else jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
    elif shardings is None:
        opt_state = jax.jit(tx.init)(params32)
    else:  # the optimizer's moments follow their parameters' shardings; counts are replicated
        opt_state = jax.jit(tx.init, out_shardings=shardings)(params32)
    return TrainState(graphdef, params, frozen, opt_state, model.lora)


def initial_state(model: Transformer, tx, tc, *, mesh=None, rules=None, lora: LoRAConfig | None = None):
    """(TrainState, layout or None): the model split into trainable and frozen state, placed on the
    mesh, with the optimizer state. Checks the mesh and the batch before anything compiles."""
    layout = train_layout(model.config, tc, mesh, rules)
    if lora is not None:
        roles = model_roles(model.config)
        bad = [t for t in lora.targets if t not in roles]
        if bad:
            raise DlmjaxError(f"unknown LoRA target {bad[0]!r}; this model's linear layers are {', '.join(roles)}")
        model = with_lora(model, lora, tc.seed)
    return split_state(placed(model, layout), tx, tc, layout), layout


def _like_params(abstract_opt_state, params, mesh):
    """Shardings for an optimizer state: each subtree shaped like the parameters takes their
    shardings (Adam's moments), any other leaf is replicated."""
    structure = jax.tree.structure(params)
    shardings = jax.tree.map(lambda x: x.sharding, params)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def like(node):
        return shardings if jax.tree.structure(node) == structure else jax.tree.map(lambda _: replicated, node)

    return jax.tree.map(like, abstract_opt_state, is_leaf=lambda n: jax.tree.structure(n) == structure)


def placed_batch(batch: dict[str, np.ndarray], layout) -> dict[str, jax.Array]:
    """The batch on the device, or split over the mesh's batch axes (each process hands over the
    shards of its own devices)."""
    if layout is None:
        return {k: jnp.asarray(v) for k, v in batch.items()}
    return {k: sharding.put_global(v, sharding.batch_sharding(layout.mesh, layout.rules, np.shape(v))) for k, v in batch.items()}


def streamed_batch(stream, step: int, layout) -> dict[str, jax.Array]:
    """Batch `step` of a `BatchStream` as global arrays: each process reads from the stream only
    the rows of the global batch that its own devices hold (whatever the mesh's device order)."""
    if layout is None:
        return placed_batch(stream.batch(step), None)
    shapes = {k: (stream.batch_size, *v.shape[1:]) for k, v in stream.arrays.items()}
    cache: dict = {}

    def rows(index):
        key = (index[0].start, index[0].stop)
        if key not in cache:
            cache[key] = stream.batch(step, index[0])
        return cache[key]

    return {k: jax.make_array_from_callback(shape, sharding.batch_sharding(layout.mesh, layout.rules, shape),
                                            lambda index, k=k: rows(index)[k][(slice(None),) + tuple(index[1:])])
            for k, shape in shapes.items()}


def build_gradients(state: TrainState, objective, tc, layout):
    """gradients(params, frozen, batch, key) -> (loss, metric sums, grads) of the whole batch, its
    noise drawn whole and split with it into `grad_accum` micro-batches (not jitted)."""
    graphdef, n = state.graphdef, tc.grad_accum
    compute = jnp.bfloat16 if tc.precision in ("bf16_compute", "bf16") else None
    remat = None if tc.remat == "none" else tc.remat

    def micro_loss(params, frozen, batch, noise, weight):
        if compute is not None:
            params, frozen = _floats(params, compute), _floats(frozen, compute)
        out = objective.terms(nnx.merge(graphdef, params, frozen), batch, noise, layout, remat)
        return out.loss_sum / weight, out.metrics

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
    rows = tuple(tc.frozen_embedding_rows)

    def gradients(params, frozen, batch, key):
        loss, sums, grads = accumulated(params, frozen, batch, key)
        return loss, sums, frozen_rows(grads, rows)

    def accumulated(params, frozen, batch, key):
        noise = objective.noise(key, batch)
        weight = objective.weight(batch)
        if n == 1:
            (loss, sums), grads = grad_fn(params, frozen, batch, noise, weight)
            return loss, sums, grads
        micro = jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), (batch, noise))
        first = jax.tree.map(lambda x: x[0], micro)
        shapes = jax.eval_shape(grad_fn, params, frozen, first[0], first[1], weight)
        zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)

        def accumulate(total, one):
            # Tie the weights to this micro-batch: otherwise XLA hoists their loop-invariant
            # all-gathers (fsdp) out of the loop and keeps every layer's gathered weights alive at
            # once (LLaDA-8B LoRA on 8 v5e chips: +0.35 GiB per layer, 16.9 GiB at 32 layers).
            p, f, _ = jax.lax.optimization_barrier((params, frozen, one))
            out = grad_fn(p, f, one[0], one[1], weight)
            return jax.tree.map(jnp.add, total, out), None

        ((loss, sums), grads), _ = jax.lax.scan(accumulate, zeros, micro)
        return loss, sums, grads

    return gradients


def frozen_rows(grads, rows: tuple[int, ...]):
    """`grads` with the input embedding's `rows` zeroed (TrainConfig.frozen_embedding_rows: torch's
    `padding_idx`, as Fast-dLLM v2's model freezes <|im_end|>). With tied embeddings the row's
    gradient through the output head is zeroed too, where padding_idx stops only the lookup's."""
    if not rows:
        return grads
    index = jnp.asarray(rows, jnp.int32)

    def zero(path, g):
        first = path[0] if path else None
        if getattr(first, "key", None) == "embed" and g.ndim == 2:
            return g.at[index].set(0)
        return g

    return jax.tree_util.tree_map_with_path(zero, grads)


def build_step(state: TrainState, tx, schedule, objective, tc, layout):
    """step(params, opt_state, frozen, batch, key, step) -> (params, opt_state, metrics), jitted."""
    gradients = build_gradients(state, objective, tc, layout)

    def step(params, opt_state, frozen, batch, key, step):
        loss, sums, grads = gradients(params, frozen, batch, key)
        metrics = {k: total / jnp.maximum(count, 1) for k, (total, count) in sums.items()}
        grads32 = _floats(grads, jnp.float32)
        params32 = _floats(params, jnp.float32)
        updates, opt_state = tx.update(grads32, opt_state, params32)
        new = optax.apply_updates(params32, updates)
        new = jax.tree.map(lambda x, old: x.astype(old.dtype), new, params)
        return new, opt_state, {"loss": loss, "grad_norm": optax.global_norm(grads32), "lr": schedule(step), **metrics}

    if layout is None:
        return jax.jit(step, donate_argnums=(0, 1))
    keep = (jax.tree.map(lambda x: x.sharding, state.params), jax.tree.map(lambda x: x.sharding, state.opt_state), None)
    return jax.jit(step, donate_argnums=(0, 1), out_shardings=keep)
