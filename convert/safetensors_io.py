"""Safetensors checkpoints: the `safetensors` package does the format, this module what is ours.

The library parses and validates headers and reads one tensor at a time
(`safe_open(..., framework="numpy")`), and writes files (`safetensors.numpy.save_file`).
Added here: the walk of a sharded checkpoint through `model.safetensors.index.json` with
its consistency checks; one-line `DlmjaxError`s that name the file when a download is
truncated, corrupt or of a dtype numpy cannot hold; and a sharded writer that holds one
shard in memory at a time and can keep each conversion group in shards of its own.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Callable, Mapping, Sequence

# Imported for its side effect too: it registers numpy's "bfloat16", which
# safe_open(framework="numpy") needs to return BF16 tensors.
import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

from dlmjax.errors import DlmjaxError

__all__ = ["INDEX_NAME", "SINGLE_NAME", "TensorInfo", "index_checkpoint", "load_tensor", "read_header", "save_file",
           "save_sharded"]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

# The safetensors dtypes that numpy can hold. FP8/FP6/FP4 are left out: safe_open cannot
# return them as numpy arrays (and they need quantisation scales dlmjax does not apply).
_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(dt)
    for name, dt in {
        "BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "U16": np.uint16, "I16": np.int16, "U32": np.uint32,
        "I32": np.int32, "U64": np.uint64, "I64": np.int64, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
        "F32": np.float32, "F64": np.float64,
    }.items()
}
_DTYPE_NAMES = {dt: name for name, dt in _DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor of a checkpoint, known from its file's header alone."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    path: pathlib.Path


# --------------------------------------------------------------------------- reading


def _unreadable(path, error: Exception) -> DlmjaxError:
    reason = " ".join(str(error).split())  # the library's message, kept to one line
    return DlmjaxError(
        f"{path} is not a readable safetensors file ({reason}): it is truncated, corrupt or not safetensors at all; "
        "re-download it"
    )


def _open(path: pathlib.Path):
    """safe_open with the library's errors turned into one line naming the file."""
    if not path.is_file():
        what = "does not exist" if not path.exists() else "is not a regular file"
        raise DlmjaxError(f"safetensors file {path} {what}; pass a checkpoint directory or a .safetensors file")
    try:
        return safetensors.safe_open(path, framework="numpy")
    except safetensors.SafetensorError as e:
        raise _unreadable(path, e) from None
    except OSError as e:
        raise DlmjaxError(f"cannot read safetensors file {path} ({e}); check the file and its permissions") from None


def read_header(path) -> dict[str, TensorInfo]:
    """Names, dtypes and shapes of one file's tensors, from its header (no tensor data is read)."""
    path = pathlib.Path(path)
    infos = {}
    with _open(path) as f:
        for name in f.keys():
            view = f.get_slice(name)
            dtype = _DTYPES.get(view.get_dtype())
            if dtype is None:
                raise DlmjaxError(
                    f"safetensors file {path}: tensor {name!r} has dtype {view.get_dtype()}, which dlmjax cannot read; "
                    "use a copy of the checkpoint stored in BF16, F16 or F32"
                )
            infos[name] = TensorInfo(name, dtype, tuple(view.get_shape()), path)
    return infos


def load_tensor(info: TensorInfo) -> np.ndarray:
    """One tensor as a new writable array.

    The file is opened for this tensor only: safe_open maps the whole file, and a handle
    kept open would keep every page read so far resident, growing peak memory to the file.
    """
    with _open(info.path) as f:
        try:
            return f.get_tensor(info.name)
        except safetensors.SafetensorError as e:
            raise _unreadable(info.path, e) from None


def _read_index(index_path: pathlib.Path) -> dict[str, str]:
    fix = "re-download the index file"
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise DlmjaxError(f"checkpoint index {index_path} is not valid JSON ({e}); {fix}") from None
    except OSError as e:
        raise DlmjaxError(f"cannot read checkpoint index {index_path} ({e.strerror}); check the file and permissions") from None
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        raise DlmjaxError(f"checkpoint index {index_path} has no \"weight_map\" object; {fix}")
    weight_map = index["weight_map"]
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise DlmjaxError(f"checkpoint index {index_path} maps tensor {name!r} to {shard!r}, not a file name; {fix}")
        p = pathlib.PurePath(shard)
        if p.is_absolute() or ".." in p.parts:
            raise DlmjaxError(
                f"checkpoint index {index_path} maps tensor {name!r} to {shard!r}, which is outside the "
                f"checkpoint directory; {fix}"
            )
    return weight_map


def _read_sharded(src: pathlib.Path, index_path: pathlib.Path) -> dict[str, TensorInfo]:
    weight_map = _read_index(index_path)
    mismatch = "re-download the checkpoint so the index and shards match"
    result: dict[str, TensorInfo] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = src / shard
        if not shard_path.is_file():
            raise DlmjaxError(f"checkpoint index {index_path} names shard {shard_path}, which is missing; download the missing shard")
        for name, info in read_header(shard_path).items():
            if name in result:
                raise DlmjaxError(
                    f"tensor {name!r} appears in both {result[name].path} and {shard_path}; "
                    "remove the duplicate file from the checkpoint"
                )
            if name not in weight_map:
                raise DlmjaxError(f"shard {shard_path} holds tensor {name!r} that the index {index_path} does not list; {mismatch}")
            if weight_map[name] != shard:
                raise DlmjaxError(
                    f"tensor {name!r} appears in shard {shard_path} but the index {index_path} maps it to "
                    f"{weight_map[name]}; {mismatch}"
                )
            result[name] = info
    for name, shard in weight_map.items():
        if name not in result:
            raise DlmjaxError(
                f"checkpoint index {index_path} maps tensor {name!r} to shard {src / shard}, whose header "
                f"does not contain it; {mismatch}"
            )
    return result


def index_checkpoint(src) -> dict[str, TensorInfo]:
    """All tensors of a checkpoint directory (sharded through its index, or one file) or of one file."""
    src = pathlib.Path(src)
    if not src.exists():
        raise DlmjaxError(f"checkpoint path {src} does not exist; pass a checkpoint directory or a .safetensors file")
    if not src.is_dir():
        return read_header(src)
    if (src / INDEX_NAME).is_file():
        return _read_sharded(src, src / INDEX_NAME)
    if (src / SINGLE_NAME).is_file():
        return read_header(src / SINGLE_NAME)
    files = sorted(p for p in src.glob("*.safetensors") if p.is_file())
    if len(files) == 1:
        return read_header(files[0])
    if not files:
        raise DlmjaxError(f"checkpoint directory {src} contains no .safetensors files; download the model weights into it")
    raise DlmjaxError(
        f"checkpoint directory {src} contains {len(files)} .safetensors files "
        f"({', '.join(p.name for p in files[:4])}{', ...' if len(files) > 4 else ''}) but no {INDEX_NAME}; "
        "add the index file or keep only one .safetensors file"
    )


# --------------------------------------------------------------------------- writing


def _dtype_name(dtype, where: str) -> str:
    """The safetensors name of a dtype dlmjax can read back; byte order does not matter."""
    try:
        name = _DTYPE_NAMES.get(np.dtype(dtype).newbyteorder("="))
    except TypeError:
        name = None
    if name is None:
        raise DlmjaxError(f"cannot write {where}: dtype {dtype!r} is not supported; cast it to one of {', '.join(_DTYPES)}")
    return name


def save_file(tensors: Mapping[str, np.ndarray], path, metadata: Mapping[str, str] | None = None) -> None:
    """Writes `tensors` to one safetensors file (the library writes a temporary file and renames it)."""
    arrays = {}
    for name, value in tensors.items():
        array = np.asarray(value)
        _dtype_name(array.dtype, f"tensor {name!r} to {path}")
        # The library writes an array's memory as it lies: a transposed view would be stored
        # scrambled. (Not np.ascontiguousarray, which turns a scalar into shape (1,).)
        arrays[name] = array if array.flags.c_contiguous else array.copy(order="C")
    try:
        safetensors.numpy.save_file(arrays, path, metadata=None if metadata is None else dict(metadata))
    except (safetensors.SafetensorError, OSError) as e:
        raise DlmjaxError(f"cannot write safetensors file {path} ({e}); check free disk space and permissions") from None


def _plan_shards(specs: Sequence[tuple[str, int, str | None]], max_shard_bytes: int) -> list[list[str]]:
    """Consecutive (name, bytes, group) runs of at most max_shard_bytes (a bigger tensor alone)
    that never mix two groups."""
    shards: list[list[str]] = []
    size, group = 0, None
    for name, nbytes, g in specs:
        if not shards or g != group or size + nbytes > max_shard_bytes:
            shards.append([])
            size, group = 0, g
        shards[-1].append(name)
        size += nbytes
    return shards


def save_sharded(
    specs: Sequence[tuple[str, tuple[int, ...], np.dtype]],
    get_tensor: Callable[[str], np.ndarray],
    out_dir,
    max_shard_bytes: int = 5 * 2**30,
    metadata: Mapping[str, str] | None = None,
    groups: Mapping[str, str] | None = None,
) -> list[pathlib.Path]:
    """Writes a checkpoint shard by shard, fetching the tensors of one shard at a time.

    `groups` (name -> group) keeps each group in shards of its own, so that writing a model
    whose tensors come group by group holds one group at a time. Returns the shard paths in
    order, then the index path when there is more than one shard (a single shard is written
    as `model.safetensors`, with no index). `metadata` goes into every shard.
    """
    out_dir = pathlib.Path(out_dir)
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
        raise DlmjaxError(f"cannot write a checkpoint in {out_dir}: max_shard_bytes is {max_shard_bytes!r}; pass a positive integer")
    declared: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    plan = []
    for name, shape, dtype in specs:
        if name in declared:
            raise DlmjaxError(f"cannot write a checkpoint in {out_dir}: tensor {name!r} is listed twice; remove the duplicate")
        _dtype_name(dtype, f"tensor {name!r} to {out_dir}")
        declared[name] = (tuple(int(d) for d in shape), np.dtype(dtype).newbyteorder("="))
        plan.append((name, int(np.prod(declared[name][0])) * declared[name][1].itemsize, (groups or {}).get(name)))
    shards = _plan_shards(plan, max_shard_bytes)
    names = [SINGLE_NAME] if len(shards) == 1 else [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]

    def fetch(name: str, path: pathlib.Path) -> np.ndarray:
        array = get_tensor(name)
        shape, dtype = declared[name]
        if not isinstance(array, np.ndarray) or array.shape != shape or array.dtype.newbyteorder("=") != dtype:
            got = f"shape {array.shape} dtype {array.dtype}" if isinstance(array, np.ndarray) else type(array).__name__
            raise DlmjaxError(
                f"cannot write {path}: get_tensor({name!r}) returned {got}, but the spec declares shape {shape} "
                f"dtype {dtype}; make the spec and the tensor agree"
            )
        return array

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for shard, fname in zip(shards, names):
        path = out_dir / fname
        save_file({name: fetch(name, path) for name in shard}, path, metadata)
        written.append(path)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(nbytes for _, nbytes, _ in plan)},
            "weight_map": dict(sorted((name, fname) for shard, fname in zip(shards, names) for name in shard)),
        }
        index_path = out_dir / INDEX_NAME
        try:
            index_path.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        except OSError as e:
            raise DlmjaxError(f"cannot write checkpoint index {index_path} ({e.strerror}); check free disk space and permissions") from None
        written.append(index_path)
    return written
