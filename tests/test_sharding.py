"""Sharding: the same logits and tokens on any mesh, on 8 simulated CPU devices; the decode
carry keeps its sharding; two processes on one mesh match one device."""

import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from dlmjax import sharding
from dlmjax.config import from_hf_config
from dlmjax.errors import DlmjaxError
from dlmjax.testing import tiny_hf_config

# Run in a fresh interpreter: the device count is fixed when JAX starts.
SCRIPT = textwrap.dedent(
    """
    import json, os, re, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, numpy as np, dlmjax
    jax.config.update("jax_default_matmul_precision", "highest")
    import cpu_compile; cpu_compile.unrolled_threefry_on_cpu()  # tests/ is on PYTHONPATH
    from jax.sharding import AxisType, Mesh
    from dlmjax.errors import DlmjaxError
    from dlmjax.sharding import ShardingRules, fit_rules, make_mesh, resolve_mesh

    def carried_cache(lm):
        # Per-device shapes of the float [B, Hkv, S, D] arrays (the KV cache) that the while
        # loops of the program lm.generate compiled last carry, after partitioning.
        text = lm.compiled.last().as_text()
        carries = [line.split(" while(")[0] for line in text.splitlines() if " while(" in line]
        return sorted({shape for c in carries for shape in re.findall(r"f32\\[(\\d+,\\d+,\\d+,\\d+)\\]", c)})

    devices = np.asarray(jax.devices())
    Auto, Explicit, Manual = AxisType.Auto, AxisType.Explicit, AxisType.Manual
    fast = dict(method="fast-dllm", threshold=0.3, gen_length=16, block_length=8)
    quota = dict(gen_length=16, block_length=8, steps=8)
    METHODS = {
        "fast-dllm": fast, "llada": dict(method="llada", **quota), "sched": dict(method="sched", **quota),
        "dream": dict(method="dream", gen_length=16, steps=8), "prefix": dict(fast, cache="prefix"),
        "block": dict(method="llada", attention="prompt_block_causal", cache="block", **quota),
        # D2F's in-order block cache; Fast-dLLM v2's sub-block DualCache (per-row cache windows)
        "d2f": dict(method="d2f", gen_length=16, block_length=4, tau_add=0.25, tau_act=0.75, tau_conf=0.6, cache="block"),
        "fdv2": dict(method="fast-dllm-v2", gen_length=16, block_length=8, sub_block_length=4, threshold=0.5, cache="dual"),
    }
    # preset -> (the mesh as a user builds it, the other runs compared with one device); fast-dllm
    # with the dual cache runs last on every mesh (the fast-dllm run of every preset).
    # jax.make_mesh's axes are Explicit.
    def runs(family):
        every = {
            # typed Manual (what shard_map makes inside), with an extra size-1 axis
            "single": (Mesh(devices.reshape(8, 1), ("data", "stage"), axis_types=(Manual, Manual)), []),
            "dp": (jax.make_mesh((8,), ("data",)), ["llada" if family == "llada" else "dream", "sched"]),
            "fsdp": (jax.make_mesh((8,), ("fsdp",)), []),
            # mixed Auto/Explicit, an extra axis of size 1, the devices in reverse order
            "tp": (Mesh(devices[::-1].reshape(2, 1, 4), ("data", "expert", "tensor"), axis_types=(Auto, Explicit, Explicit)),
                   []),
            # the issue's mesh, also set as JAX's context mesh (explicit sharding's way in)
            "fsdp_tp": (jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor")), ["prefix", "block", "d2f"]),
        }
        # Dream (shifted logits, positions from the mask, 2 KV heads that tensor=4 cannot split) on
        # the two jax.make_mesh meshes and tp, its own sampler on dp and the dual cache (the GQA
        # replication case) everywhere; the Manual and fsdp-only meshes, and which methods and caches
        # run sharded, do not depend on the family
        if family == "llada":
            return every
        if family == "fast_dllm_v2":
            return {"tp": (every["tp"][0], ["fdv2"])}
        return {"dp": (every["dp"][0], ["dream"]), "tp": every["tp"], "fsdp_tp": (every["fsdp_tp"][0], [])}

    results, errors = [], {}
    for family, path in json.loads(sys.argv[1]).items():
        single = dlmjax.load(path)
        ids = np.random.default_rng(0).integers(0, 96, (8, 20))
        mask = np.ones_like(ids); mask[:3, :5] = 0
        want = single.logits(ids, mask)
        names = sorted({m for _, used in runs(family).values() for m in used})
        reference = {m: single.generate(ids, mask, **METHODS[m]) for m in names}
        cached = single.generate(ids, mask, cache="dual", **fast)
        for preset, (mesh, used) in runs(family).items():
            context = jax.set_mesh(mesh) if preset == "fsdp_tp" else jax.set_mesh(None)
            with context:
                lm = dlmjax.load(path, mesh=mesh, rules=ShardingRules.preset(preset))
                got = lm.logits(ids, mask)
                same = {}
                for m in used:
                    out = lm.generate(ids, mask, **METHODS[m])
                    same[m] = bool((out.tokens == reference[m].tokens).all() and (out.nfe == reference[m].nfe).all())
                compiled = len(lm.compiled)
                out_cached = lm.generate(ids, mask, cache="dual", **fast)
                assert len(lm.compiled) == compiled + 1
                one_device = bool((single.logits(ids, mask) == want).all())  # one device under the caller's mesh too
            real = mask.astype(bool)
            q = lm.state["layers"][0]["q_proj"]["weight"][...]
            # the user's devices at the same (data, fsdp, tensor) coordinates, every axis Auto
            user = {a: i for i, a in enumerate(mesh.axis_names)}
            order = [user[a] for a in ("data", "fsdp", "tensor") if a in user]
            placed = np.asarray(mesh.devices).transpose(order + [i for i in range(mesh.devices.ndim) if i not in order])
            results.append(dict(
                family=family, preset=preset, logits=float(np.abs(got - want)[real].max()), tokens=same,
                cached=bool((out_cached.tokens == cached.tokens).all()), one_device=one_device,
                same_devices=bool(np.array_equal(lm.mesh.devices.ravel(), placed.ravel())),
                axes=[str(lm.mesh.axis_names), str(lm.mesh.axis_types)],
                devices=len(q.sharding.device_set), spec=str(q.sharding.spec),
                shard_shape=list(q.addressable_shards[0].data.shape), shape=list(q.shape), cache=carried_cache(lm),
            ))
            if preset == "tp":  # the Pallas kernel (interpret mode on CPU) per shard under shard_map
                os.environ["DLMJAX_ATTENTION"] = "pallas"
                kernel = lm.generate(ids, mask, cache="dual", **fast)
                os.environ.pop("DLMJAX_ATTENTION")
                results[-1]["kernel"] = bool((kernel.tokens == cached.tokens).all())

        # meshes that cannot work: one line naming a mesh that does, before anything is read
        bad = {
            "foreign": jax.make_mesh((2, 4), ("data", "stage")),
            "divide": jax.make_mesh((1, 8), ("data", "tensor")),  # 4 heads over tensor=8
            "abstract": jax.make_mesh((8,), ("data",)).abstract_mesh,
            "devices": "data=16",
        }
        for case, mesh in bad.items():
            try:
                dlmjax.load(path, mesh=mesh, rules=ShardingRules.preset("tp"))
                errors[family, case] = dict(message=None)
                continue
            except DlmjaxError as e:
                message = str(e)
            suggested = re.search(r'make_mesh\\("([^"]+)"\\)', message)
            fits = suggested is not None and bool(fit_rules(ShardingRules.preset("tp"), make_mesh(suggested[1]), single.config))
            errors[family, case] = dict(message=message, suggested=suggested and suggested[1], fits=fits)

    # the kernel alone under meshes of every axis type (jit; batch over data, heads over tensor)
    from dlmjax.kernels import reference_attention, sharded_cached_block_attention
    rng = np.random.default_rng(0)
    q, k, v = (jax.numpy.asarray(rng.standard_normal(s, np.float32)) for s in [(2, 8, 8, 64), (2, 4, 128, 64), (2, 4, 128, 64)])
    key_valid = jax.numpy.asarray(np.arange(128)[None] < np.array([[128], [50]]))
    want = np.asarray(reference_attention(q, k, v, key_valid=key_valid))
    kernel = {}
    for types in [(Auto, Explicit), (Explicit, Auto), (Manual, Manual)]:
        mesh = Mesh(devices.reshape(2, 4), ("data", "tensor"), axis_types=types)
        run = jax.jit(lambda q, k, v, mesh=mesh: sharded_cached_block_attention(
            q, k, v, key_valid=key_valid, mesh=mesh, implementation="pallas_tpu", interpret=True))
        kernel[str(types)] = float(np.abs(np.asarray(run(q, k, v)) - want).max())
    mesh = Mesh(devices.reshape(2, 4), ("data", "tensor"))
    inner = jax.shard_map(lambda q, k, v: sharded_cached_block_attention(q, k, v, mesh=mesh, implementation="xla"),
                          mesh=mesh, in_specs=jax.P("data"), out_specs=jax.P("data"))
    try:
        jax.jit(inner)(q, k, v)
        kernel["inside shard_map"] = None
    except ValueError as e:
        kernel["inside shard_map"] = str(e)
    print(json.dumps(dict(results=results, errors={f"{f}/{c}": r for (f, c), r in errors.items()}, kernel=kernel)))
    """
)


def test_any_mesh_matches_one_device(converted):
    """LLaDA and Dream on 8 devices, every preset (and Fast-dLLM v2's per-row sub-block DualCache on tp), on the meshes users build: jax.make_mesh's
    (Explicit axes), mixed Auto/Explicit, typed Manual, with extra size-1 axes and devices in
    another order. Logits within 1e-4 and the tokens of one device for every method and cache;
    the decode carry keeps its sharding; a mesh that cannot work says which one does."""
    paths = {"llada": str(converted("llada")), "dream": str(converted("dream")),  # dream: GQA, 2 kv heads
             "fast_dllm_v2": str(converted("fast_dllm_v2"))}
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pathlib.Path(__file__).parent), env.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(paths)], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    results = out["results"]
    assert len(results) == 9
    assert all(r["kernel"] for r in results if r["preset"] == "tp")
    for r in results:
        assert r["logits"] <= 1e-4, r
        assert all(r["tokens"].values()) and r["cached"] and r["one_device"], r
        assert r["devices"] == 8 and r["same_devices"], r
        assert r["axes"] == ["('data', 'fsdp', 'tensor', 'expert')", "(Auto, Auto, Auto, Auto)"], r
    tried = {m for r in results for m in r["tokens"]}
    assert tried == {"llada", "dream", "sched", "prefix", "block", "d2f", "fdv2"}, tried  # and fast-dllm (dual) on every mesh
    by = {(r["family"], r["preset"]): r for r in results}
    # single replicates the parameters; tp splits q_proj's heads over 4 devices, fsdp its embed dim over 8
    assert by["llada", "single"]["shard_shape"] == by["llada", "single"]["shape"]
    assert by["llada", "tp"]["shard_shape"] == [by["llada", "tp"]["shape"][0] // 4, by["llada", "tp"]["shape"][1]]
    assert by["llada", "fsdp"]["shard_shape"] == [by["llada", "fsdp"]["shape"][0], by["llada", "fsdp"]["shape"][1] // 8]
    # The dual cache [8 rows, Hkv, 48 slots, 16] as every device holds it through the decode loops:
    # rows over the batch axes, KV heads over tensor where they divide it. Dream's 2 KV heads do not
    # split over tensor=4, so the rules replicate them; left to itself the partitioner splits them in
    # halves over part of the tensor axis (and the kernel's shard_map would regather them every step).
    rows = {"single": 8, "dp": 1, "fsdp": 1, "tp": 4, "fsdp_tp": 2}
    kv_heads = {
        "llada": {"single": 4, "dp": 4, "fsdp": 4, "tp": 1, "fsdp_tp": 2},
        "dream": {"dp": 2, "tp": 2, "fsdp_tp": 1},
        "fast_dllm_v2": {"tp": 2},
    }
    for (family, preset), r in by.items():
        assert r["cache"] == [f"{rows[preset]},{kv_heads[family][preset]},48,16"], r

    errors = out["errors"]
    for family in ("llada", "dream"):
        foreign, divide = errors[f"{family}/foreign"], errors[f"{family}/divide"]
        assert "mesh axis 'stage' has size 4" in foreign["message"] and foreign["suggested"] == "data=8", foreign
        assert "heads size 4 does not split over the 8 devices" in divide["message"], divide
        assert divide["suggested"] == "data=2,tensor=4" and divide["fits"], divide
        assert "must be a jax.sharding.Mesh" in errors[f"{family}/abstract"]["message"]
        assert "needs 16 devices but 8 are available" in errors[f"{family}/devices"]["message"]
        assert all("\n" not in e["message"] for e in errors.values())

    kernel = out["kernel"]
    assert "already Manual" in (kernel.pop("inside shard_map") or ""), kernel
    assert len(kernel) == 3 and all(err < 1e-5 for err in kernel.values()), kernel


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
    with pytest.raises(DlmjaxError, match="mesh axis data is given twice"):
        sharding.make_mesh("data=1,data=1", devices=one)
    with pytest.raises(DlmjaxError, match="unknown logical axis 'hidden'"):
        sharding.ShardingRules((("hidden", "tensor"),))
    with pytest.raises(DlmjaxError, match="rule for 'heads' names mesh axis 'model', which does not exist"):
        sharding.ShardingRules((("heads", "model"),))
    with pytest.raises(DlmjaxError, match="names a mesh axis twice"):
        sharding.ShardingRules((("batch", ("data", "data")),))
    foreign = jax.sharding.Mesh(np.asarray(one).reshape(1, 1), ("x", "y"))
    with pytest.raises(DlmjaxError, match="the mesh has no axis 'data'"):
        sharding.fit_rules(sharding.ShardingRules.preset("tp"), foreign, _cfg())
    assert sharding.make_mesh("data=1", devices=one).shape == {"data": 1, "fsdp": 1, "tensor": 1, "expert": 1}
    with pytest.raises(DlmjaxError, match="mesh must be a jax.sharding.Mesh"):
        sharding.resolve_mesh(foreign.abstract_mesh)


def test_resolve_mesh_types_and_axes():
    """Any mesh -> (data, fsdp, tensor, expert), all Auto: size-1 axes of other names dropped, missing
    ones added, Explicit and Manual read as Auto (the 8-device test checks the devices' order)."""
    types = jax.sharding.AxisType
    one = np.asarray(jax.devices()[:1])
    for axis_types in [(types.Explicit,) * 3, (types.Auto, types.Explicit, types.Manual)]:
        user = jax.sharding.Mesh(one.reshape(1, 1, 1), ("stage", "tensor", "data"), axis_types=axis_types)
        mesh = sharding.resolve_mesh(user)
        assert mesh.axis_names == sharding.MESH_AXES and mesh.axis_types == (types.Auto,) * len(sharding.MESH_AXES)
        assert mesh == sharding.make_mesh("data=1", devices=list(one))  # the same program as a string mesh
    assert sharding.resolve_mesh("data=1").axis_types == (types.Auto,) * len(sharding.MESH_AXES)
    assert sharding.resolve_mesh(jax.make_mesh((1,), ("data",))) == sharding.resolve_mesh({"data": 1})


def test_activation_specs():
    """A mesh axis serves one dimension of an activation; sizes that do not divide stay whole."""
    from jax.sharding import PartitionSpec as P

    class Mesh:
        shape = {"data": 2, "fsdp": 2, "tensor": 4}

    def layout(preset, **cfg):
        rules = sharding.fit_rules(sharding.ShardingRules.preset(preset), Mesh(), _cfg(**cfg))
        return sharding.Layout(Mesh(), rules)

    residual, kv = ("batch", "length", "embed"), ("batch", "kv_heads", "length", "head_dim")
    fsdp = layout("fsdp")
    assert fsdp.spec((8, 5, 64), residual) == P(("data", "fsdp"), None, None)  # the batch takes fsdp first
    assert fsdp.spec((1, 5, 64), residual) == P(None, None, "fsdp")  # one row: the embed dim takes it
    assert fsdp.spec((2, 5, 64), residual) == P(None, None, "fsdp")  # all or none of the batch axes, as inputs
    tp = layout("fsdp_tp", num_heads=4, num_kv_heads=2)
    assert tp.spec((8, 2, 48, 16), kv) == P(("data", "fsdp"), None, None, None)  # 2 KV heads over tensor=4: whole
    assert tp.spec((8, 5, 4, 16), ("batch", "length", "heads", "head_dim")) == P(("data", "fsdp"), None, "tensor", None)
    assert tp.spec((8, 5, 128), ("batch", "length", "vocab")) == P(("data", "fsdp"), None, "tensor")
    assert tp.spec((), ()) == P()
    with pytest.raises(ValueError, match="do not name the dimensions"):
        tp.spec((8, 5), ("batch", "sequence"))
    x = jax.numpy.ones((2, 3))
    assert sharding.constrain(x, ("batch", "length"), None) is x  # no layout: untouched


def test_sizes_must_divide_the_mesh():
    class FakeMesh:
        shape = {"data": 1, "fsdp": 1, "tensor": 3}

    rules = sharding.ShardingRules.preset("tp")
    # the devices an axis cannot use go to data, which splits only the batch
    with pytest.raises(DlmjaxError, match=r'heads size 4 does not split over the 3 devices.*make_mesh\("data=3"\)'):
        sharding.fit_rules(rules, FakeMesh(), _cfg(num_heads=4, num_kv_heads=2))

    class Wide:
        shape = {"data": 1, "fsdp": 3, "tensor": 8}

    wide = r'heads size 4 does not split over the 8 devices.*make_mesh\("data=6,tensor=4"\) \(on the command line: --mesh'
    with pytest.raises(DlmjaxError, match=wide):
        sharding.fit_rules(sharding.ShardingRules.preset("fsdp_tp"), Wide(), _cfg(num_heads=4, num_kv_heads=2))
    class ThreeData:
        shape = {"data": 3, "fsdp": 1, "tensor": 1}

    # a rule that splits the model over data: the devices it cannot use are left out
    on_data = sharding.ShardingRules((("batch", "data"), ("embed", "data")))
    with pytest.raises(DlmjaxError, match=r'make_mesh\("data=1", devices=jax.devices\(\)\[:1\]\)'):
        sharding.fit_rules(on_data, ThreeData(), _cfg())

    class TwoWay:
        shape = {"data": 1, "fsdp": 1, "tensor": 4}

    fitted = sharding.fit_rules(rules, TwoWay(), _cfg(num_heads=4, num_kv_heads=2))
    assert fitted.axes_for("kv_heads") is None and fitted.axes_for("heads") == "tensor"  # kv heads replicated


def test_cli_mesh(converted):
    base = [sys.executable, "-m", "dlmjax.generate", "--model", str(converted("llada")), "--prompt-ids", "5,6,7", "--gen-length", "8"]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    run = subprocess.run(base + ["--mesh", "data=1,tensor=4", "--sharding", "tp", "--cache", "dual"], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "per-device memory estimate: parameters" in run.stderr
    bad = subprocess.run(base + ["--mesh", "data=3"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "needs 3 devices but 4 are available" in bad.stderr and "Traceback" not in bad.stderr
    wrong = {**env, "DLMJAX_COORDINATOR": "localhost:1", "DLMJAX_NUM_PROCESSES": "2", "DLMJAX_PROCESS_ID": "2"}
    bad = subprocess.run(base + ["--mesh", "data=4"], capture_output=True, text=True, env=wrong)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "DLMJAX_PROCESS_ID=2 is not below DLMJAX_NUM_PROCESSES=2" in bad.stderr, bad.stderr


def test_distributed_settings():
    from dlmjax import distributed

    env = {"DLMJAX_COORDINATOR": "10.0.0.1:8476", "DLMJAX_NUM_PROCESSES": "4", "DLMJAX_PROCESS_ID": "3"}
    assert distributed.settings(environ=env) == distributed.Settings("10.0.0.1:8476", 4, 3, None)
    assert distributed.settings(process_id=0, environ=env).process_id == 0  # arguments win
    assert distributed.settings(environ={**env, "DLMJAX_LOCAL_DEVICE_IDS": "0,1"}).local_device_ids == (0, 1)
    assert not distributed.settings(environ={}).explicit  # nothing set: JAX detects the cluster
    assert distributed.configured(env) and not distributed.configured({"DLMJAX_PROCESS_ID": ""})
    errors = {
        "is not below DLMJAX_NUM_PROCESSES=4": {**env, "DLMJAX_PROCESS_ID": "4"},
        "DLMJAX_NUM_PROCESSES='four' is not an integer": {**env, "DLMJAX_NUM_PROCESSES": "four"},
        "DLMJAX_NUM_PROCESSES=0 must be at least 1": {**env, "DLMJAX_NUM_PROCESSES": "0"},
        "DLMJAX_PROCESS_ID=-1 is negative": {**env, "DLMJAX_PROCESS_ID": "-1"},
        "needs DLMJAX_PROCESS_ID as well": {"DLMJAX_COORDINATOR": "h:1", "DLMJAX_NUM_PROCESSES": "2"},
        "needs DLMJAX_NUM_PROCESSES as well": {"DLMJAX_PROCESS_ID": "0"},
        "DLMJAX_NUM_PROCESSES=4 needs the coordinator": {"DLMJAX_NUM_PROCESSES": "4", "DLMJAX_PROCESS_ID": "0"},
        "DLMJAX_COORDINATOR='10.0.0.1' is not host:port": {**env, "DLMJAX_COORDINATOR": "10.0.0.1"},
        "is not a comma-separated list": {**env, "DLMJAX_LOCAL_DEVICE_IDS": "gpu0"},
    }
    for message, environ in errors.items():
        with pytest.raises(DlmjaxError, match=message):
            distributed.settings(environ=environ)
    with pytest.raises(DlmjaxError, match="process_id=2 is not below num_processes=2"):
        distributed.initialize("localhost:1", num_processes=2, process_id=2)
    assert distributed.initialize(num_processes=1) == 1  # one process: nothing to join
    jax.devices()  # the backend is up: joining now is too late, and says so
    with pytest.raises(DlmjaxError, match="call it first"):
        distributed.initialize("localhost:1", num_processes=2, process_id=0)


WORKER = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from dlmjax import distributed
    processes = distributed.initialize()  # from the DLMJAX_* variables
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    import dlmjax
    from dlmjax.generate import main
    from dlmjax.sharding import ShardingRules
    path, out = sys.argv[1], sys.argv[2]
    lm = dlmjax.load(path, mesh="data=2,tensor=2", rules=ShardingRules.preset("tp"))
    ids, mask = np.asarray(json.loads(sys.argv[3])), np.asarray(json.loads(sys.argv[4]))
    logits = lm.logits(ids, mask)
    gen = lm.generate(ids, mask, method="fast-dllm", threshold=0.3, gen_length=16, block_length=8)
    info = [jax.process_index(), processes, jax.local_device_count(), jax.device_count()]
    np.savez(out % jax.process_index(), logits=logits, tokens=gen.tokens, info=info)
    # the CLI on the same processes: it joins again (a no-op) and process 0 prints
    sys.exit(main(["--model", path, "--prompt-ids", "5,6,7", "--gen-length", "8", "--mesh", "data=2,tensor=2", "--json"]))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(converted, tmp_path):
    """Two processes with 2 CPU devices each join through jax.distributed on localhost and run
    logits, a decode (rows split over the processes) and the CLI over one 4-device mesh; each
    gets the one-device result."""
    import dlmjax

    path = str(converted("llada"))
    ids = np.random.default_rng(0).integers(0, 96, (4, 20))
    mask = np.ones_like(ids)
    mask[:1, :5] = 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("DLMJAX_") or k == "DLMJAX_CACHE"}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
               DLMJAX_COORDINATOR=f"127.0.0.1:{_free_port()}", DLMJAX_NUM_PROCESSES="2")
    args = [sys.executable, "-c", WORKER, path, str(tmp_path / "p%d.npz"), json.dumps(ids.tolist()), json.dumps(mask.tolist())]
    procs = [
        subprocess.Popen(args, env={**env, "DLMJAX_PROCESS_ID": str(i)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]

    single = dlmjax.load(path)
    want = single.logits(ids, mask)
    tokens = single.generate(ids, mask, method="fast-dllm", threshold=0.3, gen_length=16, block_length=8).tokens
    cli = single.generate([[5, 6, 7]], gen_length=8).tokens[0].tolist()
    for i in range(2):
        got = np.load(tmp_path / f"p{i}.npz")
        assert got["info"].tolist() == [i, 2, 2, 4]
        assert np.abs(got["logits"] - want)[mask.astype(bool)].max() <= 1e-4
        assert (got["tokens"] == tokens).all()
        assert f"process {i} of 2: 2 local devices of 4" in outs[i][1]
    # The CLI prints one JSON line; Gloo's connection messages share stdout (and under load a message
    # can arrive split over lines), so only JSON lines are the CLI's
    printed = [[line for line in out.splitlines() if line.lstrip().startswith("{")] for out, _ in outs]
    assert len(printed[0]) == 1 and json.loads(printed[0][0])["tokens"] == cli
    assert printed[1] == []  # only process 0 prints
