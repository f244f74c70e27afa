"""Training: objectives, data batching, and a resumable optax + orbax training loop.

    from dlmjax.train import TrainConfig, init_model, train, sft_arrays

`init_model` gives a randomly initialised `Transformer`; `sft_arrays` turns prompt and
answer ids into fixed-length training rows; `train` runs the loop, saves an orbax
checkpoint every `save_every` steps (keeping the last `keep`), and resumes from the latest
one. Objectives: LLaDA's masked-diffusion loss ("mdm") and a next-token loss ("ar"). The seeds'
recipes' objectives, each a pure function of (model, batch, noise) with its own `*_sample_noise`
(training-recipes.md section 5), on the callable `objectives.bind(model)` gives:
`dparallel.dparallel_loss` (certainty forcing), `d2f.d2f_loss` (asymmetric distillation) and
`fdv2.fdv2_loss` (block-diffusion fine-tuning). `train` runs them as objectives "dparallel", "d2f"
and "fdv2" (each row's loss on its own, averaged: the official per-device batch of 1) on rows
from `recipe_arrays`.
"""

from dlmjax.train.data import BatchStream, recipe_arrays, sft_arrays
from dlmjax.train.init import init_model
from dlmjax.train.loop import TrainConfig, TrainResult, train
from dlmjax.train.objectives import OBJECTIVES, autoregressive_loss, masked_diffusion_loss

__all__ = [
    "OBJECTIVES",
    "BatchStream",
    "TrainConfig",
    "TrainResult",
    "autoregressive_loss",
    "init_model",
    "masked_diffusion_loss",
    "recipe_arrays",
    "sft_arrays",
    "train",
]
