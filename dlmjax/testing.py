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

from dlmjax.config import from_hf_config
from dlmjax.tokenizer import default_chat_template

_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}

# Special tokens per family, placed at the end of the tiny vocabulary.
_SPECIALS = {
    "llada": ["<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"],
    "dream": ["<|beginoftext|>", "<|endoftext|>", "<|mask|>", "<|im_end|>", "<|im_start|>"],
    "fast_dllm_v2": ["<|beginoftext|>", "<|endoftext|>", "|<MASK>|", "<|im_end|>", "<|im_start|>"],
    "qwen2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],  # autoregressive: no mask token
}
_BOS_MASK = {  # (bos, mask) token names; Qwen2's tokenizer has neither
    "llada": ("<|startoftext|>", "<|mdm_mask|>"),
    "dream": ("<|beginoftext|>", "<|mask|>"),
    "fast_dllm_v2": ("<|beginoftext|>", "|<MASK>|"),
    "qwen2": (None, None),
}
_CHARS = list(string.printable[:95]) + ["\n"]  # printable ASCII (space included) and newline


def tiny_hf_config(family: str = "llada", *, vocab_size: int = 128, hidden_size: int = 64, num_layers: int = 2,
                   num_heads: int = 4, num_kv_heads: int | None = None, intermediate_size: int = 128,
                   max_positions: int = 512, tie_word_embeddings: bool = False, dtype: str = "float32",
                   rope_theta: float | None = None) -> dict:
    """A config.json dict of the real family's format, scaled down."""
    specials = _SPECIALS[family]
    first = vocab_size - len(specials)
    if first < len(_CHARS):
        raise ValueError(f"vocab_size must be at least {len(_CHARS) + len(specials)}")
    ids = {name: first + i for i, name in enumerate(specials)}
    if family == "llada":
        return {
            "model_type": "llada", "architectures": ["LLaDAModelLM"], "d_model": hidden_size, "n_heads": num_heads,
            "n_kv_heads": num_kv_heads or num_heads, "n_layers": num_layers, "mlp_hidden_size": intermediate_size,
            "mlp_ratio": 4, "vocab_size": vocab_size, "embedding_size": vocab_size, "rope": True,
            "rope_theta": rope_theta or 500000.0, "rope_full_precision": True, "rms_norm_eps": 1e-5,
            "layer_norm_type": "rms", "block_type": "llama", "activation_type": "silu", "include_bias": False,
            "include_qkv_bias": False, "alibi": False, "attention_layer_norm": False,
            "weight_tying": tie_word_embeddings, "max_sequence_length": max_positions, "torch_dtype": dtype,
            "mask_token_id": ids["<|mdm_mask|>"], "eos_token_id": ids["<|endoftext|>"],
            "pad_token_id": ids["<|endoftext|>"],
        }
    if family == "qwen2":
        # Qwen2.5's config keys; eot_token_id is ours (Qwen ships <|im_end|> in generation_config.json)
        return {
            "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": hidden_size,
            "num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads or num_heads,
            "num_hidden_layers": num_layers, "intermediate_size": intermediate_size, "hidden_act": "silu",
            "vocab_size": vocab_size, "rope_theta": rope_theta or 1000000.0, "rms_norm_eps": 1e-6,
            "max_position_embeddings": max_positions, "tie_word_embeddings": tie_word_embeddings, "torch_dtype": dtype,
            "use_sliding_window": False, "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|endoftext|>"],
            "eot_token_id": ids["<|im_end|>"],
        }
    mask_name = _BOS_MASK[family][1]
    config = {
        "model_type": "Dream" if family == "dream" else "Fast_dLLM_Qwen",
        "architectures": ["DreamModel" if family == "dream" else "Fast_dLLM_QwenForCausalLM"],
        "hidden_size": hidden_size, "num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads or num_heads,
        "num_hidden_layers": num_layers, "intermediate_size": intermediate_size, "hidden_act": "silu",
        "vocab_size": vocab_size, "rope_theta": rope_theta or 1000000.0, "rms_norm_eps": 1e-6,
        "max_position_embeddings": max_positions, "tie_word_embeddings": tie_word_embeddings, "torch_dtype": dtype,
        "mask_token_id": ids[mask_name], "pad_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|endoftext|>"],
        "bos_token_id": ids["<|beginoftext|>"],
    }
    if family == "fast_dllm_v2":
        config["bd_size"] = 32
    return config


def random_weights(hf_config: dict, seed: int = 0, std: float = 0.2) -> dict[str, np.ndarray]:
    """Gaussian weights for every tensor the config needs (norm weights near 1)."""
    from dlmjax.convert.layouts import tensor_specs

    cfg = from_hf_config(hf_config)
    rng = np.random.default_rng(seed)
    out = {}
    for spec in tensor_specs(cfg):
        if spec.hf_name.endswith("norm.weight") or spec.hf_name.endswith("ln_f.weight"):
            value = 1.0 + 0.1 * rng.standard_normal(spec.shape)
        else:
            value = std * rng.standard_normal(spec.shape)
        out[spec.hf_name] = value.astype(_DTYPES[cfg.dtype])
    return out


def write_tokenizer(directory: pathlib.Path, hf_config: dict) -> None:
    """A character-level tokenizers JSON with the family's special tokens at their config ids."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    family = from_hf_config(hf_config).family
    specials = _SPECIALS[family]
    vocab_size = hf_config["vocab_size"]
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
    eos = "<|endoftext|>"
    bos, mask = _BOS_MASK[family]
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos, "pad_token": eos,
        "mask_token": mask, "unk_token": None, "add_bos_token": False, "add_eos_token": False,
        "padding_side": "left", "model_max_length": hf_config.get("max_sequence_length", hf_config.get("max_position_embeddings")),
        "chat_template": default_chat_template(family),
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")


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
    parser.add_argument("--family", choices=sorted(_SPECIALS), default="llada")
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
