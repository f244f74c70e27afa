"""dlmjax: diffusion language models in JAX/Flax.

The stable surface: `dlmjax.load(...)`, `lm.logits(...)`, `lm.generate(...)` and the CLIs.
"""

from dlmjax.config import ModelConfig
from dlmjax.errors import DlmjaxError
from dlmjax.lm import LM, load

__version__ = "0.1.0"
__all__ = ["load", "LM", "ModelConfig", "DlmjaxError", "__version__"]
