"""LLaDA2 (`llada2_moe`): the family record, the mixture-of-experts forward and the checkpoint
layout, each against tests/llada2_reference.py, an independent NumPy (float64) rewrite of
llada2.md sections 1-3 and 5 that shares no code with dlmjax."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import dlmjax
from dlmjax import testing
from dlmjax.config import from_hf_config
from dlmjax.errors import DlmjaxError
from dlmjax.model import Router
from dlmjax.sharding import ShardingRules, fit_rules

import llada2_reference as ref


def _weights(directory):
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny checkpoint in the HF layout (3 layers: one dense, two MoE; 8 experts in 4 groups,
    top-2 of the best 2 groups, a shared expert, partial RoPE, q/k norms) and its config."""
    directory = testing.write_tiny_checkpoint(tmp_path_factory.mktemp("llada2") / "hf", "llada2", num_layers=3,
                                              hidden_size=64, num_heads=4, num_kv_heads=2)
    return directory, json.loads((directory / "config.json").read_text())


def test_checkpoint_layout_is_the_spec(tiny):
    """Our tiny writer (from the family record) writes exactly the tensors and shapes llada2.md
    section 2 lists, and the real models' configs read as the spec says."""
    directory, config = tiny
    weights = _weights(directory)
    assert {k: w.shape for k, w in weights.items()} == ref.hf_tensor_shapes(config)
    cfg = from_hf_config(config)
    assert (cfg.family, cfg.rotary_dim, cfg.num_experts, cfg.first_k_dense_replace) == ("llada2", 8, 8, 1)
    assert [cfg.is_moe_layer(i) for i in range(3)] == [False, True, True]
    mini = dict(ref.tiny_config(), vocab_size=157184, hidden_size=2048, num_hidden_layers=20, num_attention_heads=16,
                num_key_value_heads=4, head_dim=128, intermediate_size=5120, moe_intermediate_size=512, num_experts=256,
                num_experts_per_tok=8, n_group=8, topk_group=4, pad_token_id=156892)
    cfg = from_hf_config(mini)
    assert (cfg.rotary_dim, cfg.mask_token_id, cfg.eos_token_id, cfg.rope_theta) == (64, 156895, 156892, 600000.0)


@pytest.mark.parametrize("dtype", ["float32"])
def test_logits_equal_the_reference(tiny, dtype):
    """fp32 logits within 1e-4 of the float64 reference: bidirectional, block-causal from position
    0 (LLaDA2's decoding mask), and a batch of two rows."""
    directory, config = tiny
    weights = {k: w.astype(np.float64) for k, w in _weights(directory).items()}
    lm = dlmjax.load(directory, dtype=dtype, progress=False)
    ids = np.random.default_rng(0).integers(0, 96, (2, 21))
    want = ref.forward(config, weights, ids)
    got = lm.logits(ids)
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())
    mask = np.broadcast_to(ref.block_causal_mask(21, 8), (2, 21, 21))
    want = ref.forward(config, weights, ids, mask=mask)
    got = lm.logits(ids, mode="block_causal", block_size=8)
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())
    # the block-causal logits are not the bidirectional ones (the mask matters)
    assert np.abs(got - lm.logits(ids)).max() > 1e-3


def test_routing_matches_the_reference_with_ties():
    """The router picks the same experts with the same weights as the reference, token by token,
    on random scores and on scores full of ties (equal biases, a zero gate): ties go to the lower
    index in the group ranking and in the expert ranking alike."""
    config = ref.tiny_config(hidden_size=16, num_experts=16, n_group=4, topk_group=2, num_experts_per_tok=3)
    cfg = from_hf_config(dict(config, mask_token_id=61, eos_token_id=60))
    router = Router(cfg, jnp.float32)
    rng = np.random.default_rng(1)
    cases = [(rng.standard_normal((16, 16)), 0.3 * rng.standard_normal(16)),
             (np.zeros((16, 16)), np.round(rng.standard_normal(16)) * 0.1),  # many equal scores
             (np.zeros((16, 16)), np.zeros(16))]  # every score equal
    x = rng.standard_normal((32, 16))
    for gate, bias in cases:
        router.weight[...] = jnp.asarray(gate, jnp.float32)
        router.expert_bias[...] = jnp.asarray(bias, jnp.float32)
        experts, weights = jax.device_get(router(jnp.asarray(x, jnp.float32)))
        for t in range(len(x)):
            idx, w = ref.route(config, np.asarray(x[t] @ gate.T, np.float32).astype(np.float64), bias.astype(np.float32))
            assert list(experts[t]) == list(idx), (t, bias)
            np.testing.assert_allclose(weights[t], w, rtol=1e-5)
    # with every score equal: the first topk_group groups, their lowest experts
    assert list(experts[0]) == [0, 1, 2]


def test_tied_routing_in_the_whole_model(tiny, tmp_path):
    """A checkpoint whose routers are all ties (zero gate, coarse biases) gives the reference's logits."""
    directory, config = tiny
    weights = _weights(directory)
    rng = np.random.default_rng(2)
    for name in list(weights):
        if name.endswith("mlp.gate.weight"):
            weights[name] = np.zeros_like(weights[name])
        elif name.endswith("expert_bias"):
            weights[name] = (np.round(rng.standard_normal(weights[name].shape)) * 0.1).astype(np.float32)
    tied = tmp_path / "tied"
    tied.mkdir()
    for f in directory.iterdir():
        if not f.name.endswith(".safetensors") and not f.name.endswith(".index.json"):
            (tied / f.name).write_bytes(f.read_bytes())
    save_file(weights, str(tied / "model.safetensors"), metadata={"format": "pt"})
    ids = np.random.default_rng(3).integers(0, 96, (1, 16))
    want = ref.forward(config, {k: w.astype(np.float64) for k, w in weights.items()}, ids)
    got = dlmjax.load(tied, dtype="float32", progress=False).logits(ids)
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())


def test_export_writes_back_the_same_tensors(tiny, tmp_path):
    """Convert, load and export: every tensor (each expert's slices included) comes back bit for
    bit under its own name, and the config reads back the same."""
    directory, config = tiny
    lm = dlmjax.load(directory, progress=False)
    out = lm.save_pretrained(tmp_path / "export")
    before, after = _weights(directory), _weights(out)
    assert before.keys() == after.keys()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert from_hf_config(json.loads((out / "config.json").read_text())) == from_hf_config(config)


@pytest.mark.parametrize("change, message", [
    (dict(num_experts=6), "num_experts 6 does not split into n_group 4 groups"),
    (dict(n_group=8), "groups of 1 expert"),
    (dict(topk_group=5), "topk_group 5 is not in"),
    (dict(num_experts_per_tok=5), "num_experts_per_tok 5 is not in"),
    (dict(partial_rotary_factor=0.1), "partial_rotary_factor 0.1"),
    (dict(use_qkv_bias=True), "attention biases"),
])
def test_inconsistent_configs_are_one_line(change, message):
    config = dict(ref.tiny_config(), mask_token_id=61, eos_token_id=60, **change)
    with pytest.raises(DlmjaxError, match=message) as e:
        from_hf_config(config)
    assert "\n" not in str(e.value)


EP_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, numpy as np, dlmjax
    jax.config.update("jax_default_matmul_precision", "highest")
    from dlmjax.sharding import ShardingRules
    path = sys.argv[1]
    one = dlmjax.load(path, dtype="float32", progress=False)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 95, (8, 20))
    prompts = [[int(t) for t in rng.integers(0, 95, n)] for n in (3, 8, 11, 16, 5, 9, 2, 14)]
    methods = {"llada2": dict(steps=4, threshold=0.3), "llada2.1-s": {}}
    base = {m: one.generate(prompts, method=m, gen_length=12, block_length=8, **k).tokens for m, k in methods.items()}
    out = {}
    for mesh, preset in (("expert=8", "ep"), ("expert=4,fsdp=2", "ep_fsdp"), ("expert=4,tensor=2", "ep_tp")):
        lm = dlmjax.load(path, dtype="float32", progress=False, mesh=mesh, rules=ShardingRules.preset(preset))
        gate = lm.model.layers[1].moe.experts.gate_proj[...]
        out[mesh] = dict(
            logits=float(np.abs(lm.logits(ids) - one.logits(ids)).max()),
            odd=float(np.abs(lm.logits(ids[:3]) - one.logits(ids[:3])).max()),  # rows the expert axis does not divide
            tokens={m: bool((lm.generate(prompts, method=m, gen_length=12, block_length=8, **k).tokens == base[m]).all())
                    for m, k in methods.items()},
            shard=list(gate.addressable_shards[0].data.shape),  # [experts, width, hidden] on one device
        )
    print(json.dumps(out))
    """
)


def test_expert_parallel_equals_one_device(tiny):
    """On 8 simulated devices, experts split over the expert axis (expert=8; expert=4 with fsdp=2;
    expert=4 with each expert's width over tensor=2): each device holds E / n experts, and the
    logits (a batch the axis divides, and one it does not) and both decoders' tokens equal one
    device's."""
    directory, _ = tiny
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pathlib.Path(__file__).parent), env.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-c", EP_SCRIPT, str(directory)], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    for mesh, r in out.items():
        assert r["logits"] < 1e-4 and r["odd"] < 1e-4, (mesh, r)
        assert all(r["tokens"].values()), (mesh, r)
    assert out["expert=8"]["shard"][:2] == [1, 16] and out["expert=4,fsdp=2"]["shard"][:2] == [2, 16]
    assert out["expert=4,tensor=2"]["shard"][:2] == [2, 8]  # each expert's width split over tensor


def test_expert_count_must_divide_the_expert_axis():
    class Mesh:
        shape = {"data": 1, "fsdp": 1, "tensor": 1, "expert": 3}

    cfg = from_hf_config(dict(ref.tiny_config(), mask_token_id=61, eos_token_id=60))
    with pytest.raises(DlmjaxError, match=r"expert size 8 does not split over the 3 devices of mesh axes expert"):
        fit_rules(ShardingRules.preset("ep"), Mesh(), cfg)


def test_lora_adapters_leave_and_come_back(tiny, tmp_path):
    """LoRA on LLaDA2's attention (the fused query_key_value, dense) and its dense layer's MLP,
    trained a few steps: `save_adapter` writes PEFT's names for the HF modules, and the adapter
    loads back merged and kept with the trained model's logits, which equal the reference's on
    W + (alpha / r) B A. An adapter on the routed experts is refused in one line."""
    from dlmjax.convert import safetensors_io
    from dlmjax.model import LoRAConfig
    from dlmjax.train import TrainConfig, sft_arrays, train

    directory, config = tiny
    lm = dlmjax.load(directory, dtype="float32", progress=False)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(0, 90, 5)) for _ in range(8)]
    answers = [list(rng.integers(0, 90, 4)) for _ in range(8)]
    eos = lm.config.eos_token_id
    arrays = sft_arrays(prompts, answers, prompt_length=8, gen_length=8, pad_id=eos, eos_id=eos, objective="mdm")
    lora = LoRAConfig(rank=4, alpha=8.0, targets=("qkv_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    tc = TrainConfig(steps=6, batch_size=8, learning_rate=5e-2, warmup_steps=1, save_every=6, log_every=6)
    trained = dlmjax.LM(train(lm.model, arrays, tmp_path / "run", tc, lora=lora, progress=False).model, source=str(directory))
    adapter = trained.save_adapter(tmp_path / "adapter")
    ids = np.random.default_rng(1).integers(0, 96, (2, 16))
    ours = trained.logits(ids)
    assert np.abs(ours - lm.logits(ids)).max() > 1e-3  # training moved the adapters

    tensors = safetensors_io.read_header(adapter / "adapter_model.safetensors")
    names = {n.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for n in tensors}
    want = {f"model.layers.{i}.attention.{m}" for i in range(3) for m in ("query_key_value", "dense")}
    want |= {f"model.layers.0.mlp.{m}" for m in ("gate_proj", "up_proj", "down_proj")}  # the dense layer only
    assert names == want
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["target_modules"] == sorted(["query_key_value", "dense", "gate_proj", "up_proj", "down_proj"])
    for mode in ("merge", "keep"):
        back = dlmjax.load(directory, adapter=adapter, lora=mode, dtype="float32", progress=False)
        assert np.abs(back.logits(ids) - ours).max() <= 1e-5, mode

    weights = {k: w.astype(np.float64) for k, w in _weights(directory).items()}
    for module in want:
        a = safetensors_io.load_tensor(tensors[f"base_model.model.{module}.lora_A.weight"]).astype(np.float64)
        b = safetensors_io.load_tensor(tensors[f"base_model.model.{module}.lora_B.weight"]).astype(np.float64)
        weights[f"{module}.weight"] = weights[f"{module}.weight"] + 2.0 * b @ a
    want_logits = ref.forward(config, weights, ids)
    assert np.abs(ours - want_logits).max() <= 1e-4 * max(1.0, np.abs(want_logits).max())

    experts = tmp_path / "experts"
    experts.mkdir()
    (experts / "adapter_config.json").write_text(json.dumps(dict(cfg, target_modules=["gate_proj"])))
    safetensors_io.save_file({"base_model.model.model.layers.1.mlp.experts.0.gate_proj.lora_A.weight": np.zeros((4, 64), np.float32),
                              "base_model.model.model.layers.1.mlp.experts.0.gate_proj.lora_B.weight": np.zeros((16, 4), np.float32)},
                             experts / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(DlmjaxError, match="adapts the mixture of experts .*mlp.experts.0.gate_proj"):
        dlmjax.load(directory, adapter=experts, progress=False)
