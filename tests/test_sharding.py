"""Sharding: the same logits and tokens on any mesh, on 8 simulated CPU devices."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import pytest

from dlmjax import sharding
from dlmjax.config import from_hf_config
from dlmjax.errors import DlmjaxError
from dlmjax.testing import tiny_hf_config

# Run in a fresh interpreter: the device count is fixed when JAX starts.
SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, numpy as np, dlmjax
    jax.config.update("jax_default_matmul_precision", "highest")
    from dlmjax.sharding import ShardingRules
    results = []
    for family, path in json.loads(sys.argv[1]).items():
        single = dlmjax.load(path)
        ids = np.random.default_rng(0).integers(0, 96, (8, 20))
        mask = np.ones_like(ids); mask[:3, :5] = 0
        want = single.logits(ids, mask)
        args = dict(method="fast-dllm", threshold=0.3, gen_length=16, block_length=8)
        tokens = single.generate(ids, mask, **args)
        cached = single.generate(ids, mask, cache="dual", **args)
        for preset, mesh in [("single", "data=8"), ("dp", "data=8"), ("fsdp", "fsdp=8"), ("tp", "data=2,tensor=4"),
                             ("fsdp_tp", "data=2,fsdp=2,tensor=2")]:
            lm = dlmjax.load(path, mesh=mesh, rules=ShardingRules.preset(preset))
            got = lm.logits(ids, mask)
            out = lm.generate(ids, mask, **args)
            out_cached = lm.generate(ids, mask, cache="dual", **args)
            real = mask.astype(bool)
            q = lm.state["layers"][0]["q_proj"]["weight"][...]
            results.append(dict(
                family=family, preset=preset, mesh=mesh, logits=float(np.abs(got - want)[real].max()),
                tokens=bool((out.tokens == tokens.tokens).all() and (out.nfe == tokens.nfe).all()),
                cached=bool((out_cached.tokens == cached.tokens).all()),
                devices=len(q.sharding.device_set), spec=str(q.sharding.spec),
                shards=len({s.data.shape for s in q.addressable_shards}),
                shard_shape=list(q.addressable_shards[0].data.shape), shape=list(q.shape),
            ))
        # the Pallas kernel (interpret mode on CPU) per shard under shard_map, in the cached steps
        os.environ["DLMJAX_ATTENTION"] = "pallas"
        lm = dlmjax.load(path, mesh="data=2,tensor=4", rules=ShardingRules.preset("tp"))
        kernel = lm.generate(ids, mask, cache="dual", **args)
        os.environ.pop("DLMJAX_ATTENTION")
        results.append(dict(family=family, preset="tp-pallas", kernel=bool((kernel.tokens == cached.tokens).all())))
    print(json.dumps(results))
    """
)


def test_every_preset_matches_one_device(converted):
    paths = {"llada": str(converted("llada")), "dream": str(converted("dream"))}  # dream: GQA, 2 kv heads
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    run = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(paths)], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(results) == 12
    assert all(r["kernel"] for r in results if r["preset"] == "tp-pallas")
    results = [r for r in results if r["preset"] != "tp-pallas"]
    for r in results:
        assert r["logits"] <= 1e-4, r
        assert r["tokens"] and r["cached"], r
        assert r["devices"] == 8
    by = {(r["family"], r["preset"]): r for r in results}
    # single replicates the parameters; tp splits q_proj's heads over 4 devices, fsdp its embed dim over 8
    assert by["llada", "single"]["shard_shape"] == by["llada", "single"]["shape"]
    assert by["llada", "tp"]["shard_shape"] == [by["llada", "tp"]["shape"][0] // 4, by["llada", "tp"]["shape"][1]]
    assert by["llada", "fsdp"]["shard_shape"] == [by["llada", "fsdp"]["shape"][0], by["llada", "fsdp"]["shape"][1] // 8]


def _cfg(**kwargs):
    return from_hf_config(tiny_hf_config("dream", **kwargs))


def test_mesh_errors():
    one = jax.devices()[:1]
    with pytest.raises(DlmjaxError, match="needs 8 devices but 1 are available"):
        sharding.make_mesh("data=8", devices=one)
    with pytest.raises(DlmjaxError, match="mesh axis 'model' does not exist"):
        sharding.make_mesh("model=2", devices=one)
    with pytest.raises(DlmjaxError, match="not name=integer"):
        sharding.make_mesh("data=two", devices=one)
    with pytest.raises(DlmjaxError, match="unknown sharding preset"):
        sharding.ShardingRules.preset("zero3")
    assert sharding.make_mesh("data=1", devices=one).shape == {"data": 1, "fsdp": 1, "tensor": 1}


def test_sizes_must_divide_the_mesh():
    class FakeMesh:
        shape = {"data": 1, "fsdp": 1, "tensor": 3}

    rules = sharding.ShardingRules.preset("tp")
    with pytest.raises(DlmjaxError, match="heads size 4 does not split over the 3 devices"):
        sharding.fit_rules(rules, FakeMesh(), _cfg(num_heads=4, num_kv_heads=2))

    class TwoWay:
        shape = {"data": 1, "fsdp": 1, "tensor": 4}

    fitted = sharding.fit_rules(rules, TwoWay(), _cfg(num_heads=4, num_kv_heads=2))
    assert fitted.axes_for("kv_heads") is None and fitted.axes_for("heads") == "tensor"  # kv heads replicated


def test_memory_estimate_single_device(converted):
    import numpy as np
    from flax import nnx

    import dlmjax

    lm = dlmjax.load(converted("llada"))
    est = sharding.memory_estimate(lm, batch=2, length=64, gen_length=32, cache=True)
    cfg = lm.config
    assert est["parameters"] == sum(x.nbytes for x in jax.tree.leaves(nnx.to_pure_dict(lm.state)))
    assert est["cache"] == 2 * cfg.num_layers * 2 * cfg.num_kv_heads * 64 * cfg.head_dim * np.dtype(lm.dtype).itemsize
    assert sharding.memory_estimate(lm, batch=2, length=64, gen_length=32, cache=False)["cache"] == 0


def test_cli_mesh(converted):
    base = [sys.executable, "-m", "dlmjax.generate", "--model", str(converted("llada")), "--prompt-ids", "5,6,7", "--gen-length", "8"]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    run = subprocess.run(base + ["--mesh", "data=1,tensor=4", "--sharding", "tp", "--cache", "dual"], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "per-device memory estimate: parameters" in run.stderr
    bad = subprocess.run(base + ["--mesh", "data=3"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "needs 3 devices but 4 are available" in bad.stderr and "Traceback" not in bad.stderr
