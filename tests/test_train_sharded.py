"""The trainer on a mesh (8 simulated CPU devices, in a fresh interpreter): every sharding preset
trains to one device's parameters, full and LoRA; the compiled step keeps its carry's shardings;
a micro-batch the batch axes do not divide is refused before compiling."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import json, os, sys, tempfile, pathlib
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_default_matmul_precision", "highest")
    from flax import nnx
    from dlmjax.config import from_hf_config
    from dlmjax.errors import DlmjaxError
    from dlmjax.testing import tiny_hf_config
    from dlmjax.model import LoRAConfig
    from dlmjax.sharding import ShardingRules, make_mesh
    from dlmjax.train import TrainConfig, init_model, sft_arrays, train
    from dlmjax.train.loop import make_optimizer
    from dlmjax.train.objectives import make_objective
    from dlmjax.train.step import build_step, initial_state, placed_batch

    hf = tiny_hf_config("llada", vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=4, intermediate_size=64)
    cfg = from_hf_config(hf)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(0, 90, rng.integers(2, 8))) for _ in range(32)]
    answers = [list(rng.integers(0, 90, rng.integers(1, 6))) for _ in range(32)]
    arrays = sft_arrays(prompts, answers, prompt_length=8, gen_length=8, pad_id=120, eos_id=121, objective="mdm")
    tc = TrainConfig(steps=20, batch_size=8, learning_rate=3e-3, warmup_steps=2, save_every=20, log_every=20)
    lora = LoRAConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "up_proj"))

    def flat(model):
        return {jax.tree_util.keystr(p): np.asarray(x)
                for p, x in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(model)))}

    def adapted():
        # LoRA training of an adapter whose B is not zero (as when training continues from a saved
        # adapter). A fresh adapter (B = 0) gives A an exactly zero gradient at first and then one
        # that is zero up to rounding in places, which Adam's normalised step turns into differences
        # of ~1e-5 between any two summation orders (one device or eight): that is the optimizer's,
        # not the sharding's, and would hide a sharding bug of the same size.
        from dlmjax.train.step import with_lora
        model = with_lora(init_model(cfg, seed=1, std=0.5), lora, 0)
        state = nnx.state(model)
        pure = nnx.to_pure_dict(state)
        for i, layer in pure["layers"].items():
            for role in lora.targets:
                shape = layer[role]["lora_b"].shape
                layer[role]["lora_b"] = 0.05 * jax.random.normal(jax.random.key(10 * i + len(role)), shape)
        nnx.replace_by_pure_dict(state, pure)
        nnx.update(model, state)
        return model

    d = pathlib.Path(tempfile.mkdtemp())
    meshes = {"dp": "data=8", "fsdp": "fsdp=8", "tp": "data=4,tensor=2", "fsdp_tp": "data=2,fsdp=2,tensor=2"}
    out = {"relative": {}, "moved": {}}
    for kind, make in (("full", lambda: init_model(cfg, seed=1, std=0.5)), ("lora", adapted)):
        start = flat(make())
        one = flat(train(make(), arrays, d / f"one-{kind}", tc, progress=False).model)
        out["moved"][kind] = max(float(np.abs(one[k] - start[k]).max()) for k in one if kind == "full" or "lora" in k)
        for preset, text in meshes.items():
            got = flat(train(make(), arrays, d / f"{preset}-{kind}", tc, progress=False,
                             mesh=make_mesh(text), rules=ShardingRules.preset(preset)).model)
            out["relative"][f"{kind}/{preset}"] = max(
                float(np.abs(got[k] - one[k]).max() / max(float(np.abs(one[k]).max()), 1e-12)) for k in one)

    # the compiled step: parameters and optimizer state come out as they went in (fsdp_tp)
    tx, schedule = make_optimizer(tc)
    state, layout = initial_state(init_model(cfg, seed=1), tx, tc, mesh=make_mesh(meshes["fsdp_tp"]),
                                  rules=ShardingRules.preset("fsdp_tp"))
    step = build_step(state, tx, schedule, make_objective("mdm"), tc, layout)
    batch = placed_batch({k: v[:8] for k, v in arrays.items()}, layout)
    compiled = step.lower(state.params, state.opt_state, state.frozen, batch, jax.random.key(0), jnp.int32(0)).compile()
    ins, outs = compiled.input_shardings[0][:2], compiled.output_shardings[:2]
    same = [a.is_equivalent_to(b, len(x.shape)) for a, b, x in
            zip(jax.tree.leaves(ins), jax.tree.leaves(outs), jax.tree.leaves((state.params, state.opt_state)))]
    out["stable"] = bool(all(same)) and len(same) > 0
    embed = state.params["embed"][...]
    out["embed_shard"] = list(embed.addressable_shards[0].data.shape)
    mu = jax.tree.leaves(state.opt_state)
    out["moment_shards"] = sorted({str(x.sharding.spec) for x in mu if x.ndim == 2})
    # LoRA under fsdp=8: every adapter matrix (A and B of each target, down_proj's too) and its Adam
    # moments split 8 ways, so adapters and their optimizer state shrink with the mesh
    lora8 = LoRAConfig(rank=8, alpha=16.0, targets=("q_proj", "up_proj", "down_proj"))
    state8, _ = initial_state(init_model(cfg, seed=1), tx, tc, mesh=make_mesh("fsdp=8"), rules=ShardingRules.preset("fsdp"),
                              lora=lora8)
    out["lora_split"] = sorted({x.size // x.addressable_shards[0].data.size
                                for x in jax.tree.leaves((state8.params, state8.opt_state)) if x.ndim == 2})
    out["lora_matrices"] = sum(x.ndim == 2 for x in jax.tree.leaves(state8.params))
    try:
        train(init_model(cfg), arrays, d / "bad", TrainConfig(steps=1, batch_size=8, grad_accum=4), mesh=make_mesh("data=8"),
              rules=ShardingRules.preset("dp"), progress=False)
        out["bad"] = None
    except DlmjaxError as e:
        out["bad"] = str(e)
    print(json.dumps(out))
    """
)


def test_training_on_a_mesh_matches_one_device():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pathlib.Path(__file__).parent), env.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["moved"]["full"] > 1e-2 and out["moved"]["lora"] > 1e-3  # 20 steps changed the parameters
    assert set(out["relative"]) == {f"{k}/{p}" for k in ("full", "lora") for p in ("dp", "fsdp", "tp", "fsdp_tp")}
    for run_name, relative in out["relative"].items():
        assert relative < 1e-5, (run_name, relative)
    assert out["stable"]
    assert out["embed_shard"] == [64, 16]  # vocab 128 over tensor=2, embed 32 over fsdp=2
    assert any("fsdp" in spec for spec in out["moment_shards"]), out["moment_shards"]  # Adam's moments are sharded too
    assert out["lora_split"] == [8] and out["lora_matrices"] == 2 * 3 * 2  # A and B, 3 targets, 2 layers
    assert "micro-batch of 2 rows (batch_size 8 / grad_accum 4) does not split over the 8 devices" in out["bad"]


WORKER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from dlmjax import distributed
    distributed.initialize()  # from the DLMJAX_* variables
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    from flax import nnx
    from dlmjax.config import from_hf_config
    from dlmjax.sharding import ShardingRules, to_host
    from dlmjax.testing import tiny_hf_config
    from dlmjax.train import TrainConfig, init_model, sft_arrays, train
    sys.path.insert(0, sys.argv[2])
    from test_train_sharded import setup
    cfg, arrays, tc = setup()
    result = train(init_model(cfg, seed=1, std=0.5), arrays, sys.argv[1], tc, mesh="data=4,tensor=2",
                   rules=ShardingRules.preset("tp"), progress=False)
    flat = {jax.tree_util.keystr(p): to_host(x) for p, x in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(result.model)))}
    if jax.process_index() == 0:
        np.savez(sys.argv[1] + "/final.npz", **flat)
    print("devices", jax.process_index(), jax.local_device_count(), jax.device_count(), flush=True)
    """
)


def setup():
    """The tiny model, rows and settings of the two-process test."""
    import numpy as np

    from dlmjax.config import from_hf_config
    from dlmjax.testing import tiny_hf_config
    from dlmjax.train import TrainConfig, sft_arrays

    hf = tiny_hf_config("llada", vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=4, intermediate_size=64)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(0, 90, rng.integers(2, 8))) for _ in range(32)]
    answers = [list(rng.integers(0, 90, rng.integers(1, 6))) for _ in range(32)]
    arrays = sft_arrays(prompts, answers, prompt_length=8, gen_length=8, pad_id=120, eos_id=121, objective="mdm")
    tc = TrainConfig(steps=8, batch_size=8, learning_rate=3e-3, warmup_steps=2, save_every=4, log_every=4)
    return from_hf_config(hf), arrays, tc


def test_two_processes_train_as_one(tmp_path):
    """Two processes with 4 CPU devices each join through jax.distributed on localhost and train on
    one 8-device mesh, each reading only its rows of every batch: the parameters of one process
    alone, within 1e-5 relative."""
    import socket

    import jax
    import numpy as np
    from flax import nnx

    from dlmjax.train import init_model, train

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DLMJAX_") or k == "DLMJAX_CACHE"}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
               DLMJAX_COORDINATOR=f"127.0.0.1:{port}", DLMJAX_NUM_PROCESSES="2")
    run_dir = tmp_path / "run"
    args = [sys.executable, "-c", WORKER, str(run_dir), str(pathlib.Path(__file__).parent)]
    procs = [subprocess.Popen(args, env={**env, "DLMJAX_PROCESS_ID": str(i)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "devices 0 4 8" in outs[0][0] and "devices 1 4 8" in outs[1][0]
    cfg, arrays, tc = setup()
    one = train(init_model(cfg, seed=1, std=0.5), arrays, tmp_path / "one", tc, progress=False).model
    got = np.load(run_dir / "final.npz")
    for path, want in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(one))):
        want = np.asarray(want)
        diff = np.abs(got[jax.tree_util.keystr(path)] - want).max() / np.abs(want).max()
        assert diff < 1e-5, (jax.tree_util.keystr(path), diff)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["4", "8"]


MESH_DRIVER = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    from flax import nnx
    from dlmjax.sharding import ShardingRules
    from dlmjax.train import init_model, train
    sys.path.insert(0, sys.argv[4])
    from test_train_sharded import setup
    import dataclasses
    cfg, arrays, tc = setup()
    tc = dataclasses.replace(tc, steps=12, save_every=2)
    slow = float(sys.argv[3])
    result = train(init_model(cfg, seed=1, std=0.5), arrays, sys.argv[1], tc, mesh=sys.argv[2],
                   rules=ShardingRules.preset("fsdp_tp"), progress=False, log=print, on_save=lambda s, m: time.sleep(slow))
    flat = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(result.model)))}
    np.savez(sys.argv[1] + "/final.npz", **flat)
    print("finished", result.step, flush=True)
    """
)


def test_a_run_killed_under_a_mesh_resumes_bitwise(tmp_path):
    """SIGKILL a run on 8 simulated devices (fsdp=8) after its second save; the same command on
    the same mesh ends bitwise with an uninterrupted run, and on another mesh shape
    (data=2,fsdp=2,tensor=2) it continues from the checkpoint to the same parameters within 1e-5."""
    import signal
    import time

    import numpy as np

    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    here = str(pathlib.Path(__file__).parent)

    def command(run_dir, mesh, slow="0"):
        return [sys.executable, "-c", MESH_DRIVER, str(run_dir), mesh, slow, here]

    whole = subprocess.run(command(tmp_path / "whole", "fsdp=8"), env=env, capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(command(killed, "fsdp=8", "0.5"), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (killed / "checkpoints" / "4").is_dir():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (killed / "checkpoints" / "4").is_dir() and not (killed / "final.npz").exists()
    other = tmp_path / "other"
    import shutil

    shutil.copytree(killed, other)
    saved = max(int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit())
    for run_dir, mesh in ((killed, "fsdp=8"), (other, "data=2,fsdp=2,tensor=2")):
        resumed = subprocess.run(command(run_dir, mesh), env=env, capture_output=True, text=True, timeout=600)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert f"resumed from step {saved}" in resumed.stdout
    a, b, c = (np.load(d / "final.npz") for d in (tmp_path / "whole", killed, other))
    for name in a.files:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
        assert np.abs(a[name] - c[name]).max() <= 1e-5 * np.abs(a[name]).max(), name
