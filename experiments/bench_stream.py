"""Benchmark: what streaming costs. `lm.stream` runs lm.generate's program plus a host callback
whenever a row completes a block (or every pass); this times both on the same inputs.

    python experiments/bench_stream.py [--quick] [--repeats N] [--json PATH]

Model: a random LLaDA checkpoint (4 layers, hidden 256, vocab 512; `--quick`: 2 layers, hidden 128)
written by `dlmjax.testing.write_tiny_checkpoint`. For each method (llada with blocks of 32,
fast-dllm dual cache at threshold 0.9 with blocks of 32) and batch size (1, 8), prompt 32 random
ids, gen_length 128, temperature 0: one warm-up call of each (compiles), then `--repeats` timed
calls, fastest kept. Reported: generate seconds, stream seconds (first next() to the last update,
every="block" and every="step"), callbacks received, the cost per callback
((stream - generate) / callbacks, ms) and per block of the answer, and whether the streamed tokens equal
generate's. Time to the first update is printed too (what a reader of a stream waits for).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import tempfile
import time

import jax
import numpy as np

import dlmjax
from dlmjax.convert import convert
from dlmjax.testing import write_tiny_checkpoint

METHODS = {
    "llada": dict(method="llada", block_length=32, steps=128),
    "fast-dllm/dual": dict(method="fast-dllm", block_length=32, threshold=0.9, cache="dual"),
}


def timed_stream(lm, prompt, kwargs, every):
    start = time.perf_counter()
    first, n = None, 0
    for update in lm.stream(prompt, every=every, **kwargs):
        if first is None:
            first = time.perf_counter() - start
        n += 0 if update.final else 1
    return time.perf_counter() - start, first, n, update.output


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=pathlib.Path)
    args = parser.parse_args(argv)
    size = (dict(num_layers=2, hidden_size=128, num_heads=4, num_kv_heads=4, intermediate_size=256) if args.quick else
            dict(num_layers=4, hidden_size=256, num_heads=4, num_kv_heads=4, intermediate_size=512))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        hf = write_tiny_checkpoint(tmp / "hf", "llada", seed=0, vocab_size=512, max_positions=1024, **size)
        convert(hf, tmp / "converted", progress=False)
        lm = dlmjax.load(tmp / "converted", progress=False)
        rng = np.random.default_rng(0)
        for name, knobs in METHODS.items():
            for batch in (1, 8):
                prompt = rng.integers(10, 500, size=(batch, 32)).tolist()
                kwargs = dict(knobs, gen_length=128)
                want = lm.generate(prompt, **kwargs)
                generate_s = min(lm.generate(prompt, **kwargs).seconds for _ in range(args.repeats))
                row = dict(method=name, batch=batch, generate_s=generate_s, passes=want.steps)
                for every in ("block", "step"):
                    timed_stream(lm, prompt, kwargs, every)  # compiles
                    runs = [timed_stream(lm, prompt, kwargs, every) for _ in range(args.repeats)]
                    seconds, first, n, out = min(runs, key=lambda r: r[0])
                    row[every] = dict(stream_s=seconds, first_update_s=first, updates=n,
                                      cost_per_update_ms=1e3 * (seconds - generate_s) / max(n, 1),
                                      same_tokens=bool(np.array_equal(out.tokens, want.tokens)))
                rows.append(row)
                print(json.dumps(row), flush=True)
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores ({jax.devices()[0].platform}), jax {jax.__version__}"
    print(f"\n{machine}; model {size}; gen_length 128, prompt 32, fastest of {args.repeats}\n")
    print("| method | batch | passes | generate s | stream (block) s | updates | ms per update | first update s | "
          "stream (step) s | updates | ms per update | same tokens |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        b, s = r["block"], r["step"]
        print(f"| {r['method']} | {r['batch']} | {r['passes']} | {r['generate_s']:.3f} | {b['stream_s']:.3f} | {b['updates']} | "
              f"{b['cost_per_update_ms']:.2f} | {b['first_update_s']:.3f} | {s['stream_s']:.3f} | {s['updates']} | "
              f"{s['cost_per_update_ms']:.2f} | {b['same_tokens'] and s['same_tokens']} |")
    if args.json:
        args.json.write_text(json.dumps(dict(machine=machine, size=size, rows=rows), indent=1))


if __name__ == "__main__":
    main()
