"""Pallas kernels, imported as `dlmjax.kernels`: cached block attention (TPU and Mosaic GPU
kernels, an XLA reference, and a shard_map wrapper). See `attention.py` for the contract."""

from .attention import IMPLEMENTATIONS, cached_block_attention, reference_attention
from .sharding import sharded_cached_block_attention

__all__ = ["cached_block_attention", "reference_attention", "sharded_cached_block_attention", "IMPLEMENTATIONS"]
