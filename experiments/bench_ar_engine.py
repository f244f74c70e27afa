"""Greedy AR decoding as a composition of the diffusion engine, against `dlmjax.decode.ar`.

    python experiments/bench_ar_engine.py [--batch 1 4] [--gen-length 32] [--repeats 5]

Issue 12 asks whether the engine can express autoregressive decoding: blocks of one token
(`SemiAR(block_length=1, steps=gen_length)`), the exact block cache under block-causal
attention with blocks of one (= causal), the quota rule (one token a step: the argmax), and
`stop_at_eos`. On the embedded `tiny-ar` (family qwen2) this script decodes the task suite's
test prompts both ways, checks that the answers agree up to each row's first stop token, and
times both (the fastest of `--repeats` calls, compilation excluded).

What differs by construction: the engine's exact cache re-feeds the previous token with the
current one (a window of 2 queries a step: it rewrites the previous block's K/V from its final
token, which a one-token block never needs), carries its [B, G] statistics through the loop and
fills a stopped row with EOS where `ar` fills the pad id. The AR model has no mask token, so an
id that never occurs in the answers stands in for it (its logit is -inf in the engine).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import dlmjax  # noqa: E402
import tasks  # noqa: E402
from dlmjax.decode import engine  # noqa: E402
from dlmjax.decode.api import _bucket, _prepare_prompts, resolve_stops  # noqa: E402
from dlmjax.decode.method import compose  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--gen-length", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    lm = dlmjax.load("tiny-ar", dtype="float32", progress=False)
    cfg = lm.config
    g = args.gen_length
    examples = tasks.make_split("test", max(args.batch))
    prompts = [lm.apply_chat_template([{"role": "user", "content": e.prompt}]) for e in examples]
    stops = resolve_stops(cfg, None)
    method = compose(dict(rule="quota", gen_length=g, block_length=1, steps=g, cache="block", attention="block_causal",
                          stop_at_eos=True), set(), "ar-as-engine")
    print(f"tiny-ar, gen_length {g}, float32, {jax.default_backend()}; fastest of {args.repeats} calls")
    print("| batch | ar tokens/s | engine tokens/s | engine / ar | ar NFE | engine NFE | answers equal |")
    print("|---|---|---|---|---|---|---|")
    for b in args.batch:
        ar = [lm.generate(prompts[:b], gen_length=g) for _ in range(args.repeats + 1)]
        best_ar = min(ar[1:], key=lambda r: r.seconds)
        ids, mask = _prepare_prompts(lm, prompts[:b], None, False)
        ids, mask = _bucket(ids, mask, 32, cfg.max_position_embeddings - g)
        stand_in = next(t for t in range(cfg.vocab_size - 1, -1, -1) if t not in best_ar.tokens and t not in stops)
        tokens = engine.Tokens(mask=stand_in, eos=cfg.eos_token_id, eot=cfg.eot_token_id, stops=stops)
        batch = engine.Batch(jax.numpy.asarray(ids), jax.numpy.asarray(mask), tokens)
        compiled = engine.run.lower(lm.graphdef, lm.state, batch, method.traced(), jax.random.key(0)).compile()
        times, out = [], None
        for _ in range(args.repeats + 1):
            start = time.perf_counter()
            out = jax.block_until_ready(compiled(lm.state, batch, method.traced(), jax.random.key(0)))
            times.append(time.perf_counter() - start)
        seconds = min(times[1:])
        got = np.asarray(out.tokens)
        equal = all(np.array_equal(got[r, :n], best_ar.tokens[r, :n]) for r, n in enumerate(best_ar.lengths))
        produced = int(best_ar.lengths.sum())
        ar_rate, engine_rate = produced / best_ar.seconds, produced / seconds
        print(f"| {b} | {ar_rate:.0f} | {engine_rate:.0f} | {engine_rate / ar_rate:.2f} | {best_ar.nfe.mean():.1f} | "
              f"{np.asarray(out.nfe).mean():.1f} | {equal} |")


if __name__ == "__main__":
    main()
