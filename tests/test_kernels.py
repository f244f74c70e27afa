"""dlmjax.kernels: cached block attention (CPU; Pallas kernels in interpret mode).

Error norm everywhere: max |out - ref| / max |ref| over the whole output, in float32.
Tolerances: 1e-5 for float32 inputs, 1e-2 for bfloat16 inputs.
"""

import logging
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlmjax.kernels import cached_block_attention, reference_attention
from dlmjax.kernels import attention as kattn

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
BLOCK = 16  # block size of the block-causal masks


def rel_err(out, ref) -> float:
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    return float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))


def make_qkv(seed, b, h, hkv, tq, s, d, dtype):
    """Random normal q, k, v (numpy RNG: no XLA compile for the inputs)."""
    rng = np.random.default_rng(seed)
    return tuple(
        jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
        for shape in ((b, h, tq, d), (b, hkv, s, d), (b, hkv, s, d))
    )


def key_padding(b, s):
    """Row 0: tail padding (unused cache slots); row 1: left padding; row 2: no valid key."""
    pos = np.arange(s)
    rows = [pos < s - s // 3, pos >= s // 4, np.zeros(s, bool)]
    return jnp.asarray(np.stack([rows[i % 3] for i in range(b)]))


def block_ids(kind, tq, s):
    """(q_block [Tq], k_block [S]) for queries at cache positions s//2 .. s//2 + tq - 1."""
    pos = np.arange(s)
    qpos = s // 2 + np.arange(tq)
    if kind == "absolute":  # Fast-dLLM v2: blocks counted from position 0
        kb, qb = pos // BLOCK, qpos // BLOCK
        qb[0] = 0  # query 0 sees only block 0: in a left-padded row it sees nothing at all
    else:  # "prompt": D2F, the prompt [0, P) is block 0
        p = s // 4
        kb = np.where(pos < p, 0, 1 + (pos - p) // BLOCK)
        qb = np.where(qpos < p, 0, 1 + (qpos - p) // BLOCK)
    return jnp.asarray(qb, jnp.int32), jnp.asarray(kb, jnp.int32)


# (batch, heads, kv_heads, Tq, S, head_dim, dtype, key padding, block ids, block_k)
CASES = [
    (3, 8, 2, 1, 200, 64, jnp.float32, True, None, 512),  # Tq=1, ragged S, GQA 4, an empty batch row
    (2, 4, 4, 8, 512, 64, jnp.float32, True, "absolute", 128),  # GQA 1, 4 tiles, tile skipping, empty rows
    (2, 7, 1, 32, 64, 32, jnp.float32, False, "prompt", 512),  # GQA 7 (MQA), S < one tile, no key padding
    (2, 8, 2, 128, 512, 128, jnp.bfloat16, True, "absolute", 512),  # Tq=128, bf16
    (2, 14, 2, 32, 200, 64, jnp.bfloat16, True, "prompt", 128),  # GQA 7, bf16, ragged S over 2 tiles
]


def case_inputs(case, seed=0):
    b, h, hkv, tq, s, d, dtype, pad, blocks, _ = case
    q, k, v = make_qkv(seed, b, h, hkv, tq, s, d, dtype)
    masks = dict(key_valid=key_padding(b, s) if pad else None)
    masks["q_block"], masks["k_block"] = block_ids(blocks, tq, s) if blocks else (None, None)
    return q, k, v, masks


def case_id(case):
    b, h, hkv, tq, s, d, dtype, pad, blocks, bk = case
    return f"tq{tq}-s{s}-g{h // hkv}-{jnp.dtype(dtype).name}-{'pad' if pad else 'nopad'}-{blocks}-bk{bk}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_pallas_tpu_interpret_matches_reference(case):
    q, k, v, masks = case_inputs(case)
    out = cached_block_attention(q, k, v, **masks, implementation="pallas_tpu", block_k=case[-1], interpret=True)
    ref = jax.jit(reference_attention)(q, k, v, **masks)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert np.isfinite(np.asarray(out, np.float32)).all()
    assert rel_err(out, ref) < TOL[case[6]], rel_err(out, ref)
    if masks["key_valid"] is not None and q.shape[0] == 3:  # batch row 2 has no valid key
        assert not np.any(np.asarray(out[2], np.float32)) and not np.any(np.asarray(ref[2], np.float32))
    if case[8] == "absolute":  # (row 1, query 0) is fully masked: zeros in both
        assert not np.any(np.asarray(out[1, :, 0], np.float32))
        assert not np.any(np.asarray(ref[1, :, 0], np.float32))


@pytest.mark.parametrize("kind", ["absolute", "prompt"])
def test_reference_matches_jax_nn(kind):
    b, h, hkv, tq, s, d = 2, 8, 2, 16, 96, 32
    q, k, v = make_qkv(1, b, h, hkv, tq, s, d, jnp.float32)
    pos = np.arange(s)
    key_valid = jnp.asarray(np.stack([pos < 80, pos >= 7]))  # tail / left padding
    q_block, k_block = block_ids(kind, tq, s)
    q_block = q_block.at[0].set(q_block[1])  # no fully masked rows: jax.nn does not zero them
    ours = jax.jit(reference_attention)(q, k, v, key_valid=key_valid, q_block=q_block, k_block=k_block)

    @jax.jit
    def theirs_fn(q, k, v):  # layout BTNH, GQA, boolean mask broadcastable to [B, N, T, S]
        mask = key_valid[:, None, None, :] & (q_block[:, None] >= k_block[None, :])[None, None]
        bt = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731
        return bt(jax.nn.dot_product_attention(bt(q), bt(k), bt(v), mask=mask, implementation="xla"))

    theirs = theirs_fn(q, k, v)
    assert rel_err(ours, theirs) < 1e-5


def test_pallas_tpu_in_the_tpu_simulator():
    """pltpu.InterpretParams: TPU memory spaces, DMAs, scalar prefetch in SMEM and a
    randomised order of the "parallel" grid axes."""
    from jax.experimental.pallas import tpu as pltpu

    case = (2, 4, 2, 8, 384, 128, jnp.float32, True, "absolute", 128)  # 3 KV tiles, some skipped
    q, k, v, masks = case_inputs(case, seed=4)
    interpret = pltpu.InterpretParams(random_seed=1)
    out = cached_block_attention(q, k, v, **masks, implementation="pallas_tpu", block_k=128, interpret=interpret)
    assert rel_err(out, jax.jit(reference_attention)(q, k, v, **masks)) < 1e-5


def test_pallas_gpu_kernel_logic_in_gpu_interpreter():
    """The Mosaic GPU kernel's pipeline, index maps, masks and online softmax, run by the
    GPU interpreter (private API; matmuls as dots there). Not a hardware check."""
    pytest.importorskip("jax._src.pallas.mosaic_gpu.interpret.params")
    case = (2, 2, 1, 8, 200, 64, jnp.bfloat16, True, "absolute", 128)  # 2 KV tiles, GQA 2
    q, k, v, masks = case_inputs(case, seed=3)
    out = cached_block_attention(q, k, v, **masks, implementation="pallas_gpu", interpret=True)
    ref = jax.jit(reference_attention)(q, k, v, **masks)
    assert rel_err(out, ref) < 1e-2


@pytest.mark.parametrize(
    "platform,impl,dtype",
    [("tpu", "pallas_tpu", jnp.bfloat16), ("tpu", "pallas_tpu", jnp.float32), ("cuda", "pallas_gpu", jnp.bfloat16)],
)
def test_kernels_lower_for_their_platform(platform, impl, dtype):
    """Pallas -> Mosaic lowering (block shapes, layouts, wgmma shapes) at LLaDA-like shapes,
    cross-lowered on CPU. Compiling and running on the hardware is not covered."""
    from dlmjax.kernels import _gpu, _tpu

    fn = _tpu.attention if impl == "pallas_tpu" else _gpu.attention
    for b, h, hkv, tq, s in [(1, 32, 32, 32, 1024), (2, 28, 4, 128, 640)]:
        sds = jax.ShapeDtypeStruct
        args = (
            sds((b, h, tq, 128), dtype),
            sds((b, hkv, s, 128), dtype),
            sds((b, hkv, s, 128), dtype),
            sds((b, s), jnp.bool_),
            sds((tq,), jnp.int32),
            sds((s,), jnp.int32),
        )
        text = fn.trace(*args).lower(lowering_platforms=(platform,)).as_text()
        assert ("tpu_custom_call" if platform == "tpu" else "mosaic_gpu") in text


@pytest.fixture
def kernel_log(caplog):
    kattn._logged_reasons.clear()
    kattn._compile_error.cache_clear()
    kattn._self_check_error.cache_clear()
    caplog.set_level(logging.INFO, logger="dlmjax.kernels")
    yield caplog
    kattn._logged_reasons.clear()
    for fn in (kattn._compile_error, kattn._self_check_error):
        getattr(fn, "cache_clear", lambda: None)()  # may still be monkeypatched here


def _fallbacks(caplog):
    return [r for r in caplog.records if r.name == "dlmjax.kernels" and "falling back to XLA" in r.getMessage()]


def test_auto_on_cpu_selects_xla_and_logs_once(kernel_log, monkeypatch):
    monkeypatch.delenv(kattn.ENV_VAR, raising=False)
    q, k, v, masks = case_inputs(CASES[0])
    ref = reference_attention(q, k, v, **masks)
    for _ in range(3):
        out = cached_block_attention(q, k, v, **masks)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
    records = _fallbacks(kernel_log)
    assert len(records) == 1 and "'cpu'" in records[0].getMessage()


def test_explicit_pallas_on_wrong_platform_raises():
    q, k, v, masks = case_inputs(CASES[0])
    with pytest.raises(ValueError, match="interpret=True"):
        cached_block_attention(q, k, v, **masks, implementation="pallas_tpu")
    with pytest.raises(ValueError, match="GPU only"):
        cached_block_attention(*make_qkv(0, 1, 2, 2, 8, 128, 64, jnp.bfloat16), implementation="pallas_gpu")
    with pytest.raises(ValueError, match="Tq <= 128"):  # not applicable: never a silent fallback
        q, k, v = make_qkv(0, 1, 2, 2, 129, 128, 64, jnp.float32)
        cached_block_attention(q, k, v, implementation="pallas_tpu", interpret=True)


def test_env_var_forces_implementation(kernel_log, monkeypatch):
    q, k, v, masks = case_inputs(CASES[0])  # the shapes and block_k of a kernel test: no new compile
    ref = reference_attention(q, k, v, **masks)
    monkeypatch.setenv(kattn.ENV_VAR, "xla")
    np.testing.assert_array_equal(np.asarray(cached_block_attention(q, k, v, **masks)), np.asarray(ref))
    monkeypatch.setenv(kattn.ENV_VAR, "pallas")  # on CPU: the TPU kernel, interpreted
    out = cached_block_attention(q, k, v, **masks)
    assert rel_err(out, ref) < 1e-5
    assert not _fallbacks(kernel_log)
    monkeypatch.setenv(kattn.ENV_VAR, "triton")
    with pytest.raises(ValueError, match=kattn.ENV_VAR):
        cached_block_attention(q, k, v, **masks)


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_auto_falls_back_when_the_kernel_does_not_compile(kernel_log, monkeypatch, platform):
    """Pretend the inputs live on a TPU/GPU: compiling the kernel for the real (CPU)
    backend raises, so "auto" must log a warning once and return the XLA result."""
    monkeypatch.delenv(kattn.ENV_VAR, raising=False)
    monkeypatch.setattr(kattn, "_platform", lambda x: platform)
    q, k, v = make_qkv(2, 1, 4, 2, 8, 256, 64, jnp.bfloat16)
    ref = reference_attention(q, k, v)
    for _ in range(2):
        np.testing.assert_array_equal(np.asarray(cached_block_attention(q, k, v)), np.asarray(ref))
    records = _fallbacks(kernel_log)
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    assert "failed to compile" in records[0].getMessage()


def test_auto_self_check_guards_the_kernel(kernel_log, monkeypatch):
    """Pretend to be on a TPU where the kernel compiles: "auto" runs the self-check (eagerly,
    even inside jit) and uses the kernel when it agrees with XLA, XLA when it does not."""
    monkeypatch.delenv(kattn.ENV_VAR, raising=False)
    monkeypatch.setattr(kattn, "_platform", lambda x: "tpu")
    monkeypatch.setattr(kattn, "_compile_error", lambda *a: None)
    real_kernel_fn = kattn._kernel_fn
    monkeypatch.setattr(kattn, "_kernel_fn", lambda impl, bk, interp: real_kernel_fn(impl, bk, True))
    q, k, v, masks = case_inputs(CASES[1])
    ref = jax.jit(reference_attention)(q, k, v, **masks)
    out = jax.jit(lambda q, k, v: cached_block_attention(q, k, v, **masks, block_k=128))(q, k, v)
    assert rel_err(out, ref) < 1e-5 and not _fallbacks(kernel_log)

    wrong = lambda q, k, v, **m: jnp.flip(q, axis=2)  # noqa: E731 - a kernel with an indexing bug
    monkeypatch.setattr(kattn, "_kernel_fn", lambda impl, bk, interp: wrong)
    kattn._self_check_error.cache_clear()
    for _ in range(2):
        out = cached_block_attention(q, k, v, **masks, block_k=128)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(reference_attention(q, k, v, **masks)))
    records = _fallbacks(kernel_log)
    assert len(records) == 1 and records[0].levelno == logging.WARNING and "self-check" in records[0].getMessage()


def test_auto_falls_back_for_unsupported_inputs(kernel_log, monkeypatch):
    monkeypatch.delenv(kattn.ENV_VAR, raising=False)
    monkeypatch.setattr(kattn, "_platform", lambda x: "tpu")
    q, k, v = make_qkv(2, 1, 2, 2, 130, 128, 64, jnp.float32)  # Tq > 128
    np.testing.assert_array_equal(
        np.asarray(cached_block_attention(q, k, v)), np.asarray(reference_attention(q, k, v))
    )
    assert "Tq <= 128" in _fallbacks(kernel_log)[0].getMessage()


def test_argument_checks():
    q, k, v = make_qkv(0, 1, 6, 4, 8, 64, 32, jnp.float32)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        reference_attention(q, k, v)
    q, k, v = make_qkv(0, 1, 4, 2, 8, 64, 32, jnp.float32)
    with pytest.raises(ValueError, match="both q_block and k_block"):
        cached_block_attention(q, k, v, q_block=jnp.zeros(8, jnp.int32))
    with pytest.raises(ValueError, match="implementation"):
        cached_block_attention(q, k, v, implementation="triton")


SHARDED_SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from dlmjax.kernels import reference_attention, sharded_cached_block_attention
    jax.config.update("jax_default_matmul_precision", "highest")
    assert jax.device_count() == 4, jax.devices()
    mesh = jax.make_mesh((2, 2), ("data", "tensor"))
    b, h, hkv, tq, s, d = 4, 8, 2, 8, 256, 64
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal(x, np.float32)) for x in [(b, h, tq, d), (b, hkv, s, d), (b, hkv, s, d)])
    pos = np.arange(s)
    key_valid = jnp.asarray(pos[None] < np.array([256, 100, 200, 30])[:, None])
    q_block = jnp.asarray(np.arange(tq) // 4 + 3, jnp.int32); k_block = jnp.asarray(pos // 32, jnp.int32)
    masks = dict(key_valid=key_valid, q_block=q_block, k_block=k_block)
    want = jax.jit(reference_attention)(q, k, v, **masks)
    run = jax.jit(lambda q, k, v: sharded_cached_block_attention(
        q, k, v, **masks, mesh=mesh, implementation="pallas_tpu", interpret=True))
    got = run(q, k, v)
    assert got.sharding.spec == jax.P("data", "tensor", None, None), got.sharding
    err = float(np.max(np.abs(np.asarray(got) - np.asarray(want))) / np.max(np.abs(np.asarray(want))))
    assert err < 1e-5, err
    # MQA: K/V replicated over the tensor axis (XLA inside the shard_map)
    got = sharded_cached_block_attention(q, k[:, :1], v[:, :1], key_valid=key_valid, mesh=mesh, implementation="xla")
    want = reference_attention(q, k[:, :1], v[:, :1], key_valid=key_valid)
    assert float(np.max(np.abs(np.asarray(got) - np.asarray(want)))) < 1e-5
    print("SHARDED-OK")
    """
)


def test_shard_map_matches_unsharded_on_a_2x2_mesh():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    env.pop(kattn.ENV_VAR, None)
    proc = subprocess.run(
        [sys.executable, "-c", SHARDED_SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0 and "SHARDED-OK" in proc.stdout, proc.stdout + proc.stderr


def test_the_checkout_does_not_shadow_a_top_level_kernels_package():
    """Run from the checkout's root (as `python -m ...` and the README's commands are), Python finds
    this repository's kernels/ folder as a top-level `kernels`, which would shadow Hugging Face's
    `kernels` package that transformers >= 5.25 imports. Our folder hands the name over; with no
    such package installed it is an empty module (transformers then sees no usable `kernels`)."""
    import importlib.util
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import kernels, dlmjax.kernels as ours; print(kernels.__file__); "
            "print(hasattr(kernels, 'cached_block_attention'), hasattr(ours, 'cached_block_attention'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[1] == "False True"
    installed = importlib.util.find_spec("kernels")  # from tests/, the checkout's root is not on sys.path
    if installed is not None and not installed.origin.startswith(root):
        assert out[0] == installed.origin  # Hugging Face's package, not our folder
        subprocess.run([sys.executable, "-c", "from transformers import Qwen2ForCausalLM"], cwd=root, check=True,
                       capture_output=True)
