"""Checkpoint import and export, imported as `dlmjax.convert`.

    python -m dlmjax.convert SRC DST              Hugging Face dir or hub id -> dlmjax checkpoint
    python -m dlmjax.convert --export SRC DST     dlmjax checkpoint -> Hugging Face safetensors
"""

from .hf_import import convert

__all__ = ["convert"]
