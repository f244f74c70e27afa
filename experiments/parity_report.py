"""Logit parity against the PyTorch reference, as figures (the tests assert the bounds).

    python experiments/parity_report.py

Needs torch (`pip install torch==2.13.0` on CPU). For each family: tiny random HF
checkpoints (fp32 and bf16), converted with the real converter, logits compared against
transformers' Llama / Qwen2 run bidirectionally (tests/torch_reference.py). Also times the
conversion and the load of the tiny checkpoints.
"""

from __future__ import annotations

import os
import pathlib
import sys
import tempfile
import time

import jax
import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
jax.config.update("jax_default_matmul_precision", "highest")

import dlmjax  # noqa: E402
from dlmjax.convert import convert  # noqa: E402
from dlmjax.testing import write_tiny_checkpoint  # noqa: E402
from torch_reference import load_reference, reference_logits  # noqa: E402

FAMILIES = {
    "llada (MHA)": ("llada", dict()),
    "dream (GQA 2)": ("dream", dict(num_heads=4, num_kv_heads=2)),
    "dream (GQA 7)": ("dream", dict(hidden_size=56, num_heads=7, num_kv_heads=1)),
    "fast_dllm_v2 (tied)": ("fast_dllm_v2", dict(num_heads=4, num_kv_heads=2, tie_word_embeddings=True)),
}


def main() -> None:
    work = pathlib.Path(tempfile.mkdtemp(prefix="dlmjax-parity-"))
    ids = np.random.default_rng(0).integers(0, 96, (2, 48))
    mask = np.ones_like(ids)
    mask[0, :9] = 0
    print(f"machine: {os.cpu_count()} CPUs, jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__}")
    print()
    print("| model | fp32 max abs diff | fp32 padded max abs diff | bf16 rel L2 (dlmjax) | bf16 rel L2 (PyTorch) | convert s | load s |")
    print("|---|---|---|---|---|---|---|")
    for name, (family, kwargs) in FAMILIES.items():
        row = []
        for dtype in ("float32", "bfloat16"):
            hf = write_tiny_checkpoint(work / f"{name}-{dtype}-hf", family, seed=1, shards=2, dtype=dtype, **kwargs)
            start = time.perf_counter()
            out = convert(hf, work / f"{name}-{dtype}-jax", progress=False)
            convert_s = time.perf_counter() - start
            start = time.perf_counter()
            lm = dlmjax.load(out)
            load_s = time.perf_counter() - start
            ref32 = reference_logits(*load_reference(hf, torch.float32), ids)
            if dtype == "float32":
                padded = reference_logits(*load_reference(hf, torch.float32), ids, mask)
                real = mask.astype(bool)
                row += [np.abs(lm.logits(ids) - ref32).max(), np.abs(lm.logits(ids, mask)[real] - padded[real]).max()]
                times = (convert_s, load_s)
            else:
                ref16 = reference_logits(*load_reference(hf, torch.bfloat16), ids)
                rel = lambda x: np.linalg.norm(x - ref32) / np.linalg.norm(ref32)  # noqa: E731
                row += [rel(lm.logits(ids)), rel(ref16)]
        print(f"| {name} | {row[0]:.1e} | {row[1]:.1e} | {row[2]:.4f} | {row[3]:.4f} | {times[0]:.2f} | {times[1]:.2f} |")


if __name__ == "__main__":
    main()
