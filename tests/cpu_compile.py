"""Test-harness speed: how the suite's processes (pytest's and the subprocesses a test starts) compile."""

import os

def unrolled_threefry_on_cpu() -> None:
    """Compile JAX's threefry hash unrolled on the CPU, as JAX does on every other platform.

    On the CPU JAX emits the hash's five rounds as a rolled loop, which XLA compiles slowly: a
    decode program draws keys and Gumbel noise (fold_in, split, gumbel) several times, and the
    suite is mostly compile time (about a fifth less with this). Both lowerings are JAX's own
    and give the same bits. A private hook: where it is missing, nothing changes."""
    if os.environ.get("DLMJAX_TESTS_ROLLED_THREEFRY"):  # to measure what this saves
        return
    try:
        from jax._src.interpreters import mlir
        from jax._src.random import threefry2x32

        mlir.register_lowering(threefry2x32.threefry2x32_p, threefry2x32._threefry2x32_lowering_rule, platform="cpu")
    except (ImportError, AttributeError):
        pass


