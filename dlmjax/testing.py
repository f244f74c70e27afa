"""Tiny random checkpoints in the exact Hugging Face layouts, built with numpy alone.

Tests, examples and benchmarks use these in place of hub downloads:

    python -m dlmjax.testing DIR --family llada

writes config.json, safetensors weights (sharded on request) and a character-level
tokenizer with the family's special tokens and chat template.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import string

import ml_dtypes
import numpy as np

from dlmjax import families
from dlmjax.config import from_hf_config

_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
_CHARS = list(string.printable[:95]) + ["\n"]  # printable ASCII (space included) and newline


def tiny_hf_config(family: str = "llada", *, vocab_size: int = 128, hidden_size: int = 64, num_layers: int = 2,
                   num_heads: int = 4, num_kv_heads: int | None = None, intermediate_size: int = 128,
                   max_positions: int = 512, tie_word_embeddings: bool = False, dtype: str = "float32",
                   rope_theta: float | None = None) -> dict:
    """A config.json dict of the real family's format, scaled down; its special tokens end the vocabulary."""
    spec = families.get(family)
    tiny, keys = spec.tiny, spec.config_keys
    first = vocab_size - len(tiny.special_tokens)
    if first < len(_CHARS):
        raise ValueError(f"vocab_size must be at least {len(_CHARS) + len(tiny.special_tokens)}")
    ids = {name: first + i for i, name in enumerate(tiny.special_tokens)}
    config = {
        "model_type": spec.model_types[0],
        "architectures": list(spec.architectures),
        keys.hidden_size: hidden_size,
        keys.num_heads: num_heads,
        keys.num_kv_heads: num_kv_heads or num_heads,
        keys.num_layers: num_layers,
        keys.intermediate_size: intermediate_size,
        **{key: vocab_size for key in keys.vocab_size},
        keys.rope_theta: rope_theta or tiny.rope_theta,
        keys.rms_norm_eps: spec.rms_norm_eps,
        keys.max_position_embeddings: max_positions,
        keys.tie_word_embeddings: tie_word_embeddings,
        "torch_dtype": dtype,
    }
    if keys.qkv_bias is not None:
        config[keys.qkv_bias] = spec.qkv_bias
    if keys.bd_size is not None:
        config[keys.bd_size] = spec.bd_size
    config.update(tiny.extra_config)
    config.update({key: ids[token] for key, token in tiny.config_ids})
    return config


def random_weights(hf_config: dict, seed: int = 0, std: float = 0.2) -> dict[str, np.ndarray]:
    """Gaussian weights for every tensor the config needs (norm weights near 1)."""
    from dlmjax.convert.layouts import tensor_specs

    cfg = from_hf_config(hf_config)
    rng = np.random.default_rng(seed)
    out = {}
    for spec in tensor_specs(cfg):
        if spec.is_norm:
            value = 1.0 + 0.1 * rng.standard_normal(spec.shape)
        else:
            value = std * rng.standard_normal(spec.shape)
        out[spec.hf_name] = value.astype(_DTYPES[cfg.dtype])
    return out


def write_tokenizer(directory: pathlib.Path, hf_config: dict) -> None:
    """A character-level tokenizers JSON with the family's special tokens at their config ids."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    cfg = from_hf_config(hf_config)
    tiny = cfg.family_spec.tiny
    specials = list(tiny.special_tokens)
    vocab_size = cfg.vocab_size
    vocab = {ch: i for i, ch in enumerate(_CHARS)}
    first_special = vocab_size - len(specials)
    for i in range(len(_CHARS), first_special):
        vocab[f"<|unused_{i}|>"] = i
    for i, name in enumerate(specials):
        vocab[name] = first_special + i
    tok = Tokenizer(models.WordLevel(vocab, unk_token=" "))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(specials)
    tok.save(str(directory / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tiny.bos_token, "eos_token": tiny.eos_token,
        "pad_token": tiny.eos_token, "mask_token": tiny.mask_token, "unk_token": None, "add_bos_token": False,
        "add_eos_token": False, "padding_side": "left", "model_max_length": cfg.max_position_embeddings,
        "chat_template": cfg.family_spec.chat_template,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    from dlmjax.tokenizer import pin_tokenizer_json

    pin_tokenizer_json(directory)  # plain transformers would swap in Qwen2Tokenizer for qwen2


def write_tiny_checkpoint(directory, family: str = "llada", *, seed: int = 0, shards: int = 1, tokenizer: bool = True,
                          **config_kwargs) -> pathlib.Path:
    """Write a random tiny checkpoint of `family` in the Hugging Face layout."""
    from dlmjax.convert import safetensors_io

    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hf_config = tiny_hf_config(family, **config_kwargs)
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    weights = random_weights(hf_config, seed)
    total = sum(w.nbytes for w in weights.values())
    specs = [(name, w.shape, w.dtype) for name, w in weights.items()]
    limit = total if shards <= 1 else -(-total // shards)
    safetensors_io.save_sharded(specs, weights.__getitem__, directory, max_shard_bytes=max(limit, 1), metadata={"format": "pt"})
    if tokenizer:
        write_tokenizer(directory, hf_config)
    return directory


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dlmjax.testing", description="Write a tiny random HF checkpoint.")
    parser.add_argument("directory")
    parser.add_argument("--family", choices=sorted(families.FAMILIES), default="llada")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int)
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = write_tiny_checkpoint(
        args.directory, args.family, seed=args.seed, shards=args.shards, num_layers=args.layers,
        hidden_size=args.hidden, num_heads=args.heads, num_kv_heads=args.kv_heads, dtype=args.dtype,
    )
    print(f"wrote a tiny {args.family} checkpoint to {out}")


if __name__ == "__main__":
    main()
