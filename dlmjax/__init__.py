"""dlmjax: diffusion language models in JAX/Flax.

The stable surface: `dlmjax.load(...)`, `lm.logits(...)`, `lm.generate(...)` and the CLIs.
"""

import pathlib as _pathlib

from dlmjax import _layout

_layout.install(_pathlib.Path(__file__).resolve().parent)

from dlmjax.config import ModelConfig  # noqa: E402
from dlmjax.errors import DlmjaxError  # noqa: E402
from dlmjax.lm import LM, load  # noqa: E402

__version__ = "0.1.0"
__all__ = ["load", "LM", "ModelConfig", "DlmjaxError", "__version__"]
