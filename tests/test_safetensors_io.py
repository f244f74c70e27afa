"""Tests for the pure-numpy safetensors reader/writer."""

import json
import struct

import ml_dtypes
import numpy as np
import pytest

from dlmjax.errors import DlmjaxError

try:
    from dlmjax.convert import safetensors_io as st
except ImportError:
    import safetensors_io as st

BF16 = np.dtype(ml_dtypes.bfloat16)


def _bits(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8).tobytes()


def _assert_identical(got: np.ndarray, want: np.ndarray):
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    assert _bits(got) == _bits(want)


def _load_all(src):
    return {name: st.load_tensor(info) for name, info in st.index_checkpoint(src).items()}


def _sample_tensors():
    rng = np.random.default_rng(0)
    f32 = rng.standard_normal((3, 5)).astype(np.float32)
    f32[0, 0] = np.nan
    f32[0, 1] = -0.0
    return {
        "f32": f32,
        "bf16": rng.standard_normal((4, 3)).astype(BF16),
        "f16": rng.standard_normal((7,)).astype(np.float16),
        "i64": rng.integers(-(2**62), 2**62, size=(2, 3), dtype=np.int64),
        "bool": rng.integers(0, 2, size=(5,)).astype(bool),
        "i8": np.arange(-3, 4, dtype=np.int8),  # odd size: later tensors are not 8-aligned
        "scalar": np.array(3.25, dtype=np.float32),
        "empty": np.zeros((0, 4), dtype=np.float32),
        "transposed": np.arange(12, dtype=np.float64).reshape(3, 4).T,
        "bf16_strided": rng.standard_normal((6, 4)).astype(BF16)[::2, ::-1],
    }


# --------------------------------------------------------------------------- round trip


def test_round_trip(tmp_path):
    tensors = _sample_tensors()
    assert not tensors["transposed"].flags.c_contiguous
    path = tmp_path / "model.safetensors"
    st.save_file(tensors, path, metadata={"format": "pt", "note": "ü"})

    infos = st.index_checkpoint(tmp_path)
    assert list(infos) == list(tensors)  # order given == offset order
    assert st.read_metadata(path) == {"format": "pt", "note": "ü"}
    n = struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert n % 8 == 0
    for name, want in tensors.items():
        info = infos[name]
        assert info.path == path and info.shape == want.shape and info.dtype == want.dtype
        got = st.load_tensor(info)
        _assert_identical(got, want)
        assert got.flags.c_contiguous and got.flags.writeable and not isinstance(got, np.memmap)
        got[...] = 0  # writable and owned: must not touch the file
    _assert_identical(st.load_tensor(infos["f32"]), tensors["f32"])
    assert st.index_checkpoint(path).keys() == infos.keys()  # a single file works too
    assert st.read_metadata(tmp_path / "model.safetensors") != {}


def test_no_metadata_and_big_endian_input(tmp_path):
    path = tmp_path / "x.safetensors"
    big = np.arange(6, dtype=">i4").reshape(2, 3)
    st.save_file({"b": big}, path)
    assert st.read_metadata(path) == {}
    got = st.load_tensor(st.read_header(path)["b"])
    assert got.dtype == np.dtype("<i4")
    np.testing.assert_array_equal(got, big)


def test_unsupported_dtype_on_write(tmp_path):
    with pytest.raises(DlmjaxError, match="not supported"):
        st.save_file({"s": np.array(["a"])}, tmp_path / "x.safetensors")


# --------------------------------------------------------------------------- interop

NP_DTYPES = [np.float16, np.float32, np.float64, np.int8, np.int16, np.int32, np.int64, np.uint8, bool]


def test_reads_safetensors_numpy_files(tmp_path):
    snp = pytest.importorskip("safetensors.numpy")
    rng = np.random.default_rng(1)
    tensors = {f"t{i}": (rng.standard_normal((3, i + 1)) * 50).astype(dt) for i, dt in enumerate(NP_DTYPES)}
    tensors["scalar"] = np.array(-2.5, dtype=np.float32)
    tensors["empty"] = np.zeros((2, 0), dtype=np.int32)
    path = tmp_path / "np.safetensors"
    snp.save_file(tensors, str(path), metadata={"k": "v"})
    got = _load_all(path)
    assert got.keys() == tensors.keys()
    for name, want in tensors.items():
        _assert_identical(got[name], want)
    assert st.read_metadata(path) == {"k": "v"}


def test_reads_safetensors_torch_files(tmp_path):
    torch = pytest.importorskip("torch")
    sto = pytest.importorskip("safetensors.torch")
    g = torch.Generator().manual_seed(2)
    tensors = {
        "bf16": torch.randn(5, 7, generator=g).to(torch.bfloat16),
        "f32": torch.randn(4, generator=g),
        "f16": torch.randn(2, 3, generator=g).half(),
        "i64": torch.arange(-5, 5, dtype=torch.int64),
        "bool": torch.tensor([True, False, True]),
        "f8": torch.randn(6, generator=g).to(torch.float8_e4m3fn),
        "scalar_bf16": torch.tensor(1.5, dtype=torch.bfloat16),
    }
    path = tmp_path / "pt.safetensors"
    sto.save_file(tensors, str(path), metadata={"format": "pt"})
    got = _load_all(path)
    assert got.keys() == tensors.keys()
    assert got["bf16"].dtype == BF16
    np.testing.assert_array_equal(got["bf16"].view(np.int16), tensors["bf16"].view(torch.int16).numpy())
    np.testing.assert_array_equal(got["bf16"].astype(np.float32), tensors["bf16"].float().numpy())
    assert got["scalar_bf16"].shape == () and float(got["scalar_bf16"]) == 1.5
    assert got["f8"].dtype == np.dtype(ml_dtypes.float8_e4m3fn)
    np.testing.assert_array_equal(got["f8"].view(np.uint8), tensors["f8"].view(torch.uint8).numpy())
    for name in ("f32", "f16", "i64", "bool"):
        _assert_identical(got[name], tensors[name].numpy())
    assert st.read_metadata(path) == {"format": "pt"}


def test_our_files_load_in_safetensors_torch(tmp_path):
    torch = pytest.importorskip("torch")
    sto = pytest.importorskip("safetensors.torch")
    tensors = _sample_tensors()
    path = tmp_path / "ours.safetensors"
    st.save_file(tensors, path, metadata={"format": "pt"})
    loaded = sto.load_file(str(path))
    assert loaded.keys() == tensors.keys()
    for name, want in tensors.items():
        t = loaded[name]
        assert tuple(t.shape) == want.shape
        if want.dtype == BF16:
            assert t.dtype == torch.bfloat16
            np.testing.assert_array_equal(t.view(torch.int16).numpy(), np.ascontiguousarray(want).view(np.int16))
            np.testing.assert_array_equal(t.float().numpy(), want.astype(np.float32))
        else:
            _assert_identical(t.numpy(), want)


def test_sharded_files_load_in_safetensors(tmp_path):
    sto = pytest.importorskip("safetensors.torch")
    tensors = {f"w{i}": np.full((16,), i, dtype=np.float32) for i in range(4)}
    specs = [(n, a.shape, a.dtype) for n, a in tensors.items()]
    paths = st.save_sharded(specs, tensors.__getitem__, tmp_path, max_shard_bytes=128)
    seen = {}
    for p in paths[:-1]:
        seen.update({k: v.numpy() for k, v in sto.load_file(str(p)).items()})
    assert seen.keys() == tensors.keys()
    for name, want in tensors.items():
        _assert_identical(seen[name], want)


# --------------------------------------------------------------------------- sharding


def test_save_sharded(tmp_path):
    rng = np.random.default_rng(3)
    # 400, 400, 400, 2000 (oversize), 40, 400 bytes; limit 1000.
    tensors = {
        "a": rng.standard_normal((10, 10)).astype(np.float32),
        "b": rng.standard_normal((200,)).astype(BF16),
        "c": rng.integers(0, 9, (50,)).astype(np.int64),
        "big": rng.standard_normal((500,)).astype(np.float32),
        "d": rng.standard_normal((10, 2)).astype(np.float16),
        "e": rng.standard_normal((10, 10)).astype(np.float32).T,
    }
    specs = [(n, a.shape, a.dtype) for n, a in tensors.items()]
    calls = []

    def get_tensor(name):
        calls.append(name)
        return tensors[name]

    limit = 1000
    paths = st.save_sharded(specs, get_tensor, tmp_path / "out", max_shard_bytes=limit, metadata={"format": "pt"})
    assert calls == list(tensors)  # once each, in order

    out = tmp_path / "out"
    names = [p.name for p in paths]
    assert names == [
        "model-00001-of-00004.safetensors",
        "model-00002-of-00004.safetensors",
        "model-00003-of-00004.safetensors",
        "model-00004-of-00004.safetensors",
        "model.safetensors.index.json",
    ]
    shard_contents = [list(st.read_header(p)) for p in paths[:-1]]
    assert shard_contents == [["a", "b"], ["c"], ["big"], ["d", "e"]]
    for p, contents in zip(paths[:-1], shard_contents):
        size = sum(tensors[n].nbytes for n in contents)
        assert size <= limit or len(contents) == 1
        assert st.read_metadata(p) == {"format": "pt"}

    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in tensors.values())
    assert index["weight_map"] == {
        "a": names[0], "b": names[0], "c": names[1], "big": names[2], "d": names[3], "e": names[3],
    }

    infos = st.index_checkpoint(out)
    assert set(infos) == set(tensors)
    for name, want in tensors.items():
        _assert_identical(st.load_tensor(infos[name]), want)


def test_save_sharded_oversize_first_and_last(tmp_path):
    tensors = {"big0": np.zeros(100, np.float32), "x": np.ones(2, np.float32), "big1": np.zeros(50, np.int64)}
    specs = [(n, a.shape, a.dtype) for n, a in tensors.items()]
    paths = st.save_sharded(specs, tensors.__getitem__, tmp_path, max_shard_bytes=64)
    assert [list(st.read_header(p)) for p in paths[:-1]] == [["big0"], ["x"], ["big1"]]
    assert paths[0].name == "model-00001-of-00003.safetensors"


def test_save_sharded_single_shard(tmp_path):
    tensors = {"x": np.ones((3,), np.float32), "y": np.zeros((2, 2), np.int32)}
    specs = [(n, a.shape, a.dtype) for n, a in tensors.items()]
    paths = st.save_sharded(specs, tensors.__getitem__, tmp_path)
    assert [p.name for p in paths] == ["model.safetensors"]
    assert not (tmp_path / "model.safetensors.index.json").exists()
    got = _load_all(tmp_path)
    for name, want in tensors.items():
        _assert_identical(got[name], want)


@pytest.mark.parametrize(
    "bad",
    [np.ones((3, 2), np.float32), np.ones((2, 3), np.float16), [[1.0] * 3] * 2],
    ids=["shape", "dtype", "not-array"],
)
def test_save_sharded_rejects_wrong_tensor(tmp_path, bad):
    specs = [("w", (2, 3), np.float32)]
    with pytest.raises(DlmjaxError, match="'w'"):
        st.save_sharded(specs, lambda name: bad, tmp_path)


def test_save_sharded_rejects_bad_specs(tmp_path):
    with pytest.raises(DlmjaxError, match="twice"):
        st.save_sharded([("w", (1,), np.float32), ("w", (1,), np.float32)], lambda n: None, tmp_path)
    with pytest.raises(DlmjaxError, match="object"):
        st.save_sharded([("w", (1,), object)], lambda n: None, tmp_path)
    with pytest.raises(DlmjaxError, match="max_shard_bytes"):
        st.save_sharded([("w", (1,), np.float32)], lambda n: None, tmp_path, max_shard_bytes=0)


# --------------------------------------------------------------------------- corruption


def _write_raw(path, header, data=b"", pad=True):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _good_file(tmp_path, name="m.safetensors"):
    path = tmp_path / name
    st.save_file({"a.weight": np.arange(64, dtype=np.float32), "b": np.ones(8, np.int64)}, path)
    return path


def _expect_error(path_for_call, fname, *fragments, call=None):
    call = call or st.index_checkpoint
    with pytest.raises(DlmjaxError) as exc:
        call(path_for_call)
    msg = str(exc.value)
    assert fname in msg, msg
    for frag in fragments:
        assert frag in msg, msg
    assert "\n" not in msg
    return msg


def test_truncated_file(tmp_path):
    path = _good_file(tmp_path, "model-00002-of-00003.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[:-5])
    _expect_error(path, "model-00002-of-00003.safetensors", "'b'", f"ends at byte {len(data)}",
                  f"has {len(data) - 5} bytes", call=st.read_header)


def test_file_shorter_than_length_prefix(tmp_path):
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(b"\x01\x02")
    _expect_error(path, "tiny.safetensors", call=st.read_header)


def test_header_length_larger_than_file(tmp_path):
    path = tmp_path / "long.safetensors"
    path.write_bytes(struct.pack("<Q", 10**6) + b"{}      ")
    _expect_error(path, "long.safetensors", "1000000", "has only 16 bytes", call=st.read_header)
    path.write_bytes(struct.pack("<Q", 2**64 - 1) + b"{}      ")
    _expect_error(path, "long.safetensors", call=st.read_metadata)


@pytest.mark.parametrize(
    "raw",
    [b"{not json at all", b"\xff\xfe\x00garbage", b'{"a": {"dtype": "F32"', b"", b'{"x":1,"x":2}'],
    ids=["invalid-json", "invalid-utf8", "cut-json", "empty", "duplicate-key"],
)
def test_garbage_header(tmp_path, raw):
    path = _write_raw(tmp_path / "garbage.safetensors", raw)
    _expect_error(path, "garbage.safetensors", call=st.read_header)
    _expect_error(path, "garbage.safetensors", call=st.read_metadata)


@pytest.mark.parametrize("header", [[1, 2, 3], "str", 5, None])
def test_header_not_object(tmp_path, header):
    path = _write_raw(tmp_path / "list.safetensors", header)
    _expect_error(path, "list.safetensors", "not an object", call=st.read_header)


def test_unknown_dtype(tmp_path):
    path = _write_raw(tmp_path / "dt.safetensors", {"w": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}, b"\0")
    _expect_error(path, "dt.safetensors", "'F4'", call=st.read_header)
    path = _write_raw(tmp_path / "dt2.safetensors", {"w": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 1]}}, b"\0")
    _expect_error(path, "dt2.safetensors", "'Q9'", call=st.index_checkpoint)


@pytest.mark.parametrize(
    "entry",
    [
        {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]},  # needs 24
        {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]},
        {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]},
        {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]},
        {"dtype": "F32", "shape": [2], "data_offsets": [0]},
        {"dtype": "F32", "shape": [2], "data_offsets": [True, 9]},
        {"dtype": "F32", "shape": [2]},
        {"dtype": 7, "shape": [2], "data_offsets": [0, 8]},
        [1, 2],
    ],
)
def test_inconsistent_entries(tmp_path, entry):
    path = _write_raw(tmp_path / "off.safetensors", {"w": entry}, b"\0" * 64)
    _expect_error(path, "off.safetensors", "'w'", call=st.read_header)


def test_bad_metadata(tmp_path):
    path = _write_raw(tmp_path / "meta.safetensors", {"__metadata__": {"a": 1}})
    _expect_error(path, "meta.safetensors", "__metadata__", call=st.read_metadata)
    _expect_error(path, "meta.safetensors", "__metadata__", call=st.read_header)


def test_overlapping_tensors(tmp_path):
    header = {
        "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]},
    }
    path = _write_raw(tmp_path / "ovl.safetensors", header, b"\0" * 24)
    _expect_error(path, "ovl.safetensors", "overlap", call=st.read_header)


def test_header_sorted_by_offset_and_gaps_and_empties_ok(tmp_path):
    header = {
        "late": {"dtype": "I8", "shape": [2], "data_offsets": [4, 6]},
        "empty": {"dtype": "F32", "shape": [0], "data_offsets": [1, 1]},
        "early": {"dtype": "I8", "shape": [2], "data_offsets": [0, 2]},
    }
    path = _write_raw(tmp_path / "ok.safetensors", header, bytes([1, 2, 9, 9, 3, 4]))
    infos = st.read_header(path)
    assert list(infos) == ["early", "empty", "late"]
    np.testing.assert_array_equal(st.load_tensor(infos["late"]), np.array([3, 4], np.int8))
    assert st.load_tensor(infos["empty"]).shape == (0,)


def _sharded(tmp_path):
    tensors = {f"w{i}": np.full((4,), i, np.float32) for i in range(3)}
    specs = [(n, a.shape, a.dtype) for n, a in tensors.items()]
    paths = st.save_sharded(specs, tensors.__getitem__, tmp_path, max_shard_bytes=16)
    assert len(paths) == 4
    return paths


def test_index_missing_shard(tmp_path):
    paths = _sharded(tmp_path)
    paths[1].unlink()
    _expect_error(tmp_path, paths[1].name, "missing")


def test_index_names_tensor_not_in_shard(tmp_path):
    paths = _sharded(tmp_path)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["ghost"] = paths[0].name
    index_path.write_text(json.dumps(index))
    _expect_error(tmp_path, paths[0].name, "'ghost'")


def test_index_misses_tensor_in_shard(tmp_path):
    tensors = {f"w{i}": np.full((4,), i, np.float32) for i in range(3)}
    specs = [(n, a.shape, a.dtype) for n, a in tensors.items()]
    paths = st.save_sharded(specs, tensors.__getitem__, tmp_path, max_shard_bytes=32)
    assert [list(st.read_header(p)) for p in paths[:-1]] == [["w0", "w1"], ["w2"]]
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"]["w1"]
    index_path.write_text(json.dumps(index))
    _expect_error(tmp_path, paths[0].name, "'w1'", "does not list")


def test_index_maps_tensor_to_wrong_shard(tmp_path):
    paths = _sharded(tmp_path)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["w1"] = paths[0].name
    index_path.write_text(json.dumps(index))
    _expect_error(tmp_path, paths[0].name, "'w1'")


@pytest.mark.parametrize("text", ["{broken", "[]", '{"weight_map": {"a": 3}}', '{"weight_map": {"a": "../x"}}'])
def test_bad_index_json(tmp_path, text):
    _sharded(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(text)
    _expect_error(tmp_path, "model.safetensors.index.json")


def test_duplicate_tensor_across_shards(tmp_path):
    st.save_file({"a": np.ones(2, np.float32)}, tmp_path / "s1.safetensors")
    st.save_file({"a": np.ones(2, np.float32), "b": np.ones(1, np.int8)}, tmp_path / "s2.safetensors")
    index = {"metadata": {"total_size": 9}, "weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    _expect_error(tmp_path, "s2.safetensors", "'a'", "s1.safetensors")


def test_directory_without_safetensors(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    _expect_error(tmp_path, str(tmp_path), "no .safetensors")
    _expect_error(tmp_path / "nope", "nope")


def test_directory_with_two_files_and_no_index(tmp_path):
    _good_file(tmp_path, "one.safetensors")
    _good_file(tmp_path, "two.safetensors")
    _expect_error(tmp_path, str(tmp_path), "one.safetensors", "two.safetensors")
    # model.safetensors takes precedence when present.
    _good_file(tmp_path, "model.safetensors")
    assert {i.path.name for i in st.index_checkpoint(tmp_path).values()} == {"model.safetensors"}


def test_directory_with_single_odd_name(tmp_path):
    _good_file(tmp_path, "weights.safetensors")
    assert set(st.index_checkpoint(tmp_path)) == {"a.weight", "b"}


def test_load_tensor_after_truncation(tmp_path):
    path = _good_file(tmp_path, "cut.safetensors")
    infos = st.read_header(path)
    data = path.read_bytes()
    path.write_bytes(data[:-3])
    _expect_error(infos["b"], "cut.safetensors", "'b'", call=st.load_tensor)
    np.testing.assert_array_equal(st.load_tensor(infos["a.weight"]), np.arange(64, dtype=np.float32))
    path.unlink()
    _expect_error(infos["a.weight"], "cut.safetensors", call=st.load_tensor)
