"""Pure-numpy reading and writing of the safetensors format.

A ``.safetensors`` file is an 8-byte little-endian header length ``N``, ``N`` bytes of
UTF-8 JSON (padded with spaces), then the tensor bytes. Each header entry gives a
dtype string, a shape and ``data_offsets`` relative to the start of the byte buffer
(file offset ``8 + N``). Data is little-endian and C-ordered.

Nothing here imports torch or the ``safetensors`` package. Reading validates the
header completely before any data is touched, so a truncated or corrupt download is
reported up front with one-sentence :class:`DlmjaxError` messages. Writing streams one
tensor at a time, so peak memory is one tensor rather than one shard.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import struct
import sys
from collections.abc import Callable, Mapping, Sequence

import ml_dtypes
import numpy as np

from dlmjax.errors import DlmjaxError

__all__ = [
    "INDEX_NAME",
    "SINGLE_NAME",
    "TensorInfo",
    "index_checkpoint",
    "load_tensor",
    "read_header",
    "read_metadata",
    "save_file",
    "save_sharded",
]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

# The reference implementation refuses headers above 100 MB; we do the same so a
# garbage length cannot make us allocate gigabytes before noticing.
_MAX_HEADER_BYTES = 100 * 1000 * 1000
_METADATA_KEY = "__metadata__"
_REDOWNLOAD = "re-download the file"

# safetensors dtype string -> numpy dtype. Sub-byte types (F4, F6_*) are not listed:
# numpy cannot address them, so they are reported as unsupported.
_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16),
    "I16": np.dtype(np.int16),
    "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32),
    "U64": np.dtype(np.uint64),
    "I64": np.dtype(np.int64),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "C64": np.dtype(np.complex64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E4M3FNUZ": np.dtype(ml_dtypes.float8_e4m3fnuz),
    "F8_E5M2FNUZ": np.dtype(ml_dtypes.float8_e5m2fnuz),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
}
# Keys are native-order numpy dtypes; big-endian inputs are normalised before lookup.
_DTYPE_NAMES: dict[np.dtype, str] = {dt: name for name, dt in _DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: enough to read it without re-parsing the header."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    path: pathlib.Path
    offset: int  # absolute byte offset in the file
    nbytes: int


# --------------------------------------------------------------------------- helpers


def _corrupt(path, problem: str, fix: str = _REDOWNLOAD) -> DlmjaxError:
    return DlmjaxError(f"corrupt or truncated safetensors file {path}: {problem}; {fix}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _native(dtype: np.dtype) -> np.dtype:
    """The native-byte-order version of a numpy dtype (ml_dtypes have no order)."""
    if dtype.byteorder in ("<", ">") and dtype.byteorder != ("<" if sys.byteorder == "little" else ">"):
        return dtype.newbyteorder("=")
    return dtype


def _dtype_name(dtype, *, where: str) -> str:
    try:
        dt = _native(np.dtype(dtype))
    except TypeError as e:
        raise DlmjaxError(
            f"cannot write {where}: {dtype!r} is not a numpy dtype; "
            f"pass one of {', '.join(str(d) for d in _DTYPE_NAMES)}"
        ) from e
    name = _DTYPE_NAMES.get(dt)
    if name is None:
        raise DlmjaxError(
            f"cannot write {where}: dtype {dt} is not supported by safetensors; "
            f"cast it to one of {', '.join(str(d) for d in _DTYPE_NAMES)} first"
        )
    return name


def _file_size(path: pathlib.Path) -> int:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise DlmjaxError(f"safetensors file {path} does not exist; check the path") from None
    except OSError as e:
        raise DlmjaxError(f"cannot access safetensors file {path} ({e.strerror}); check the path and permissions") from None
    if not path.is_file():
        raise DlmjaxError(f"{path} is not a regular file; pass a .safetensors file or a checkpoint directory")
    return st.st_size


def _read_raw_header(path: pathlib.Path) -> tuple[dict, int, int]:
    """Returns (parsed header object, data start offset, file size)."""
    size = _file_size(path)
    if size < 8:
        raise _corrupt(path, f"the file has only {size} bytes, fewer than the 8-byte header length")
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise _corrupt(path, f"the header claims {n} bytes but the file has only {size} bytes")
            if n > _MAX_HEADER_BYTES:
                raise _corrupt(path, f"the header claims {n} bytes, more than the {_MAX_HEADER_BYTES}-byte limit")
            raw = f.read(n)
    except OSError as e:
        raise DlmjaxError(f"cannot read safetensors file {path} ({e.strerror}); check the file and permissions") from None
    if len(raw) != n:
        raise _corrupt(path, f"the header should have {n} bytes but only {len(raw)} could be read")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _corrupt(path, f"the header is not valid UTF-8 (byte {e.start + 8})") from None
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as e:
        raise _corrupt(path, f"the header JSON contains the key {e.args[0]!r} twice") from None
    except (json.JSONDecodeError, RecursionError, ValueError) as e:
        raise _corrupt(path, f"the header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise _corrupt(path, f"the header JSON is a {type(header).__name__}, not an object")
    return header, 8 + n, size


def _parse_metadata(path, header: dict) -> dict[str, str]:
    meta = header.get(_METADATA_KEY)
    if meta is None:
        return {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _corrupt(path, "the __metadata__ entry is not an object of string to string")
    return dict(meta)


# --------------------------------------------------------------------------- reading


def read_header(path) -> dict[str, TensorInfo]:
    """Parses and validates one file's header; returns name -> TensorInfo by offset."""
    path = pathlib.Path(path)
    header, data_start, size = _read_raw_header(path)
    _parse_metadata(path, header)
    buffer_len = size - data_start

    entries: list[tuple[int, int, int, TensorInfo]] = []
    for position, (name, entry) in enumerate(header.items()):
        if name == _METADATA_KEY:
            continue
        if not isinstance(entry, dict):
            raise _corrupt(path, f"the header entry for tensor {name!r} is not an object")
        missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
        if missing:
            raise _corrupt(path, f"the header entry for tensor {name!r} lacks {', '.join(missing)}")
        dtype_name = entry["dtype"]
        if not isinstance(dtype_name, str):
            raise _corrupt(path, f"tensor {name!r} has a non-string dtype {dtype_name!r}")
        dtype = _DTYPES.get(dtype_name)
        if dtype is None:
            raise DlmjaxError(
                f"safetensors file {path}: tensor {name!r} has dtype {dtype_name!r}, which dlmjax does not "
                f"support; convert the checkpoint to one of {', '.join(_DTYPES)}"
            )
        shape = entry["shape"]
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise _corrupt(path, f"tensor {name!r} has shape {shape!r}, which is not a list of non-negative integers")
        offsets = entry["data_offsets"]
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)):
            raise _corrupt(path, f"tensor {name!r} has data_offsets {offsets!r}, not two non-negative integers")
        begin, end = offsets
        expected = math.prod(shape) * dtype.itemsize
        if end < begin or end - begin != expected:
            raise _corrupt(
                path,
                f"tensor {name!r} has data_offsets [{begin}, {end}] but shape {shape} of {dtype_name} "
                f"needs {expected} bytes",
            )
        if end > buffer_len:
            raise _corrupt(
                path,
                f"tensor {name!r} ends at byte {data_start + end} but the file has {size} bytes",
            )
        info = TensorInfo(
            name=name,
            dtype=dtype,
            shape=tuple(shape),
            path=path,
            offset=data_start + begin,
            nbytes=expected,
        )
        entries.append((begin, end, position, info))

    entries.sort(key=lambda e: (e[0], e[1], e[2]))
    prev_end, prev_name = 0, None
    for begin, end, _, info in entries:
        if begin == end:  # empty tensors occupy no bytes and cannot overlap
            continue
        if prev_name is not None and begin < prev_end:
            raise _corrupt(
                path,
                f"tensors {prev_name!r} and {info.name!r} overlap (the second starts at buffer byte {begin} "
                f"before the first ends at {prev_end})",
            )
        prev_end, prev_name = end, info.name
    return {info.name: info for _, _, _, info in entries}


def read_metadata(path) -> dict[str, str]:
    """The file's ``__metadata__`` dict, or ``{}`` when it has none."""
    path = pathlib.Path(path)
    header, _, _ = _read_raw_header(path)
    return _parse_metadata(path, header)


def _read_index(index_path: pathlib.Path) -> dict[str, str]:
    fix = "re-download the index file"
    try:
        text = index_path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DlmjaxError(f"checkpoint index {index_path} is not valid UTF-8; {fix}") from None
    except OSError as e:
        raise DlmjaxError(f"cannot read checkpoint index {index_path} ({e.strerror}); check the file and permissions") from None
    try:
        index = json.loads(text)
    except (json.JSONDecodeError, RecursionError, ValueError) as e:
        raise DlmjaxError(f"checkpoint index {index_path} is not valid JSON ({e}); {fix}") from None
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        raise DlmjaxError(f"checkpoint index {index_path} has no \"weight_map\" object; {fix}")
    weight_map = index["weight_map"]
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise DlmjaxError(
                f"checkpoint index {index_path} maps tensor {name!r} to {shard!r}, not a file name; {fix}"
            )
        p = pathlib.PurePath(shard)
        if p.is_absolute() or ".." in p.parts:
            raise DlmjaxError(
                f"checkpoint index {index_path} maps tensor {name!r} to {shard!r}, which is outside the "
                f"checkpoint directory; {fix}"
            )
    return weight_map


def _merge(result: dict[str, TensorInfo], infos: dict[str, TensorInfo]) -> None:
    for name, info in infos.items():
        if name in result:
            raise DlmjaxError(
                f"tensor {name!r} appears in both {result[name].path} and {info.path}; "
                f"remove the duplicate file from the checkpoint"
            )
        result[name] = info


def index_checkpoint(src) -> dict[str, TensorInfo]:
    """All tensors of a checkpoint directory (sharded or not) or of one file.

    For an index, shards are visited in sorted file-name order and tensors within a
    shard by offset.
    """
    src = pathlib.Path(src)
    if not src.exists():
        raise DlmjaxError(f"checkpoint path {src} does not exist; pass a checkpoint directory or a .safetensors file")
    if not src.is_dir():
        return read_header(src)

    index_path = src / INDEX_NAME
    if index_path.is_file():
        weight_map = _read_index(index_path)
        result: dict[str, TensorInfo] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = src / shard
            if not shard_path.is_file():
                raise DlmjaxError(
                    f"checkpoint index {index_path} names shard {shard_path}, which is missing; "
                    f"download the missing shard"
                )
            infos = read_header(shard_path)
            for name, info in infos.items():
                if name not in weight_map:
                    raise DlmjaxError(
                        f"shard {shard_path} holds tensor {name!r} that the index {index_path} does not list; "
                        f"re-download the checkpoint so the index and shards match"
                    )
                if weight_map[name] != shard:
                    raise DlmjaxError(
                        f"tensor {name!r} appears in shard {shard_path} but the index {index_path} maps it to "
                        f"{weight_map[name]}; re-download the checkpoint so the index and shards match"
                    )
            _merge(result, infos)
        for name, shard in weight_map.items():
            if name not in result:
                raise DlmjaxError(
                    f"checkpoint index {index_path} maps tensor {name!r} to shard {src / shard}, whose header "
                    f"does not contain it; re-download the checkpoint so the index and shards match"
                )
        return result

    single = src / SINGLE_NAME
    if single.is_file():
        return read_header(single)
    files = sorted(p for p in src.glob("*.safetensors") if p.is_file())
    if len(files) == 1:
        return read_header(files[0])
    if not files:
        raise DlmjaxError(
            f"checkpoint directory {src} contains no .safetensors files; download the model weights into it"
        )
    raise DlmjaxError(
        f"checkpoint directory {src} contains {len(files)} .safetensors files "
        f"({', '.join(p.name for p in files[:4])}{', ...' if len(files) > 4 else ''}) but no {INDEX_NAME}; "
        f"add the index file or keep only one .safetensors file"
    )


def load_tensor(info: TensorInfo) -> np.ndarray:
    """Reads one tensor into a new, writable, C-contiguous array (not a memmap)."""
    dtype = np.dtype(info.dtype)
    shape = tuple(info.shape)
    expected = math.prod(shape) * dtype.itemsize
    if expected != info.nbytes:
        raise DlmjaxError(
            f"cannot read tensor {info.name!r} from {info.path}: its TensorInfo says {info.nbytes} bytes but shape "
            f"{shape} of {dtype} needs {expected}; build the TensorInfo with read_header or index_checkpoint"
        )
    buf = np.empty(expected, dtype=np.uint8)
    got = 0
    try:
        with open(info.path, "rb") as f:
            f.seek(info.offset)
            view = memoryview(buf)
            while got < expected:
                n = f.readinto(view[got:])
                if not n:
                    break
                got += n
    except FileNotFoundError:
        raise DlmjaxError(
            f"safetensors file {info.path} disappeared while reading tensor {info.name!r}; "
            f"restore the file and run again"
        ) from None
    except OSError as e:
        raise DlmjaxError(
            f"cannot read tensor {info.name!r} from safetensors file {info.path} ({e.strerror}); "
            f"check the file and permissions"
        ) from None
    if got != expected:
        raise _corrupt(
            info.path,
            f"tensor {info.name!r} needs bytes {info.offset} to {info.offset + expected} but the file ended "
            f"after {info.offset + got} bytes",
        )
    arr = buf.view(dtype).reshape(shape)
    if sys.byteorder != "little" and dtype.itemsize > 1:
        arr.byteswap(inplace=True)
    return arr


# --------------------------------------------------------------------------- writing


@dataclasses.dataclass(frozen=True)
class _Spec:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    dtype_name: str
    nbytes: int


def _make_spec(name, shape, dtype, *, where) -> _Spec:
    if not isinstance(name, str):
        raise DlmjaxError(f"cannot write {where}: tensor name {name!r} is not a string; use string names")
    if name == _METADATA_KEY:
        raise DlmjaxError(f"cannot write {where}: the tensor name {_METADATA_KEY!r} is reserved; rename the tensor")
    try:
        shape = tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        raise DlmjaxError(f"cannot write {where}: tensor {name!r} has shape {shape!r}, not a tuple of integers; fix the shape") from None
    if any(d < 0 for d in shape):
        raise DlmjaxError(f"cannot write {where}: tensor {name!r} has negative shape {shape}; fix the shape")
    dtype_name = _dtype_name(dtype, where=f"{where} (tensor {name!r})")
    dt = _DTYPES[dtype_name]
    return _Spec(name, shape, dt, dtype_name, math.prod(shape) * dt.itemsize)


def _check_metadata(metadata, where) -> dict[str, str] | None:
    if metadata is None:
        return None
    if not isinstance(metadata, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise DlmjaxError(f"cannot write {where}: metadata must map strings to strings; convert the values with str()")
    return dict(metadata)


def _header_bytes(specs: Sequence[_Spec], metadata: dict[str, str] | None) -> bytes:
    header: dict = {}
    if metadata is not None:
        header[_METADATA_KEY] = metadata
    pos = 0
    for s in specs:
        header[s.name] = {"dtype": s.dtype_name, "shape": list(s.shape), "data_offsets": [pos, pos + s.nbytes]}
        pos += s.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    # Pad so that the byte buffer starts at a multiple of 8 (8 + len is 8-aligned).
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _as_le_bytes(arr: np.ndarray) -> memoryview:
    """A C-contiguous little-endian byte view of ``arr`` (copies only when needed)."""
    if arr.dtype.byteorder == ">" or (arr.dtype.byteorder == "=" and sys.byteorder != "little" and arr.dtype.itemsize > 1):
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    arr = np.ascontiguousarray(arr)
    return memoryview(arr.reshape(-1).view(np.uint8))


def _write_file(path: pathlib.Path, specs: Sequence[_Spec], get: Callable[[_Spec], np.ndarray], metadata) -> None:
    try:
        with open(path, "wb") as f:
            f.write(_header_bytes(specs, metadata))
            for s in specs:
                arr = get(s)
                data = _as_le_bytes(arr)
                if data.nbytes != s.nbytes:  # guarded by the callers' checks; never silently corrupt
                    raise DlmjaxError(
                        f"cannot write {path}: tensor {s.name!r} produced {data.nbytes} bytes instead of "
                        f"{s.nbytes}; report this bug"
                    )
                f.write(data)
                del arr, data
    except OSError as e:
        raise DlmjaxError(f"cannot write safetensors file {path} ({e.strerror}); check free disk space and permissions") from None


def save_file(tensors: Mapping[str, np.ndarray], path, metadata: Mapping[str, str] | None = None) -> None:
    """Writes ``tensors`` (in the given order) to one safetensors file."""
    path = pathlib.Path(path)
    where = f"safetensors file {path}"
    meta = _check_metadata(metadata, where)
    arrays = {}
    specs = []
    for name, value in tensors.items():
        arr = value if isinstance(value, np.ndarray) else np.asarray(value)
        specs.append(_make_spec(name, arr.shape, arr.dtype, where=where))
        arrays[name] = arr
    _write_file(path, specs, lambda s: arrays[s.name], meta)


def _shard_name(i: int, n: int) -> str:
    return SINGLE_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _plan_shards(specs: Sequence[_Spec], max_shard_bytes: int) -> list[list[_Spec]]:
    shards: list[list[_Spec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


def save_sharded(
    specs: Sequence[tuple[str, tuple[int, ...], np.dtype]],
    get_tensor: Callable[[str], np.ndarray],
    out_dir,
    max_shard_bytes: int = 5 * 2**30,
    metadata: Mapping[str, str] | None = None,
) -> list[pathlib.Path]:
    """Writes a (possibly sharded) checkpoint, fetching one tensor at a time.

    Returns the shard paths in order, followed by the index path when there is more
    than one shard (a single shard is written as ``model.safetensors`` with no index).
    ``metadata`` goes into every shard's ``__metadata__``.
    """
    out_dir = pathlib.Path(out_dir)
    where = f"checkpoint in {out_dir}"
    if not _is_int(max_shard_bytes) or max_shard_bytes <= 0:
        raise DlmjaxError(f"cannot write {where}: max_shard_bytes is {max_shard_bytes!r}; pass a positive integer")
    meta = _check_metadata(metadata, where)
    plan: list[_Spec] = []
    seen: set[str] = set()
    for item in specs:
        try:
            name, shape, dtype = item
        except (TypeError, ValueError):
            raise DlmjaxError(f"cannot write {where}: spec {item!r} is not a (name, shape, dtype) triple; fix the spec list") from None
        if name in seen:
            raise DlmjaxError(f"cannot write {where}: tensor {name!r} is listed twice; remove the duplicate spec")
        seen.add(name)
        plan.append(_make_spec(name, shape, dtype, where=where))

    shards = _plan_shards(plan, max_shard_bytes)
    n = len(shards)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DlmjaxError(f"cannot create output directory {out_dir} ({e.strerror}); check the path and permissions") from None

    def fetch(s: _Spec, path: pathlib.Path) -> np.ndarray:
        arr = get_tensor(s.name)
        if not isinstance(arr, np.ndarray):
            raise DlmjaxError(
                f"cannot write {path}: get_tensor({s.name!r}) returned {type(arr).__name__}, not a numpy array; "
                f"return a numpy array"
            )
        if arr.shape != s.shape or _native(arr.dtype) != s.dtype:
            raise DlmjaxError(
                f"cannot write {path}: get_tensor({s.name!r}) returned shape {arr.shape} dtype {arr.dtype} but "
                f"the spec declares shape {s.shape} dtype {s.dtype}; make the spec and the tensor agree"
            )
        return arr

    written: list[pathlib.Path] = []
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards):
        fname = _shard_name(i, n)
        path = out_dir / fname
        _write_file(path, shard, lambda s, _p=path: fetch(s, _p), meta)
        written.append(path)
        for s in shard:
            weight_map[s.name] = fname

    if n > 1:
        index = {
            "metadata": {"total_size": sum(s.nbytes for s in plan)},
            "weight_map": dict(sorted(weight_map.items())),
        }
        index_path = out_dir / INDEX_NAME
        try:
            index_path.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        except OSError as e:
            raise DlmjaxError(f"cannot write checkpoint index {index_path} ({e.strerror}); check free disk space and permissions") from None
        written.append(index_path)
    return written
