"""Hugging Face checkpoint -> dlmjax checkpoint.

Tensors are read one at a time into numpy (through the `safetensors` package) and written
one group (a transformer block, or the embedding and head) at a time, so peak host memory
is about one group. Everything is validated before anything is written, and the result
is built in a temporary sibling of the destination and renamed into place at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any, Iterator

import ml_dtypes
import numpy as np

from dlmjax import checkpoint, hub
from dlmjax.config import ModelConfig, from_hf_config
from dlmjax.errors import DlmjaxError

from . import layouts, safetensors_io
from .lora import Adapter, read_adapter

# Small files carried along for export and for the tokenizer.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")
_NUMPY_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def read_hf_config(src: pathlib.Path) -> tuple[ModelConfig, dict[str, Any]]:
    path = src / "config.json"
    if not path.is_file():
        if (src / "adapter_config.json").is_file():
            raise DlmjaxError(f"{src} is a LoRA adapter, not a model; pass the base model as SRC and this directory as --adapter")
        raise DlmjaxError(f"{src} has no config.json; pass a Hugging Face model directory or hub id")
    try:
        hf_config = json.loads(path.read_text())
    except ValueError as e:
        raise DlmjaxError(f"{path} is not valid JSON ({e}); re-download it") from None
    return from_hf_config(hf_config), hf_config


class TensorReader:
    """name -> numpy array for every weight in a model directory (safetensors, or opt-in pickle)."""

    def __init__(self, src: pathlib.Path, allow_pickle: bool = False):
        self._bins: dict[str, pathlib.Path] = {}
        self._bin_cache: tuple[pathlib.Path, dict] | None = None
        if any(src.glob("*.safetensors")):
            self.infos = safetensors_io.index_checkpoint(src)
            self.shapes = {name: info.shape for name, info in self.infos.items()}
            return
        bins = sorted(src.glob("*.bin"))
        if not bins:
            raise DlmjaxError(f"{src} holds no .safetensors weights; pass a directory with model*.safetensors files")
        if not allow_pickle:
            raise DlmjaxError(
                f"{src} holds only pickled .bin weights, which can run code when loaded; convert them to safetensors, "
                "or pass --allow-pickle (allow_pickle=True) if you trust the source"
            )
        self.infos = {}
        self.shapes = {}
        for path in bins:
            for name, tensor in self._load_bin(path).items():
                self._bins[name] = path
                self.shapes[name] = tuple(tensor.shape)

    def _load_bin(self, path: pathlib.Path) -> dict:
        if self._bin_cache is None or self._bin_cache[0] != path:
            try:
                import torch
            except ImportError:
                raise DlmjaxError("reading .bin weights needs torch; pip install torch, or use safetensors weights") from None
            self._bin_cache = (path, torch.load(path, map_location="cpu", weights_only=True, mmap=True))
        return self._bin_cache[1]

    def __call__(self, name: str) -> np.ndarray:
        if name in self.infos:
            return safetensors_io.load_tensor(self.infos[name])
        import torch

        tensor = self._load_bin(self._bins[name])[name]
        if tensor.dtype == torch.bfloat16:
            return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
        return tensor.numpy().copy()


def check_tensors(cfg: ModelConfig, found: dict[str, tuple[int, ...]], src: pathlib.Path) -> list[layouts.TensorSpec]:
    """Raise one error that lists every missing, unexpected and mis-shaped tensor."""
    specs = layouts.tensor_specs(cfg)
    expected = {s.hf_name: s.shape for s in specs}
    missing = [n for n in expected if n not in found]
    unexpected = [n for n in found if n not in expected]
    if cfg.tie_word_embeddings and layouts.head_name(cfg) in unexpected:
        unexpected.remove(layouts.head_name(cfg))  # a tied checkpoint may still store the head
    misshaped = [f"{n} {list(found[n])} (config wants {list(s)})" for n, s in expected.items() if n in found and tuple(found[n]) != s]
    if missing or unexpected or misshaped:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if items:
                shown = ", ".join(items[:6]) + (f", ... ({len(items)} in all)" if len(items) > 6 else "")
                parts.append(f"{label}: {shown}")
        raise DlmjaxError(
            f"the weights in {src} do not match its config.json ({'; '.join(parts)}); "
            "use the config.json that belongs to these weights"
        )
    return specs


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not enabled, leave=False)


@contextlib.contextmanager
def atomic_directory(dst: pathlib.Path, overwrite: bool) -> Iterator[pathlib.Path]:
    """Yield a temporary directory that becomes `dst` only if the block succeeds."""
    dst = dst.absolute()
    if dst.exists() and not overwrite:
        raise DlmjaxError(f"{dst} already exists; choose another destination or pass --overwrite")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private (0700); the result is an ordinary directory
    try:
        yield tmp
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
            dst.rename(old)
            tmp.rename(dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def copy_small_files(src: pathlib.Path, dst: pathlib.Path) -> None:
    """Config, tokenizer, chat template and modeling code: everything but weights and their index."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(_WEIGHT_SUFFIXES) and not f.name.endswith(".index.json"):
            shutil.copy2(f, dst / f.name)


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    adapter: str | os.PathLike | None = None,
    lora: str = "merge",
    dtype: str | None = None,
    allow_pickle: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> pathlib.Path:
    """Convert a Hugging Face model directory or hub id (and an optional PEFT LoRA adapter).

    lora: "merge" folds the adapter into the weights; "keep" stores it as LoRA parameters.
    dtype: store the weights in this dtype (default: as in the checkpoint).
    """
    if lora not in ("merge", "keep"):
        raise DlmjaxError(f"lora={lora!r} is not an option; use 'merge' or 'keep'")
    if dtype is not None and dtype not in _NUMPY_DTYPES:
        raise DlmjaxError(f"dtype {dtype!r} is not supported; use one of {sorted(_NUMPY_DTYPES)}")
    src_dir = hub.resolve(src)
    cfg, hf_config = read_hf_config(src_dir)
    reader = TensorReader(src_dir, allow_pickle=allow_pickle)
    specs = check_tensors(cfg, reader.shapes, src_dir)
    lora_adapter: Adapter | None = read_adapter(hub.resolve(adapter), cfg, str(src)) if adapter is not None else None
    lora_cfg = lora_adapter.config if lora_adapter is not None and lora == "keep" else None

    store_dtype = dtype or cfg.dtype
    cfg = ModelConfig(**{**cfg.__dict__, "dtype": store_dtype})
    target = _NUMPY_DTYPES[store_dtype]
    total = sum(s.numel for s in specs) * np.dtype(target).itemsize
    with atomic_directory(pathlib.Path(dst), overwrite) as tmp, _progress(total, "convert", progress) as bar:
        groups = []
        for group, group_specs in layouts.iter_groups(specs):
            tree: dict[str, Any] = {}
            for spec in group_specs:
                array = reader(spec.hf_name)
                role = spec.path[2] if spec.path[0] == "layers" else None
                if lora_adapter is not None and lora == "merge" and spec.path[-1] == "weight":
                    array = lora_adapter.merge_into(spec.path[1], role, array)
                if spec.index is not None:  # one expert's slice of a stacked weight
                    _stacked(tree, _relative(spec.path), (cfg.num_experts, *spec.shape), target)[spec.index] = array
                else:
                    _set(tree, _relative(spec.path), array.astype(target, copy=False))
                bar.update(array.size * np.dtype(target).itemsize)
            if lora_cfg is not None and group != "embed":
                for role, (a, b) in lora_adapter.layer_factors(int(group.split("_")[1])).items():
                    tree[role]["lora_a"] = a.astype(target)
                    tree[role]["lora_b"] = b.astype(target)
            checkpoint.write_group(tmp, group, tree)
            groups.append(group)
            del tree
        copy_small_files(src_dir, tmp / "hf")
        if lora_adapter is not None:
            copy_small_files(lora_adapter.path, tmp / "adapter")
        checkpoint.write_manifest(tmp, cfg, lora_cfg, groups, source=str(src))
    return pathlib.Path(dst)


def _relative(path: tuple) -> tuple:
    """A parameter path relative to its group (blocks drop their 'layers', i prefix)."""
    return path[2:] if path[0] == "layers" else path


def _parent(tree: dict, path: tuple) -> dict:
    """The dict that holds `path`'s last key (created as needed)."""
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    return tree


def _stacked(tree: dict, path: tuple, shape: tuple, dtype) -> np.ndarray:
    """The stacked array at `path`, created on its first slice."""
    parent = _parent(tree, path)
    if path[-1] not in parent:
        parent[path[-1]] = np.zeros(shape, dtype)
    return parent[path[-1]]


def _set(tree: dict, path: tuple, value: Any) -> None:
    _parent(tree, path)[path[-1]] = value


