"""Cached against uncached decoding: NFE, per-step latency and tokens/s on a tiny model.

    python experiments/bench_cache.py [--quick]

Builds a random LLaDA-layout checkpoint (and a Dream one), converts it, and decodes the
same prompts with cache none / prefix / dual under bidirectional attention, and none /
block under D2F's block-causal attention. Compilation is excluded (one warm-up call).
Prints a markdown table; a benchmark, never a test.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile

import jax
import numpy as np

import dlmjax
from dlmjax.convert import convert
from dlmjax.testing import write_tiny_checkpoint

CASES = [
    ("llada", dict(method="llada"), ["none", "prefix", "dual"]),
    ("fast-dllm 0.9", dict(method="fast-dllm", threshold=0.9), ["none", "prefix", "dual"]),
    ("dparallel 0.5", dict(method="dparallel", threshold=0.5), ["none", "prefix", "dual"]),
    ("sched exp", dict(method="sched", schedule="exp", tau_low=0.0), ["none", "dual"]),
    ("fast-dllm 0.9, D2F mask", dict(method="fast-dllm", threshold=0.9, attention="prompt_block_causal"), ["none", "block"]),
]


def run(lm, prompts, repeats: int, **kwargs):
    lm.generate(prompts, **kwargs)  # compile
    best = None
    for _ in range(repeats):
        out = lm.generate(prompts, **kwargs)
        best = out if best is None or out.seconds < best.seconds else best
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller model and fewer repeats")
    parser.add_argument("--family", default="llada", choices=("llada", "dream"))
    args = parser.parse_args()
    hidden, layers, gen = (128, 2, 64) if args.quick else (256, 4, 128)
    work = tempfile.mkdtemp(prefix="dlmjax-bench-cache-")
    try:
        hf = write_tiny_checkpoint(
            os.path.join(work, "hf"), args.family, num_layers=layers, hidden_size=hidden, num_heads=4,
            intermediate_size=2 * hidden, vocab_size=512, max_positions=1024,
        )
        lm = dlmjax.load(convert(hf, os.path.join(work, "jax"), progress=False))
        rng = np.random.default_rng(0)
        prompts = rng.integers(0, 400, (2, 64)).tolist()
        repeats = 2 if args.quick else 3
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__} "
              f"({jax.default_backend()}); {args.family} {layers} layers x {hidden}, batch 2, prompt 64, gen {gen}, block 32")
        print()
        print("| method | cache | mean NFE | decode s | ms / step | tokens/s | speedup vs none | same tokens as none |")
        print("|---|---|---|---|---|---|---|---|")
        for name, kwargs, caches in CASES:
            base = None
            for cache in caches:
                out = run(lm, prompts, repeats, gen_length=gen, block_length=32, cache=cache, **kwargs)
                tokens_per_s = out.tokens.size / out.seconds
                base = base or out
                same = float((out.tokens == base.tokens).mean())
                print(f"| {name} | {cache} | {out.nfe.mean():.1f} | {out.seconds:.3f} | {1000 * out.seconds / out.steps:.2f} | "
                      f"{tokens_per_s:.0f} | {base.seconds / out.seconds:.2f}x | {same:.0%} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
