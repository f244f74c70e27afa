"""Shared fixtures: tiny checkpoints in the real HF layouts, converted with the real converter.

JAX runs on the CPU with full-precision matmuls; converted checkpoints go to a
per-session cache directory, never to the user's.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
# One on-disk compilation cache for the whole run: the process that starts pytest makes it, and the
# xdist workers and the tests' subprocesses inherit it, so a program one process compiled (a decode
# two test files share, a CLI call's) is read back by the others instead of compiled again. It is
# removed when that process exits.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache_dir = tempfile.mkdtemp(prefix="dlmjax-tests-xla-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


from cpu_compile import unrolled_threefry_on_cpu  # noqa: E402

unrolled_threefry_on_cpu()


# The slowest files first, so that the two xdist workers (one file at a time each) finish together.
SLOW_FIRST = ("test_sharding.py", "test_decode_cache.py", "test_train.py", "test_tiny_models.py", "test_decode_parity.py",
              "test_report_v2.py", "test_harness.py", "test_report.py", "test_serve.py", "test_device_check.py",
              "test_stream_viz.py", "test_notebooks.py",
              "test_decode_confident.py", "test_decode_reference_cache.py")


def pytest_collection_modifyitems(config, items):
    if not hasattr(config, "workerinput"):  # only xdist workers: a plain run keeps the given order
        return
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its order


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DLMJAX_CACHE", str(tmp_path_factory.getbasetemp() / "dlmjax-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# name -> (family, tiny_hf_config kwargs). GQA ratios 1, 2 and 7 are covered.
CHECKPOINTS = {
    "llada": ("llada", dict()),
    "llada-bf16": ("llada", dict(dtype="bfloat16")),
    "llada-tied": ("llada", dict(tie_word_embeddings=True)),
    "dream": ("dream", dict(num_heads=4, num_kv_heads=2)),
    "dream-gqa7": ("dream", dict(hidden_size=56, num_heads=7, num_kv_heads=1)),
    "dream-bf16": ("dream", dict(num_heads=4, num_kv_heads=2, dtype="bfloat16")),
    "fast_dllm_v2": ("fast_dllm_v2", dict(num_heads=4, num_kv_heads=2, tie_word_embeddings=True)),
    "qwen2": ("qwen2", dict(num_heads=4, num_kv_heads=2)),  # the autoregressive baseline
    "qwen2-tied": ("qwen2", dict(tie_word_embeddings=True)),
}


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """hf_checkpoint(name) -> directory of a tiny random HF checkpoint (built once per session)."""
    from dlmjax.testing import write_tiny_checkpoint

    built = {}

    def get(name):
        if name not in built:
            family, kwargs = CHECKPOINTS[name]
            built[name] = write_tiny_checkpoint(
                tmp_path_factory.mktemp(f"hf-{name}"), family, seed=list(CHECKPOINTS).index(name) + 1, shards=2, **kwargs
            )
        return built[name]

    return get


@pytest.fixture(scope="session")
def converted(hf_checkpoint, tmp_path_factory):
    """converted(name) -> directory of the checkpoint after `dlmjax.convert`."""
    from dlmjax.convert import convert

    done = {}

    def get(name):
        if name not in done:
            done[name] = convert(hf_checkpoint(name), tmp_path_factory.mktemp(f"jax-{name}") / "ckpt", progress=False)
        return done[name]

    return get


@pytest.fixture(scope="session")
def loaded(converted):
    """loaded(name) -> one `dlmjax.LM` per converted checkpoint for the whole session. Compiled
    decode programs are kept on the LM, so every test that decodes with the same structure and
    shapes reuses one program. Tests must not change the LM; those that do load their own."""
    import dlmjax

    lms = {}

    def get(name):
        if name not in lms:
            lms[name] = dlmjax.load(converted(name))
        return lms[name]

    return get
