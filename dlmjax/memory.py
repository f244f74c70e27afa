"""Peak device memory of a decode, from shapes alone.

`decode_memory` estimates the bytes one device holds at the peak of the decode program
(`dlmjax.decode.engine.run`) from a `ModelConfig`, the parameter dtype and the decode's
shapes; it needs no loaded model and no device, so it can size a run before one is bought.
`lm_decode_memory` does the same for a loaded `LM` (its dtype, mesh and rules).

The peak is the program's arguments (the parameters, as sharded) plus what it allocates:

    parameters    every weight, divided over the mesh axes its logical axes map to;
    cache         the KV cache of every layer, K and V [B, Hkv, P + G, D] in the parameter dtype
                  (none without a cache; prefix, dual and block all keep every slot). Twice for
                  prefix and block: there the cache comes out of the step's `lax.cond` (refresh or
                  cached step; first or later block step) in a new buffer, and XLA copies it into
                  the loop carry (seen in the compiled HLO; the dual cache's branches update it in
                  place);
    state         the while_loop carry: the canvas [B, P + G] and the carried predictions and
                  trajectory (six [B, G]), twice (a loop body's input and output);
    activations   the largest live buffers of one step: the float32 logits [B, rows, V] and the
                  softmax's exp of the same shape, the block's Gumbel noise [B, K, V] (float32,
                  with the random bits it is made from), the attention scores [B, H, W, S]
                  (float32 scores and probabilities, a copy in the parameter dtype) and the MLP's
                  [B, W, I] (two float32 projections and their product), plus the residual stream;
    relayout      CPU only: without a cache the whole forward runs in the loop body, and XLA's
                  CPU backend hoists a relayouted copy of every matmul weight and a float32
                  copy of the embedding table out of the loop (measured with memory_analysis;
                  GPU and TPU matmuls read the weights in place).

W is the widest forward's queries and S its keys: the whole canvas (P + G) without a cache and
at a prefix/dual refresh; for the exact block cache the prompt (P) once, then 2K queries per
step. rows is the logits the head computes: the generation region G (+1 for shifted-logit
families) for the full forward, 2K for the block cache's first step of a block. Attention,
MLP and logits come one after the other and reuse each other's buffers, so the largest of
them counts, plus the noise. CFG (two passes) and the exit signal's [B, G, V] temporaries are
not counted.

tests/test_memory.py and experiments/decode_memory.py compare it with XLA's
`jax.jit(decode).lower(...).compile().memory_analysis()` on CPU from abstract shapes (at
LLaDA-8B shapes within 1.5%); GPU and TPU programs have not been measured.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from dlmjax.config import ModelConfig
from dlmjax.errors import DlmjaxError

CACHES = ("none", "prefix", "dual", "block")
F32 = 4  # bytes


@dataclasses.dataclass(frozen=True)
class DecodeMemory:
    """Bytes per device of one decode program, by part (see the module docstring)."""

    parameters: float
    cache: float
    state: float
    activations: float
    relayout: float

    @property
    def total(self) -> float:
        return self.parameters + self.cache + self.state + self.activations + self.relayout

    def summary(self) -> str:
        gib = 2**30
        return (
            f"parameters {self.parameters / gib:.2f} GiB, cache {self.cache / gib:.2f} GiB, "
            f"activations {self.activations / gib:.2f} GiB, state {self.state / gib:.3f} GiB"
            + (f", CPU weight copies {self.relayout / gib:.2f} GiB" if self.relayout else "")
            + f"; peak {self.total / gib:.2f} GiB"
        )


class _Sizes:
    """A mesh's axis sizes (what `fit_rules` and `axis_size` read) from a Mesh or a mapping;
    the data, fsdp, tensor and expert axes it does not name have size 1."""

    def __init__(self, mesh):
        from dlmjax.sharding import MESH_AXES

        sizes = dict(mesh.shape) if hasattr(mesh, "shape") else {a: int(n) for a, n in dict(mesh).items()}
        self.shape = {**{a: 1 for a in MESH_AXES}, **sizes}


def _split(sizes: _Sizes | None, axes) -> int:
    from dlmjax.sharding import axis_size

    return 1 if sizes is None else axis_size(sizes, axes)


def parameter_bytes(cfg: ModelConfig, dtype, mesh=None, rules=None) -> float:
    """Bytes per device of the parameters, each divided over the mesh axes its logical axes
    map to under `rules` (fitted to the model as `dlmjax.load` fits them)."""
    from flax import nnx

    from dlmjax.model import Transformer
    from dlmjax.sharding import fit_rules

    abstract = nnx.eval_shape(lambda: Transformer(cfg, dtype=jnp.dtype(dtype)))
    sizes = None if mesh is None else _Sizes(mesh)
    fitted = None if sizes is None else fit_rules(rules, sizes, cfg)
    total = 0.0
    for variable in jax.tree.leaves(nnx.state(abstract), is_leaf=lambda x: isinstance(x, nnx.Variable)):
        value = variable.get_value() if hasattr(variable, "get_value") else variable.value
        nbytes = math.prod(value.shape) * np.dtype(value.dtype).itemsize
        axes = variable.get_metadata().get("logical_axes") or ()
        shards = 1 if fitted is None else math.prod(_split(sizes, fitted.axes_for(a)) for a in axes)
        total += nbytes / shards
    return total


def decode_memory(
    cfg: ModelConfig,
    *,
    dtype="bfloat16",
    batch: int,
    prompt_length: int,
    gen_length: int,
    block_length: int,
    cache: str = "none",
    mesh=None,
    rules=None,
    platform: str = "gpu",
) -> DecodeMemory:
    """Estimated bytes per device at the peak of a decode of `batch` prompts of `prompt_length`
    (after bucketing) generating `gen_length` tokens in blocks of `block_length`. For an
    autoregressive family it is the token-by-token decode (`cache` and `block_length` unused).

    mesh: None (one device), a jax Mesh, or its axis sizes ({"data": 2, "tensor": 4}); rules:
    a `ShardingRules` (the fsdp_tp preset by default). platform: "cpu" adds the weight copies
    XLA's CPU backend keeps (see the module docstring)."""
    from dlmjax.sharding import ShardingRules, batch_axes, fit_rules

    if cache not in CACHES:
        raise DlmjaxError(f"unknown cache '{cache}'; use one of {', '.join(CACHES)}")
    if min(batch, prompt_length, gen_length, block_length) <= 0:
        raise DlmjaxError(
            f"batch {batch}, prompt_length {prompt_length}, gen_length {gen_length} and block_length {block_length} "
            "must be positive"
        )
    if gen_length % block_length:
        raise DlmjaxError(f"gen_length {gen_length} is not divisible by block_length {block_length}; pick a block_length that divides it")
    itemsize = np.dtype(jnp.dtype(dtype)).itemsize
    sizes = None
    if mesh is not None:
        rules = rules if rules is not None else ShardingRules.preset("fsdp_tp")
        sizes = _Sizes(mesh)
        rules = fit_rules(rules, sizes, cfg)
    parameters = parameter_bytes(cfg, dtype, mesh, rules)

    def split(logical: str) -> int:
        return 1 if sizes is None else _split(sizes, rules.axes_for(logical))

    rows_of_batch = batch / (1 if sizes is None else _split(sizes, batch_axes(sizes, rules, batch)))
    p, g, k = prompt_length, gen_length, block_length
    length = p + g
    heads, mlp, vocab = cfg.num_heads / split("heads"), cfg.intermediate_size / split("mlp"), cfg.vocab_size / split("vocab")
    kv_heads = cfg.num_kv_heads / split("kv_heads")

    one_cache = 2 * cfg.num_layers * rows_of_batch * kv_heads * length * cfg.head_dim * itemsize
    kv_cache = {"none": 0.0, "prefix": 2 * one_cache, "dual": one_cache, "block": 2 * one_cache}[cache]
    state = 2 * rows_of_batch * (length + 6 * g) * 4

    def forward(queries: int, keys: int, logit_rows: int) -> float:
        scores = rows_of_batch * heads * queries * keys * (2 * F32 + itemsize)
        hidden = rows_of_batch * queries * mlp * (2 * F32 + itemsize)
        residual = 4 * rows_of_batch * queries * cfg.hidden_size * F32
        logits = 2 * rows_of_batch * logit_rows * vocab * F32  # the logits and the softmax's exp
        # attention and MLP run one after the other, and the logits after the last layer:
        # their buffers are reused, so the largest of them is live at once
        return max(max(scores, hidden) + residual, logits)

    shift = 1 if cfg.shifted_logits else 0
    if cfg.is_autoregressive:  # method "ar": a KV cache of every slot, the prompt's prefill is the widest forward
        return DecodeMemory(parameters=parameters, cache=one_cache, state=state,
                            activations=forward(p, length, 1), relayout=0.0)
    if cache == "block":  # the prompt's K/V once (no head), then 2K queries per block step
        largest = max(forward(p, length, 0), forward(2 * k, length, 2 * k))
    else:  # the whole canvas: every step without a cache, the refresh of every block with one
        largest = forward(length, length, g + shift)
    # The block's float32 Gumbel noise: XLA on CPU keeps four buffers of its size (the threefry
    # counters and bits, and the noise); G / K times less than noise for the whole region.
    noise = 4 * rows_of_batch * k * vocab * F32
    activations = largest + noise

    relayout = 0.0
    if platform == "cpu" and cache == "none":
        embedding = cfg.vocab_size * cfg.hidden_size / split("vocab")
        relayout = (parameters - embedding * itemsize) + embedding * F32
    return DecodeMemory(parameters=parameters, cache=kv_cache, state=state, activations=activations, relayout=relayout)


def lm_decode_memory(lm, *, batch: int, prompt_length: int, gen_length: int, block_length: int, cache: str = "none",
                     platform: str | None = None) -> DecodeMemory:
    """`decode_memory` for a loaded `LM`: its config, parameter dtype, mesh and rules; the
    parameters are the bytes each device holds of `lm.state` (LoRA adapters included), and the
    platform defaults to JAX's default backend."""
    from flax import nnx

    est = decode_memory(
        lm.config, dtype=lm.dtype, batch=batch, prompt_length=prompt_length, gen_length=gen_length,
        block_length=block_length, cache=cache, mesh=lm.mesh, rules=lm.rules,
        platform=platform or jax.default_backend(),
    )
    return dataclasses.replace(est, parameters=sharded_bytes(nnx.to_pure_dict(lm.state)))


def sharded_bytes(tree) -> float:
    """The bytes one device holds of a tree of sharded arrays or `ShapeDtypeStruct`s with shardings."""
    return float(sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def compile_abstract_decode(cfg: ModelConfig, *, dtype="bfloat16", batch: int, prompt_length: int, gen_length: int,
                            block_length: int, cache: str = "none", method=None):
    """Compile the decode program from shapes alone (no weights, nothing run), e.g. to read
    XLA's `memory_analysis()`. The method defaults to Fast-dLLM's threshold rule with `cache`
    (the block cache under prompt-block-causal attention)."""
    from flax import nnx

    from dlmjax.decode.engine import Batch, Tokens, run
    from dlmjax.decode.presets import fast_dllm
    from dlmjax.model import Transformer

    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, dtype=jnp.dtype(dtype))))
    if method is None:
        attention = "prompt_block_causal" if cache == "block" else "bidirectional"
        method = fast_dllm(gen_length, block_length=block_length, cache=cache, attention=attention)
    prompt = jax.ShapeDtypeStruct((batch, prompt_length), jnp.int32)
    tokens = Tokens(mask=cfg.mask_token_id, eos=cfg.eos_token_id, eot=cfg.eot_token_id)
    return run.lower(graphdef, state, Batch(prompt, prompt, tokens), method.traced(), jax.random.key(0)).compile()


def compiled_bytes(compiled) -> float:
    """The bytes a compiled program needs, from XLA's memory analysis: arguments + outputs +
    temporaries - aliased (donated) buffers."""
    stats = compiled.memory_analysis()
    return float(stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
                 - stats.alias_size_in_bytes)
