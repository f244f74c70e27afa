"""One Flax NNX transformer for LLaDA, Dream, Fast-dLLM v2, Qwen2 and LLaDA2 (mixture of experts).

Weights keep PyTorch's [out, in] layout, so a Hugging Face tensor maps onto a parameter
without a transpose and exports back bit for bit. Every parameter carries its logical
axis names in the `logical_axes` metadata (embed, heads, kv_heads, head_dim, mlp, vocab, expert) for the
sharding rules.

The forward is pure in everything that changes during decoding: token ids, positions,
the attention mask and the KV cache go in, logits and the cache come out.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from dlmjax.attention import apply_rope, attend, restrict_keys, rope_tables
from dlmjax.cache import KVCache
from dlmjax.config import ModelConfig
from dlmjax.errors import DlmjaxError
from dlmjax.sharding import Layout, constrain

# Logical axes of the activations (see dlmjax/sharding.py).
RESIDUAL = ("batch", "length", "embed")

# Projection roles, in our naming. LoRA targets are named with these.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ROLES = ("qkv_proj", *PROJECTIONS)  # with LLaDA2's fused query_key_value, in one order


def layer_roles(cfg: ModelConfig, layer: int) -> tuple[str, ...]:
    """The projections (LoRA targets) one block has: q/k/v or the fused qkv, o, and the dense MLP's
    gate/up/down (a mixture-of-experts layer has none: its experts take no adapters)."""
    attention = ("qkv_proj",) if cfg.family_spec.fused_qkv else ("q_proj", "k_proj", "v_proj")
    return (*attention, "o_proj", *(() if cfg.is_moe_layer(layer) else ("gate_proj", "up_proj", "down_proj")))


def model_roles(cfg: ModelConfig) -> tuple[str, ...]:
    """Every projection role some block of the model has, in ROLES order."""
    present = {role for layer in range(cfg.num_layers) for role in layer_roles(cfg, layer)}
    return tuple(role for role in ROLES if role in present)


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters kept as separate parameters: W x + (alpha / rank) B A x."""

    rank: int
    alpha: float
    targets: tuple[str, ...]  # a subset of ROLES (the model's: `model_roles`)
    dropout: float = 0.0  # training only: dropout on the adapter's input (PEFT's lora_dropout)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _zeros(shape, dtype, axes, kind=nnx.Param):
    return kind(jnp.zeros(shape, dtype), logical_axes=axes)


class Linear(nnx.Module):
    """y = x W^T (+ b) with W [out, in], and an optional LoRA branch."""

    def __init__(self, d_in, d_out, axes, *, bias, dtype, lora: LoRAConfig | None, rngs: nnx.Rngs):
        self.weight = _zeros((d_out, d_in), dtype, axes)
        self.bias = _zeros((d_out,), dtype, axes[:1]) if bias else None
        if lora is not None:
            # A starts random and B at zero, so a fresh adapter leaves the model unchanged.
            init = jax.random.normal(rngs.params(), (lora.rank, d_in), jnp.float32) / d_in**0.5
            # the rank dim is "lora_rank": fsdp shards it where the other dim does not take fsdp
            self.lora_a = nnx.LoRAParam(init.astype(dtype), logical_axes=("lora_rank", axes[1]))
            self.lora_b = _zeros((d_out, lora.rank), dtype, (axes[0], "lora_rank"), nnx.LoRAParam)
            self.lora_scale = lora.scale
            self.lora_dropout = lora.dropout
        else:
            self.lora_a = self.lora_b = None
            self.lora_dropout = 0.0

    def __call__(self, x, dropout=None):
        """`dropout` (training): one PRNG key per row [B]; the adapter's input is dropped with
        probability lora_dropout, row by row from its own key."""
        y = jnp.einsum("...i,oi->...o", x, self.weight[...], preferred_element_type=jnp.float32)
        if self.lora_a is not None:
            source = x
            if dropout is not None and self.lora_dropout > 0:
                p = self.lora_dropout
                keep = jax.vmap(lambda key: jax.random.bernoulli(key, 1.0 - p, x.shape[1:]))(dropout)
                source = jnp.where(keep, x / (1.0 - p), 0.0).astype(x.dtype)
            low = jnp.einsum("...i,ri->...r", source, self.lora_a[...], preferred_element_type=jnp.float32)
            y = y + self.lora_scale * jnp.einsum(
                "...r,or->...o", low.astype(x.dtype), self.lora_b[...], preferred_element_type=jnp.float32
            )
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim, eps, dtype, axis="embed"):
        self.weight = nnx.Param(jnp.ones((dim,), dtype), logical_axes=(axis,))
        self.eps = eps

    def __call__(self, x):
        # Normalise in float32, cast back, then scale (LLaDA and HF Llama do the same).
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return normed.astype(x.dtype) * self.weight[...]


def route(x, weight, bias, n_group: int, topk_group: int, top_k: int, scale):
    """LLaDA2's routing of tokens x [N, D]: experts [N, k] (int32) and their weights [N, k]
    (float32). Scores s = sigmoid(x W^T) in float32; groups ranked by the sum of their top two
    biased scores s + bias, the best topk_group kept; the top k biased scores among their experts;
    weights s normalised to sum 1 (k > 1), times `scale`. Ties go to the lower index."""
    n = x.shape[0]
    scores = jax.nn.sigmoid(jnp.einsum("nd,ed->ne", x.astype(jnp.float32), weight.astype(jnp.float32)))
    biased = scores + jax.lax.stop_gradient(bias.astype(jnp.float32))
    grouped = biased.reshape(n, n_group, -1)
    group_score = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)  # [N, G]
    _, best = jax.lax.top_k(group_score, topk_group)
    keep = jnp.zeros((n, n_group), bool).at[jnp.arange(n)[:, None], best].set(True)
    masked = jnp.where(keep[:, :, None], grouped, -jnp.inf).reshape(n, -1)
    _, experts = jax.lax.top_k(masked, top_k)
    weights = jnp.take_along_axis(scores, experts, axis=-1)
    if top_k > 1:
        weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
    return experts.astype(jnp.int32), weights * scale


def expert_mlp(x, experts, weights, gate, up, down):
    """sum_k weights[n, k] expert_{experts[n, k]}(x[n]) for x [N, D] in float32 [N, D], with the E
    SwiGLU experts stacked [E, out, in]: grouped matmuls over the (token, expert) pairs sorted by
    expert (`jax.lax.ragged_dot_general`), not a loop. Ids outside [0, E) (experts held elsewhere)
    contribute nothing."""
    n, k = experts.shape
    e = gate.shape[0]
    flat = experts.reshape(-1)
    mine = (flat >= 0) & (flat < e)
    flat = jnp.where(mine, flat, e)
    order = jnp.argsort(flat, stable=True)  # grouped by expert, the others last
    token = order // k
    sizes = jnp.bincount(flat, length=e).astype(jnp.int32)  # (id e: dropped)
    numbers = jax.lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(((1,), (2,)), ((), ())), lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])

    def grouped(lhs, w):  # lhs [M, in] against each row's expert's w [out, in]
        return jax.lax.ragged_dot_general(lhs, w, sizes, numbers, preferred_element_type=jnp.float32).astype(x.dtype)

    rows = x[token]
    hidden = jax.nn.silu(grouped(rows, gate)) * grouped(rows, up)
    weight = jnp.where(mine, weights.reshape(-1), 0.0)[order][:, None]
    out = jnp.where(weight != 0, grouped(hidden, down).astype(jnp.float32) * weight, 0.0)
    return jnp.zeros((n, x.shape[-1]), jnp.float32).at[token].add(out)


class Router(nnx.Module):
    """LLaDA2's router (`route`): sigmoid scores of a linear gate [E, D]; `expert_bias` [E] shifts
    only which experts are picked, never their weights (a buffer upstream, kept out of gradients)."""

    def __init__(self, cfg: ModelConfig, dtype):
        self.weight = _zeros((cfg.num_experts, cfg.hidden_size), dtype, ("expert", "embed"))
        self.expert_bias = _zeros((cfg.num_experts,), jnp.float32, ("expert",))
        self.n_group, self.topk_group, self.top_k = cfg.n_group, cfg.topk_group, cfg.num_experts_per_tok
        self.scale = cfg.routed_scaling_factor

    def __call__(self, x):
        return route(x, self.weight[...], self.expert_bias[...], self.n_group, self.topk_group, self.top_k, self.scale)


class Experts(nnx.Module):
    """E SwiGLU experts stacked [E, out, in] (PyTorch's layout, one slice per expert; `expert_mlp`)."""

    def __init__(self, cfg: ModelConfig, dtype):
        e, d, m = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_proj = _zeros((e, m, d), dtype, ("expert", "mlp", "embed"))
        self.up_proj = _zeros((e, m, d), dtype, ("expert", "mlp", "embed"))
        self.down_proj = _zeros((e, d, m), dtype, ("expert", "embed", "mlp"))

    def __call__(self, x, experts, weights):
        return expert_mlp(x, experts, weights, self.gate_proj[...], self.up_proj[...], self.down_proj[...])


class SwiGLU(nnx.Module):
    """down(silu(gate(x)) * up(x)): LLaDA2's shared expert."""

    def __init__(self, d, width, dtype, rngs):
        self.gate_proj = Linear(d, width, ("mlp", "embed"), bias=False, dtype=dtype, lora=None, rngs=rngs)
        self.up_proj = Linear(d, width, ("mlp", "embed"), bias=False, dtype=dtype, lora=None, rngs=rngs)
        self.down_proj = Linear(width, d, ("embed", "mlp"), bias=False, dtype=dtype, lora=None, rngs=rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nnx.Module):
    """LLaDA2's mixture of experts: routed experts weighted by the router, plus the always-on
    shared expert. Under a layout whose rules put the `expert` axis on a mesh axis of size > 1
    (expert parallelism), each device holds E / n experts and the routed part runs per shard
    (`_expert_parallel`)."""

    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        self.router = Router(cfg, dtype)
        self.experts = Experts(cfg, dtype)
        width = cfg.moe_intermediate_size * cfg.num_shared_experts
        self.shared = SwiGLU(cfg.hidden_size, width, dtype, rngs) if cfg.num_shared_experts else None

    def __call__(self, x, layout: Layout | None = None):
        b, t, d = x.shape
        axis = None if layout is None else layout.rules.axes_for("expert")
        if axis is not None and layout.mesh.shape[axis] > 1:
            y = self._expert_parallel(x, layout, axis)
        else:
            flat = x.reshape(b * t, d)
            experts, weights = self.router(flat)
            # the weighted sum in float32, cast back to the activations' dtype (as upstream's moe_infer)
            y = self.experts(flat, experts, weights).astype(x.dtype).reshape(b, t, d)
        return y if self.shared is None else y + self.shared(x)

    def _expert_parallel(self, x, layout: Layout, axis: str):
        """The routed experts under `shard_map`, experts split over mesh axis `axis`: each shard
        routes its own tokens, gathers the tokens (and routes) of the shards along `axis`, runs the
        pairs that fall on its E / n experts, and a reduce-scatter over `axis` sums every token's
        contributions back onto its shard (an all-gather dispatch: exact, no capacity limit).
        Tokens not split over `axis` (a batch it does not divide) skip the gather, and a psum
        sums them. Where the rules put `mlp` on another mesh axis (ep_tp), each expert's width is
        split over it too, and a psum over it completes the down projection."""
        from jax.sharding import PartitionSpec as P

        from dlmjax.sharding import batch_axes

        mesh, r = layout.mesh, self.router
        rows = batch_axes(mesh, layout.rules, x.shape[0])
        names = () if rows is None else ((rows,) if isinstance(rows, str) else tuple(rows))
        split = axis in names
        local_experts = self.experts.gate_proj.shape[0] // mesh.shape[axis]
        # each expert's width over the mlp axis (tensor parallelism inside the shard), where it divides
        width = layout.rules.axes_for("mlp")
        if not (isinstance(width, str) and width != axis and width not in names and mesh.shape[width] > 1
                and self.experts.gate_proj.shape[1] % mesh.shape[width] == 0):
            width = None

        def per_shard(x, weight, bias, gate, up, down):
            b, t, d = x.shape
            flat = x.reshape(b * t, d)
            experts, weights = route(flat, weight, bias, r.n_group, r.topk_group, r.top_k, r.scale)
            if split:
                flat, experts, weights = (jax.lax.all_gather(a, axis, tiled=True) for a in (flat, experts, weights))
            first = jax.lax.axis_index(axis) * local_experts
            y = expert_mlp(flat, experts - first, weights, gate, up, down)
            if width is not None:  # each width shard holds part of every expert's down projection's sum
                y = jax.lax.psum(y, width)
            y = jax.lax.psum_scatter(y, axis, scatter_dimension=0, tiled=True) if split else jax.lax.psum(y, axis)
            return y.astype(x.dtype).reshape(b, t, d)

        token_spec = P(rows, None, None)
        gate_spec, down_spec = P(axis, width, None), P(axis, None, width)
        fn = jax.shard_map(per_shard, mesh=mesh, in_specs=(token_spec, P(None, None), P(None), gate_spec, gate_spec, down_spec),
                           out_specs=token_spec, check_vma=False)
        return fn(x, r.weight[...], r.expert_bias[...], self.experts.gate_proj[...], self.experts.up_proj[...],
                  self.experts.down_proj[...])


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, lora: LoRAConfig | None, rngs: nnx.Rngs, layer: int = 0):
        d, hd = cfg.hidden_size, cfg.head_dim
        q_out, kv_out = cfg.num_heads * hd, cfg.num_kv_heads * hd

        def proj(name, d_in, d_out, axes, bias=False):
            use_lora = lora if lora is not None and name in lora.targets else None
            return Linear(d_in, d_out, axes, bias=bias, dtype=dtype, lora=use_lora, rngs=rngs)

        self.attn_norm = RMSNorm(d, cfg.rms_norm_eps, dtype)
        if cfg.family_spec.fused_qkv:  # LLaDA2: one [Q heads | K heads | V heads] projection
            self.qkv_proj = proj("qkv_proj", d, q_out + 2 * kv_out, ("heads", "embed"), cfg.qkv_bias)
            self.q_proj = self.k_proj = self.v_proj = None
        else:
            self.q_proj = proj("q_proj", d, q_out, ("heads", "embed"), cfg.qkv_bias)
            self.k_proj = proj("k_proj", d, kv_out, ("kv_heads", "embed"), cfg.qkv_bias)
            self.v_proj = proj("v_proj", d, kv_out, ("kv_heads", "embed"), cfg.qkv_bias)
            self.qkv_proj = None
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, dtype, "head_dim") if cfg.qk_norm else None
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, dtype, "head_dim") if cfg.qk_norm else None
        self.o_proj = proj("o_proj", q_out, d, ("embed", "heads"))
        self.mlp_norm = RMSNorm(d, cfg.rms_norm_eps, dtype)
        if cfg.is_moe_layer(layer):
            self.moe = MoE(cfg, dtype, rngs)
            self.gate_proj = self.up_proj = self.down_proj = None
        else:
            self.gate_proj = proj("gate_proj", d, cfg.intermediate_size, ("mlp", "embed"))
            self.up_proj = proj("up_proj", d, cfg.intermediate_size, ("mlp", "embed"))
            self.down_proj = proj("down_proj", cfg.intermediate_size, d, ("embed", "mlp"))
            self.moe = None
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd

    def _qkv(self, h, key):
        """Queries [B, T, H, D], keys and values [B, T, Hkv, D], before RoPE."""
        b, t, _ = h.shape
        if self.qkv_proj is not None:
            qkv = self.qkv_proj(h, key(0)).reshape(b, t, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
            q, k, v = jnp.split(qkv, [self.num_heads, self.num_heads + self.num_kv_heads], axis=2)
        else:
            q = self.q_proj(h, key(0)).reshape(b, t, self.num_heads, self.head_dim)
            k = self.k_proj(h, key(1)).reshape(b, t, self.num_kv_heads, self.head_dim)
            v = self.v_proj(h, key(2)).reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def __call__(self, x, cos, sin, mask, cache: KVCache | None, layer: int, cache_index, cache_keep=None,
                 layout: Layout | None = None, kv=None, kernel: str = "auto", dropout=None):
        b, t, _ = x.shape

        def key(j):  # the row keys of projection j (LoRA dropout)
            return None if dropout is None else jax.vmap(lambda k: jax.random.fold_in(k, j))(dropout)

        h = self.attn_norm(x)
        heads, kv_heads = ("batch", "length", "heads", "head_dim"), ("batch", "length", "kv_heads", "head_dim")
        q, k, v = self._qkv(h, key)
        q = constrain(apply_rope(q, cos, sin), heads, layout)
        k = constrain(apply_rope(k, cos, sin), kv_heads, layout)
        v = constrain(v, kv_heads, layout)
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, Hkv, T, D]
        if cache is not None:
            cache = cache.write(layer, k, v, cache_index, cache_keep)
            k, v = cache.k[layer].astype(x.dtype), cache.v[layer].astype(x.dtype)
        elif kv is not None:
            k, v = kv(layer, k, v)
            k, v = k.astype(x.dtype), v.astype(x.dtype)
        # cached steps under a mesh run the attention kernel per shard, on the layout's axes
        shard = layout.attention_shard(b, self.num_heads, self.num_kv_heads) if layout is not None and cache is not None else None
        a = attend(q, k, v, mask, shard, kernel).reshape(b, t, -1)
        x = constrain(x + self.o_proj(a, key(3)), RESIDUAL, layout)
        h = self.mlp_norm(x)
        if self.moe is not None:
            return constrain(x + self.moe(h, layout), RESIDUAL, layout), cache
        hidden = constrain(jax.nn.silu(self.gate_proj(h, key(4))) * self.up_proj(h, key(5)), ("batch", "length", "mlp"), layout)
        x = constrain(x + self.down_proj(hidden, key(6)), RESIDUAL, layout)
        return x, cache


class Transformer(nnx.Module):
    """The bidirectional transformer of every supported dLLM family.

    Parameters start as zeros (norm weights as ones): real weights come from a checkpoint
    via `nnx.eval_shape` and a restore, never from random initialisation.
    """

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, lora: LoRAConfig | None = None, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = cfg
        self.lora = lora
        self.embed = _zeros((cfg.vocab_size, cfg.hidden_size), dtype, ("vocab", "embed"))
        self.layers = nnx.List([Block(cfg, dtype, lora, rngs, i) for i in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.lm_head = None if cfg.tie_word_embeddings else _zeros((cfg.vocab_size, cfg.hidden_size), dtype, ("vocab", "embed"))

    def __call__(
        self,
        input_ids: jax.Array,
        positions: jax.Array,
        mask: jax.Array,
        cache: KVCache | None = None,
        cache_index: int | jax.Array = 0,
        logits_from: int = 0,
        cache_keep: jax.Array | None = None,
        layout: Layout | None = None,
        kv=None,
        kernel: str = "auto",
        remat: str | None = None,
        dropout=None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Raw per-position logits (float32 [B, T, V], before any shift) and the cache.

        input_ids, positions [B, T]; mask [B, T, Tk] bool. Without a cache the keys are the
        T inputs (Tk = T). With a cache, the inputs' keys and values are first written at
        slots [cache_index, cache_index + T) and the queries attend to all S slots (Tk = S).
        `cache_keep` [T] bool keeps the cached K/V of those window slots instead of writing the
        fresh ones (the queries still attend to the cache as a whole).
        `logits_from` (static) skips the head for positions before it: the logits are [B, T - logits_from, V].
        `layout` (static; None on one device) pins the activations to their shardings over a mesh.
        `kernel` (static) is the cached-attention implementation ("auto", "xla", "pallas"; see
        `dlmjax.kernels.cached_block_attention`).
        `remat` (static; training) recomputes each transformer block's activations in the backward
        pass under a named policy (REMAT_POLICIES: "full" saves nothing inside a block, "dots_saveable"
        keeps the matmul outputs, ...); None or "none" keeps everything.
        `dropout` (training; LoRA adapters with dropout > 0): one PRNG key per row [B].
        `kv` (no cache; for callers that keep K/V themselves, such as the tests' independent cache
        reference): a function (layer, k, v) -> (k_all, v_all) given each layer's fresh post-RoPE
        keys and values [B, Hkv, T, D] and returning the [B, Hkv, Tk, D] the queries attend to under
        `mask` [B, T, Tk]. The second output is then the tuple of what it returned, one per layer.
        """
        if kv is not None and cache is not None:
            raise ValueError("pass either cache or kv, not both")
        # The table's embed dim is gathered whole first (fsdp): the rows come out split over the
        # batch axes like the ids, instead of over fsdp twice (batch and embed).
        table = constrain(self.embed[...], ("vocab", None), layout)
        x = constrain(table[input_ids], RESIDUAL, layout)
        cos, sin = rope_tables(positions, self.config.rotary_dim, self.config.rope_theta)
        if cache is not None:  # keys come from the cache: never attend to a slot nothing was written to
            cache = cache.mark_written(cache_index, input_ids.shape[1], cache_keep)
            mask = restrict_keys(mask, cache.written)
        attended = []
        if kv is not None:
            inner = kv

            def kv(layer, k, v):
                attended.append(inner(layer, k, v))
                return attended[-1]

        policy = remat_policy(remat)
        for i, layer in enumerate(self.layers):
            keys = None if dropout is None else jax.vmap(lambda k, i=i: jax.random.fold_in(k, i))(dropout)
            if policy is not None and cache is None and kv is None:
                def block(x, cos, sin, mask, keys, layer=layer, i=i):
                    return layer(x, cos, sin, mask, None, i, 0, None, layout, None, kernel, keys)[0]

                x = jax.checkpoint(block, policy=policy)(x, cos, sin, mask, keys)
                continue
            x, cache = layer(x, cos, sin, mask, cache, i, cache_index, cache_keep, layout, kv, kernel, keys)
        x = self.final_norm(x[:, logits_from:])
        head = self.embed if self.lm_head is None else self.lm_head
        logits = jnp.einsum("btd,vd->btv", x, head[...], preferred_element_type=jnp.float32)
        logits = constrain(logits, ("batch", "length", "vocab"), layout)
        return logits, (tuple(attended) if kv is not None else cache)


REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")


def remat_policy(name: str | None):
    """The jax.checkpoint policy of a named remat setting (None: no rematerialisation)."""
    if name is None or name == "none":
        return None
    policies = {
        "full": jax.checkpoint_policies.nothing_saveable,
        "dots_saveable": jax.checkpoint_policies.dots_saveable,
        "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    }
    if name not in policies:
        raise DlmjaxError(f"unknown remat policy {name!r}; use one of {', '.join(REMAT_POLICIES)}")
    return policies[name]


def position_ids(cfg: ModelConfig, attention_mask: jax.Array) -> jax.Array:
    """RoPE positions [B, T] for a left-padded batch.

    LLaDA keeps absolute positions 0..T-1 even under padding. Dream numbers the real
    tokens from 0 (cumsum(mask) - 1) and, as its reference does, gives padding position 1.
    """
    b, t = attention_mask.shape
    if not cfg.positions_from_mask:
        return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    mask = attention_mask.astype(jnp.int32)
    return jnp.where(mask > 0, jnp.cumsum(mask, axis=-1) - 1, 1).astype(jnp.int32)


def shift_right(logits: jax.Array) -> jax.Array:
    """Dream's convention: the prediction for position i is the output at i-1 (position 0 keeps its own)."""
    return jnp.concatenate([logits[:, :1], logits[:, :-1]], axis=1)
