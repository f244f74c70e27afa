"""What dlmjax adds to the `safetensors` package: the sharded-index walk, one-line errors
naming the file, the group-bounded sharded writer, and bit-exact bf16."""

import json
import struct

import ml_dtypes
import numpy as np
import pytest
import safetensors

from dlmjax.convert import safetensors_io as st
from dlmjax.errors import DlmjaxError

BF16 = np.dtype(ml_dtypes.bfloat16)


def _bits(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8).tobytes()


def _assert_identical(got: np.ndarray, want: np.ndarray):
    assert got.dtype == want.dtype and got.shape == want.shape
    assert _bits(got) == _bits(want)


def _load_all(src):
    return {name: st.load_tensor(info) for name, info in st.index_checkpoint(src).items()}


def _metadata(path):
    with safetensors.safe_open(path, framework="numpy") as f:
        return f.metadata()


def _expect_error(arg, *fragments, call=st.index_checkpoint):
    with pytest.raises(DlmjaxError) as exc:
        call(arg)
    msg = str(exc.value)
    for fragment in fragments:
        assert fragment in msg, msg
    assert "\n" not in msg
    return msg


# --------------------------------------------------------------------------- round trip


def test_round_trip_is_bit_exact(tmp_path):
    rng = np.random.default_rng(0)
    f32 = rng.standard_normal((3, 5)).astype(np.float32)
    f32[0, :2] = [np.nan, -0.0]
    bf16 = rng.standard_normal((4, 3)).astype(BF16)
    bf16[0, :3] = [np.nan, -0.0, np.inf]
    tensors = {
        "f32": f32,
        "bf16": bf16,
        "f16": rng.standard_normal((7,)).astype(np.float16),
        "i64": rng.integers(-(2**62), 2**62, size=(2, 3), dtype=np.int64),
        "bool": rng.integers(0, 2, size=(5,)).astype(bool),
        "i8": np.arange(-3, 4, dtype=np.int8),
        "scalar_bf16": np.array(1.5, dtype=BF16),
        "empty": np.zeros((0, 4), dtype=np.float32),
        # The library writes memory as it lies; ours must store these in logical order.
        "transposed": np.arange(12, dtype=np.float64).reshape(3, 4).T,
        "bf16_strided": rng.standard_normal((6, 4)).astype(BF16)[::2, ::-1],
        "big_endian": np.arange(6, dtype=">i4").reshape(2, 3),
    }
    path = tmp_path / "model.safetensors"
    st.save_file(tensors, path, metadata={"format": "pt"})
    assert _metadata(path) == {"format": "pt"}

    infos = st.index_checkpoint(tmp_path)
    assert infos.keys() == tensors.keys()
    assert st.index_checkpoint(path).keys() == infos.keys()  # a single file works too
    for name, want in tensors.items():
        info = infos[name]
        want = want.astype(want.dtype.newbyteorder("="))
        assert info.path == path and info.shape == want.shape and info.dtype == want.dtype
        got = st.load_tensor(info)
        _assert_identical(got, want)
        got[...] = 0  # writable, and a copy: the file must not change
    _assert_identical(st.load_tensor(infos["bf16"]), bf16)


def test_bf16_interoperates_with_torch(tmp_path):
    torch = pytest.importorskip("torch")
    sto = pytest.importorskip("safetensors.torch")
    theirs = torch.randn(5, 7, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    sto.save_file({"w": theirs}, str(tmp_path / "pt.safetensors"))
    got = st.load_tensor(st.read_header(tmp_path / "pt.safetensors")["w"])
    assert got.dtype == BF16
    np.testing.assert_array_equal(got.view(np.int16), theirs.view(torch.int16).numpy())

    st.save_file({"w": got.T}, tmp_path / "ours.safetensors")
    back = sto.load_file(str(tmp_path / "ours.safetensors"))["w"]
    assert back.dtype == torch.bfloat16
    np.testing.assert_array_equal(back.view(torch.int16).numpy(), np.ascontiguousarray(got.T).view(np.int16))


def test_header_reads_no_tensor_data(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    st.save_file({"a": np.ones((4, 2), np.float32), "b": np.zeros(3, BF16)}, path)
    reads, real_open = [], safetensors.safe_open

    class Spy:
        """safe_open, recording every call that reads tensor data."""

        def __init__(self, *args, **kwargs):
            self._f = real_open(*args, **kwargs)

        def __enter__(self):
            self._f.__enter__()
            return self

        def __exit__(self, *exc):
            return self._f.__exit__(*exc)

        def __getattr__(self, attr):
            if attr in ("get_tensor", "get_tensors"):
                reads.append(attr)
            return getattr(self._f, attr)

        def get_slice(self, name):
            view = self._f.get_slice(name)

            class SliceSpy:
                get_shape, get_dtype = view.get_shape, view.get_dtype

                def __getitem__(self, index):
                    reads.append(("slice", name))
                    return view[index]

            return SliceSpy()

    monkeypatch.setattr(st.safetensors, "safe_open", Spy)
    infos = st.index_checkpoint(path)
    assert {n: (i.shape, i.dtype) for n, i in infos.items()} == {"a": ((4, 2), np.dtype(np.float32)), "b": ((3,), BF16)}
    assert reads == []
    st.load_tensor(infos["a"])
    assert reads == ["get_tensor"]  # the spy does see reads


def test_unsupported_dtype_on_write(tmp_path):
    _expect_error({"s": np.array(["a"])}, "'s'", "not supported", call=lambda t: st.save_file(t, tmp_path / "x.safetensors"))
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- sharded writer


def _sharded_write(tmp_path, tensors, **kwargs):
    specs = [(n, a.shape, a.dtype) for n, a in tensors.items()]
    calls = []

    def get_tensor(name):
        calls.append(name)
        return tensors[name]

    paths = st.save_sharded(specs, get_tensor, tmp_path, metadata={"format": "pt"}, **kwargs)
    assert calls == list(tensors)  # once each, in order
    return paths


def test_save_sharded_by_size(tmp_path):
    rng = np.random.default_rng(3)
    # 400, 400, 400, 2000 (over the limit: alone), 40, 400 bytes; limit 1000.
    tensors = {
        "a": rng.standard_normal((10, 10)).astype(np.float32),
        "b": rng.standard_normal((200,)).astype(BF16),
        "c": rng.integers(0, 9, (50,)).astype(np.int64),
        "big": rng.standard_normal((500,)).astype(np.float32),
        "d": rng.standard_normal((10, 2)).astype(np.float16),
        "e": rng.standard_normal((10, 10)).astype(np.float32).T,
    }
    paths = _sharded_write(tmp_path, tensors, max_shard_bytes=1000)
    names = [p.name for p in paths]
    assert names == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)] + ["model.safetensors.index.json"]
    assert [sorted(st.read_header(p)) for p in paths[:-1]] == [["a", "b"], ["c"], ["big"], ["d", "e"]]
    assert all(_metadata(p) == {"format": "pt"} for p in paths[:-1])
    index = json.loads(paths[-1].read_text())
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in tensors.values())
    assert index["weight_map"] == {"a": names[0], "b": names[0], "c": names[1], "big": names[2], "d": names[3], "e": names[3]}
    got = _load_all(tmp_path)
    for name, want in tensors.items():
        _assert_identical(got[name], want)


def test_save_sharded_keeps_groups_apart(tmp_path):
    tensors = {n: np.full((4,), i, np.float32) for i, n in enumerate(["e0", "e1", "l0a", "l0b", "l1a", "l1b", "l1c"])}
    groups = {n: "embed" if n.startswith("e") else n[:2] for n in tensors}
    paths = _sharded_write(tmp_path / "groups", tensors, groups=groups)
    assert [sorted(st.read_header(p)) for p in paths[:-1]] == [["e0", "e1"], ["l0a", "l0b"], ["l1a", "l1b", "l1c"]]
    # A group above the size limit is split, still without mixing groups.
    paths = _sharded_write(tmp_path / "split", tensors, groups=groups, max_shard_bytes=32)
    assert [sorted(st.read_header(p)) for p in paths[:-1]] == [["e0", "e1"], ["l0a", "l0b"], ["l1a", "l1b"], ["l1c"]]
    got = _load_all(tmp_path / "split")
    for name, want in tensors.items():
        _assert_identical(got[name], want)


def test_save_sharded_single_shard(tmp_path):
    tensors = {"x": np.ones((3,), np.float32), "y": np.zeros((2, 2), np.int32)}
    paths = _sharded_write(tmp_path, tensors)
    assert [p.name for p in paths] == ["model.safetensors"]
    assert not (tmp_path / st.INDEX_NAME).exists()


@pytest.mark.parametrize(
    "bad", [np.ones((3, 2), np.float32), np.ones((2, 3), np.float16), [[1.0] * 3] * 2], ids=["shape", "dtype", "not-array"]
)
def test_save_sharded_rejects_wrong_tensor(tmp_path, bad):
    _expect_error(tmp_path, "'w'", call=lambda d: st.save_sharded([("w", (2, 3), np.float32)], lambda name: bad, d))


def test_save_sharded_rejects_bad_specs(tmp_path):
    def save(specs, **kwargs):
        return lambda d: st.save_sharded(specs, lambda n: None, d, **kwargs)

    _expect_error(tmp_path, "twice", call=save([("w", (1,), np.float32), ("w", (1,), np.float32)]))
    _expect_error(tmp_path, "'w'", "not supported", call=save([("w", (1,), object)]))
    _expect_error(tmp_path, "max_shard_bytes", call=save([("w", (1,), np.float32)], max_shard_bytes=0))


# --------------------------------------------------------------------------- bad files


def _raw(path, header, data=b""):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _good_file(tmp_path, name="m.safetensors"):
    path = tmp_path / name
    st.save_file({"a.weight": np.arange(64, dtype=np.float32), "b": np.ones(8, np.int64)}, path)
    return path


CORRUPTIONS = {
    "truncated": lambda good: good[:-5],
    "too-long": lambda good: good + b"\0" * 8,
    "shorter-than-length": lambda good: b"\x01\x02",
    "empty": lambda good: b"",
    "length-beyond-file": lambda good: struct.pack("<Q", 10**6) + b"{}      ",
    "html-error-page": lambda good: b"<!DOCTYPE html><html>404 Not Found</html>",
    "pickle": lambda good: b"PK\x03\x04" + b"\0" * 64,
    "invalid-json": lambda good: struct.pack("<Q", 8) + b"{not jso",
    "overlapping": lambda good: _raw_bytes(
        {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
         "b": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]}}, b"\0" * 24),
    "unknown-dtype": lambda good: _raw_bytes({"w": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 1]}}, b"\0"),
}


def _raw_bytes(header, data):
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_bad_file_is_one_line_naming_it(tmp_path, corruption):
    path = _good_file(tmp_path, "model-00002-of-00003.safetensors")
    path.write_bytes(CORRUPTIONS[corruption](path.read_bytes()))
    _expect_error(path, str(path), "truncated, corrupt", "re-download it", call=st.read_header)
    _expect_error(tmp_path, str(path), "re-download it")


def test_dtype_numpy_cannot_hold(tmp_path):
    path = tmp_path / "fp8.safetensors"
    st.safetensors.numpy.save_file({"w": np.zeros(4, ml_dtypes.float8_e4m3fn)}, path)
    _expect_error(path, str(path), "'w'", "F8_E4M3", "BF16")


def test_file_truncated_after_indexing(tmp_path):
    path = _good_file(tmp_path, "cut.safetensors")
    infos = st.read_header(path)
    path.write_bytes(path.read_bytes()[:-3])
    _expect_error(infos["b"], str(path), "re-download it", call=st.load_tensor)
    path.unlink()
    _expect_error(infos["a.weight"], str(path), "does not exist", call=st.load_tensor)


# --------------------------------------------------------------------------- index walk


def _sharded(tmp_path, max_shard_bytes=16):
    tensors = {f"w{i}": np.full((4,), i, np.float32) for i in range(3)}
    return st.save_sharded([(n, a.shape, a.dtype) for n, a in tensors.items()], tensors.__getitem__, tmp_path,
                           max_shard_bytes=max_shard_bytes)


def _edit_index(tmp_path, edit):
    index_path = tmp_path / st.INDEX_NAME
    index = json.loads(index_path.read_text())
    edit(index["weight_map"])
    index_path.write_text(json.dumps(index))


def test_index_walk(tmp_path):
    paths = _sharded(tmp_path)
    infos = st.index_checkpoint(tmp_path)
    assert {n: i.path.name for n, i in infos.items()} == {"w0": paths[0].name, "w1": paths[1].name, "w2": paths[2].name}


def test_index_missing_shard(tmp_path):
    paths = _sharded(tmp_path)
    paths[1].unlink()
    _expect_error(tmp_path, paths[1].name, "missing")


def test_index_names_tensor_not_in_shard(tmp_path):
    paths = _sharded(tmp_path)
    _edit_index(tmp_path, lambda m: m.update(ghost=paths[0].name))
    _expect_error(tmp_path, paths[0].name, "'ghost'")


def test_index_misses_tensor_in_shard(tmp_path):
    paths = _sharded(tmp_path, max_shard_bytes=32)
    _edit_index(tmp_path, lambda m: m.pop("w1"))
    _expect_error(tmp_path, paths[0].name, "'w1'", "does not list")


def test_index_maps_tensor_to_wrong_shard(tmp_path):
    paths = _sharded(tmp_path)
    _edit_index(tmp_path, lambda m: m.update(w1=paths[0].name))
    _expect_error(tmp_path, paths[0].name, "'w1'")


@pytest.mark.parametrize("text", ["{broken", "[]", '{"weight_map": {"a": 3}}', '{"weight_map": {"a": "../x"}}'])
def test_bad_index_json(tmp_path, text):
    _sharded(tmp_path)
    (tmp_path / st.INDEX_NAME).write_text(text)
    _expect_error(tmp_path, st.INDEX_NAME)


def test_duplicate_tensor_across_shards(tmp_path):
    st.save_file({"a": np.ones(2, np.float32)}, tmp_path / "s1.safetensors")
    st.save_file({"a": np.ones(2, np.float32), "b": np.ones(1, np.int8)}, tmp_path / "s2.safetensors")
    index = {"metadata": {"total_size": 9}, "weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}
    (tmp_path / st.INDEX_NAME).write_text(json.dumps(index))
    _expect_error(tmp_path, "s2.safetensors", "'a'", "s1.safetensors")


def test_directories_without_an_index(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    _expect_error(tmp_path, str(tmp_path), "no .safetensors")
    _expect_error(tmp_path / "nope", "nope", "does not exist")
    _good_file(tmp_path, "weights.safetensors")
    assert set(st.index_checkpoint(tmp_path)) == {"a.weight", "b"}  # one file, whatever its name
    _good_file(tmp_path, "two.safetensors")
    _expect_error(tmp_path, str(tmp_path), "two.safetensors", "weights.safetensors")
    _good_file(tmp_path, "model.safetensors")  # model.safetensors wins
    assert {i.path.name for i in st.index_checkpoint(tmp_path).values()} == {"model.safetensors"}


# --------------------------------------------------------------------------- export


def test_export_writes_one_shard_per_group(converted, tmp_path):
    from dlmjax.convert.hf_export import export

    out = export(converted("llada"), tmp_path / "hf")
    index = json.loads((out / st.INDEX_NAME).read_text())
    shards: dict[str, set] = {}
    for name, shard in index["weight_map"].items():
        group = name.split(".")[3] if ".blocks." in name else "embed"
        shards.setdefault(shard, set()).add(group)
    assert all(len(groups) == 1 for groups in shards.values()), shards
    assert sorted(g for groups in shards.values() for g in groups) == ["0", "1", "embed"]


def test_export_failure_leaves_nothing_half_written(converted, tmp_path, monkeypatch):
    from dlmjax.convert.hf_export import export

    real, calls = st.save_file, []

    def failing(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise DlmjaxError("disk full")
        real(tensors, path, metadata)

    monkeypatch.setattr(st, "save_file", failing)
    with pytest.raises(DlmjaxError, match="disk full"):
        export(converted("llada"), tmp_path / "hf")
    assert len(calls) == 2 and list(tmp_path.iterdir()) == []
