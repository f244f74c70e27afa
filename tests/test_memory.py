"""dlmjax.memory: the decode's peak-memory estimate against XLA's memory analysis of the compiled
program (abstract shapes, nothing runs), its sharded arithmetic, and its refusals."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from dlmjax import memory
from dlmjax.config import ModelConfig
from dlmjax.errors import DlmjaxError
from dlmjax.sharding import ShardingRules

# LLaDA's proportions shrunk: the vocabulary is large next to the width, so the float32 logits
# and the block's noise matter as they do at 8B (experiments/decode_memory.py runs the real shapes).
SHRUNK = ModelConfig(
    family="llada", vocab_size=16384, hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=64,
    intermediate_size=768, rms_norm_eps=1e-5, rope_theta=5e5, max_position_embeddings=1024, qkv_bias=False,
    tie_word_embeddings=False, mask_token_id=16383, pad_token_id=16382, eos_token_id=16381,
)
SHAPE = dict(batch=2, prompt_length=16, gen_length=64, block_length=16)


@pytest.mark.parametrize("cache", memory.CACHES)
def test_estimate_is_close_to_memory_analysis(cache):
    """Within 0.9x .. 1.25x of arguments + outputs + temporaries - aliases (measured on CPU: 1.00x
    for none, prefix and dual, 1.13x for the block cache, whose noise and logits are overcounted)."""
    compiled = memory.compile_abstract_decode(SHRUNK, cache=cache, **SHAPE)
    measured = memory.compiled_bytes(compiled)
    est = memory.decode_memory(SHRUNK, cache=cache, platform=jax.default_backend(), **SHAPE)
    assert 0.9 <= est.total / measured <= 1.25, (cache, est, measured)
    # the parameters are the program's arguments (the prompt and the knobs are a few bytes)
    assert est.parameters <= compiled.memory_analysis().argument_size_in_bytes <= est.parameters + 4096


def test_parts_follow_the_shapes():
    est = {c: memory.decode_memory(SHRUNK, cache=c, **SHAPE) for c in memory.CACHES}
    cfg, b, length = SHRUNK, SHAPE["batch"], SHAPE["prompt_length"] + SHAPE["gen_length"]
    one_cache = 2 * cfg.num_layers * b * cfg.num_kv_heads * length * cfg.head_dim * 2  # bf16
    assert [est[c].cache for c in memory.CACHES] == [0, 2 * one_cache, one_cache, 2 * one_cache]
    assert all(e.relayout == 0 for e in est.values())  # platform "gpu": no CPU weight copies
    assert memory.decode_memory(SHRUNK, cache="none", platform="cpu", **SHAPE).relayout > 0
    # the block cache's widest step is 2K queries, not the whole canvas
    assert est["block"].activations < est["none"].activations == est["prefix"].activations
    # the noise is drawn for the block: a longer generation with the same block adds only logits rows
    longer = memory.decode_memory(SHRUNK, cache="dual", **{**SHAPE, "gen_length": 128})
    logit_rows = 2 * b * 64 * cfg.vocab_size * 4  # 64 more rows of float32 logits and their exp
    assert longer.activations - est["dual"].activations == pytest.approx(logit_rows, rel=0.01)


def test_sharded_parameters_and_cache():
    """fsdp_tp on data=2, fsdp=2, tensor=4: every weight splits over tensor (heads, mlp, vocab)
    and fsdp (embed); the batch over data x fsdp; the cache over batch and kv heads."""
    cfg = dataclasses.replace(SHRUNK, num_heads=8, num_kv_heads=4, head_dim=32)
    single = memory.decode_memory(cfg, cache="dual", **{**SHAPE, "batch": 8})
    mesh = {"data": 2, "fsdp": 2, "tensor": 4}
    sharded = memory.decode_memory(cfg, cache="dual", mesh=mesh, rules=ShardingRules.preset("fsdp_tp"), **{**SHAPE, "batch": 8})
    norms = (2 * cfg.num_layers + 1) * cfg.hidden_size * 2  # [embed] only: split over fsdp alone
    assert sharded.parameters == pytest.approx((single.parameters - norms) / 8 + norms / 2)
    assert sharded.cache == pytest.approx(single.cache / 4 / 4)
    assert sharded.activations < single.activations / 4
    # a batch that does not split over data x fsdp stays whole on every device
    odd = memory.decode_memory(cfg, cache="dual", mesh=mesh, **{**SHAPE, "batch": 3})
    assert odd.cache == pytest.approx(memory.decode_memory(cfg, cache="dual", **{**SHAPE, "batch": 3}).cache / 4)


def test_loaded_model(loaded):
    lm = loaded("llada")
    est = memory.lm_decode_memory(lm, batch=2, prompt_length=32, gen_length=32, block_length=8, cache="dual")
    assert est.parameters == sum(x.nbytes for x in jax.tree.leaves(nnx.to_pure_dict(lm.state)))
    assert memory.parameter_bytes(lm.config, lm.dtype) == est.parameters  # the abstract count agrees
    cfg = lm.config
    assert est.cache == 2 * cfg.num_layers * 2 * cfg.num_kv_heads * 64 * cfg.head_dim * np.dtype(lm.dtype).itemsize
    assert est.total == pytest.approx(est.parameters + est.cache + est.state + est.activations + est.relayout)
    assert "peak" in est.summary()


@pytest.mark.parametrize("kwargs,message", [
    (dict(cache="ring"), "unknown cache 'ring'"),
    (dict(block_length=24), "gen_length 64 is not divisible by block_length 24"),
    (dict(batch=0), "must be positive"),
    (dict(mesh={"tensor": 3}), "does not split over the 3 devices"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(DlmjaxError, match=message):
        memory.decode_memory(SHRUNK, **{**SHAPE, **kwargs})
