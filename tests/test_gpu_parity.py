"""The parity checks on a CUDA GPU (skipped without one): dlmjax on the GPU against transformers
on the same GPU, with the checks and bounds of experiments/device_check.py's parity section
(`parity_rows`: bf16 logits within 1.25x torch bf16's relative L2 error and 0.04; float32 logits
with left padding within 1e-4 at precision "highest"; a padded row equal to the unpadded one).

Run on a GPU machine with:  JAX_PLATFORMS=cuda,cpu python -m pytest -m gpu tests/test_gpu_parity.py
(or all of it, with the figures in a report: python experiments/device_check.py --out DIR).
"""

import pathlib
import sys

import jax
import pytest
import torch

import dlmjax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "experiments"))

from device_check import parity_rows  # noqa: E402


def _has_gpu() -> bool:
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _has_gpu(), reason="needs a CUDA GPU (JAX_PLATFORMS=cuda,cpu)")]


@pytest.mark.parametrize("name", ["llada-bf16", "dream-bf16", "llada", "dream"])
def test_parity_on_gpu(name, hf_checkpoint, converted):
    lm = dlmjax.load(converted(name))
    assert lm.state.embed[...].devices().pop().platform == "gpu"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = parity_rows(name, hf_checkpoint(name), lm, device)
    for r in rows:
        print(f"{name}: {r['compare']} on {device}: max |diff| {r['max_abs']:.2e}, rel L2 {r.get('rel_l2', float('nan')):.2e}")
    checked = [r for r in rows if "ok" in r]
    assert checked and all(r["ok"] for r in checked), rows
