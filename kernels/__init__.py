"""Pallas kernels, imported as `dlmjax.kernels`: cached block attention (TPU and Mosaic GPU
kernels, an XLA reference, and a shard_map wrapper). See `attention.py` for the contract."""

if __name__ == "kernels":
    # This folder was found as a top-level `kernels`: Python put the checkout's root on sys.path
    # (`python -m ...` run from it), and the folder shadows Hugging Face's `kernels` package, which
    # transformers >= 5.25 imports (`from kernels import CUDAProperties`). Hand the name to that
    # package when it is installed; ours is only ever `dlmjax.kernels`.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    )
    if _spec is not None and _spec.loader is not None:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _module  # the import statement returns sys.modules' entry
        _spec.loader.exec_module(_module)
    del _root, _spec
else:
    from .attention import IMPLEMENTATIONS, cached_block_attention, reference_attention
    from .sharding import sharded_cached_block_attention

    __all__ = ["cached_block_attention", "reference_attention", "sharded_cached_block_attention", "IMPLEMENTATIONS"]
