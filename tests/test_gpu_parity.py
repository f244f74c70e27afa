"""The parity checks on a CUDA GPU (skipped without one).

Run on a GPU machine with:  JAX_PLATFORMS=cuda,cpu python -m pytest -m gpu tests/test_gpu_parity.py
The PyTorch reference runs on the CPU in float32; the bounds are those of test_model_parity.
"""

import jax
import numpy as np
import pytest
import torch

import dlmjax
from torch_reference import load_reference, reference_logits


def _has_gpu() -> bool:
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _has_gpu(), reason="needs a CUDA GPU (JAX_PLATFORMS=cuda,cpu)")]


def _ids(seed, length=48):
    return np.random.default_rng(seed).integers(0, 96, (2, length))


@pytest.mark.parametrize("name", ["llada-bf16", "dream-bf16"])
def test_bf16_on_gpu(name, hf_checkpoint, converted):
    lm = dlmjax.load(converted(name))
    assert lm.state.embed[...].devices().pop().platform == "gpu"
    ids = _ids(0)
    ref_model, family = load_reference(hf_checkpoint(name), torch.float32)
    ref32 = reference_logits(ref_model, family, ids)
    ref16 = reference_logits(load_reference(hf_checkpoint(name), torch.bfloat16)[0], family, ids)

    def rel(x):
        return np.linalg.norm(x - ref32) / np.linalg.norm(ref32)

    ours = rel(lm.logits(ids))
    print(f"{name}: relative L2 error on GPU {ours:.4f}, PyTorch bf16 (CPU) {rel(ref16):.4f}")
    assert ours <= 1.25 * rel(ref16) and ours <= 0.04


@pytest.mark.parametrize("name", ["llada", "dream"])
def test_fp32_and_padding_on_gpu(name, hf_checkpoint, converted):
    lm = dlmjax.load(converted(name))
    ids = _ids(1, 24)
    mask = np.ones_like(ids)
    mask[0, :5] = 0
    ref_model, family = load_reference(hf_checkpoint(name), torch.float32)
    ref = reference_logits(ref_model, family, ids, mask)
    out = lm.logits(ids, mask)
    err = np.abs(out - ref)[mask.astype(bool)].max()
    print(f"{name}: fp32 max abs error on GPU {err:.2e}")
    assert err <= 1e-4
    np.testing.assert_allclose(out[0, 5:], lm.logits(ids[:1, 5:])[0], atol=2e-5, rtol=0)
