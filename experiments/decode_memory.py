"""Decode peak memory at LLaDA-8B shapes: dlmjax.memory's estimate vs XLA's memory_analysis.

    python experiments/decode_memory.py                 # LLaDA-8B: 32 layers, bf16, prompt 128, gen 256, block 32
    python experiments/decode_memory.py --layers 4      # fewer layers (faster), same widths
    python experiments/decode_memory.py --json out.json

For batch 1 and 8 and every cache (none, prefix, dual, block), the decode program
(`dlmjax.decode.engine.run`, Fast-dLLM's threshold rule; the block cache under
prompt-block-causal attention) is lowered and compiled from abstract shapes only
(`jax.ShapeDtypeStruct` inputs, `nnx.eval_shape` for the model): no weights are made and nothing
runs, so a CPU host compiles the 8B program in seconds. measured = argument + output + temp -
alias of `compiled.memory_analysis()`; the estimate is `dlmjax.memory.decode_memory` with
platform="cpu" (which adds the weight copies XLA's CPU backend keeps without a cache).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from dlmjax.config import ModelConfig  # noqa: E402
from dlmjax.memory import compile_abstract_decode, compiled_bytes, decode_memory  # noqa: E402

CACHES = ("none", "prefix", "dual", "block")


def llada_8b(layers: int = 32) -> ModelConfig:
    """LLaDA-8B-Instruct's shapes (config.json of GSAI-ML/LLaDA-8B-Instruct)."""
    return ModelConfig(
        family="llada", vocab_size=126464, hidden_size=4096, num_layers=layers, num_heads=32, num_kv_heads=32,
        head_dim=128, intermediate_size=12288, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=4096,
        qkv_bias=False, tie_word_embeddings=False, mask_token_id=126336, pad_token_id=126081, eos_token_id=126081,
        eot_token_id=126348, dtype="bfloat16",
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--prompt-length", type=int, default=128)
    parser.add_argument("--gen-length", type=int, default=256)
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    cfg = llada_8b(args.layers)
    shape = dict(prompt_length=args.prompt_length, gen_length=args.gen_length, block_length=args.block_length)
    gib = 2**30
    print(f"LLaDA-8B shapes, {args.layers} layers, bf16, prompt {args.prompt_length}, gen {args.gen_length}, "
          f"block {args.block_length}; GiB per device (one CPU device)")
    print(f"{'batch':>5} {'cache':>6} {'measured':>9} {'estimate':>9} {'ratio':>6} {'params':>7} {'kv':>6} {'activ':>6} "
          f"{'cpu-copy':>8} {'compile s':>9}")
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        for cache in CACHES:
            start = time.perf_counter()
            measured = compiled_bytes(compile_abstract_decode(cfg, batch=batch, cache=cache, **shape))
            seconds = time.perf_counter() - start
            est = decode_memory(cfg, batch=batch, cache=cache, platform="cpu", **shape)
            row = dict(batch=batch, cache=cache, measured=measured, estimate=est.total, ratio=est.total / measured,
                       parameters=est.parameters, kv_cache=est.cache, activations=est.activations,
                       cpu_copies=est.relayout, compile_seconds=seconds)
            rows.append(row)
            print(f"{batch:>5} {cache:>6} {measured / gib:>9.2f} {est.total / gib:>9.2f} {row['ratio']:>6.2f} "
                  f"{est.parameters / gib:>7.2f} {est.cache / gib:>6.2f} {est.activations / gib:>6.2f} "
                  f"{est.relayout / gib:>8.2f} {seconds:>9.1f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(layers=args.layers, **shape, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
