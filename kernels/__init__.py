"""Pallas kernels, imported as `dlmjax.kernels` (cached block attention arrives with the KV-cache issue)."""
