"""The converted-checkpoint directory: a manifest plus one orbax checkpoint per group.

    DST/dlmjax.json        format version, ModelConfig, LoRA, groups, source
    DST/hf/                the source's config, tokenizer and other small files (for export)
    DST/params/embed/      orbax: embedding, final norm, LM head
    DST/params/layer_000/  orbax: one transformer block (relative paths, e.g. q_proj/weight)

One group per orbax checkpoint bounds the host memory of both conversion and loading to
the largest group (the embedding), not the whole model.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from dlmjax.config import ModelConfig
from dlmjax.errors import DlmjaxError
from dlmjax.model import LoRAConfig

MANIFEST = "dlmjax.json"
FORMAT_VERSION = 1


def is_converted(path: pathlib.Path) -> bool:
    return (path / MANIFEST).is_file()


def write_manifest(path: pathlib.Path, cfg: ModelConfig, lora: LoRAConfig | None, groups: list[str], source: str) -> None:
    manifest = {
        "format": "dlmjax",
        "version": FORMAT_VERSION,
        "config": dataclasses.asdict(cfg),
        "lora": None if lora is None else dataclasses.asdict(lora),
        "groups": groups,
        "source": source,
    }
    (path / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def read_manifest(path: pathlib.Path) -> tuple[ModelConfig, LoRAConfig | None, dict[str, Any]]:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise DlmjaxError(f"cannot read {path / MANIFEST} ({e}); convert the checkpoint again") from None
    if manifest.get("format") != "dlmjax" or manifest.get("version") != FORMAT_VERSION:
        raise DlmjaxError(
            f"{path} holds a dlmjax checkpoint of format version {manifest.get('version')}, this dlmjax reads "
            f"version {FORMAT_VERSION}; convert the original checkpoint again"
        )
    cfg = ModelConfig(**manifest["config"])
    lora = manifest.get("lora")
    if lora is not None:
        lora = LoRAConfig(rank=lora["rank"], alpha=lora["alpha"], targets=tuple(lora["targets"]), dropout=lora.get("dropout", 0.0))
    return cfg, lora, manifest


def write_group(path: pathlib.Path, group: str, tree: Mapping[str, Any]) -> None:
    ocp.PyTreeCheckpointer().save((path / "params" / group).absolute(), dict(tree))


def read_group(path: pathlib.Path, group: str, target: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Restore one group. With `target` (a tree of jax.ShapeDtypeStruct with shardings)
    the arrays land directly on their devices, cast to the target dtypes; without it they
    come back as numpy arrays in the stored dtype."""
    checkpointer = ocp.PyTreeCheckpointer()
    where = (path / "params" / group).absolute()
    if target is None:
        metadata = checkpointer.metadata(where).item_metadata
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata.tree)
        return checkpointer.restore(where, restore_args=args)
    args = jax.tree.map(lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding, dtype=t.dtype, global_shape=t.shape), target)
    return checkpointer.restore(where, item=dict(target), restore_args=args)


def group_subtree(state: Mapping[str, Any], group: str) -> dict[str, Any]:
    """The part of a model's pure-dict state that one group stores."""
    if group == "embed":
        return {k: state[k] for k in ("embed", "final_norm", "lm_head") if k in state and state[k] is not None}
    return state["layers"][int(group.split("_")[1])]


def set_group_subtree(state: dict[str, Any], group: str, tree: Mapping[str, Any]) -> None:
    if group == "embed":
        state.update(tree)
    else:
        state["layers"][int(group.split("_")[1])] = dict(tree)
