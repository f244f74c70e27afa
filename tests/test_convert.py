"""Conversion: exact round trips, PyTorch loading of exports, validation, atomicity, LoRA."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import dlmjax
from dlmjax import checkpoint
from dlmjax.convert import convert, safetensors_io
from dlmjax.convert.hf_export import export
from dlmjax.errors import DlmjaxError
from dlmjax.testing import write_tiny_checkpoint
from torch_reference import load_reference, reference_logits

IDS = np.random.default_rng(0).integers(0, 96, (2, 20))


def _tensors(directory):
    return {n: safetensors_io.load_tensor(i) for n, i in safetensors_io.index_checkpoint(directory).items()}


def _bits(a):
    return a.view(np.uint8)


@pytest.mark.parametrize("name", ["llada", "llada-bf16", "dream", "fast_dllm_v2"])
def test_export_round_trip_is_bitwise(name, hf_checkpoint, converted, tmp_path):
    out = export(converted(name), tmp_path / "hf", max_shard_bytes=100_000)
    original, exported = _tensors(hf_checkpoint(name)), _tensors(out)
    assert original.keys() == exported.keys()
    for key in original:
        assert original[key].dtype == exported[key].dtype and original[key].shape == exported[key].shape
        np.testing.assert_array_equal(_bits(original[key]), _bits(exported[key]))
    assert (out / "model.safetensors.index.json").is_file()  # sharded at 100 kB
    src_config = json.loads((hf_checkpoint(name) / "config.json").read_text())
    assert json.loads((out / "config.json").read_text()) == src_config
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / f).read_bytes() == (hf_checkpoint(name) / f).read_bytes()


@pytest.mark.parametrize("name", ["llada", "dream"])
def test_exported_model_loads_in_pytorch(name, hf_checkpoint, converted, tmp_path):
    lm = dlmjax.load(converted(name))
    out = lm.save_pretrained(tmp_path / "hf")
    model, family = load_reference(out, torch.float32)
    np.testing.assert_allclose(reference_logits(model, family, IDS), lm.logits(IDS), atol=1e-4, rtol=0)


def _fresh(tmp_path, family="llada", **kwargs):
    return write_tiny_checkpoint(tmp_path / "src", family, seed=3, **kwargs)


def test_mismatched_tensors_are_listed_together(tmp_path):
    src = _fresh(tmp_path)
    tensors = _tensors(src)
    del tensors["model.transformer.blocks.1.up_proj.weight"]
    tensors["model.transformer.blocks.0.extra.weight"] = np.zeros(3, np.float32)
    tensors["model.transformer.blocks.0.q_proj.weight"] = np.zeros((64, 32), np.float32)
    os.remove(src / "model.safetensors")
    safetensors_io.save_file(tensors, src / "model.safetensors")
    with pytest.raises(DlmjaxError) as err:
        convert(src, tmp_path / "dst", progress=False)
    message = str(err.value)
    for fragment in ("missing", "blocks.1.up_proj.weight", "unexpected", "blocks.0.extra.weight", "mis-shaped", "[64, 32]", "[64, 64]"):
        assert fragment in message
    assert "\n" not in message
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize(
    "edit,expected",
    [
        (lambda c: c.update(model_type="gpt2"), "model_type 'gpt2' is not supported"),
        (lambda c: c.update(pad_token_id=c["mask_token_id"]), "mask_token_id equals pad_token_id"),
        (lambda c: c.pop("d_model"), "lacks 'd_model'"),
    ],
)
def test_bad_configs(edit, expected, tmp_path):
    src = _fresh(tmp_path)
    config = json.loads((src / "config.json").read_text())
    edit(config)
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(DlmjaxError, match=expected):
        convert(src, tmp_path / "dst", progress=False)
    assert not (tmp_path / "dst").exists()


def test_truncated_shard_is_rejected_before_writing(tmp_path):
    src = _fresh(tmp_path, shards=2)
    shard = sorted(src.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(DlmjaxError, match="truncated"):
        convert(src, tmp_path / "dst", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_missing_sources(tmp_path):
    with pytest.raises(DlmjaxError, match="no checkpoint directory"):
        convert(tmp_path / "nope", tmp_path / "dst")
    with pytest.raises(DlmjaxError, match="hf download"):  # HF_HUB_OFFLINE=1 in the tests
        convert("no-such-org/no-such-model", tmp_path / "dst")
    with pytest.raises(DlmjaxError, match="no config.json"):
        convert(tmp_path, tmp_path / "dst")


def test_failure_leaves_nothing_half_written(tmp_path, monkeypatch):
    src = _fresh(tmp_path)
    real = checkpoint.write_group
    calls = []

    def failing(path, group, tree):
        calls.append(group)
        if len(calls) == 2:
            raise OSError("disk full")
        real(path, group, tree)

    monkeypatch.setattr(checkpoint, "write_group", failing)
    with pytest.raises(OSError):
        convert(src, tmp_path / "dst", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_existing_destination_needs_overwrite(tmp_path):
    src = _fresh(tmp_path)
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "keep.txt").write_text("mine")
    with pytest.raises(DlmjaxError, match="already exists"):
        convert(src, tmp_path / "dst", progress=False)
    assert (tmp_path / "dst" / "keep.txt").read_text() == "mine"
    convert(src, tmp_path / "dst", progress=False, overwrite=True)
    assert checkpoint.is_converted(tmp_path / "dst") and not (tmp_path / "dst" / "keep.txt").exists()


def test_pickled_weights_need_opt_in(tmp_path, hf_checkpoint):
    src = _fresh(tmp_path, dtype="bfloat16")
    tensors = {n: torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16) for n, a in _tensors(src).items()}
    for f in src.glob("*.safetensors"):
        f.unlink()
    torch.save(tensors, src / "pytorch_model.bin")
    with pytest.raises(DlmjaxError, match="allow-pickle"):
        convert(src, tmp_path / "dst", progress=False)
    convert(src, tmp_path / "dst", progress=False, allow_pickle=True)
    exported = _tensors(export(tmp_path / "dst", tmp_path / "back"))
    for name, t in tensors.items():
        np.testing.assert_array_equal(exported[name].view(np.int16), t.view(torch.int16).numpy())


def test_cli(tmp_path):
    src = _fresh(tmp_path)
    run = [sys.executable, "-m", "dlmjax.convert"]
    ok = subprocess.run(run + [str(src), str(tmp_path / "dst"), "--no-progress"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert checkpoint.is_converted(tmp_path / "dst")
    back = subprocess.run(run + ["--export", str(tmp_path / "dst"), str(tmp_path / "hf")], capture_output=True, text=True)
    assert back.returncode == 0, back.stderr
    bad = subprocess.run(run + [str(tmp_path / "missing"), str(tmp_path / "x")], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: no checkpoint directory") and "Traceback" not in bad.stderr


# -- LoRA adapters -----------------------------------------------------------------

LLADA_TARGETS = ("q_proj", "k_proj", "v_proj", "attn_out")


def _write_adapter(directory, base_dir, targets=LLADA_TARGETS, rank=4, alpha=8, base_name=None, in_dim=None, seed=0):
    """A PEFT-format adapter for a tiny base: names base_model.model.<module>.lora_{A,B}.weight."""
    rng = np.random.default_rng(seed)
    tensors = {}
    base = _tensors(base_dir)
    for name, weight in base.items():
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module.split(".")[-1] in targets:
            d_out, d_in = weight.shape
            tensors[f"base_model.model.{module}.lora_A.weight"] = (0.3 * rng.standard_normal((rank, in_dim or d_in))).astype(np.float32)
            tensors[f"base_model.model.{module}.lora_B.weight"] = (0.3 * rng.standard_normal((d_out, rank))).astype(np.float32)
    directory.mkdir(parents=True)
    safetensors_io.save_file(tensors, directory / "adapter_model.safetensors")
    (directory / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": list(targets), "bias": "none",
        "base_model_name_or_path": base_name or str(base_dir), "lora_dropout": 0.0,
    }))
    return directory, tensors


def _merged_reference(base_dir, adapter_tensors, scale, out_dir):
    """The base checkpoint with W + scale * B @ A written out, for the PyTorch reference."""
    shutil.copytree(base_dir, out_dir)
    tensors = _tensors(base_dir)
    for name in list(tensors):
        key = f"base_model.model.{name.removesuffix('.weight')}.lora_A.weight"
        if key in adapter_tensors:
            b = adapter_tensors[key.replace("lora_A", "lora_B")]
            tensors[name] = (tensors[name] + scale * (b @ adapter_tensors[key])).astype(np.float32)
    for f in out_dir.glob("*.safetensors"):
        f.unlink()
    (out_dir / "model.safetensors.index.json").unlink(missing_ok=True)
    safetensors_io.save_file(tensors, out_dir / "model.safetensors")
    return out_dir


def test_lora_merge_and_keep_match_the_merged_reference(tmp_path):
    base = _fresh(tmp_path)
    adapter, a_tensors = _write_adapter(tmp_path / "adapter", base)
    ref_dir = _merged_reference(base, a_tensors, 8 / 4, tmp_path / "merged")
    model, family = load_reference(ref_dir, torch.float32)
    ref = reference_logits(model, family, IDS)
    assert np.abs(ref - reference_logits(*load_reference(base, torch.float32), IDS)).max() > 1e-2  # the adapter matters

    merged = dlmjax.load(convert(base, tmp_path / "m", adapter=adapter, progress=False))
    assert merged.lora is None
    assert np.abs(merged.logits(IDS) - ref).max() <= 1e-4

    kept = dlmjax.load(convert(base, tmp_path / "k", adapter=adapter, lora="keep", progress=False))
    assert kept.lora is not None and kept.lora.targets == ("q_proj", "k_proj", "v_proj", "o_proj") and kept.lora.rank == 4
    assert np.abs(kept.logits(IDS) - ref).max() <= 1e-4
    # exporting the kept adapter merges it: the weights equal the merged reference
    exported, want = _tensors(export(tmp_path / "k", tmp_path / "k-hf")), _tensors(ref_dir)
    for name in want:
        np.testing.assert_allclose(exported[name], want[name], atol=1e-5, rtol=0)


def test_lora_through_load(tmp_path):
    base = _fresh(tmp_path)
    adapter, _ = _write_adapter(tmp_path / "adapter", base)
    plain = dlmjax.load(base)
    kept = dlmjax.load(base, adapter=adapter, lora="keep")
    assert kept.lora is not None and np.abs(kept.logits(IDS) - plain.logits(IDS)).max() > 1e-2


def test_lora_for_another_base_is_rejected(tmp_path):
    base = _fresh(tmp_path)
    adapter, _ = _write_adapter(tmp_path / "wide", base, in_dim=32)
    with pytest.raises(DlmjaxError, match="does not fit this llada base model"):
        convert(base, tmp_path / "dst", adapter=adapter, progress=False)
    dream_base = write_tiny_checkpoint(tmp_path / "dream", "dream", num_heads=4, num_kv_heads=2)
    dream_adapter, _ = _write_adapter(tmp_path / "dream-adapter", dream_base, targets=("q_proj", "o_proj"))
    with pytest.raises(DlmjaxError, match="matches no projection of the base model"):
        convert(base, tmp_path / "dst", adapter=dream_adapter, progress=False)
    named, _ = _write_adapter(tmp_path / "named", base, base_name="GSAI-ML/LLaDA-8B-Instruct")
    from dlmjax.convert.lora import read_adapter
    from dlmjax.config import from_hf_config

    cfg = from_hf_config(json.loads((base / "config.json").read_text()))
    with pytest.raises(DlmjaxError, match="trained on GSAI-ML/LLaDA-8B-Instruct"):
        read_adapter(named, cfg, "GSAI-ML/LLaDA-8B-Base")
    assert not (tmp_path / "dst").exists()


def test_an_ar_checkpoint_becomes_block_diffusion(tmp_path, capsys):
    """`--to-block-diffusion`: the Qwen2 weights unchanged under Fast-dLLM v2's model type, bd_size
    and a mask token (the tokenizer's own, else |<MASK>| added at the next id); bad sources refused."""
    import jax

    from dlmjax.convert.__main__ import main
    from dlmjax.convert.block_diffusion import to_block_diffusion
    from dlmjax.testing import write_tiny_checkpoint
    from dlmjax.tokenizer import load_tokenizer

    assert main(["tiny-ar", str(tmp_path / "bd"), "--to-block-diffusion", "8"]) == 0
    ar, bd = dlmjax.load("tiny-ar", progress=False), dlmjax.load(tmp_path / "bd", progress=False)
    assert (bd.config.family, bd.config.bd_size, bd.config.mask_token_id) == ("fast_dllm_v2", 8, ar.tokenizer.mask_token_id)
    for x, y in zip(jax.tree.leaves(ar.state), jax.tree.leaves(bd.state)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    config = json.loads((tmp_path / "bd" / "config.json").read_text())
    assert config["architectures"] == ["Fast_dLLM_QwenForCausalLM"] and config["converted_from"]["mask_token_added"] is False
    out = bd.generate(["Sort: 3 1 2"], method="fast-dllm-v2", chat=True, gen_length=16)
    assert out.tokens.shape == (1, 16) and bd.config.mask_token_id not in out.tokens

    # a Qwen2 tokenizer without a mask token gets |<MASK>| at the next free id
    src = write_tiny_checkpoint(tmp_path / "qwen", "qwen2", vocab_size=160)  # its tokenizer fills the 160 rows:
    small = write_tiny_checkpoint(tmp_path / "small", "qwen2", vocab_size=128)  # take one of 128 tokens
    for p in small.iterdir():
        if p.name.startswith("tokeniz"):
            shutil.copy(p, src / p.name)
    before = len(load_tokenizer(src))
    assert before < 160
    to_block_diffusion(src, tmp_path / "qbd", bd_size=4)
    tok = load_tokenizer(tmp_path / "qbd")
    assert tok.mask_token == "|<MASK>|" and tok.mask_token_id == before == dlmjax.load(tmp_path / "qbd", progress=False).config.mask_token_id
    assert tok.encode("|<MASK>|", add_special_tokens=False) == [before]

    with pytest.raises(DlmjaxError, match="takes an autoregressive Qwen2 checkpoint"):
        to_block_diffusion("tiny-llada", tmp_path / "x")
    with pytest.raises(DlmjaxError, match="exists; pass overwrite=True"):
        to_block_diffusion("tiny-ar", tmp_path / "bd")
    with pytest.raises(DlmjaxError, match="bd_size must be a positive integer"):
        to_block_diffusion("tiny-ar", tmp_path / "y", bd_size=0)
    with pytest.raises(DlmjaxError, match="outside the embedding's"):
        to_block_diffusion(small, tmp_path / "z")
    assert not (tmp_path / "x").exists() and not (tmp_path / "z").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # nothing half-written


def test_an_ar_checkpoint_becomes_dream(tmp_path):
    """`--to-dream` (Dream 7B's start: Qwen2.5's weights): the weights unchanged under Dream's model
    type, bidirectional attention and shifted logits; the tokenizer's mask token, else <|mask|> added."""
    import jax

    from dlmjax.convert.__main__ import main
    from dlmjax.convert.block_diffusion import to_dream

    assert main(["tiny-ar", str(tmp_path / "dream"), "--to-dream"]) == 0
    ar, dream = dlmjax.load("tiny-ar", progress=False), dlmjax.load(tmp_path / "dream", progress=False)
    assert (dream.config.family, dream.config.shifted_logits, dream.config.mask_token_id) == ("dream", True, ar.tokenizer.mask_token_id)
    for x, y in zip(jax.tree.leaves(ar.state), jax.tree.leaves(dream.state)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    config = json.loads((tmp_path / "dream" / "config.json").read_text())
    assert config["architectures"] == ["DreamModel"] and "bd_size" not in config
    # bidirectional: a later token changes an earlier position's logits (it cannot under the AR model)
    ids = np.asarray([[5, 6, 7, 8]]), np.asarray([[5, 6, 7, 9]])
    a, b = (np.asarray(dream.logits(x)) for x in ids)
    assert not np.allclose(a[0, 0], b[0, 0])
    a, b = (np.asarray(ar.logits(x)) for x in ids)
    np.testing.assert_allclose(a[0, :3], b[0, :3], rtol=1e-5, atol=1e-5)
    out = dream.generate(["Sort: 3 1 2"], method="dream", chat=True, gen_length=8, steps=8)
    assert out.tokens.shape == (1, 8) and dream.config.mask_token_id not in out.tokens
    with pytest.raises(DlmjaxError, match="the Dream conversion takes an autoregressive Qwen2 checkpoint"):
        to_dream("tiny-llada", tmp_path / "x")
    assert main(["tiny-ar", str(tmp_path / "y"), "--to-dream", "--export"]) == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
