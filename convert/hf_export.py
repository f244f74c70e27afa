"""dlmjax checkpoint or in-memory LM -> Hugging Face directory that PyTorch loads.

The original tensor names and config.json come back; LoRA parameters are merged into the
weights. Each conversion group (a block, or the embedding and head) is written to its own
shard, so about one group is resident at a time.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

from dlmjax import checkpoint
from dlmjax.config import ModelConfig, to_hf_config
from dlmjax.errors import DlmjaxError
from dlmjax.model import LoRAConfig
from dlmjax.tokenizer import pin_tokenizer_json

from . import layouts, safetensors_io
from .hf_import import _NUMPY_DTYPES, atomic_directory

GroupSource = Callable[[str], dict[str, Any]]


def _export(
    cfg: ModelConfig,
    lora: LoRAConfig | None,
    get_group: GroupSource,
    hf_dir: pathlib.Path | None,
    dst: str | os.PathLike,
    *,
    dtype: str | None,
    max_shard_bytes: int,
    overwrite: bool,
) -> pathlib.Path:
    dtype = dtype or cfg.dtype
    if dtype not in _NUMPY_DTYPES:
        raise DlmjaxError(f"dtype {dtype!r} is not supported for export; use one of {sorted(_NUMPY_DTYPES)}")
    target = np.dtype(_NUMPY_DTYPES[dtype])
    # Group by group (the embedding, final norm and head together), so that each group is
    # fetched once and fills shards of its own.
    specs = [spec for _, group in layouts.iter_groups(layouts.tensor_specs(cfg)) for spec in group]
    by_name = {s.hf_name: s for s in specs}
    current: dict[str, Any] = {}

    def get_tensor(name: str) -> np.ndarray:
        spec = by_name[name]
        if current.get("group") != spec.group:
            current.clear()
            current.update(group=spec.group, tree=get_group(spec.group))
        node = current["tree"]
        relative = spec.path[2:] if spec.path[0] == "layers" else spec.path
        for key in relative[:-1]:
            node = node[key]
        array = np.asarray(node[relative[-1]])
        if spec.index is not None:  # one expert of a stacked weight
            array = array[spec.index]
        role = spec.path[2] if spec.path[0] == "layers" else None
        if lora is not None and role in lora.targets and relative[-1] == "weight":
            a = np.asarray(node["lora_a"], np.float32)
            b = np.asarray(node["lora_b"], np.float32)
            array = array.astype(np.float32) + lora.scale * (b @ a)
        return array.astype(target, copy=False)

    with atomic_directory(pathlib.Path(dst), overwrite) as tmp:
        if hf_dir is not None and hf_dir.is_dir():
            for f in hf_dir.iterdir():
                if f.is_file() and f.name != "config.json":
                    shutil.copy2(f, tmp / f.name)
        # A tokenizer that declares the generic class must load as declared in plain transformers
        # too (which swaps in e.g. Qwen2Tokenizer for qwen2 otherwise): a no-op for other tokenizers.
        pin_tokenizer_json(tmp)
        original = json.loads((hf_dir / "config.json").read_text()) if hf_dir and (hf_dir / "config.json").is_file() else {}
        exported = ModelConfig(**{**cfg.__dict__, "dtype": dtype})
        (tmp / "config.json").write_text(json.dumps(to_hf_config(exported, original), indent=2) + "\n")
        # One conversion group per shard (split further above max_shard_bytes): writing a
        # shard then holds one group, however large the model.
        safetensors_io.save_sharded(
            [(s.hf_name, s.shape, target) for s in specs], get_tensor, tmp, max_shard_bytes=max_shard_bytes,
            metadata={"format": "pt"}, groups={s.hf_name: s.group for s in specs},
        )
    return pathlib.Path(dst)


def export_lm(lm, dst, *, dtype: str | None = None, max_shard_bytes: int = 5 * 2**30, overwrite: bool = False,
              hf_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Export an in-memory LM (e.g. after training). The small files (config.json to update,
    tokenizer) come from `hf_dir`, by default the ones the LM was loaded with."""
    state = nnx.to_pure_dict(lm.state)
    if hf_dir is not None:
        hf_dir = pathlib.Path(hf_dir)
    elif lm.directory is not None:
        hf_dir = lm.directory / "hf"
    return _export(
        lm.config, lm.lora, lambda g: jax.device_get(checkpoint.group_subtree(state, g)), hf_dir, dst,
        dtype=dtype, max_shard_bytes=max_shard_bytes, overwrite=overwrite,
    )


def export(src, dst, *, dtype: str | None = None, max_shard_bytes: int = 5 * 2**30, overwrite: bool = False) -> pathlib.Path:
    """Export a converted dlmjax directory, reading one group at a time."""
    src = pathlib.Path(src)
    if not checkpoint.is_converted(src):
        raise DlmjaxError(f"{src} is not a converted dlmjax checkpoint (no {checkpoint.MANIFEST}); pass the output of dlmjax.convert")
    cfg, lora, _ = checkpoint.read_manifest(src)
    return _export(
        cfg, lora, lambda g: checkpoint.read_group(src, g), src / "hf", dst,
        dtype=dtype, max_shard_bytes=max_shard_bytes, overwrite=overwrite,
    )
