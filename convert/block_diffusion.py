"""An autoregressive Qwen2 checkpoint made a Fast-dLLM v2 (block-diffusion) starting point.

Fast-dLLM v2 fine-tunes Qwen2.5-Instruct into a block-diffusion model without changing a weight's
shape: the architecture is the same (model_type `Fast_dLLM_Qwen`, `bd_size` in config.json), and
the tokenizer gains the mask token `|<MASK>|` (id 151665 in Qwen2.5, the first id after its
added tokens, inside the embedding's 152064 rows). This writes that checkpoint:

    python -m dlmjax.convert Qwen/Qwen2.5-7B-Instruct runs/qwen2.5-7b-bd --to-block-diffusion 32
    python -m dlmjax.train experiments/recipes/fast-dllm-v2-qwen2.5-7b.yaml model.name=runs/qwen2.5-7b-bd

The weights are linked (or copied) unchanged; config.json gets the new model type and
architecture, `bd_size` and `mask_token_id`; a tokenizer that already has a mask token keeps it
(the tiny task tokenizer's `<|mask|>`), else `|<MASK>|` is added as a special token at the next
free id, which must lie inside the embedding. The mask row of the embedding is whatever the base
holds (Qwen2.5's unused rows): the fine-tuning trains it. The directory is written whole or not
at all.

`to_dream` writes the same base as a Dream checkpoint (Dream 7B's recipe: Qwen2.5's weights,
bidirectional attention, logits read shifted by one, masked-diffusion training; its mask token
`<|mask|>`, id 151666 in Dream's tokenizer): model_type `Dream`, no blocks.

    python -m dlmjax.convert Qwen/Qwen2.5-7B runs/qwen2.5-7b-dream --to-dream
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil

from dlmjax.errors import DlmjaxError

from .hf_import import atomic_directory

MASK_TOKEN = "|<MASK>|"  # Fast-dLLM v2's mask token
DREAM_MASK_TOKEN = "<|mask|>"  # Dream's
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt")


def to_block_diffusion(src: str | os.PathLike, dst: str | os.PathLike, *, bd_size: int = 32, mask_token: str = MASK_TOKEN,
                       overwrite: bool = False) -> pathlib.Path:
    """Write `src` (a Qwen2 Hugging Face directory, hub id or embedded name) to `dst` as a
    Fast-dLLM v2 checkpoint with blocks of `bd_size`; returns `dst`."""
    if not isinstance(bd_size, int) or bd_size < 1:
        raise DlmjaxError(f"bd_size must be a positive integer (Fast-dLLM v2: 32), got {bd_size!r}")
    return _from_autoregressive(src, dst, "fast_dllm_v2", {"bd_size": bd_size}, mask_token, overwrite, "block-diffusion")


def to_dream(src: str | os.PathLike, dst: str | os.PathLike, *, mask_token: str = DREAM_MASK_TOKEN,
             overwrite: bool = False) -> pathlib.Path:
    """Write `src` (a Qwen2 Hugging Face directory, hub id or embedded name) to `dst` as a Dream
    (masked-diffusion) checkpoint, the start of Dream's adaptation; returns `dst`."""
    return _from_autoregressive(src, dst, "dream", {}, mask_token, overwrite, "Dream")


def _from_autoregressive(src, dst, target: str, extra: dict, mask_token: str, overwrite: bool, what: str) -> pathlib.Path:
    from dlmjax import families
    from dlmjax.hub import resolve
    from dlmjax.tokenizer import load_tokenizer

    dst = pathlib.Path(dst)
    if dst.exists() and not overwrite:
        raise DlmjaxError(f"{dst} exists; pass overwrite=True (--overwrite) or choose another directory")
    src = resolve(src)
    config_path = src / "config.json"
    if not config_path.is_file():
        raise DlmjaxError(f"{src} has no config.json; pass a Hugging Face checkpoint directory")
    config = json.loads(config_path.read_text())
    family = families.for_model_type(config.get("model_type"))
    if family.name != "qwen2":
        raise DlmjaxError(f"{src} is a {family.display_name} model; the {what} conversion takes an autoregressive "
                          "Qwen2 checkpoint (e.g. Qwen/Qwen2.5-7B-Instruct)")
    weights = sorted(p for p in src.iterdir() if p.suffix == ".safetensors" or p.name.endswith(".safetensors.index.json"))
    if not any(p.suffix == ".safetensors" for p in weights):
        raise DlmjaxError(f"{src} holds no .safetensors weights; convert a safetensors checkpoint")
    tokenizer = load_tokenizer(src)
    vocab = int(config.get("vocab_size", 0))
    added = tokenizer.mask_token is None
    if added:
        tokenizer.add_special_tokens({"mask_token": mask_token})
    mask_id = int(tokenizer.mask_token_id)
    if not 0 <= mask_id < vocab:
        raise DlmjaxError(f"the mask token's id {mask_id} is outside the embedding's {vocab} rows; "
                          "a base whose tokenizer fills its embedding needs a resized embedding first")

    out = dict(config)
    out["model_type"] = families.get(target).model_types[0]
    out["architectures"] = list(families.get(target).architectures)
    out.update(extra)
    out["mask_token_id"] = mask_id
    out["converted_from"] = {"model_type": config.get("model_type"), "source": str(src), "mask_token_added": added}

    with atomic_directory(dst, overwrite) as tmp:
        for p in src.iterdir():
            if p.is_file() and p.name != "config.json" and not (added and p.name in TOKENIZER_FILES):
                try:
                    os.link(p, tmp / p.name)  # weights unchanged: a hard link where the file system allows it
                except OSError:
                    shutil.copy2(p, tmp / p.name)
        if added:
            tokenizer.save_pretrained(tmp)
        (tmp / "config.json").write_text(json.dumps(out, indent=2) + "\n")
    return dst
