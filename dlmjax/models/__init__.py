"""Small models trained by this project and shipped inside the package.

    tiny-llada   LLaDA architecture, trained with the masked-diffusion loss
    tiny-ar      Qwen2 architecture, trained with the next-token loss (the AR baseline)
    tiny-ar-v2   tiny-ar's architecture trained on task suite v2 (64-token answers)

They were trained from scratch on the task suite in experiments/tasks.py (arithmetic word
problems with a chain of thought, sorting and reversing digits; v2: two-person problems and
running sums with longer dependent chains) by experiments/train_tiny.py; each directory holds bf16 safetensors in the Hugging Face
layout, config.json, the tokenizer and train_log.json (command, steps, time, accuracy).
`dlmjax.load("tiny-llada")` finds them by name, offline.
"""

from __future__ import annotations

import pathlib

EMBEDDED = ("tiny-llada", "tiny-ar", "tiny-ar-v2")
DEFAULT = "tiny-llada"


def path(name: str) -> pathlib.Path | None:
    """The directory of an embedded model, or None if `name` is not one (or is missing from this install)."""
    if name not in EMBEDDED:
        return None
    directory = pathlib.Path(__file__).resolve().parent / name
    return directory if (directory / "config.json").is_file() else None
